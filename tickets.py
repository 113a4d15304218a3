"""tickets.py: the support-ticket task: synthetic tickets for 8-way intent classification, and how a classifier of
them is scored (minibert.py's `finetune` fine-tunes BERT on it).

The data is deterministic and written by the standard library alone. A ticket is: optional greeting, optional context
sentence, one or two core sentences of its category, sometimes a short aside from another category ("Also, ..."),
optional closer and signature, plus casing, typo and punctuation noise. Held-out phrasing: every category has two
disjoint families of core templates (and of asides/context); the 'train' split only draws from family 0 and the 'test'
split only from family 1. Slot fillers (products, amounts, dates, ...) and some label-free filler are shared, so the
test split asks for the same intents in wordings never seen in training.

The task around the data: `load_labelled` (these tickets, or a labelled Hugging Face dataset), `encode_labels` (with
a clear error for a bad row), `classification_report` (accuracy, macro-F1, confusion matrix), the bag-of-words
baseline every model is compared with, and `print_report`, the comparison table.

Run it: `python tickets.py` prints examples of each category and checks that the splits share no phrasing.
"""
import math
import random
import re
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from training import InputError

CATEGORIES = ("billing", "technical_issue", "feature_request", "account_access", "shipping", "refund", "cancellation",
              "feedback")

