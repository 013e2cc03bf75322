"""What a user meets first when something is off: a stage started by the wrong Python, Ctrl-C over a
progress bar, `llm generate` in the wrong folder or with a bad option, a progress bar's units."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from llm.cli import main
from llm.config import DataConfig
from llm.data import prepare_raw
from llm.stage import run_stage

ROOT = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = sorted((ROOT / "stages").glob("*.py"))


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda path: path.stem)
def test_a_stage_run_by_a_python_without_the_packages_says_what_to_do(script: Path, tmp_path: Path) -> None:
    """As when DVC runs `python stages/...` with a system Python first on PATH (-S: no site-packages)."""
    done = subprocess.run([sys.executable, "-S", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and not done.stdout, done
    assert done.stderr.startswith("error: this Python (") and done.stderr.count("\n") == 1, done.stderr
    assert "cannot import" in done.stderr and "make install" in done.stderr
    assert "source .venv/bin/activate" in done.stderr and "make repro" in done.stderr


def test_ctrl_c_over_a_progress_bar_prints_interrupted_on_a_line_of_its_own(capsys) -> None:
    def main_interrupted_midway() -> None:
        bar = tqdm(total=100, desc="encode", mininterval=0)
        bar.update(5)
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_stage(main_interrupted_midway)
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "encode:" in err and err.endswith("\ninterrupted\n"), repr(err)


def test_llm_generate_outside_a_project_says_to_run_from_the_project_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["generate"]) == 2
    err = capsys.readouterr().err
    documented = "params.yaml: not found; run from the project root"  # the README's troubleshooting row
    assert err.startswith(f"error: {documented}") and err.count("\n") == 1, err
    assert f"| `{documented}` |" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_llm_generate_help_gives_the_range_of_every_checked_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]
    for option, allowed in (("--max-length MAX_LENGTH", ">= 1"), ("--num-samples NUM_SAMPLES", ">= 1"),
                            ("--temperature TEMPERATURE", ">= 0"), ("--top-k TOP_K", ">= 0"),
                            ("--top-p TOP_P", "> 0 and <= 1"), ("--seed SEED", ">= 0")):
        described = help_text.split(option, 1)[1].split(" --", 1)[0]
        assert allowed in described, f"{option}: {described!r}"


def test_the_split_writer_bar_shows_no_fractions(tmp_path: Path, shakespeare_text: str, capsys) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(shakespeare_text[:50_000], encoding="utf-8")
    config = DataConfig(dataset="text_files", text_files_dir=str(tmp_path / "texts"))
    prepare_raw(config, tmp_path / "raw", progress=True)
    assert "0.00" not in capsys.readouterr().err
