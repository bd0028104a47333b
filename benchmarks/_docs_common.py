"""What the docs' sections share: reading results, the header line, per-seed cells and tables."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: F401  (the sections draw with this one, its backend set above)


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def measured(results: Path, name: str) -> list[dict]:
    """The non-smoke results of `name.json` and its variants (`name_640.json`, ...)."""
    found = [load(results, path.stem) for path in sorted(results.glob(f"{name}*.json"))]
    return [r for r in found if not r["smoke"]]


def header(result: dict) -> str:
    m = result["machine"]
    return f"_{result['model']}; measured {result['date']} on {m['cpus']} CPU threads, torch {m['torch']}, " \
           f"transformers {m['transformers']}._\n"  # fmt: skip


def seeds(rows: list[dict], key: str) -> str:
    """'mean (seed 0, seed 1, ...)' of `key` over rows that differ only in their seed."""
    values = [r[key] for r in rows]
    each = ", ".join(f"{v:.2f}" for v in values)
    return f"{statistics.mean(values):.2f}" + (f" ({each})" if len(values) > 1 else "")


def sources(result: dict) -> list[str]:
    return [key.removeprefix("ppl ") for key in result["rows"][0] if key.startswith("ppl ")]


def originals(result: dict) -> str:
    return ", ".join(f"{result['rows'][0]['ppl ' + name]:.2f}" for name in sources(result))


def grouped(rows: list[dict], key: str, names: list[str], columns: list[str], fixed) -> list[str]:
    """A table with a line per value of `key` (in order of appearance): the value, the `columns` cells made by
    `fixed(group)`, then the perplexity of each source over the group's seeds."""
    lines = ["| " + " | ".join([key, *columns, *(f"ppl {n}" for n in names)]) + " |",
             "|---|" + "---:|" * (len(columns) + len(names))]  # fmt: skip
    for value in dict.fromkeys(r[key] for r in rows):
        group = [r for r in rows if r[key] == value]
        cells = [str(value), *fixed(group), *(seeds(group, f"ppl {n}") for n in names)]
        lines.append(f"| {' | '.join(cells)} |")
    return [*lines, ""]