# Core phrasings: CORE[category] = (family 0 -> 'train', family 1 -> 'test'). {slot}s are filled in by _fill().
CORE = {
    "billing": ([
        "I was charged twice for my {plan} subscription this month.", "Why did my monthly price go up to {amount}?",
        "I need an invoice for the payment I made on {date} for my company's records.",
        "How do I update the credit card on file? My old one expired.",
        "There is a charge of {amount} on my account that I don't recognize.",
        "Is the {plan} plan paid monthly or yearly?",
        "My payment keeps getting declined even though the card works everywhere else.",
        "The invoice you sent has the wrong company name and VAT number on it.",
        "I was billed {amount} but the pricing page says the {plan} plan costs less.",
        "Please switch me from monthly to annual payments.", "I got charged a late fee but I paid on time on {date}.",
        "Can I pay with PayPal instead of a credit card?"
    ], [
        "My card statement shows two identical payments to you on {date}.",
        "The amount you took this month was {amount}, which is not what I signed up for.",
        "Could you send me a proper invoice with my business address for the last payment?",
        "Where in the settings do I change which card you debit?",
        "I see a mysterious {amount} deduction from your company in my banking app.",
        "What exactly does the {plan} tier cost per seat when billed annually?",
        "Your system says my card was rejected, but my bank says there was no attempt at all.",
        "The address printed on your billing documents is outdated, they need to be reissued.",
        "I'm being overcharged: I should still be on the discounted rate you promised me.",
        "Is there a way to get one consolidated statement for everything I paid this year?",
        "You're asking me for a penalty although my transfer went through on {date}.",
        "Do you take bank transfers or only cards?"
    ]),
    "technical_issue": ([
        "The app crashes every time I open the {feature} on my {device}.",
        "I keep getting error {error} when I try to save my work.",
        "Since the last update everything is extremely slow on my {device}.",
        "My data is not syncing between my {device} and the web version.",
        "The {feature} shows a blank white screen and never loads.",
        "Uploading files fails halfway with the message {error}.",
        "Push notifications stopped working on my {device} after the update.",
        "The page freezes when I click the export button.", "Search returns no results even for items I know exist.",
        "Changes I make in the {feature} disappear after I refresh.",
        "The app won't install on my {device}, it says the package is invalid.",
        "The website shows error {error} when I submit the form."
    ], [
        "Whenever I tap on the {feature} the whole thing closes itself and I'm back on the home screen.",
        "A red box saying {error} pops up and nothing gets stored.",
        "It takes almost a minute for anything to respond now; it used to be instant.",
        "What I edit on my laptop never shows up on my {device}.",
        "There's a bug in the {feature}: half of the buttons aren't drawn at all.",
        "Attachments bigger than a few megabytes get stuck at 90 percent and never finish.",
        "I'm not getting any alerts anymore although they're enabled.",
        "Your software locks up completely as soon as I try to print a report.",
        "My {device} lists your app as the top battery drain and it lags constantly.",
        "The results list stays empty no matter what I type into the search field.",
        "After pressing submit I just get a spinning wheel and then 'something went wrong' ({error}).",
        "The newest version crashes right at startup on my {device}, it never opens."
    ]),
    "feature_request": ([
        "It would be great if you could add {capability}.", "Are there any plans to support {capability}?",
        "Please consider adding {capability} to the {feature}.", "I'd love to see {capability} in a future version.",
        "Could you make it possible to schedule reports to be sent automatically?",
        "It would save me a lot of time if the app had {capability}.",
        "Can you add an option to choose the default currency?",
        "My team really needs {capability}, is that on the roadmap?",
        "Would it be possible to let multiple users edit the same document?",
        "I'd like to suggest a setting to hide completed items.",
        "Please add support for more languages, like Portuguese.",
        "A simple way to undo deleted entries would be really helpful."
    ], [
        "One thing missing for me is {capability}.", "Is {capability} something you'd ever build?",
        "Feature wish for the next release: {capability}.",
        "If the {feature} offered {capability} I'd use it every day.",
        "Other tools I use already have {capability}, and I miss it here.",
        "Any chance of a version that lets me pick my own colors and fonts?",
        "I'd vote for {capability} if you had a feature board.", "Can we get an API so we can connect our own systems?",
        "How about letting admins set permissions per folder?",
        "It's a shame there's no way to recover something after it's been removed.",
        "We'd happily pay extra for {capability}.",
        "Being able to sort by date would make the {feature} far more useful."
    ]),
    "account_access": ([
        "I can't log in to my account, it says my password is incorrect.", "The password reset email never arrives.",
        "My account has been locked after too many login attempts.",
        "I lost my phone and can't get the two-factor code anymore.", "I forgot which email address I used to sign up.",
        "The verification code you send me by SMS is always expired.",
        "I'm stuck in a login loop, it keeps sending me back to the sign-in page.",
        "Someone changed my password and I can't get into my account.",
        "I need to change the email on my account but I can't access the old inbox.",
        "Login with Google doesn't work for me anymore.",
        "After resetting my password it still says invalid credentials.",
        "My username is {email} and the system says the account doesn't exist."
    ], [
        "Every time I enter my password I'm told it's wrong, though I'm sure it's right.",
        "I clicked 'forgot password' three times and got nothing in my inbox or spam folder.",
        "You've blocked me after I mistyped a few times. How do I get back in?",
        "My authenticator app was on my old {device} and now I can't get past the security step.",
        "I have no idea which address my profile is registered under.",
        "The six-digit code expires before I can even type it.",
        "I sign in, the page reloads, and I'm signed out again.",
        "I think my profile was hijacked, the email on it isn't mine anymore.",
        "How do I move my profile to a new address when I no longer have the old mailbox?",
        "The 'continue with Apple' button just spins and never lets me in.",
        "I set a new password an hour ago and it's already being rejected.",
        "The login screen doesn't recognize {email} even though I've used it for years."
    ]),
    "shipping": ([
        "My order {order} still hasn't arrived and it's been {days} days.",
        "The tracking number for order {order} doesn't show any updates.",
        "Can I change the delivery address for my order? I'm moving to {city}.",
        "The package arrived damaged and the {product} is broken. Can you send a replacement?",
        "Tracking says delivered but there's nothing at my door.", "When will my {product} be shipped?",
        "Do you ship to {country}?", "I ordered a {product} but received the wrong item, please send the right one.",
        "How long does express delivery usually take?", "My package has been stuck in {city} for a week.",
        "Only part of my order arrived, the {product} is missing.",
        "The courier left my parcel with a neighbor I don't know."
    ], [
        "I'm still waiting for the {product} I ordered on {date}, where is it?",
        "{carrier} tracking hasn't moved since my parcel left your warehouse.",
        "I gave the wrong street at checkout, please redirect it to my office in {city}.",
        "The {product} came in pieces because of how it was packed. I'd like a new one sent out.",
        "The app claims my parcel was handed over, but no one rang and my mailbox is empty.",
        "Has order {order} left the warehouse yet?", "Is international delivery available to {country}?",
        "The box contained someone else's items instead of my {product}.",
        "What are the options for getting it faster? I need it by {date}.",
        "My delivery keeps being rescheduled by {carrier}.", "Two boxes were supposed to come but only one showed up.",
        "The driver left the package out in the rain and it's soaked, can you ship another?"
    ]),
    "refund": ([
        "I returned the {product} two weeks ago and still haven't received my money.",
        "I'd like a refund for order {order}, the {product} doesn't work as described.",
        "How do I return the {product}? It doesn't fit and I want my money back.",
        "I was promised {amount} back but nothing has shown up on my card.",
        "Can I get my money back for the annual plan I bought by mistake yesterday?",
        "The {product} stopped working after a few days, I want a full refund.",
        "You only paid back part of the amount, I'm still missing {amount}.",
        "I sent the item back on {date}, when will it be processed?",
        "I'd like to return my {product} within the 30-day window for my money.",
        "The event was cancelled, so I expect my {amount} back.",
        "Please give me back the shipping fee, the package arrived a week late.",
        "I was told my refund would take 5 days but it's been a month."
    ], [
        "The {product} went back to you by courier on {date}; when will I see the money again?",
        "This {product} is nothing like the photos. I want to send it back and be reimbursed.",
        "What's the refund process for something that didn't meet expectations?",
        "Your agent confirmed {amount} would be credited to my card, but it never was.",
        "I purchased the {plan} upgrade by accident, can that payment be reversed?",
        "The {product} broke within a week. I'd rather have my payment returned than a replacement.",
        "Only {amount} of the {amount} I paid came back to me.",
        "Your warehouse signed for my return package on {date}, so please release the funds.",
        "Is it too late to return the {product} and be reimbursed? I've never used it.",
        "Since you called off the workshop, I'd like the ticket price credited back.",
        "It came so late that I'd like the delivery charge refunded.",
        "Three weeks ago I was told the money was on its way back, and still nothing."
    ]),
    "cancellation": ([
        "Please cancel my {plan} subscription, I no longer need it.", "How do I close my account permanently?",
        "I want to cancel order {order} before it ships.",
        "Please make sure I'm not charged again after this month, I'm ending my membership.",
        "I'd like to stop my subscription from renewing automatically.", "Can you delete my account and all my data?",
        "I can't find the cancel button anywhere in the settings.",
        "I signed up for the free trial but don't want to continue, please cancel it.",
        "We are moving to another provider, please terminate our {plan} contract.",
        "I placed an order by mistake, can you cancel it?", "Please unsubscribe me from the monthly box.",
        "What happens to my files if I end my plan?"
    ], [
        "I've decided I'm done with the service, please end everything on my side.",
        "I want my profile and everything connected to it wiped.",
        "Order {order} was a mistake. Please stop it before it goes out.",
        "Don't renew me next cycle, this is my last month.", "Turn off auto-renew on my {plan} tier, I'm not staying.",
        "Our company won't need the licenses anymore, what's the notice period to get out of the contract?",
        "The trial ends on {date}; please cancel before it turns into a paid plan.",
        "Is there a self-service way to cancel, or do I have to go through you?",
        "I'm leaving for a competitor, so let's wrap up my membership today.",
        "I clicked 'buy' twice; please void the second purchase before it's packed.",
        "No more boxes for me after this one, please.",
        "If I shut down my workspace, can I still download my projects first?"
    ]),
    "feedback": ([
        "I just wanted to say your support team was amazing last week.", "The new design looks great, well done.",
        "Honestly, I'm disappointed with how long it took to get a reply.",
        "Your app has made my daily routine so much easier, thank you.",
        "The last update made the interface confusing and cluttered.",
        "I've recommended your service to all my friends.",
        "The quality of the {product} is excellent, much better than I expected.",
        "Your customer service agent was rude to me on the phone.",
        "Just some feedback: the checkout process feels too long.",
        "Great job on the {feature}, it's exactly what I needed.", "I love how fast the delivery was this time.",
        "The prices have gone up a lot and I'm not happy about it."
    ], [
        "Shout out to {name} in your chat team, everything was sorted in minutes.",
        "Whoever redid the look of the site deserves a raise.",
        "Waiting four days for an answer is not acceptable for a paid product.",
        "I couldn't run my shop without your tool anymore.",
        "The redesign is a step backwards, I can never find anything now.",
        "My whole office uses you now because I kept talking about it.",
        "This {product} feels solid and premium, great quality.",
        "The person I spoke to yesterday was dismissive and impatient.",
        "Quick feedback, no need to reply: there are too many steps before paying.",
        "The {feature} is a joy to use, I love it.", "Fastest delivery I've ever had from an online shop, nicely done.",
        "It's getting too expensive for what it is, to be honest."
    ]),
}

