"""Write .dvc/plots.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined, so that
`dvc plots show` / `dvc plots diff` render with no network (DVC's own page loads them from a CDN).

.dvc/config points DVC at the file (`plots.html_template`); the file is committed, so every clone
renders offline with nothing to install. This script is how it was made, for a maintainer who
wants other versions; it needs `npm` and the npm registry (the tests never run it):

    python tools/offline_plots.py            # then commit .dvc/plots.html

The three libraries are BSD-3-Clause (University of Washington Interactive Data Lab); the licence
text and the packages their builds bundle are copied into the page's header comment.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "plots.html"
# The major versions DVC's own page loads (vega 5, vega-lite 5, vega-embed 6), at their latest releases.
PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
# DVC fills these three placeholders by plain text replacement, everywhere in the page.
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<!--
DVC plots page for this project, with its scripts inlined so that it renders offline.
Made by tools/offline_plots.py; DVC uses it through plots.html_template in .dvc/config.

{notice}
-->
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str, into: Path) -> Path:
    """`npm pack` one package into `into` and unpack it; returns its package/ folder."""
    done = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=into, check=True,
                          capture_output=True, text=True)
    folder = into / name
    with tarfile.open(into / done.stdout.strip().splitlines()[-1]) as archive:
        archive.extractall(folder, filter="data")
    return folder / "package"


def script(package: Path, name: str) -> str:
    """The package's minified browser build, without its source-map comment, as an inline <script>."""
    code = (package / "build" / f"{name}.min.js").read_text(encoding="utf-8")
    code = "\n".join(line for line in code.splitlines() if not line.startswith("//# sourceMappingURL="))
    clashes = [p for p in (*PLACEHOLDERS, "</script") if p in code]
    if clashes:
        raise SystemExit(f"{name}.min.js contains {clashes}: it cannot be inlined into DVC's template")
    return f"    <script>/* {name} */\n{code}\n    </script>"


def notice(packages: dict[str, Path]) -> str:
    """Licence text and, per package, its version, licence and the packages its build bundles."""
    lines = []
    for name, package in packages.items():
        meta = json.loads((package / "package.json").read_text(encoding="utf-8"))
        bundled = ", ".join(sorted(meta.get("dependencies", {})))
        lines.append(f"{name} {meta['version']} ({meta['license']}); its build bundles: {bundled}")
    licence = (packages["vega-embed"] / "LICENSE").read_text(encoding="utf-8").strip()
    heading = "vega, vega-lite and vega-embed are distributed under this licence:"
    return "\n".join(lines) + f"\n\n{heading}\n\n{licence}"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        packages = {name: fetch(name, version, Path(tmp)) for name, version in PACKAGES.items()}
        scripts = "\n".join(script(package, name) for name, package in packages.items())
        OUT.write_text(PAGE.format(notice=notice(packages), scripts=scripts), encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
