"""Robust HTTP download into a cache: streamed, resumed with Range, retried with backoff, checksummed,
bounded in size (data.max_bytes), following redirects to http(s) only.

Environment:
- `LLM_CACHE_DIR`: download cache folder (default `data/cache`, relative to the working directory).
- `LLM_DOWNLOAD_BACKOFF`: seconds of the first retry wait (default 1; doubles per try).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from llm import __version__
from llm.errors import DataError
from llm.io import sha256_file

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; parallel downloads of one URL are then unsafe
    fcntl = None  # type: ignore[assignment]

USER_AGENT = f"llm-from-scratch/{__version__} (+python-requests)"
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
CHUNK_BYTES = 1 << 16
MAX_REDIRECTS = 10
OFFLINE_HINT = ("offline? set data.dataset: text_files and data.text_files_dir: <folder of *.txt> "
                "in params.yaml")


def default_cache_dir() -> Path:
    """`$LLM_CACHE_DIR`, else `data/cache` under the working directory."""
    return Path(os.environ.get("LLM_CACHE_DIR") or "data/cache")


@dataclass
class RetryPolicy:
    """How hard to try: attempts, exponential backoff base (seconds) and (connect, read) timeouts."""

    attempts: int = 5
    backoff: float = field(default_factory=lambda: _env_seconds("LLM_DOWNLOAD_BACKOFF", 1.0))
    timeout: tuple[float, float] = (10.0, 60.0)

    def wait(self, attempt: int) -> None:
        """Sleep before retry number `attempt` (0-based): backoff * 2**attempt."""
        time.sleep(self.backoff * 2**attempt)


def _env_seconds(name: str, default: float) -> float:
    """A non-negative number of seconds from the environment variable `name`."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise DataError(f"environment variable {name}={raw!r}: must be a number of seconds >= 0")
    return value


class _Retryable(Exception):
    """A transient failure worth another try (the message says what happened)."""


def cache_path(url: str, cache_dir: Path) -> Path:
    """Where `url` is cached: a short hash of the full URL plus its file name, so URLs never collide."""
    name = Path(urlsplit(url).path).name or "download"
    return cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def fetch(url: str, *, sha256: str = "", cache_dir: Path | None = None, policy: RetryPolicy | None = None,
          progress: bool = True, sha256_hint: str = "", max_bytes: int | None = None) -> Path:
    """Return a cached, verified copy of `url`, downloading it only when no good copy is cached.

    A cached file is reused without touching the network when `sha256` is empty or matches it.
    A download that does not match `sha256` is downloaded again, whole, when it was resumed from a
    partial file (whose bytes may be corrupt); only a fresh download that still differs is kept in
    the cache, with a DataError that says the actual checksum and `sha256_hint`, how to accept it
    (`<actual>` in it is replaced by the sum). More than `max_bytes` is a DataError.
    """
    target = cache_path(url, cache_dir or default_cache_dir())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{target.parent}: cannot make the download cache folder there ({exc.strerror}); "
                        "fix the path or set LLM_CACHE_DIR to a writable folder") from None
    policy = policy or RetryPolicy()
    with _locked(target):
        if target.exists() and (not sha256 or sha256_file(target) == sha256.lower()):
            return target
        fresh = download(url, target, policy=policy, progress=progress, max_bytes=max_bytes)
        actual = sha256_file(target)
        if sha256 and actual != sha256.lower() and not fresh:
            target.unlink()
            download(url, target, policy=policy, progress=progress, max_bytes=max_bytes)
            actual = sha256_file(target)
    if sha256 and actual != sha256.lower():
        hint = sha256_hint or "set data.sha256 in params.yaml to the actual value if you trust this source"
        raise DataError(f"{url}: sha256 mismatch: expected {sha256.lower()}, actual {actual} (a fresh, "
                        "complete download); " + hint.replace("<actual>", actual))
    return target


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `target`, so parallel runs never write the same cache file."""
    with open(target.with_name(target.name + ".lock"), "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def download(url: str, dest: Path, *, policy: RetryPolicy, progress: bool = True,
             max_bytes: int | None = None) -> bool:
    """Download `url` to `dest` atomically via `dest.part`, resuming that partial file with HTTP Range.

    Returns whether the file is fresh: the body of one response from its first byte, not a resumed one.
    """
    part = dest.with_name(dest.name + ".part")
    with requests.Session() as session:
        session.headers["User-Agent"] = USER_AGENT
        session.max_redirects = MAX_REDIRECTS
        for attempt in range(policy.attempts):
            try:
                start = _attempt(session, url, part, policy, progress, max_bytes)
                os.replace(part, dest)
                return start == 0
            except _Retryable as exc:
                if attempt + 1 == policy.attempts:
                    raise DataError(f"{url}: download failed after {policy.attempts} tries: {exc}; "
                                    f"try again later ({OFFLINE_HINT})") from None
                policy.wait(attempt)
    raise DataError(f"{url}: no download tries allowed (RetryPolicy.attempts = {policy.attempts})")


def _attempt(session: requests.Session, url: str, part: Path, policy: RetryPolicy, progress: bool,
             max_bytes: int | None) -> int:
    """One GET, appending to `part` from its current size; returns the offset its body started at.
    Raises _Retryable on transient failures, DataError on what retrying cannot fix."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = session.get(url, headers=headers, stream=True, timeout=policy.timeout)
    except requests.ConnectionError as exc:
        if _is_name_resolution_error(exc):
            host = urlsplit(url).hostname
            raise DataError(f"{url}: cannot resolve host {host!r}; {OFFLINE_HINT}") from None
        raise _Retryable(f"connection failed ({_reason(exc)})") from None
    except requests.Timeout:
        raise _Retryable("timed out") from None
    except requests.TooManyRedirects:
        raise DataError(f"{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?); check data.url in "
                        "params.yaml") from None
    except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema) as exc:  # a redirect to file:// or ftp://, a malformed URL
        raise DataError(f"{url}: refused ({_reason(exc)}): only http(s) URLs are downloaded, and redirects "
                        "to them followed; check data.url in params.yaml") from None
    with response:
        if response.status_code == 416:  # Range past the end: the partial file is complete, or stale
            if _content_range_total(response) == have:
                return have
            part.unlink(missing_ok=True)
            raise _Retryable("partial download does not match the server's file; restarting")
        start, total = _start_and_total(url, response, have)
        if start is None:
            part.unlink(missing_ok=True)
            raise _Retryable("server refused to resume; restarting")
        if max_bytes is not None and total is not None and total > max_bytes:
            part.unlink(missing_ok=True)
            raise _too_big(url, max_bytes, f"the server says it is {total:,} bytes")
        _write_body(response, part, start, total, progress, url, max_bytes)
        return start


