"""Safe reading of downloaded archives (.zip, .tar[.gz], .gz) without ever writing member paths to disk.

Every member name is checked before anything is read: absolute paths, `..` components, drive letters,
symlinks, hardlinks and device files are refused (zip-slip / tar-slip), so a hostile archive fails as a
whole instead of being partly used.
"""

from __future__ import annotations

import contextlib
import gzip
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from llm.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"


def _check_member_name(archive: Path, name: str) -> None:
    """Refuse names that would escape an extraction folder."""
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in parts:
        raise DataError(f"{archive}: unsafe member path {name!r} (absolute or containing '..'); "
                        "refusing the whole archive — check the URL or use a trusted copy")


def _unsafe_kind(archive: Path, name: str, kind: str) -> DataError:
    return DataError(f"{archive}: member {name!r} is a {kind}; links and special files are refused "
                     "(tar/zip-slip) — check the URL or use a trusted copy")


class Archive:
    """A validated archive: `names` lists its regular files; `open(name)` streams one of them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            if zipfile.is_zipfile(path):
                self._zip = zipfile.ZipFile(path)
                self.names = self._zip_names()
            else:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed in close())
                self.names = self._tar_names()
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
            self.close()
            raise DataError(f"{path}: corrupt or unreadable archive ({exc}); delete it to download again") \
                from None
        except DataError:
            self.close()
            raise

    def _zip_names(self) -> list[str]:
        assert self._zip is not None
        names = []
        for info in self._zip.infolist():
            _check_member_name(self.path, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _unsafe_kind(self.path, info.filename, "symlink")
            if not info.is_dir():
                names.append(info.filename)
        return names

    def _tar_names(self) -> list[str]:
        assert self._tar is not None
        names = []
        for member in self._tar.getmembers():
            _check_member_name(self.path, member.name)
            if member.issym() or member.islnk():
                raise _unsafe_kind(self.path, member.name, "symlink" if member.issym() else "hardlink")
            if member.isfile():
                names.append(member.name)
            elif not member.isdir():
                raise _unsafe_kind(self.path, member.name, "special file")
        return names

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        """Stream one regular-file member by its name in the archive."""
        if name not in self.names:
            shown = ", ".join(self.names[:10]) + (" ..." if len(self.names) > 10 else "")
            raise DataError(f"{self.path}: no member {name!r}; it holds: {shown}")
        if self._zip is not None:
            with self._zip.open(name) as stream:
                yield stream  # type: ignore[misc]
        else:
            assert self._tar is not None
            stream = self._tar.extractfile(name)
            assert stream is not None  # names holds regular files only
            with stream:
                yield stream

    def close(self) -> None:
        """Release the underlying file."""
        for handle in (self._zip, self._tar):
            if handle is not None:
                handle.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kind_of(path: Path) -> str:
    """What a downloaded file is, by content: `zip`, `tar`, `gzip` (one compressed text) or `text`."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, EOFError):
        pass
    with open(path, "rb") as f:
        return "gzip" if f.read(2) == GZIP_MAGIC else "text"


@contextlib.contextmanager
def open_gzip_text(path: Path) -> Iterator[BinaryIO]:
    """Stream the decompressed bytes of a single-file .gz."""
    with gzip.open(path, "rb") as stream:
        yield stream  # type: ignore[misc]
