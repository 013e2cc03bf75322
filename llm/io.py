"""Small file helpers: atomic writes of files and folders (temp + rename), strict UTF-8, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, else delete it.

    Readers never see a half-written file, and a crash leaves at most a
    `.tmp-*` file that the next successful write does not depend on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to fill; on success it replaces `path` by renames, else it is deleted.

    The folder is built as `.tmp-<name>-*/<name>` beside `path`, so readers never see a half-filled
    `path`, and a failure leaves the previous one as it was. Staging folders of a killed run are
    removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{path.name}-"
    for stale in path.parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    workspace = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    try:
        staging = workspace / path.name
        staging.mkdir()  # made by mkdir, so it gets the usual permissions (mkdtemp's are 0700)
        yield staging
        if path.exists():
            os.replace(path, workspace / "old")
        os.replace(staging, path)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, keys in insertion order, trailing newline) atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def utf8_error(name: str, exc: UnicodeDecodeError, offset: int = 0) -> DataError:
    """The error for text that is not UTF-8: the file, the byte offset (`offset` + where in the
    decoded bytes) and the bad byte."""
    return DataError(f"{name}: not valid UTF-8 at byte {offset + exc.start} (bad byte "
                     f"{exc.object[exc.start]:#04x}); convert it to UTF-8 (e.g. iconv -f latin1 -t UTF-8 "
                     "in.txt > out.txt)")


def decode_utf8(data: bytes, name: str, offset: int = 0) -> str:
    """`data` (found at byte `offset` of the file `name`) as strict UTF-8 text, else `utf8_error`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise utf8_error(name, exc, offset) from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