# Short clauses used as a marked aside in tickets of *other* categories (mixed intent); same family split as CORE.
MINOR = {
    "billing": (["my last invoice still shows my old address", "the website price seems to have changed"],
                ["the receipt emails come in a currency I don't use", "my statement lists a tiny extra fee"]),
    "technical_issue": (["the app is a bit slow lately", "the dashboard sometimes takes ages to load"],
                        ["search has been glitchy this week", "pages flicker when I scroll"]),
    "feature_request": (["a dark mode would be nice", "it would be cool to export to CSV"],
                        ["keyboard shortcuts would be lovely someday", "more color themes would be handy"]),
    "account_access": (["I had trouble logging in yesterday too", "the 2FA codes sometimes arrive late"],
                       ["I had to reset my password twice this month", "the sign-in page forgot me again"]),
    "shipping": (["my other order is also running late", "the tracking page was not updating"],
                 ["the last parcel came a day late too", "the courier never rings the bell"]),
    "refund": (["I'm still waiting on a refund from March", "I returned a {product} last month and heard nothing"],
               ["the money for my earlier return hasn't come back yet", "my previous return was never credited"]),
    "cancellation": (["I'm thinking about cancelling soon", "I might close my account if this continues"],
                     ["I'll probably end my plan next month", "this might be my last month with you"]),
    "feedback": (["your support has been great otherwise", "I love the new logo"],
                 ["the team has always been friendly to me", "the new colors look nice"]),
}

