"""Atomic writes: fsync before the rename and of the folder after it; temporaries of killed writes swept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import llm.io
from llm.errors import OutputError
from llm.io import atomic_dir, check_outputs, write_text_atomic


@pytest.fixture()
def disk_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (of the path its descriptor names) and rename, in order."""
    log: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        log.append(("rename", f"{src} -> {dst}"))
        replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name a descriptor's file")
    monkeypatch.setattr(llm.io.os, "fsync", logged_fsync)
    monkeypatch.setattr(llm.io.os, "replace", logged_replace)
    return log


def test_a_file_reaches_the_disk_before_its_name_points_at_it(tmp_path: Path, disk_log: list) -> None:
    """Without the fsyncs, a crash after the rename can leave an empty file where a checkpoint stood."""
    target = tmp_path / "last.pt"
    write_text_atomic(target, "weights")
    (kind1, synced), (kind2, renamed), (kind3, folder) = disk_log
    assert (kind1, kind2, kind3) == ("fsync", "rename", "fsync")
    assert renamed == f"{synced} -> {target}" and Path(synced).name.startswith(".tmp-last.pt.")
    assert folder == str(tmp_path)


def test_a_folder_is_synced_file_by_file_before_the_swap(tmp_path: Path, disk_log: list) -> None:
    with atomic_dir(tmp_path / "shards") as staging:
        (staging / "train").mkdir()
        (staging / "train" / "shard_00000.npy").write_bytes(b"ids")
        (staging / "meta.json").write_text("{}")
    kinds = [kind for kind, _ in disk_log]
    assert kinds == ["fsync"] * 4 + ["rename", "fsync"]  # 2 files, 2 folders; swap; the parent
    synced = {Path(path).name for _, path in disk_log[:4]}
    assert synced == {"shard_00000.npy", "meta.json", "train", "shards"}
    assert disk_log[-1] == ("fsync", str(tmp_path))


def test_temporaries_of_killed_writes_are_swept_and_nothing_else(tmp_path: Path) -> None:
    stale = [tmp_path / ".tmp-last.pt.a1b2c3d4", tmp_path / ".tmp-last.pt.x"]
    other = [tmp_path / name for name in (".tmp-last.pt.backup.old", ".tmp-best_model.pt.a1b2c3d4", "keep")]
    for path in stale + other:
        path.write_bytes(b"half written")
    write_text_atomic(tmp_path / "last.pt", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in other) + ["last.pt"]


def test_output_checks_create_nothing_when_they_refuse(tmp_path: Path) -> None:
    (tmp_path / "metrics").write_text("a file")
    with pytest.raises(OutputError, match="metrics: is a file, but .*metrics/train.json must be written in"):
        check_outputs(tmp_path / "models" / "model.pt", tmp_path / "metrics" / "train.json")
    assert not (tmp_path / "models").exists()
    (tmp_path / "out.txt").mkdir()
    with pytest.raises(OutputError, match="out.txt: is a folder, but this stage writes it as a file"):
        check_outputs(tmp_path / "out.txt")
    check_outputs(folders=(tmp_path / "out.txt",))  # a folder output may be a folder
    check_outputs(tmp_path / "new" / "deeper" / "file.txt")
    assert not (tmp_path / "new").exists()  # the writer makes its folders, not the check
