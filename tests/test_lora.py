"""lora.py against independent references: the base model, PEFT, bitsandbytes' NF4 table and error bounds, and one
merged model per adapter for the mixed-adapter batch."""

import json

import pytest
import torch
import torch.nn as nn

import gpt
import lora
import tokenization
import training
from gpt import GPT, GPTConfig
from lora import LoRALinear, NF4Linear, apply_lora, load_adapter, merge_and_unload, save_adapter

# The NF4 code as bitsandbytes ships it (functional.py, get_4bit_type("nf4")), from QLoRA's appendix E.
NF4_BNB = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def random_gpt(vocab=61, ctx=48, width=32, depth=2, heads=4, seed=0) -> GPT:
    """A GPT whose every weight is random and far from init (biases and LayerNorm gains too)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=ctx, n_layer=depth, n_head=heads, n_embd=width))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("ln_1.weight") else 0.2 * torch.randn_like(p))
    return model.eval()


def randomize_lora(model: nn.Module, seed: int = 1):
    """B starts at zero; give every LoRA layer a non-zero update so that the tests see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))


def tokens(vocab, shape, seed=2):
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_at_init_equals_base():
    base = random_gpt()
    model = random_gpt()
    summary = apply_lora(model, r=4, alpha=8)
    x = tokens(61, (3, 20))
    assert torch.equal(model(x)[0], base(x)[0])  # B = 0: exactly the base
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 4 and len(summary["modules"]) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert summary["trainable"] == sum(4 * (m.in_features + m.out_features) for m in layers)
    assert summary["total"] == base.num_params() + summary["trainable"]
    assert "trainable of" in str(summary)
    a = layers[0].lora_A  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= 1 / a.shape[1] ** 0.5 and a.std() > 0.5 / (3 * a.shape[1]) ** 0.5
    assert layers[0].scale == 2.0 and LoRALinear(nn.Linear(8, 8), 4, 8, rslora=True).scale == 4.0  # 8/4, 8/sqrt(4)


def test_merge_unmerge_and_merge_and_unload():
    model = random_gpt()
    apply_lora(model, r=4, alpha=8, targets=("c_attn", "mlp.c_proj"))
    randomize_lora(model)
    x = tokens(61, (2, 24))
    ref = model(x)[0]
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.base.weight.clone() for m in layers]
    for m in layers:
        m.merge()
    torch.testing.assert_close(model(x)[0], ref, atol=1e-5, rtol=1e-5)  # merged == unmerged
    for m, w in zip(layers, before, strict=True):
        torch.testing.assert_close(m.base.weight - w, m.delta_weight(), atol=1e-6, rtol=0)
        m.unmerge()
        torch.testing.assert_close(m.base.weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x)[0], ref, atol=1e-6, rtol=1e-6)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(random_gpt().state_dict())
    torch.testing.assert_close(plain(x)[0], ref, atol=1e-5, rtol=1e-5)


def test_only_A_and_B_receive_gradients():
    model = random_gpt().train()
    apply_lora(model, r=2, dropout=0.1)
    x = tokens(61, (2, 16))
    model(x, x)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and with_grad
    assert all(n.endswith((".lora_A", ".lora_B")) for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".lora_B"))


def test_adapter_save_load_round_trip(tmp_path):
    model = random_gpt()
    apply_lora(model, r=4, alpha=16, rslora=True)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a", {"task": "demo"})
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = random_gpt()
    cfg = load_adapter(fresh, tmp_path / "a")
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["use_rslora"] and cfg["task"] == "demo"
    x = tokens(61, (2, 20))
    assert torch.equal(fresh(x)[0], model(x)[0])
    layers, _, _ = lora.read_adapter(tmp_path / "a")  # the adapter only: A and B of each LoRA module
    assert len(layers) == 8 and all(a.shape[0] == 4 and b.shape[1] == 4 for a, b in layers.values())
    with pytest.raises(training.InputError, match="adapter_config.json"):
        load_adapter(random_gpt(), tmp_path / "missing")


