"""The docs' sections of trained runs: distillation against the LM loss, and prune events x training budget."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from _docs_common import note, plt


HELD_OUT = ("the first 128-token blocks of the held-out python3.11-doc files, the training domain, and of git-doc's "
            "files in a fixed shuffled order, never trained on")  # fmt: skip


def teacher_dtype(settings: dict) -> str:
    """', bfloat16 teacher' when a distilled run kept its teacher in another dtype (from a spec or `distill` entry)."""
    return f", {settings['teacher_dtype']} teacher" if settings.get("teacher_dtype") else ""


def distill_settings(result: dict) -> str:
    """The distilled runs, e.g. "alpha 0.5 at T 1"."""
    return ", ".join(
        f"alpha {r['alpha']} at T {r['temperature']:g}{teacher_dtype(r)}"
        for r in result["distill"]
        if r["alpha"] != 1.0
    )


def distillation_section(result: dict, docs: Path) -> list[str]:
    gib, summary = 1024**3, result["summary"]
    # alpha 1.0 with the model as its own teacher has all-zero scores at the first event (the KL is at its minimum
    # there) and prunes at random; the callback refuses it now, and such rows are not shown
    rows = [r for r in result["rows"] if r["run"] != "1.0"]
    methods = {k: m for k, m in summary["by_method"].items() if not k.startswith("distillation, alpha 1.0,")}
    cloze = result["cloze"]
    bf16 = any(r["spec"].get("bf16") for r in result["rows"][1:])
    rate = result["rows"][1]["spec"]["learning_rate"]
    lines = [f"## Distillation from the unpruned teacher, {result['steps']} steps, {result['stages']} events, "
             f"learning rate {rate:g}", "",
             f"Keep {result['target_ratio']} in {result['stages']} events over {result['steps']} steps of "
             f"{result['batch']} ({result['train_tokens']:,} tokens of python3.11-doc"
             f"{', bfloat16 autocast training' if bf16 else ''}), seeds {result['seeds']}, "
             f"{distill_settings(result)}. Perplexity on {result['eval_tokens']:,} held-out tokens of each source "
             f"({HELD_OUT}); zero-shot cloze accuracy on {cloze['questions']} "
             f"{cloze['choices']}-way questions from git-doc prose (lm-eval, local task; chance "
             f"{1 / cloze['choices']:.0%}). {note(result)}", "",
             "| run | seed | parameters | ppl python-doc | ppl git-doc | cloze acc | median step s | teacher s/step "
             "| peak RSS GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    names = {"original": "original (no training)", "lm": "LM loss only"}
    for r in rows:
        run = names.get(r["run"]) or f"distillation, alpha {r['run']}, T {r['spec']['temperature']:g}" \
            f"{teacher_dtype(r['spec'])}"  # fmt: skip
        step = f"{r['median_step_s']:.2f} | {r['teacher_seconds_per_step']:.2f} | " \
               f"{r['rss_peak_train_bytes'] / gib:.2f}" if "median_step_s" in r else "— | — | —"  # fmt: skip
        lines.append(f"| {run} | {r['seed']} | {r['params']:,} | "
                     f"{r['ppl_in_domain']:.2f} | {r['ppl_other_source']:.2f} | {r['cloze']['acc']:.3f} ± "
                     f"{r['cloze']['acc_stderr']:.3f} | {step} |")  # fmt: skip
    lines += ["", "Means over seeds; changes against the LM loss alone:", "",
              "| method | ppl python-doc | ppl git-doc | git-doc ppl change | cloze acc | step time | peak RSS |",
              "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for method, m in methods.items():
        lines.append(f"| {method} | {m['ppl_in_domain']:.2f} | {m['ppl_other_source']:.2f} | "
                     f"{-m['other_source_ppl_reduction_vs_lm']:+.1%} | {m['cloze']:.3f} | "
                     f"{m['step_time_overhead_vs_lm']:+.0%} | "
                     f"{m['peak_memory_over_lm_bytes'] / gib:+.2f} GiB |")  # fmt: skip
    best = max(m["other_source_ppl_reduction_vs_lm"] for m in methods.values())
    lines += ["", f"The best distilled run lowers git-doc perplexity by {best:.1%} against the LM loss alone at the "
              "same steps and learning rate.", ""]  # fmt: skip
    return lines


def stages_budget_section(results: list[dict], docs: Path) -> list[str]:
    """One table and plot for the rows of every `stages_budget*.json`, by budget, recovery fraction and events."""
    result, original = results[0], results[0]["rows"][0]
    by_seed = {(row["steps"], row["spec"]["recovery_fraction"], row["stages"], row["seed"]): row
               for r in results for row in r["rows"] if row["run"] != "original"}  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for (steps, recovery, stages, _), row in sorted(by_seed.items()):
        groups.setdefault((steps, recovery, stages), []).append(row)
    stats = {group: {key: [row[key] for row in rows] for key in ("ppl_in_domain", "ppl_other_source", "train_seconds")}
             | {"cloze": [row["cloze"]["acc"] for row in rows], "bf16": rows[0]["spec"].get("bf16")}
             for group, rows in groups.items()}  # fmt: skip
    method = "LM loss only" if result["method"] == "lm" else f"distillation, alpha {result['method']}"
    notes = dict.fromkeys(s for r in results for s in re.split(r"(?<=\.) ", note(r)) if s)  # each sentence once
    lines = [
        "## Prune events x training budget",
        "",
        f"Keep {result['target_ratio']}, {method}; budgets of {sorted({g[0] for g in groups})} optimizer steps of "
        f"{result['batch']}, prune events (linear data split) and recovery fraction (steps after the last event, over "
        f"which the learning rate decays) as in the table, seeds {result['seeds']}. "
        f"Perplexity on {result['eval_tokens']:,} held-out tokens of each source ({HELD_OUT}; original: "
        f"{original['ppl_in_domain']:.2f}, {original['ppl_other_source']:.2f}); cloze accuracy on "
        f"{result['cloze']['questions']} {result['cloze']['choices']}-way git-doc questions (original "
        f"{original['cloze']['acc']:.3f}). Mean over seeds, range in brackets. " + " ".join(notes),
        "",
        "| steps | recovery | training | events | ppl python-doc | ppl git-doc | cloze acc | train s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (steps, recovery, stages), m in stats.items():
        cells = [f"{statistics.mean(m[k]):.2f} ({min(m[k]):.2f}–{max(m[k]):.2f})"
                 for k in ("ppl_in_domain", "ppl_other_source")]  # fmt: skip
        lines.append(f"| {steps} | {recovery} | {'bf16 autocast' if m['bf16'] else 'float32'} | {stages} | "
                     f"{' | '.join(cells)} | {statistics.mean(m['cloze']):.3f} | "
                     f"{statistics.mean(m['train_seconds']):.0f} |")  # fmt: skip
    usual = statistics.mode(recovery for _, recovery, _ in groups)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("ppl_in_domain", "ppl_other_source"), ("python3.11-doc", "git-doc")):
        for steps, recovery in dict.fromkeys(g[:2] for g in groups):
            points = [(g[2], stats[g][key]) for g in groups if g[:2] == (steps, recovery)]
            means = [statistics.mean(v) for _, v in points]
            ax.errorbar(
                [n for n, _ in points],
                means,
                yerr=[
                    [m - min(v) for m, (_, v) in zip(means, points)],
                    [max(v) - m for m, (_, v) in zip(means, points)],
                ],
                marker="o" if recovery == usual else "s",
                linestyle="-" if recovery == usual else "none",
                capsize=3,
                label=f"{steps} steps" + ("" if recovery == usual else f", recovery {recovery}"),
            )
        ax.set(xlabel="prune events", ylabel="held-out perplexity", title=title,
               xticks=sorted({g[2] for g in groups}))  # fmt: skip
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Adapt-Accel to keep {result['target_ratio']}, SmolLM2-135M (bars: range over seeds)")
    fig.tight_layout()
    fig.savefig(docs / "stages_budget.png", dpi=120)
    plt.close(fig)
    return [*lines, "", "![prune events x budget](stages_budget.png)", ""]
