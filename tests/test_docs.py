"""Docs consistency: the config dataclasses are the one place defaults live.

The README parameter table is checked against them, and its "re-runs" column against
the stage graph in dvc.yaml; params.yaml must name every key, with a comment (its
values are the user's to change, so they are not checked). Run this file as a
script to print the table for the README: `python tests/test_docs.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm.config import DERIVED_KEYS, SECTIONS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TABLE_START = "<!-- params-table:start -->"
TABLE_END = "<!-- params-table:end -->"
TABLE_HEADER = "| parameter | default | meaning | re-runs |"


def field_default(spec: Field) -> Any:
    """The default value a dataclass field takes when params.yaml omits it."""
    return spec.default_factory() if spec.default is MISSING else spec.default  # type: ignore[misc]


def stage_graph(dvc_yaml: Path) -> tuple[list[str], dict[str, set[str]], dict[str, set[str]]]:
    """Stage order, params sections each stage declares, and the stages each stage feeds."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    order = list(stages)
    sections: dict[str, set[str]] = {}
    outs: dict[str, list[str]] = {}
    for name, stage in stages.items():
        declared = set()
        for entry in stage.get("params", []):
            declared.update([entry] if isinstance(entry, str) else
                            [key.split(".")[0] for keys in entry.values() for key in keys])
        sections[name] = declared
        outs[name] = [next(iter(o)) if isinstance(o, dict) else o
                      for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]

    def feeds(out: str, dep: str) -> bool:
        return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")

    children = {name: {other for other in order if other != name
                       for dep in stages[other].get("deps", []) for out in outs[name] if feeds(out, dep)}
                for name in order}
    return order, sections, children


def stages_rerun_by(section: str, dvc_yaml: Path = ROOT / "dvc.yaml") -> list[str]:
    """Stages that run again when a key of `section` changes: declarers and everything downstream."""
    order, sections, children = stage_graph(dvc_yaml)
    todo = [name for name in order if section in sections[name]]
    hit = set(todo)
    while todo:
        for child in children[todo.pop()]:
            if child not in hit:
                hit.add(child)
                todo.append(child)
    return [name for name in order if name in hit]


def render_default(value: Any) -> str:
    """A default as JSON (which is also valid YAML), escaped for a Markdown table cell."""
    return "`" + json.dumps(value).replace("|", "\\|") + "`"


def render_table() -> str:
    """The README parameter table, one row per field of every params.yaml section."""
    rows = [TABLE_HEADER, "|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        rerun = ", ".join(stages_rerun_by(section)) or "nothing"
        for spec in fields(cls):
            doc = spec.metadata["doc"]
            if (section, spec.name) in DERIVED_KEYS:
                doc += " (not a params.yaml key)"
            default = render_default(field_default(spec))
            rows.append(f"| `{section}.{spec.name}` | {default} | {doc} | {rerun} |")
    return "\n".join(rows)


def split_row(line: str) -> list[str]:
    """Cells of a Markdown table row, honouring `\\|` escapes."""
    cells = line.strip().strip("|").replace("\\|", "\0").split("|")
    return [cell.strip().replace("\0", "|") for cell in cells]


def readme_table_block() -> str:
    """The text between the README's parameter-table markers."""
    text = README.read_text(encoding="utf-8")
    assert TABLE_START in text and TABLE_END in text, f"README.md lacks the {TABLE_START} block"
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()


def readme_table() -> dict[str, list[str]]:
    """README parameter table rows keyed by parameter name (without backticks)."""
    block = readme_table_block().splitlines()
    assert block[0].strip() == TABLE_HEADER, f"README parameter table header changed: {block[0]!r}"
    return {split_row(line)[0].strip("`"): split_row(line) for line in block[2:] if line.strip()}


def all_fields() -> list[tuple[str, Field]]:
    """(section, field) for every field of every params.yaml section."""
    return [(section, spec) for section, cls in SECTIONS.items() for spec in fields(cls)]


def test_params_yaml_names_every_key_with_a_comment() -> None:
    """The user's params.yaml: every key present and explained; its values are the user's, not checked."""
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    assert list(raw) == list(SECTIONS), "params.yaml sections differ from llm/config.py (or their order)"
    for section, cls in SECTIONS.items():
        expected = [f.name for f in fields(cls) if (section, f.name) not in DERIVED_KEYS]
        assert sorted(raw[section]) == sorted(expected), f"params.yaml section {section!r} keys"
    key_lines = [line for line in text.splitlines() if re.match(r"^  \w+:", line)]
    assert len(key_lines) == sum(len(keys) for keys in raw.values())
    uncommented = [line.split(":")[0].strip() for line in key_lines if not re.search(r"\s#\s*\S", line)]
    assert not uncommented, f"params.yaml keys without a comment: {uncommented}"


def test_readme_table_lists_every_field_once() -> None:
    rows = readme_table()
    expected = {f"{section}.{spec.name}" for section, spec in all_fields()}
    assert set(rows) == expected, (f"missing: {sorted(expected - set(rows))}, unknown: "
                                   f"{sorted(set(rows) - expected)}; regenerate: python tests/test_docs.py")


@pytest.mark.parametrize(("section", "spec"), all_fields(), ids=lambda v: getattr(v, "name", v))
def test_readme_table_row_is_exact(section: str, spec: Field) -> None:
    name, default, _meaning, rerun = readme_table()[f"{section}.{spec.name}"]
    assert json.loads(default.strip("`")) == field_default(spec), f"README default of {name}"
    assert rerun == (", ".join(stages_rerun_by(section)) or "nothing"), f"README re-runs of {name}"


def test_readme_table_matches_generated() -> None:
    stale = "README parameter table is stale; regenerate: python tests/test_docs.py"
    assert readme_table_block() == render_table(), stale


def test_rerun_column_follows_dvc_yaml() -> None:
    assert stages_rerun_by("train") == ["train", "evaluate", "samples"]
    assert stages_rerun_by("tokenizer") == ["fit_tokenizer", "encode", "train", "evaluate", "samples"]
    assert stages_rerun_by("generate") == ["samples"]
    assert stages_rerun_by("runtime") == []


def test_readme_quickstart_is_two_make_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first_section = text.split("\n## ", 2)[1]
    assert first_section.lower().startswith("quickstart"), "the README's first section must be the Quickstart"
    code = first_section.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in code.splitlines()[1:] if line.split("#")[0].strip()]
    assert commands == ["make repro", "make test"]


def test_readme_documents_exactly_the_environment_variables_the_code_reads() -> None:
    code = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "llm").rglob("*.py"))
    read_by_code = set(re.findall(r"[\"'](LLM_[A-Z_]+)[\"']", code))  # quoted LLM_* names are env vars
    in_readme = set(re.findall(r"`(LLM_[A-Z_]+)`", README.read_text(encoding="utf-8")))
    assert read_by_code, "found no LLM_* environment variable in llm/: has the way they are read changed?"
    assert read_by_code == in_readme


if __name__ == "__main__":
    print(render_table())