def _too_big(url: str, max_bytes: int, what: str) -> DataError:
    return DataError(f"{url}: {what}, more than data.max_bytes ({max_bytes:,}); raise data.max_bytes in "
                     "params.yaml if you mean to download that much, or check data.url")


def _start_and_total(url: str, response: requests.Response, have: int) -> tuple[int | None, int | None]:
    """Check the status; return (body's offset, full size if known), or (None, None) to restart."""
    status = response.status_code
    if status in RETRY_STATUSES:
        raise _Retryable(f"HTTP {status}")
    if status >= 400:
        what = {403: "forbidden", 404: "not found", 401: "needs authentication"}.get(status, response.reason)
        raise DataError(f"{url}: HTTP {status} ({what}); check data.url / data.dataset in params.yaml")
    length = response.headers.get("Content-Length")
    size = int(length) if length and length.isdigit() else None
    if status == 206:
        first = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0]
        if not first.isdigit() or int(first) != have:
            return None, None
        return have, _content_range_total(response)
    return 0, size  # 200: a full body, whether or not we asked for a range


def _content_range_total(response: requests.Response) -> int | None:
    """The full size from a `Content-Range: bytes a-b/total` (or `*/total`) header, if given."""
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _write_body(response: requests.Response, part: Path, start: int, total: int | None,
                progress: bool, url: str, max_bytes: int | None = None) -> None:
    """Stream the body into `part` at `start`; a short body is a retryable failure (resumed next try);
    more than `max_bytes` in all (an endless response) is a DataError, and the partial file is deleted."""
    written = start
    bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
               desc=Path(urlsplit(url).path).name, disable=not progress, leave=False)
    try:
        with open(part, "r+b" if start else "wb") as f:
            f.seek(start)
            f.truncate()
            for block in response.iter_content(CHUNK_BYTES):
                if max_bytes is not None and written + len(block) > max_bytes:
                    f.close()
                    part.unlink()
                    raise _too_big(url, max_bytes, f"the response goes on past {max_bytes:,} bytes")
                f.write(block)
                written += len(block)
                bar.update(len(block))
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as exc:
        raise _Retryable(f"connection lost after {written} bytes ({_reason(exc)})") from None
    finally:
        bar.close()
    if total is not None and written != total:
        raise _Retryable(f"got {written} of {total} bytes")


def _is_name_resolution_error(exc: BaseException) -> bool:
    """True when a requests ConnectionError comes from DNS (the host name does not resolve)."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, socket.gaierror) or type(item).__name__ == "NameResolutionError":
            return True
        stack.extend([item.__cause__, item.__context__, getattr(item, "reason", None), *item.args])
    return False


def _reason(exc: BaseException) -> str:
    """The innermost readable cause of a requests error, on one line."""
    text = str(getattr(exc.args[0], "reason", exc.args[0]) if exc.args else exc)
    return " ".join(text.split())[:200]
