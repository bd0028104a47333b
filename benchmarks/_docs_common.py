"""What the docs' sections share: reading results, the header line, per-seed cells and tables."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import matplotlib
from _main_job import variant_rows


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: F401  (the sections draw with this one, its backend set above)


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def measured(results: Path, name: str) -> list[dict]:
    """The non-smoke results of `name.json` and its variants (`name_640.json`, ...)."""
    found = [load(results, path.stem) for path in sorted(results.glob(f"{name}*.json"))]
    return [r for r in found if not r["smoke"]]


# Sentences of a result's `note` that tell how a run went on the day (dates, clock times, what else ran, which
# runs were reassembled) rather than what was measured: the page states its setting once, in its Setting table.
ANECDOTE = re.compile(
    r"\d{4}-\d{2}-\d{2}|\b\d{1,2}:\d{2}\b|session|beside|side by side|shared|inflated|earlier|found on|issue|"
    r"previous|assembl|--reuse|merged|idle|nothing else|test run|profiled|one thread each|two at a time|at once|"
    r"compare only|not comparable|do not compare|roughly|alpha 1\.0|main job's|^See ",
    re.IGNORECASE,
)
# Row labels as the scripts wrote them -> as the page shows them.
LABELS = {"proportional (previous)": "proportional", "previous default (proportional, 50 steps x 32)":
          "proportional, 50 steps x 32"}  # fmt: skip


def note(result: dict) -> str:
    """What the result's note says about the measurement, without the day's circumstances."""
    sentences = re.split(r"(?<=\.) ", result.get("note") or "")
    return " ".join(s for s in sentences if s and not ANECDOTE.search(s))


def label(text) -> str:
    return LABELS.get(str(text), str(text))


def setting_row(title: str, result: dict) -> str:
    """One line of the page's Setting table: when, on what, with which versions."""
    m = result["machine"]
    return (f"| {title} | {result['date'][:10]} | {m.get('cpu', 'not recorded')} | {m['cpus']} | "
            f"{m['torch']} | {m['transformers']} |")  # fmt: skip


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
        cells = [label(value), *fixed(group), *(seeds(group, f"ppl {n}") for n in names)]
        lines.append(f"| {' | '.join(cells)} |")
    return [*lines, ""]


def main_job_comparison(result: dict, title: str, scores: str) -> list[str]:
    """A section of a `_main_job.compare` result: one row per variant, mean (each seed). No times: the runs of one
    result may have shared the machine differently."""
    original, rows = result["rows"][0], result["rows"][1:]
    lines = [f"## {title}", "",
             f"{result['model']} to keep {result['target_ratio']} in {result['stages']} prune events over "
             f"{result['steps']} steps of {result['batch']} of python3.11-doc, distillation alpha "
             f"{result['distill_alpha']}, {scores}. Held-out perplexity on {result['eval_tokens']:,} tokens of "
             f"python3.11-doc files never trained on (original {original['ppl_in_domain']:.2f}) and of git-doc "
             f"(original {original['ppl_other_source']:.2f}); cloze: zero-shot accuracy on "
             f"{result['cloze']['questions']} 4-way questions from git-doc prose (original "
             f"{original['cloze']['acc']:.3f}); mean (each seed). " + note(result), "",
             "| | ppl python3.11-doc | ppl git-doc | cloze |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for label in result["variants"]:
        group = variant_rows(rows, result["variants"], label)
        cloze = [{"cloze": r["cloze"]["acc"]} for r in group]
        lines.append(f"| {label} | {seeds(group, 'ppl_in_domain')} | {seeds(group, 'ppl_other_source')} | "
                     f"{seeds(cloze, 'cloze')} |")  # fmt: skip
    return [*lines, ""]
