"""Turn the `data` params into a split Plan: WikiText releases, a folder of text files, or any URL.

Environment: `LLM_WIKITEXT_BASE_URL` replaces https://wikitext.smerity.com (tests serve archives locally).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from llm.config import SPLITS, WIKITEXT_DATASETS, DataConfig
from llm.data.archives import Archive, kind_of, open_gzip_text
from llm.data.download import RetryPolicy, fetch
from llm.data.splits import Plan, TextSource, assign_files, file_source
from llm.errors import DataError

WIKITEXT_BASE_URL = "https://wikitext.smerity.com"
# Unverified (see the shared data README), hence the override hint on mismatch.
PINNED_SHA256 = {"wikitext-2-raw-v1": "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"}
ROLE_WORDS = {"train": {"train", "training"}, "valid": {"valid", "validation", "val", "dev"},
              "test": {"test"}}


def wikitext_url(dataset: str) -> str:
    """Download URL of a WikiText release (base overridable with LLM_WIKITEXT_BASE_URL)."""
    base = os.environ.get("LLM_WIKITEXT_BASE_URL") or WIKITEXT_BASE_URL
    return f"{base.rstrip('/')}/{dataset}.zip"


def wikitext_members(dataset: str) -> list[str]:
    """[train, valid, test] member names, e.g. wikitext-2-raw/wiki.train.raw."""
    size = dataset.split("-")[1]
    raw = dataset.endswith("-raw-v1")
    folder, ext = (f"wikitext-{size}-raw", "raw") if raw else (f"wikitext-{size}", "tokens")
    return [f"{folder}/wiki.{split}.{ext}" for split in SPLITS]


@contextlib.contextmanager
def open_plan(config: DataConfig, *, cache_dir: Path | None = None, policy: RetryPolicy | None = None,
              progress: bool = True) -> Iterator[Plan]:
    """Fetch what `config` names (cached) and yield the Plan; archives stay open until the block ends."""
    with contextlib.ExitStack() as stack:
        if config.dataset == "text_files":
            yield _text_files_plan(config)
            return
        url = wikitext_url(config.dataset) if config.dataset in WIKITEXT_DATASETS else config.url
        sha256 = config.sha256 or PINNED_SHA256.get(config.dataset, "")
        hint = ("if you trust this download, accept its checksum: `dvc exp run -S data.sha256=<actual>` "
                "or set data.sha256: <actual> in params.yaml")
        path = fetch(url, sha256=sha256, cache_dir=cache_dir, policy=policy, progress=progress,
                     sha256_hint=hint, max_bytes=config.max_bytes)
        members = wikitext_members(config.dataset) if config.dataset in WIKITEXT_DATASETS else config.members
        yield _download_plan(path, url, members, stack)


def _download_plan(path: Path, url: str, members: list[str], stack: contextlib.ExitStack) -> Plan:
    """A Plan for a downloaded file: named members, a detected train/valid/test triple, or one text."""
    kind = kind_of(path)
    if kind in ("text", "gzip"):
        if members:
            raise DataError(f"data.members = {members!r}: {url} is not an archive; set data.members: []")
        source = TextSource(url, lambda: open_gzip_text(path)) if kind == "gzip" else file_source(path)
        return Plan(by_lines=[source], origin=url)
    archive = stack.enter_context(Archive(path))
    sources = {name: _member_source(archive, url, name) for name in archive.names}
    if members:
        missing = [m for m in members if m not in sources]
        if missing:
            shown = ", ".join(archive.names[:10]) + (" ..." if len(archive.names) > 10 else "")
            raise DataError(f"data.members: {missing[0]!r} is not in {url}; it holds: {shown}")
        return Plan(by_split={split: [sources[m]] for split, m in zip(SPLITS, members)}, origin=url)
    texts = sorted(name for name in sources if not _is_hidden(name))
    triple = _find_triple(texts)
    if triple:
        return Plan(by_split={split: [sources[triple[split]]] for split in SPLITS}, origin=url)
    return Plan(by_lines=[sources[name] for name in texts], origin=url)


def _member_source(archive: Archive, url: str, name: str) -> TextSource:
    return TextSource(f"{url}:{name}", lambda: archive.open(name))


def _is_hidden(name: str) -> bool:
    """Dot files and macOS resource forks, which are never corpus text."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _find_triple(names: list[str]) -> dict[str, str] | None:
    """{split: name} when exactly one file name mentions each of train / valid / test, else None."""
    found: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name in names:
        words = set(re.split(r"[^a-z0-9]+", Path(name).name.lower()))
        roles = [split for split, synonyms in ROLE_WORDS.items() if words & synonyms]
        if len(roles) == 1:
            found[roles[0]].append(name)
    if all(len(found[split]) == 1 for split in SPLITS):
        return {split: found[split][0] for split in SPLITS}
    return None


def _text_files_plan(config: DataConfig) -> Plan:
    """Every *.txt under text_files_dir: as-is triple, by file, or by line ranges of their concatenation."""
    folder = Path(config.text_files_dir)
    if not folder.is_dir():
        raise DataError(f"data.text_files_dir = {config.text_files_dir!r}: no such folder (a relative "
                        f"path is taken from the working directory {Path.cwd().name!r}); create it or fix "
                        "the path in params.yaml")
    files = sorted((p for p in folder.rglob("*.txt") if p.is_file() and not _is_hidden(
        p.relative_to(folder).as_posix())), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise DataError(f"data.text_files_dir = {config.text_files_dir!r}: no *.txt files found in it; "
                        "add UTF-8 .txt files or fix the path")
    origin = f"data.text_files_dir {config.text_files_dir!r}"
    as_is = [folder / f"{split}.txt" for split in SPLITS]
    if all(path in files for path in as_is):
        if len(files) > 3:
            raise DataError(f"{origin}: holds train.txt, valid.txt and test.txt plus {len(files) - 3} other "
                            "*.txt files; keep only the three (used as-is) or rename them to split by file")
        return Plan(by_split={split: [file_source(p)] for split, p in zip(SPLITS, as_is)}, origin=origin)
    assigned = assign_files(files, config.val_fraction, config.test_fraction, config.seed)
    if assigned is None:
        return Plan(by_lines=[file_source(p) for p in files], origin=origin)
    by_split = {split: [file_source(p) for p in assigned[split]] for split in SPLITS}
    return Plan(by_split=by_split, origin=origin)
