"""Download stage against a real HTTP server on 127.0.0.1: WikiText archives, faults, caching, safety."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from http_fixtures import serve

from llm.config import DataConfig, Params
from llm.data import prepare_raw
from llm.data.archives import Archive
from llm.data.download import USER_AGENT, RetryPolicy, cache_path, fetch
from llm.data.sources import PINNED_SHA256, wikitext_members
from llm.errors import DataError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=3, backoff=0.01, timeout=(5.0, 5.0))
ZIP_PATH = "/wikitext-2-raw-v1.zip"


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar(add) -> bytes:  # noqa: ANN001 (a callback taking the TarFile)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        add(tf)
    return buffer.getvalue()


def _tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def wiki_parts(wikitext_valid: Path) -> dict[str, bytes]:
    """train/valid/test slices of the real WikiText-2 valid text, cut on line boundaries."""
    lines = wikitext_valid.read_bytes().splitlines(keepends=True)
    return {"train": b"".join(lines[:2800]), "valid": b"".join(lines[2800:3300]),
            "test": b"".join(lines[3300:])}


@pytest.fixture(scope="module")
def wiki_zip(wiki_parts: dict[str, bytes]) -> bytes:
    names = wikitext_members("wikitext-2-raw-v1")
    return _zip({name: wiki_parts[split] for name, split in zip(names, ("train", "valid", "test"))})


@pytest.fixture()
def server(wiki_zip: bytes, monkeypatch: pytest.MonkeyPatch):
    """A server holding the WikiText-like zip, with LLM_WIKITEXT_BASE_URL pointing at it."""
    with serve({ZIP_PATH: wiki_zip}) as srv:
        monkeypatch.setenv("LLM_WIKITEXT_BASE_URL", srv.base_url())
        yield srv


def _run(tmp_path: Path, **data) -> dict:
    """prepare_raw into tmp_path/data/raw with a private cache and fast retries."""
    config = DataConfig(**data)
    return prepare_raw(config, tmp_path / "data" / "raw", cache_dir=tmp_path / "cache", policy=FAST,
                       progress=False)


def _wiki_sha(wiki_zip: bytes) -> str:
    return hashlib.sha256(wiki_zip).hexdigest()


def test_wikitext_download_writes_the_members_exactly(tmp_path, server, wiki_zip, wiki_parts):
    stats = _run(tmp_path, sha256=_wiki_sha(wiki_zip))
    for split in ("train", "valid", "test"):
        written = (tmp_path / "data" / "raw" / f"{split}.txt").read_bytes()
        assert written == wiki_parts[split]
        assert stats[split].words == len(wiki_parts[split].split())
        assert stats[split].lines == wiki_parts[split].count(b"\n")
        assert stats[split].bytes == len(wiki_parts[split])
    (path, headers), = server.requests
    assert path == ZIP_PATH and headers["User-Agent"] == USER_AGENT


def test_default_python_user_agent_is_refused_by_the_fixture(server):
    """The fixture behaves like wikitext.smerity.com, so the User-Agent test above can fail."""
    import requests

    assert requests.get(server.url(ZIP_PATH), timeout=5).status_code == 403


def test_dropped_connection_resumes_with_range(tmp_path, server, wiki_zip):
    server.faults[ZIP_PATH] = ["drop"]
    _run(tmp_path, sha256=_wiki_sha(wiki_zip))
    first, second = server.requests
    assert "Range" not in first[1]
    resumed_at = int(second[1]["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(wiki_zip) // 2  # what arrived before the drop (whole chunks) is kept
    cached = cache_path(server.url(ZIP_PATH), tmp_path / "cache")
    assert cached.read_bytes() == wiki_zip
    assert not cached.with_name(cached.name + ".part").exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, wiki_zip):
    server.faults[ZIP_PATH] = ["drop", "ignore-range"]
    _run(tmp_path, sha256=_wiki_sha(wiki_zip))
    assert len(server.requests) == 2 and "Range" in server.requests[1][1]
    assert cache_path(server.url(ZIP_PATH), tmp_path / "cache").read_bytes() == wiki_zip


def test_server_errors_are_retried_then_succeed(tmp_path, server, wiki_zip, wiki_parts):
    server.faults[ZIP_PATH] = ["500", "503"]
    _run(tmp_path, sha256=_wiki_sha(wiki_zip))
    assert len(server.requests) == 3
    assert (tmp_path / "data" / "raw" / "test.txt").read_bytes() == wiki_parts["test"]


def test_read_timeout_is_retried(tmp_path, server, wiki_zip):
    server.faults[ZIP_PATH] = ["stall"]
    server.stall_seconds = 1.0
    policy = RetryPolicy(attempts=2, backoff=0.01, timeout=(5.0, 0.3))
    fetch(server.url(ZIP_PATH), sha256=_wiki_sha(wiki_zip), cache_dir=tmp_path, policy=policy, progress=False)
    assert len(server.requests) == 2


def test_refused_connection_is_retried_then_reported(tmp_path):
    with serve({}) as srv:
        url = srv.url("/gone.txt")  # the port is closed once the block ends
    expected = r"gone.txt: download failed after 3 tries: connection failed.*offline\?"
    with pytest.raises(DataError, match=expected):
        _run(tmp_path, dataset="url", url=url)


def test_persistent_server_errors_give_up_after_the_last_try(tmp_path, server):
    server.faults[ZIP_PATH] = ["500"] * 5
    with pytest.raises(DataError, match=r"failed after 3 tries: HTTP 500"):
        _run(tmp_path)
    assert len(server.requests) == 3
    assert not (tmp_path / "data" / "raw").exists()


@pytest.mark.parametrize(("status", "word"), [(404, "not found"), (403, "forbidden")])
def test_client_errors_fail_at_once_naming_url_and_status(tmp_path, server, status, word):
    server.faults[ZIP_PATH] = [str(status)]
    with pytest.raises(DataError) as info:
        _run(tmp_path)
    assert f"HTTP {status} ({word})" in str(info.value) and server.url(ZIP_PATH) in str(info.value)
    assert len(server.requests) == 1


def test_checksum_mismatch_leaves_no_raw_and_names_both_sums(tmp_path, server, wiki_zip):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.txt").write_text("previous run\n")
    with pytest.raises(DataError) as info:
        _run(tmp_path, sha256="ab" * 32)
    message = str(info.value)
    assert f"expected {'ab' * 32}, actual {_wiki_sha(wiki_zip)}" in message
    assert f"dvc exp run -S data.sha256={_wiki_sha(wiki_zip)}" in message
    assert sorted(p.name for p in raw.iterdir()) == ["train.txt"]  # the old output, untouched
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]  # no temp folder left


def test_a_corrupt_partial_download_is_downloaded_again_not_offered_as_the_checksum(tmp_path, server,
                                                                                    wiki_zip):
    """A .part whose bytes went bad before a resume gives a file that differs: the answer is a fresh download,
    not "accept its checksum"; only a fresh download that still differs offers that."""
    target = cache_path(server.url(ZIP_PATH), tmp_path / "cache")
    target.parent.mkdir()
    target.with_name(target.name + ".part").write_bytes(b"\0" * 1000)  # not the file's first 1000 bytes
    _run(tmp_path, sha256=_wiki_sha(wiki_zip))
    assert target.read_bytes() == wiki_zip
    assert [headers.get("Range") for _, headers in server.requests] == ["bytes=1000-", None]
    server.files[ZIP_PATH] = wiki_zip[:-1] + b"?"  # the server's file itself differs: offer to accept it
    with pytest.raises(DataError, match=r"actual [0-9a-f]{64} \(a fresh, complete download\); if you trust"):
        _run(tmp_path, sha256="ab" * 32)
    assert len(server.requests) == 3  # one fresh download: it was not resumed, so it is not retried


def test_pinned_default_checksum_applies_to_wikitext_2_raw(tmp_path, server, wiki_zip):
    with pytest.raises(DataError, match=f"expected {PINNED_SHA256['wikitext-2-raw-v1']}"):
        _run(tmp_path)
    _run(tmp_path, sha256=_wiki_sha(wiki_zip))  # accepting the actual sum reuses the cached download
    assert len(server.requests) == 1


def test_cache_is_reused_without_any_request(tmp_path, server, wiki_zip, wiki_parts):
    _run(tmp_path, sha256=_wiki_sha(wiki_zip))
    (tmp_path / "data" / "raw" / "valid.txt").write_text("stale\n")
    _run(tmp_path, sha256=_wiki_sha(wiki_zip))
    assert len(server.requests) == 1
    assert (tmp_path / "data" / "raw" / "valid.txt").read_bytes() == wiki_parts["valid"]


def test_tokenized_release_uses_its_own_members(tmp_path, server, wiki_parts):
    names = wikitext_members("wikitext-2-v1")
    assert names == [f"wikitext-2/wiki.{s}.tokens" for s in ("train", "valid", "test")]
    server.files["/wikitext-2-v1.zip"] = _zip(dict(zip(names, wiki_parts.values())))
    _run(tmp_path, dataset="wikitext-2-v1")
    assert (tmp_path / "data" / "raw" / "train.txt").read_bytes() == wiki_parts["train"]


def test_unresolvable_host_says_offline_without_retrying(tmp_path):
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot resolve host 'nonexistent.invalid'.*offline\?.*text_files"):
        _run(tmp_path, dataset="url", url="http://nonexistent.invalid/corpus.txt")
    assert time.monotonic() - started < 20


def test_url_text_is_split_by_lines_with_newlines_normalised(tmp_path, shakespeare):
    text = shakespeare.read_bytes()[:50_000]
    with serve({"/corpus.txt": text.replace(b"\n", b"\r\n")}) as srv:
        _run(tmp_path, dataset="url", url=srv.url("/corpus.txt"))
    raw = tmp_path / "data" / "raw"
    parts = [(raw / f"{s}.txt").read_bytes() for s in ("train", "test", "valid")]
    assert b"".join(parts) == text and all(parts)


def test_url_gzip_and_tar_with_a_triple(tmp_path, wiki_parts):
    text = wiki_parts["valid"]
    triple = _tar(lambda tf: [_tar_file(tf, f"corpus/{s}.txt", wiki_parts[s]) for s in wiki_parts])
    with serve({"/c.txt.gz": gzip.compress(text), "/c.tar.gz": triple}) as srv:
        stats = _run(tmp_path, dataset="url", url=srv.url("/c.txt.gz"))
        assert sum(s.bytes for s in stats.values()) == len(text)
        _run(tmp_path, dataset="url", url=srv.url("/c.tar.gz"))
    for split in ("train", "valid", "test"):
        assert (tmp_path / "data" / "raw" / f"{split}.txt").read_bytes() == wiki_parts[split]


def test_url_zip_with_explicit_members(tmp_path, wiki_parts):
    archive = _zip({"a.txt": wiki_parts["test"], "b.txt": wiki_parts["train"], "c.txt": wiki_parts["valid"]})
    with serve({"/m.zip": archive}) as srv:
        _run(tmp_path, dataset="url", url=srv.url("/m.zip"), members=["b.txt", "c.txt", "a.txt"])
        assert (tmp_path / "data" / "raw" / "train.txt").read_bytes() == wiki_parts["train"]
        with pytest.raises(DataError, match=r"data.members: 'nope.txt' is not in .*a.txt, b.txt, c.txt"):
            _run(tmp_path, dataset="url", url=srv.url("/m.zip"), members=["b.txt", "nope.txt", "a.txt"])


def _slip_zip() -> bytes:
    return _zip({"ok/train.txt": b"a\n", "../evil.txt": b"owned\n"})


def _slip_tar() -> bytes:
    return _tar(lambda tf: [_tar_file(tf, "train.txt", b"a\n"), _tar_file(tf, "../../evil.txt", b"x\n")])


def _symlink_tar() -> bytes:
    def add(tf: tarfile.TarFile) -> None:
        _tar_file(tf, "train.txt", b"a\n")
        link = tarfile.TarInfo("valid.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return _tar(add)


@pytest.mark.parametrize(("name", "build", "why"), [
    ("slip.zip", _slip_zip, "unsafe member path '../evil.txt'"),
    ("slip.tar.gz", _slip_tar, "unsafe member path '../../evil.txt'"),
    ("link.tar.gz", _symlink_tar, "member 'valid.txt' is a symlink"),
])
def test_unsafe_archives_are_refused(tmp_path, name, build, why):
    with serve({f"/{name}": build()}) as srv, pytest.raises(DataError, match=why):
        _run(tmp_path, dataset="url", url=srv.url(f"/{name}"))
    assert not (tmp_path / "data" / "raw").exists()
    assert not list(tmp_path.rglob("evil.txt"))


def test_absolute_zip_member_is_refused(tmp_path):
    path = tmp_path / "abs.zip"
    path.write_bytes(_zip({"/etc/evil.txt": b"x\n"}))
    with pytest.raises(DataError, match="unsafe member path"):
        Archive(path)


def test_fetch_resumes_a_partial_file_left_by_an_earlier_run(tmp_path, wiki_zip):
    with serve({"/f.zip": wiki_zip}) as srv:
        target = cache_path(srv.url("/f.zip"), tmp_path)
        target.with_name(target.name + ".part").write_bytes(wiki_zip[:1000])
        fetched = fetch(srv.url("/f.zip"), cache_dir=tmp_path, policy=FAST, progress=False)
        assert fetched.read_bytes() == wiki_zip
        assert srv.requests[0][1]["Range"] == "bytes=1000-"


def _stage(cwd: Path, params: str) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(params)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "stages" / "download.py")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_stage_script_on_tiny_shakespeare(tmp_path, shakespeare):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "input.txt").write_bytes(shakespeare.read_bytes())
    params = "data:\n  dataset: text_files\n  text_files_dir: corpus\nruntime:\n  progress: false\n"
    done = _stage(tmp_path, params)
    assert done.returncode == 0, done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["train", "valid", "test"]
    raw = tmp_path / "data" / "raw"
    joined = b"".join((raw / f"{s}.txt").read_bytes() for s in ("train", "test", "valid"))
    assert joined == shakespeare.read_bytes()


def test_stage_script_bad_param_is_one_line_and_exit_2(tmp_path):
    done = _stage(tmp_path, "data:\n  dataset: text_files\n  text_files_dir: missing\n")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: data.text_files_dir = 'missing': no such folder")
    assert not (tmp_path / "data" / "raw").exists()


def test_defaults_point_at_wikitext_2_raw():
    assert Params().data.dataset == "wikitext-2-raw-v1"
    assert wikitext_members("wikitext-103-raw-v1")[0] == "wikitext-103-raw/wiki.train.raw"


@pytest.mark.parametrize(("location", "needle"), [
    ("file:///etc/passwd", "No connection adapters were found for 'file:///etc/passwd'"),
    ("ftp://127.0.0.1/corpus.txt", "No connection adapters were found for 'ftp://127.0.0.1/corpus.txt'"),
    ("/loop", "more than 10 redirects (a redirect loop?)"),
])
def test_redirects_to_other_schemes_and_loops_are_one_error(tmp_path, location, needle):
    with serve({}, forbid_agent_prefix="") as srv:
        srv.redirects = {"/corpus.txt": location, "/loop": "/corpus.txt"}
        url = srv.url("/corpus.txt")
        with pytest.raises(DataError) as info:
            _run(tmp_path, dataset="url", url=url)
    assert str(info.value).startswith(f"{url}: ") and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_a_response_that_never_ends_stops_at_max_bytes(tmp_path):
    """An endless body wrote 11 GB into data/cache in 15 s; now it stops at data.max_bytes, leaving none."""
    with serve({}, forbid_agent_prefix="") as srv:
        srv.faults["/endless.txt"] = ["endless"]
        url = srv.url("/endless.txt")
        with pytest.raises(DataError, match=rf"^{url}: the response goes on past 1,000,000 bytes, more than "
                                            r"data.max_bytes \(1,000,000\); raise data.max_bytes"):
            _run(tmp_path, dataset="url", url=url, max_bytes=1_000_000)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_download_the_server_says_is_too_big_is_refused_before_the_body(tmp_path, wiki_zip):
    expected = f"the server says it is {len(wiki_zip):,} bytes, more than data.max_bytes"
    with serve({"/big.zip": wiki_zip}, forbid_agent_prefix="") as server, \
            pytest.raises(DataError, match=expected):
        _run(tmp_path, dataset="url", url=server.url("/big.zip"), max_bytes=len(wiki_zip) - 1)


def test_a_gzip_bomb_stops_at_max_bytes_of_text(tmp_path):
    """A small .gz that inflates to far more text than data.max_bytes is refused while it is read."""
    bomb = gzip.compress(b"a" * (8 << 20), compresslevel=9)  # 8 MiB of text in ~8 KB, one line
    assert len(bomb) < 100_000
    with serve({"/bomb.txt.gz": bomb}, forbid_agent_prefix="") as srv:
        url = srv.url("/bomb.txt.gz")
        with pytest.raises(DataError, match=rf"^data.max_bytes = 1000000: {url} holds more text than that "
                                            r"\(after decompression\)"):
            _run(tmp_path, dataset="url", url=url, max_bytes=1_000_000)
    assert not (tmp_path / "data" / "raw").exists()