# Label-free filler: (used by both splits, train only, test only).
GREETINGS = (["", "", "", "", "Hi,", "Hello,", "Hi team,"], ["Dear support,", "Hey there,", "Good morning,"],
             ["To whom it may concern,", "Hello support team,", "Hey,", "Good afternoon,"])
CONTEXT = (["I've been a customer for {years} years.", "I use your service for my small business."],
           ["I'm writing from my work email.", "This is my second time writing about this.", "I'm on the {plan} plan."],
           ["I'm writing on behalf of my mother.", "I tried the help center first but found nothing.",
            "Sorry, I'm not very technical."])
ASIDES = (["Also, ", "PS: "], ["Unrelated, but ", "Oh and "], ["Side note: ", "On another note, ", "By the way, "])
CLOSERS = (["Thanks in advance.", "Please help."], ["Any help is appreciated.", "Hope you can sort this out."],
           ["Looking forward to your reply.", "Please get back to me asap."])
SIGNOFFS = (["", "", "", "Thanks,\n{name}", "Best regards,\n{name} {surname}", "-- Sent from my phone"],
            ["Cheers, {name}", "Thank you!", "{name}"], ["Kind regards, {name}", "Sent from my iPad", "Thx, {name}"])

SLOTS = {
    "product": ("wireless headphones", "standing desk", "coffee grinder", "running shoes", "phone case", "backpack",
                "smart watch", "desk lamp", "blender", "yoga mat", "bluetooth speaker", "winter jacket", "keyboard"),
    "plan": ("Basic", "Pro", "Premium", "Family", "Business", "Starter", "Team", "Plus"),
    "device": ("iPhone 13", "Pixel 7", "Galaxy S22", "iPad", "MacBook", "Windows laptop", "Chromebook", "tablet"),
    "feature": ("dashboard", "calendar view", "export tool", "reports page", "photo uploader", "settings page",
                "invoice editor", "task board", "analytics tab", "inbox"),
    "capability": ("dark mode", "export to Excel", "an offline mode", "shared calendars", "bulk editing", "custom tags",
                   "keyboard shortcuts", "recurring reminders", "home screen widgets", "Google Calendar sync",
                   "multi-currency support", "Apple Watch support", "single sign-on"),
    "carrier": ("UPS", "FedEx", "DHL", "USPS", "the courier", "Royal Mail", "DPD"),
    "city": ("Denver", "Leeds", "Toronto", "Lyon", "Austin", "Melbourne", "Dublin", "Hamburg", "Porto"),
    "country": ("Canada", "Norway", "Brazil", "Japan", "Ireland", "Mexico", "Poland", "South Africa"),
    "name": ("Maria", "Tom", "Aisha", "Kenji", "Lukas", "Sofia", "Daniel", "Priya", "Omar", "Chloe", "Mateo", "Hannah"),
    "surname": ("Becker", "Nguyen", "Okafor", "Rossi", "Smith", "Kowalski", "Tanaka", "Garcia", "Larsen", "Haddad"),
}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def _fill(slot: str, rng: random.Random) -> str:
    """A random value for one {slot}."""
    if slot in SLOTS:
        return rng.choice(SLOTS[slot])
    if slot == "amount":
        return f"{rng.choice('$$€£')}{rng.randint(5, 300)}.{rng.choice(('00', '99', '50', '49'))}"
    if slot == "order":
        return rng.choice(("#", "#", "ORD-", "no. ")) + str(rng.randint(10_000, 9_999_999))
    if slot == "date":
        return rng.choice((f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", f"the {rng.randint(4, 20)}th", "Monday"))
    if slot == "error":
        return rng.choice(("E-", "ERR_", "error 0x", "code ")) + str(rng.randint(100, 99_999))
    if slot == "email":
        return f"{rng.choice(SLOTS['name']).lower()}.{rng.choice(SLOTS['surname']).lower()}@mail.com"
    if slot in ("days", "years"):
        return str(rng.randint(2, 15))
    raise KeyError(slot)


def _render(template: str, rng: random.Random, capitalize: bool = True) -> str:
    """Fill all {slot}s of a template."""
    text = re.sub(r"\{(\w+)\}", lambda m: _fill(m.group(1), rng), template)
    return text[:1].upper() + text[1:] if capitalize else text


def _pick(table: tuple, family: int, rng: random.Random) -> str:
    return rng.choice(table[0] + table[1 + family])


def _typo(word: str, rng: random.Random) -> str:
    """Swap two neighbouring characters, drop one, or duplicate one."""
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i + 1:] if kind == 1 else word[:i] + word[i] + word[i:]


def _noisy(sentence: str, rng: random.Random, typo_rate: float) -> str:
    """Light punctuation and typo noise on one sentence."""
    r = rng.random()
    if sentence.endswith(".") and r < 0.08:
        sentence = sentence[:-1]
    elif sentence.endswith(".") and r < 0.12:
        sentence = sentence[:-1] + "!"
    elif sentence.endswith("?") and r < 0.2:
        sentence += "?"
    return re.sub(r"[A-Za-z]{4,}", lambda m: _typo(m.group(), rng) if rng.random() < typo_rate else m.group(), sentence)


def _ticket(category: str, family: int, rng: random.Random) -> tuple[str, list[str], str, str]:
    """One ticket: (text, ids of its core templates, clean core sentences, clean body without greeting/signature)."""
    ids = rng.sample(range(len(CORE[category][family])), 2 if rng.random() < 0.3 else 1)
    core = [_render(CORE[category][family][i], rng) for i in ids]
    body = list(core)
    if rng.random() < 0.35:
        body.insert(0, _render(_pick(CONTEXT, family, rng), rng))
    if rng.random() < 0.2:  # mixed intent: one short, clearly marked aside from another category
        other = rng.choice([c for c in CATEGORIES if c != category])
        aside = _render(rng.choice(MINOR[other][family]), rng, capitalize=False)
        body.append(_pick(ASIDES, family, rng) + aside + ".")
    if rng.random() < 0.25:
        body.append(_pick(CLOSERS, family, rng))
    clean_body = " ".join(body)
    typo_rate = rng.choice((0.0, 0.0, 0.02, 0.05))
    sentences = [_noisy(s, rng, typo_rate) for s in body]
    r = rng.random()
    if r < 0.1:
        sentences = [s.lower() for s in sentences]
    elif r < 0.16:
        k = rng.randrange(len(sentences))
        sentences[k] = sentences[k].upper()
    greeting, signoff = _render(_pick(GREETINGS, family, rng), rng), _render(_pick(SIGNOFFS, family, rng), rng)
    parts = [greeting, " ".join(sentences), signoff]
    text = rng.choice(("\n", " ", "\n\n")).join(p for p in parts if p)
    return text, [f"{category}/{family}/{i}" for i in ids], " ".join(core), clean_body


def _generate(n: int, split: str, seed: int = 0) -> list[tuple[str, str, list[str], str, str]]:
    """Like make_tickets, but each item is (text, category, template ids, clean core, clean body)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    family = 0 if split == "train" else 1
    rng = random.Random(f"tickets/{split}/{seed}")
    seen, items = set(), []
    for k, category in enumerate(CATEGORIES):
        want, tries = n // len(CATEGORIES) + (k < n % len(CATEGORIES)), 0
        while want > 0:
            tries += 1
            if tries > 100 * n + 1000:
                raise RuntimeError(f"cannot make {n} distinct tickets")
            text, ids, core, body = _ticket(category, family, rng)
            if text not in seen:
                seen.add(text)
                items.append((text, category, ids, core, body))
                want -= 1
    rng.shuffle(items)
    return items


def make_tickets(n: int, split: str, seed: int = 0) -> list[tuple[str, str]]:
    """n (text, category) pairs of the 'train' or 'test' split; deterministic for (n, split, seed)."""
    return [(text, category) for text, category, *_ in _generate(n, split, seed)]


# ----------------------------------------------------------------------------------------------------------------
# The task: labelled splits, metrics, the bag-of-words baseline


def load_labelled(dataset: str | None, n_train: int, n_test: int, seed: int, text_field: str = "text",
                  label_field: str = "label") -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(train, test, label names): the tickets above (dataset None), or a labelled Hugging Face dataset."""
    if dataset is None:
        return make_tickets(n_train, "train", seed), make_tickets(n_test, "test", seed), list(CATEGORIES)
    from datasets import load_dataset  # optional dependency, needs the hub

    ds = load_dataset(dataset)
    splits = [ds[s] for s in ("train", "test") if s in ds]
    if len(splits) != 2:
        raise InputError(f"--dataset {dataset}: expected 'train' and 'test' splits, found {list(ds)}")
    for split in splits:
        missing = {text_field, label_field} - set(split.column_names)
        if missing:
            raise InputError(f"--dataset {dataset}: no column {sorted(missing)} (has {split.column_names})")
    feature = splits[0].features[label_field]
    names = feature.names if hasattr(feature, "names") else sorted({str(x) for x in splits[0][label_field]})
    as_name = (lambda y: names[y]) if hasattr(feature, "names") else str
    return [[(t, as_name(y)) for t, y in zip(s[text_field], s[label_field], strict=True)] for s in splits] + [names]


def encode_labels(rows: list[tuple[str, str]], labels: list[str], where: str) -> torch.Tensor:
    """The label ids (N,) of (text, label) rows; an unknown label or an empty text is an InputError naming the row."""
    index = {name: i for i, name in enumerate(labels)}
    for i, (text, label) in enumerate(rows):
        if label not in index:
            raise InputError(f"{where}, row {i}: unknown label {label!r}; expected one of {labels}")
        if not text.strip():
            raise InputError(f"{where}, row {i}: empty text")
    return torch.tensor([index[label] for _, label in rows])


def classification_report(pred: torch.Tensor, gold: torch.Tensor, n: int) -> dict:
    """Accuracy, macro-F1 (the mean over classes of 2PR / (P + R)) and the confusion matrix (rows: gold)."""
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((gold, pred), torch.ones_like(gold), accumulate=True)
    tp = confusion.diag().float()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"accuracy": (pred == gold).float().mean().item(), "macro_f1": f1.mean().item(), "confusion": confusion}


