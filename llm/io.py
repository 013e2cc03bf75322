"""Small file helpers: atomic writes of files and folders (temp + fsync + rename), output checks done
before a stage's work, strict UTF-8, hashing.

Every temporary is named `.tmp-<name>.XXXXXXXX` (a file) or `.tmp-<name>-XXXXXXXX` (a folder) beside
the output `<name>` it becomes, so a run killed mid-write leaves something the next run recognises and
removes (`sweep_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.errors import DataError, OutputError


def sweep_temporaries(path: str | os.PathLike) -> None:
    """Remove the temporaries that writes of `path` killed midway left beside it (`.tmp-<name>.XXXXXXXX`
    files, `.tmp-<name>-XXXXXXXX` folders); outputs are written by one process at a time."""
    path = Path(path)
    stale = re.compile(rf"\.tmp-{re.escape(path.name)}[.-][a-z0-9_]+")  # tempfile's random names
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            if stale.fullmatch(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (a rename in it), to the disk; a folder that cannot be
    opened (Windows) is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it, rename it over `path` and fsync the folder,
    else delete it.

    Readers never see a half-written file, a power cut right after cannot leave an empty one (the bytes
    are on disk before the name points at them), and temporaries of killed runs are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to fill; on success it replaces `path` by renames, else it is deleted.

    The folder is built as `.tmp-<name>-*/<name>` beside `path`, so readers never see a half-filled
    `path`, and a failure leaves the previous one as it was. Its files and folders are fsynced before
    the swap and the parent after it. Staging folders of a killed run are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    workspace = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        staging = workspace / path.name
        staging.mkdir()  # made by mkdir, so it gets the usual permissions (mkdtemp's are 0700)
        yield staging
        for folder, _, files in os.walk(staging):
            for name in files:
                _fsync(Path(folder, name))
            _fsync(Path(folder))
        if path.exists():
            os.replace(path, workspace / "old")
        os.replace(staging, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def check_outputs(*files: str | os.PathLike, folders: tuple[str | os.PathLike, ...] = ()) -> None:
    """Before a stage's work: every output can be written where it goes, and what killed runs left
    beside it is removed.

    `files` are written as files, `folders` as whole folders. A path component that is a file, an
    output file that is a folder, or a folder that cannot be written is an OutputError naming it,
    raised before hours of work rather than after; nothing is created either way.
    """
    outputs = [(Path(f), False) for f in files] + [(Path(f), True) for f in folders]
    for path, is_folder in outputs:
        for ancestor in reversed(path.parents):
            if ancestor.exists() and not ancestor.is_dir():
                raise OutputError(f"{ancestor}: is a file, but {path} must be written inside it as a folder; "
                                  "move or delete the file")
        if not is_folder and path.is_dir():
            raise OutputError(f"{path}: is a folder, but this stage writes it as a file; move or delete the "
                              "folder")
        existing = next(folder for folder in path.parents if folder.exists())  # "." at least
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise OutputError(f"{existing}: cannot write there ({exc.strerror}); make it a writable "
                              "folder") from None
        if path.parent.is_dir():
            sweep_temporaries(path)


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
