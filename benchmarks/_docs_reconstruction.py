"""The docs' reconstruction sections: one-shot with and without the least-squares refit, and the main job."""

from __future__ import annotations

import statistics
from pathlib import Path

from _docs_common import main_job_comparison, note, originals, plt, sources
from reconstruction import variant


def cell(rows: list[dict], key: str, form: str = "{:.2f}") -> str:
    """'mean (each seed)' of `key` over the rows that have it, or a dash."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return "—"
    each = f" ({', '.join(form.format(v) for v in values)})" if len(values) > 1 else ""
    return form.format(statistics.mean(values)) + each


def paired_change(rows: list[dict], key: str, refit: str) -> list[float]:
    """Per seed: % change of `key` with the refit `refit` (a variant) against none, for rows of one keep ratio."""
    by_seed = {}
    for row in rows:
        if key in row and variant(row) in ("none", refit):
            by_seed.setdefault(row["seed"], {})[variant(row)] = row[key]
    return [100 * (pair[refit] / pair["none"] - 1) for _, pair in sorted(by_seed.items()) if len(pair) == 2]


def one_shot_rows(results: list[dict]) -> tuple[dict, list[dict]]:
    """(the first result, every pruned row of all results): the sweep may be split over several files."""
    return results[0], [row for result in results for row in result["rows"][1:]]


def reconstruction_section(results: list[dict], docs: Path) -> list[str]:
    first, rows = one_shot_rows(results)
    names = sources(first)
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    variants = sorted({variant(r) for r in rows}, key=lambda v: (v != "none", v))
    notes = " ".join(dict.fromkeys(note(r) for r in results))
    lines = ["## One-shot with and without least-squares reconstruction", "",
             "Each keep and seed pruned from the same calibration sample with `reconstruction=\"none\"` and with "
             "`\"least_squares\"` at each `reconstruction_damping` (defaults otherwise, float32 scoring passes). "
             f"Held-out perplexity on {first['eval_tokens']:,} tokens of each source: python3.11-doc files never "
             f"calibrated on ({names[0]}) and git-doc ({names[1]}), original: {originals(first)}; mean (each seed); "
             "change: the refit against none, per seed. Time and memory: the next section and "
             f"[Memory](guides/memory.md) (these rows shared the machine differently). {notes}",
             "", "| keep | reconstruction | " + " | ".join(f"ppl {n}" for n in names) + " |",
             "|---:|---|" + "---:|" * len(names)]  # fmt: skip
    for ratio in ratios:
        group = [r for r in rows if r["ratio"] == ratio]
        for name in variants:
            chosen = [r for r in group if variant(r) == name]
            if not chosen:
                continue
            lines.append(f"| {ratio} | {name} | {' | '.join(cell(chosen, f'ppl {n}') for n in names)} |")
            if name != "none":
                changes = [", ".join(f"{c:+.1f} %" for c in paired_change(group, f"ppl {n}", name)) or "—"
                           for n in names]  # fmt: skip
                lines.append(f"| {ratio} | change per seed | {' | '.join(changes)} |")
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, source in zip(axes, names):
        key = f"ppl {source}"
        for name in variants:
            means = {x: [r[key] for r in rows if r["ratio"] == x and variant(r) == name and key in r] for x in ratios}
            kept = [x for x in ratios if means[x]]
            ax.plot(kept, [statistics.mean(means[x]) for x in kept], marker="o", label=name)
        ax.axhline(first["rows"][0][key], color="gray", linestyle="--", label="original")
        ax.set(xlabel="fraction of parameters kept", ylabel="perplexity (log)", yscale="log", title=source)
        ax.invert_xaxis()
    axes[0].legend(fontsize=8)
    fig.suptitle("One-shot Adapt-Pruner, SmolLM2-135M: least-squares reconstruction")
    fig.tight_layout()
    fig.savefig(docs / "reconstruction.png", dpi=120)
    plt.close(fig)
    return [*lines, "", "![reconstruction](reconstruction.png)", ""]


def reconstruction_main_job_section(result: dict, docs: Path) -> list[str]:
    title = "Main job with and without least-squares reconstruction"
    scores = "Taylor scores and Gram matrices from the training steps before each event"
    return main_job_comparison(result, title, scores)


def reconstruction_time_section(result: dict, docs: Path) -> list[str]:
    means = result["mean_seconds"]
    before = means.get("none, no recomputation")
    without = (f", and `none` without calibration recomputation (`calibration_checkpointing=\"off\"`) {before:.0f} s "
               f"({result['ratio_least_squares_to_none_without_recomputation']:.2f}x)") if before else ""  # fmt: skip
    return ["## Time of a one-shot prune with and without least-squares reconstruction", "",
            f"`prune_model` of {result['model']} to keep {result['target_ratio']} at the defaults (float32 scoring "
            f"passes), the settings alternately from the same calibration sample, {result['threads']} threads, "
            f"nothing else running, loading excluded: `none` {means['none']:.0f} s, `least_squares` "
            f"{means['least_squares']:.0f} s ({result['ratio_least_squares_to_none']:.2f}x){without}. {note(result)}",
            ""]  # fmt: skip
