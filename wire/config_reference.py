"""The configuration reference, generated from the config dataclasses themselves: every field of `RunConfig`, its
type, its default and the comment beside it in the source. The docs site renders it (scripts/docs_hooks.py), so
the reference cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import re
import tokenize
from typing import Any

from geomoe.wire.run_config import NOT_SETTABLE, RunConfig


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the `# comment` on the line that declares it in `cls`'s source."""
    comments, line_field = {}, {}
    source = inspect.getsource(cls)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row = token.start[0]
        if token.type == tokenize.NAME and row not in line_field and token.start[1] == 4:
            line_field[row] = token.string
        elif token.type == tokenize.COMMENT and row in line_field:
            comments[line_field[row]] = token.string.lstrip("# ").strip()
    return comments


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _shown(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return ""
    return "`" + json.dumps(value if not isinstance(value, tuple) else list(value)) + "`"


def _type_name(field: dataclasses.Field) -> str:
    text = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return re.sub(r"\s+", " ", text).replace("|", "\\|")


def section(cls: type, prefix: str) -> list[str]:
    """Markdown for one dataclass: its own fields as a table, then its nested dataclasses as their own sections."""
    comments = field_comments(cls)
    lines = [f"## `{prefix}`" if prefix else "## Top level", "", (inspect.getdoc(cls) or "").splitlines()[0], ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for field in dataclasses.fields(cls):
        dotted = f"{prefix}.{field.name}" if prefix else field.name
        default = _default(field)
        if dataclasses.is_dataclass(default):
            nested.append((type(default), dotted))
            if not prefix:
                continue
        meaning = comments.get(field.name, "")
        if dotted in NOT_SETTABLE:
            meaning = f"(derived, not settable: {NOT_SETTABLE[dotted]}) {meaning}"
        lines.append(f"| `{dotted}` | `{_type_name(field)}` | {_shown(default)} | {meaning.replace('|', '/')} |")
    lines.append("")
    for kind, dotted in nested:
        lines += section(kind, dotted)
    return lines


def reference_markdown() -> str:
    """The whole reference page."""
    intro = [
        "# Configuration reference",
        "",
        "Every key of a run's configuration, generated from the config classes (`RunConfig` and the dataclasses it",
        "holds). Set keys in a TOML file (`--config FILE`, tables by section), with `--set section.key=value`, or in",
        "Flower's run config (`flwr run . -c 'federation.rounds=5'`). Unknown keys, wrong types and values outside",
        "a key's choices are refused, naming the key.",
        "",
    ]
    return "\n".join(intro + section(RunConfig, "")) + "\n"