def test_peft_loads_the_adapter_on_the_exported_model(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    for rslora in (False, True):
        base = random_gpt(vocab=67, ctx=32, width=48, depth=2, heads=3)
        base.save_pretrained(tmp_path / "base")
        model = random_gpt(vocab=67, ctx=32, width=48, depth=2, heads=3)
        apply_lora(model, r=4, alpha=12, rslora=rslora)
        randomize_lora(model)
        save_adapter(model, tmp_path / "adapter", {"base": str(tmp_path / "base")})
        hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        x = tokens(67, (2, 32))
        with torch.no_grad():
            ours, theirs = model(x)[0], peft_model(x).logits
        torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
        # PEFT's own merge (with the Conv1D transpose) equals our merge_and_unload exported as plain GPT-2
        merge_and_unload(model).save_pretrained(tmp_path / "merged")
        with torch.no_grad():
            merged_hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()(x).logits
            peft_merged = peft_model.merge_and_unload()(x).logits
        torch.testing.assert_close(merged_hf, ours, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(peft_merged, merged_hf, atol=2e-5, rtol=1e-5)


def test_a_llama_adapter_on_every_projection_loads_in_peft(tmp_path):
    """LoRA on SmolLM2's architecture (q, k, v, o, gate, up, down; GQA; untied here): PEFT reads our adapter, named as
    in transformers' LlamaForCausalLM, onto the exported base and gives our logits, merged and not."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = GPTConfig(arch="llama", vocab_size=67, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=48,
                    intermediate_size=80, tie_word_embeddings=False)
    model = GPT(cfg).eval()
    model.save_pretrained(tmp_path / "base")
    summary = apply_lora(model, r=4, alpha=8)
    assert sorted({n.rpartition(".")[2] for n in summary["modules"]}) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = tokens(67, (2, 32))
    with torch.no_grad():
        ours = model(x)[0]
        torch.testing.assert_close(peft_model(x).logits, ours, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(peft_model.merge_and_unload()(x).logits, ours, atol=2e-5, rtol=1e-5)
    again = GPT.from_pretrained(str(tmp_path / "base")).eval()
    load_adapter(again, tmp_path / "adapter")  # and back into ours, by transformers' names
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], ours, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# NF4 and QLoRA


def test_nf4_code_values():
    assert lora.NF4.shape == (16,) and lora.NF4[7] == 0 and lora.NF4[0] == -1 and lora.NF4[-1] == 1
    torch.testing.assert_close(lora.NF4, torch.tensor(NF4_BNB), atol=1e-6, rtol=0)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_error_within_bitsandbytes_bounds(double_quant):
    torch.manual_seed(0)
    x = torch.randn(1024, 1024)
    q = lora.quantize_nf4(x, block_size=64, double_quant=double_quant)
    err = (x - lora.dequantize_nf4(q)).abs()
    # bitsandbytes tests/test_functional.py::test_4bit_quant, NF4, blocksize 64: mean + 7 standard deviations
    assert err.mean() < 0.072798 + 7 * 0.000074
    assert (err / (x.abs() + 1e-8)).mean() < 0.203339 + 7 * 0.000340
    assert err.mean() > 0.07  # a correct NF4 lands near bitsandbytes' mean, not far below it


def test_nf4_packed_storage_size():
    x = torch.randn(1024, 1024)
    q = lora.quantize_nf4(x, 64, double_quant=True)
    assert q["packed"].dtype == torch.uint8 and q["packed"].numel() == x.numel() // 2  # two codes per byte
    assert q["absmax_q"].dtype == torch.int8
    assert lora.storage_bytes(q) / x.numel() <= 0.52
    assert lora.storage_bytes(lora.quantize_nf4(x, 64, double_quant=False)) / x.numel() == 0.5 + 4 / 64
    layer = NF4Linear(nn.Linear(256, 384))  # the module stores the same: its buffers are the packed tensors
    assert sum(b.numel() * b.element_size() for n, b in layer.named_buffers() if n != "shape") / (256 * 384) <= 0.52


def test_nf4_exact_on_code_values_and_pack_order():
    """Weights that are NF4 values times a block's absmax come back exactly (without double quantization)."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(16, (40, 64), generator=g)
    codes[:, 0] = 15  # each block holds +1 so that its absmax is the scale
    scale = torch.rand(40, 1, generator=g) + 0.5
    w = (lora.NF4[codes] * scale).view(20, 128)
    q = lora.quantize_nf4(w, 64, double_quant=False)
    assert torch.equal(q["packed"][0] >> 4, codes.flatten()[0].to(torch.uint8))  # first code in the high nibble
    assert torch.equal(lora.dequantize_nf4(q), w)


def test_double_quantization_round_trip():
    torch.manual_seed(1)
    w = torch.randn(512, 700) * torch.linspace(0.1, 3, 700)  # absmax constants spread over a range
    plain, dq = lora.quantize_nf4(w, 64, double_quant=False), lora.quantize_nf4(w, 64, double_quant=True)
    absmax, back = plain["absmax"], lora.dequantize_absmax(dq)
    assert back.shape == absmax.shape
    centred = (absmax - absmax.mean()).abs()
    bound = torch.stack([c.max() for c in torch.nn.functional.pad(centred, (0, (-len(centred)) % 256)).split(256)])
    assert ((back - absmax).abs() <= bound.repeat_interleave(256)[:len(absmax)] / 127 / 2 + 1e-6).all()
    assert (back - absmax).abs().max() / absmax.mean() < 0.01
    assert lora.dequantize_nf4(dq).shape == w.shape  # 700 is not a multiple of 64: padded, then cut back


def test_qlora_forward_equals_lora_on_the_dequantized_weight():
    torch.manual_seed(4)
    lin = nn.Linear(96, 160)
    q = LoRALinear(NF4Linear(lin), r=4, alpha=8)
    ref_base = nn.Linear(96, 160)
    with torch.no_grad():
        ref_base.weight.copy_(q.base.dequantize())
        ref_base.bias.copy_(lin.bias)
        q.lora_B.normal_()
    ref = LoRALinear(ref_base, r=4, alpha=8)
    with torch.no_grad():
        ref.lora_A.copy_(q.lora_A)
        ref.lora_B.copy_(q.lora_B)
    x1 = torch.randn(3, 7, 96, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = q(x1), ref(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)  # the re-dequantizing backward
    torch.testing.assert_close(q.lora_A.grad, ref.lora_A.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(q.lora_B.grad, ref.lora_B.grad, atol=1e-4, rtol=1e-5)
    assert not any(p.requires_grad for p in q.base.parameters())
    # a whole QLoRA model: merge_and_unload gives the plain model with the dequantized weights + B A
    model = random_gpt()
    apply_lora(model, r=2, qlora=True)
    randomize_lora(model)
    x = tokens(61, (2, 12))
    out = model(x)[0]
    torch.testing.assert_close(merge_and_unload(model)(x)[0], out, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Many adapters


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """A random base and three random adapters of different ranks and targets, saved to disk."""
    root = tmp_path_factory.mktemp("bank")
    base = random_gpt(vocab=61, ctx=48)
    dirs = {}
    for i, (name, r, targets) in enumerate([("a", 4, lora.DEFAULT_TARGETS), ("b", 8, ("c_attn",)),
                                            ("c", 2, ("c_fc", "attn.c_proj"))]):
        m = random_gpt(vocab=61, ctx=48)
        apply_lora(m, r=r, alpha=2 * r, targets=targets)
        randomize_lora(m, seed=10 + i)
        save_adapter(m, root / name)
        dirs[name] = root / name
    return base, dirs


class Chars:
    """A tokenizer over 61 symbols for the random model."""
    chars = "".join(chr(i) for i in range(48, 48 + 60)) + "\n"
    vocab_size, eot_token = 61, None

    def encode(self, s):
        return [self.chars.index(c) for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def test_mixed_batch_equals_each_request_on_its_merged_model(bank):
    base, dirs = bank
    multi, names = lora.build_multi_adapter(base, dirs)
    merged = {a: lora.merged_model(base, dirs[a]) for a in names}
    merged["base"] = base
    tok, rt = Chars(), training.setup_runtime("cpu")
    g = torch.Generator().manual_seed(5)
    prompts = [tok.decode(torch.randint(60, (int(n),), generator=g).tolist()) for n in [3, 9, 5, 12, 7, 2, 10]]
    which = ["a", "b", "c", "base", "c", "a", "b"]
    ids = [0 if a == "base" else names.index(a) + 1 for a in which]
    mixed, _ = lora.generate_rows(multi, prompts, ids, tok, rt, 20)
    assert len(set(mixed)) > 1  # the adapters make a difference
    for p, a, out in zip(prompts, which, mixed, strict=True):
        alone, _ = lora.generate_rows(merged[a], [p], [0], tok, rt, 20)
        assert alone[0] == out and len(out) == 20
    lines, _ = lora.generate_rows(multi, prompts, ids, tok, rt, 20, stop_at_newline=True)
    assert all(line == out.split("\n")[0] for line, out in zip(lines, mixed, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# The command: fold an adapter into its base and export it


def test_merge_command_exports_the_adapted_model(tmp_path):
    from transformers import GPT2LMHeadModel

    tok = tokenization.CharTokenizer(Chars.chars[:-1], eot=True)  # 61 ids: 60 characters and the end of text
    for qlora in (False, True):
        base = random_gpt()
        base.save_pretrained(tmp_path / "base")
        (tmp_path / "base" / "run.json").write_text(json.dumps({"tokenizer": tok.spec()}))
        model = random_gpt()
        apply_lora(model, r=4, alpha=8, qlora=qlora)
        randomize_lora(model)
        save_adapter(model, tmp_path / "adapter", {"base": str(tmp_path / "base"), "qlora": qlora})
        out = lora.main(lora.Args(adapter=str(tmp_path / "adapter"), output=str(tmp_path / "merged"),
                                  overwrite=qlora))
        x = tokens(61, (2, 20))
        with torch.no_grad():
            ours = model(x)[0]  # the adapter on the base it was trained on (NF4 with qlora)
            theirs = GPT2LMHeadModel.from_pretrained(out).eval()(x).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-5)
        _, tokenizer = gpt.load_pretrained(str(out))  # a checkpoint of the project: run.json names the tokenizer
        assert tokenizer.spec() == tok.spec()
    with pytest.raises(training.InputError, match="already holds a model"):
        lora.main(lora.Args(adapter=str(tmp_path / "adapter"), output=str(out)))
