"""MkDocs hook: tables generated from the code, so the reference pages cannot drift from it.

A page places a marker on a line of its own; the build replaces it with the table:

- `<!-- generated: PrunerConfig -->`: every field of `PrunerConfig`, its default and its `help` metadata;
- `<!-- generated: DistillationConfig -->`: the same for `DistillationConfig`;
- `<!-- generated: architectures -->`: the registry's table (`hf-adapt-pruner architectures`).

A new field with help text appears on the next build; a marker the hook does not know fails the (strict) build.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- generated: (\S+) -->$", re.MULTILINE)


def _code():
    """The package of this checkout (not another installed copy)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import hf_adapt_pruner
    from hf_adapt_pruner.architectures import architecture_table

    return hf_adapt_pruner, architecture_table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def field_table(config_class: type) -> str:
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(config_class):
        if f.name == "library_version":  # written by the library, not set by users
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        rows.append(f"| `{f.name}` | `{default!r}` | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join(rows) + "\n"


def generate(name: str) -> str:
    package, architecture_table = _code()
    if name == "architectures":
        return architecture_table()
    if name in ("PrunerConfig", "DistillationConfig"):
        return field_table(getattr(package, name))
    raise ValueError(f"unknown generated table {name!r}: use PrunerConfig, DistillationConfig or architectures")


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: generate(m.group(1)), markdown)