def bag_of_words_baseline(train, test, labels, seed: int, steps: int = 300) -> torch.Tensor:
    """Logistic regression on word unigrams and bigrams (log counts, L2-normalised rows), trained full-batch with
    AdamW and weight decay; returns the predicted label ids of the test split."""
    tokens = lambda text: re.findall(r"[a-z0-9']+", text.lower())
    grams = lambda text: (w := tokens(text)) + [a + " " + b for a, b in zip(w, w[1:], strict=False)]
    vocab = {g: i for i, g in enumerate(sorted({g for text, _ in train for g in grams(text)}))}

    def features(rows):
        x = torch.zeros(len(rows), len(vocab))
        for r, (text, _) in enumerate(rows):
            for g, c in Counter(grams(text)).items():
                if g in vocab:
                    x[r, vocab[g]] = math.log1p(c)
        return F.normalize(x, dim=1)

    x, y = features(train), encode_labels(train, labels, "train split")
    torch.manual_seed(seed)
    clf = nn.Linear(len(vocab), len(labels))
    opt = torch.optim.AdamW(clf.parameters(), lr=0.1, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return clf(features(test)).argmax(-1)


def print_report(results: dict, labels: list[str], n_test: int):
    """The comparison table of results {model name: classification_report + seconds}, then the confusion matrix of
    the first model."""
    print(f"\nheld-out split ({n_test} examples, phrasings unseen in training):\n")
    print("| model | accuracy | macro-F1 | train seconds |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['seconds']:.0f} |")
    first, width = next(iter(results)), max(map(len, labels))
    print(f"\nconfusion matrix of {first} (rows: true label, columns: predicted):\n{'':{width}} " +
          " ".join(f"{i:>4}" for i in range(len(labels))))
    for i, name in enumerate(labels):
        print(f"{name:{width}} " + " ".join(f"{int(c):>4}" for c in results[first]["confusion"][i]) + f"   ({i})")


if __name__ == "__main__":
    def ngrams(text: str, k: int = 6) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}

    train, test = _generate(3000, "train"), _generate(1000, "test")
    assert make_tickets(3000, "train") == [(t, c) for t, c, *_ in train], "not deterministic"
    for name, data in (("train", train), ("test", test)):
        print(f"{name}: {len(data)} tickets,", dict(Counter(c for _, c, *_ in data)))
        assert len({t for t, *_ in data}) == len(data), f"duplicate texts in {name}"
    for category in CATEGORIES:
        for name, data in (("train", train), ("test", test)):
            print(f"\n===== {category} / {name}")
            for text, *_ in [x for x in data if x[1] == category][:3]:
                print("---\n" + text)
    # Held-out phrasing: template families are disjoint, and each split only used its own family.
    for table in (CORE, MINOR):
        for category, (fam0, fam1) in table.items():
            assert not set(fam0) & set(fam1), f"template shared by both families: {category}"
    assert all(i.split("/")[1] == "0" for _, _, ids, *_ in train for i in ids), "train used a test template"
    assert all(i.split("/")[1] == "1" for _, _, ids, *_ in test for i in ids), "test used a train template"
    # Crude leakage: test tickets whose core sentences share a word 6-gram with any train ticket body.
    train_grams = set().union(*(ngrams(body) for *_, body in train))
    leaked = [core for _, _, _, core, _ in test if ngrams(core) & train_grams]
    body_shared = sum(bool(ngrams(body) & train_grams) for *_, body in test)
    print(f"\ntest tickets sharing a 6-gram with train: core sentences {len(leaked) / len(test):.3f}, "
          f"whole body (incl. shared filler) {body_shared / len(test):.3f}")
    assert not leaked, leaked[:5]
    print("all checks passed")
