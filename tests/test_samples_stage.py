"""The samples stage under real DVC: `generate.*` re-runs it alone, `eval.*` re-runs evaluate alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_project import STAGES, TINY_PARAMS, build_project, dvc, edit_params, stages_ran, stages_skipped

pytestmark = pytest.mark.slow


def test_sampling_and_scoring_params_rerun_only_their_own_stage(tmp_path: Path, shakespeare: Path) -> None:
    project = build_project(tmp_path / "project", shakespeare.parent)
    assert stages_ran(dvc(project, "repro").stdout) == list(STAGES)
    scores = (project / "metrics" / "eval.json").read_bytes()

    edit_params(project, generate={"prompt": "ROMEO:"})
    output = dvc(project, "repro").stdout
    assert stages_ran(output) == ["samples"], output
    assert sorted(stages_skipped(output)) == sorted(set(STAGES) - {"samples"}), output
    samples = (project / "reports" / "samples.txt").read_text(encoding="utf-8")
    assert "prompt: 'ROMEO:'" in samples
    assert samples.count("\nROMEO:") == TINY_PARAMS["generate"]["num_samples"]
    assert (project / "metrics" / "eval.json").read_bytes() == scores  # nothing was re-scored

    edit_params(project, eval={"batch_size": 16})
    assert stages_ran(dvc(project, "repro").stdout) == ["evaluate"]
    assert (project / "reports" / "samples.txt").read_text(encoding="utf-8") == samples
