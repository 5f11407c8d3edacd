"""MkDocs hooks (mkdocs.yml): pages generated at build time, so they cannot drift from their sources.

- `index.md`: README.md, its `docs/` links made relative to the site.
- `configuration.md`: the configuration reference, from the config dataclasses (geomoe.wire.config_reference).
- `benchmarks.md`: every figure's numbers in docs/figures/*.json, with its plot where there is one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def index_page() -> str:
    """README as the home page; links into docs/ become site links, other repository paths stay as text."""
    text = (ROOT / "README.md").read_text()
    return re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", text)


def benchmarks_page(figures: Path) -> str:
    """One section per figure JSON: where its page discusses it, its plot, and a link to the numbers."""
    guides = {p.stem: p.read_text() for p in figures.parent.glob("*.md")}
    lines = [
        "# All figures",
        "",
        "Every benchmark and analysis writes its numbers as JSON (and a plot where a person would rather look);",
        "these are the ones the guides quote, as measured. Re-run the command a page names to measure your machine.",
        "",
    ]
    for path in sorted(figures.glob("*.json")):
        cited = [stem for stem, text in guides.items() if f"figures/{path.name}" in text or path.stem in text]
        data = json.loads(path.read_text())
        keys = ", ".join(f"`{k}`" for k in list(data)[:8]) if isinstance(data, dict) else "a list"
        lines += [f"## {path.stem}", ""]
        if cited:
            lines.append("Discussed in " + ", ".join(f"[{stem}]({stem}.md)" for stem in sorted(cited)) + ".")
        lines += [f"Numbers: [figures/{path.name}](figures/{path.name}) (keys: {keys}).", ""]
        plot = path.with_suffix(".png")
        if plot.exists():
            lines += [f"![{path.stem}](figures/{plot.name})", ""]
    return "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:
    from geomoe.wire.config_reference import reference_markdown

    docs = Path(config["docs_dir"])
    pages = {
        "index.md": index_page(),
        "configuration.md": reference_markdown(),
        "benchmarks.md": benchmarks_page(docs / "figures"),
    }
    for name, content in pages.items():
        files.append(File.generated(config, name, content=content))
    return files
