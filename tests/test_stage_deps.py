"""dvc.yaml lists, for every stage, each llm module its script imports (directly or through other llm
modules): otherwise editing that module would not re-run the stage and DVC would serve stale outputs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def module_path(name: str) -> Path:
    """llm.a.b -> llm/a/b.py, or llm/a/b/__init__.py for a package."""
    base = ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def llm_imports(path: Path) -> set[str]:
    """Names of the llm modules that the file at `path` imports at any level."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == "llm")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llm":
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if module_path(f"{node.module}.{alias.name}").exists())
        elif isinstance(node, ast.ImportFrom) and node.level and path.name != "__init__.py":
            package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-node.level])
            names.add(f"{package}.{node.module}" if node.module else package)
    return names


def closure(script: Path) -> set[Path]:
    """Every llm source file the script needs, following imports through the package."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in llm_imports(todo.pop()):
            file = module_path(name)
            if file.exists() and file not in seen:
                seen.add(file)
                todo.append(file)
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_llm_module_is_a_dependency_of_the_stage(stage: str) -> None:
    deps = [ROOT / dep for dep in STAGES[stage]["deps"]]
    script = ROOT / "stages" / f"{stage}.py"
    assert script in deps
    needed = {f for f in closure(script) if f.name != "__init__.py" or f.parent != ROOT / "llm"}
    missing = sorted(str(f.relative_to(ROOT)) for f in needed
                     if not any(f == dep or dep in f.parents for dep in deps))
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_depends_on_llm_code_it_does_not_import(stage: str) -> None:
    """An extra dep re-runs the stage for nothing: e.g. an edit of the encoder must not retrain."""
    needed = closure(ROOT / "stages" / f"{stage}.py")
    extra = [dep for dep in STAGES[stage]["deps"] if dep.startswith("llm/")
             and not any(f == ROOT / dep or ROOT / dep in f.parents for f in needed)]
    assert not extra, f"dvc.yaml stage {stage!r} depends on {extra}, which its script never imports"


def test_training_code_excludes_the_encoder_and_the_tokenizers() -> None:
    """Train and evaluate read shards of token ids: editing how text becomes ids re-runs encode only."""
    for stage in ("train", "evaluate"):
        needed = closure(ROOT / "stages" / f"{stage}.py")
        assert ROOT / "llm" / "encode.py" not in needed, stage
    assert not any(ROOT / "llm" / "tokenizers" in f.parents for f in closure(ROOT / "stages" / "train.py"))
