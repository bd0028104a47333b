"""Distillation from the unpruned teacher during Adapt-Accel, against the LM loss alone, in and out of domain.

The main example's job (SmolLM2-135M -> keep 0.7 in 4 prune events, 80 steps x 4 x 128 tokens of python3.11-doc, WSD
learning rate 2e-4) is trained with the LM loss only and with `DistillationConfig(alpha=a, temperature=T)` for each
`--distill ALPHA:T[:TEACHER_DTYPE]` (default alpha 0.5 and 0.99 at T = 1; 1.0 is refused, as the teacher is the model
itself before the first event; e.g. `0.5:1:bfloat16` keeps the teacher in bfloat16), for each seed (data order). Each
run and what it measures (perplexity in and out of the training domain, a zero-shot cloze task through lm-eval, step
time, teacher time, peak memory) is described in `_main_job.py`.

About 1 hour on 2 CPU cores with the defaults (7 runs); `--smoke` runs the same pipeline on a tiny random model.

    python benchmarks/distillation.py [--smoke] [--seeds 0 1] [--distill 0.5:1 0.99:1 0.5:2] [--jobs 2]
"""

from __future__ import annotations

import statistics

from _common import parser, write
from _main_job import add_arguments, run_all, spec


def arguments():
    p = parser(__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--distill", type=distilled_run, nargs="+", default=[(0.5, 1.0, None), (0.99, 1.0, None)],
                   metavar="ALPHA:T[:TEACHER_DTYPE]",
                   help="Distilled runs, e.g. 0.5:1 (alpha 0.5, temperature 1) or 0.5:1:bfloat16.")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--num-stages", type=int, default=4)
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.distill, args.max_steps, args.num_stages = args.seeds[:1], args.distill[-1:], 8, 2
    return args


def distilled_run(text: str) -> tuple[float, float, str | None]:
    """ALPHA[:T[:TEACHER_DTYPE]]"""
    alpha, temperature, teacher_dtype = [*text.split(":"), "", ""][:3]
    return float(alpha), float(temperature or 1.0), teacher_dtype or None


def methods(args) -> dict[tuple[str, float, str | None], str]:
    """(run, temperature, teacher dtype) -> label; the LM loss has neither."""
    distilled = {(str(a), t, d): f"distillation, alpha {a}, T {t:g}" + (f", {d} teacher" if d else "")
                 for a, t, d in args.distill}  # fmt: skip
    return {("lm", 1.0, None): "LM loss only", **distilled}


def summarize(rows: list[dict], args) -> dict:
    def mean(method: tuple, key: str) -> float:
        chosen = [r for r in rows if method == (r["run"], *spec_settings(r))]
        return statistics.mean(r[key] if key != "cloze" else r["cloze"]["acc"] for r in chosen)

    labels = methods(args)
    keys = ("ppl_in_domain", "ppl_other_source", "cloze", "median_step_s", "rss_peak_train_bytes")
    summary = {label: {key: mean(method, key) for key in keys} for method, label in labels.items()}
    lm = summary["LM loss only"]
    for label in labels.values():
        entry = summary[label]
        entry["other_source_ppl_reduction_vs_lm"] = 1 - entry["ppl_other_source"] / lm["ppl_other_source"]
        entry["step_time_overhead_vs_lm"] = entry["median_step_s"] / lm["median_step_s"] - 1
        entry["peak_memory_over_lm_bytes"] = entry["rss_peak_train_bytes"] - lm["rss_peak_train_bytes"]
    best = max((summary[label] for method, label in labels.items() if method[0] != "lm"),
               key=lambda e: e["other_source_ppl_reduction_vs_lm"])  # fmt: skip
    return {"by_method": summary, "best_other_source_reduction": best["other_source_ppl_reduction_vs_lm"],
            "target_met": best["other_source_ppl_reduction_vs_lm"] >= 0.30}  # fmt: skip


def spec_settings(row: dict) -> tuple[float, str | None]:
    """A row's (temperature, teacher dtype) as `methods` keys them (the LM loss has neither)."""
    if row["run"] == "lm":
        return 1.0, None
    return row["spec"]["temperature"], row["spec"].get("teacher_dtype")


def main() -> None:
    args = arguments()
    specs = [spec(args, "original", args.seeds[0], args.num_stages, args.max_steps)]
    specs += [spec(args, run, seed, args.num_stages, args.max_steps, temperature, teacher_dtype)
              for seed in args.seeds for run, temperature, teacher_dtype in methods(args)]  # fmt: skip
    rows, task = run_all(args, specs)
    original = rows[0]
    write("distillation", args, {
        "model": original["model"], "target_ratio": 0.7, "steps": args.max_steps, "stages": args.num_stages,
        "batch": f"{specs[0].batch_size} x {specs[0].seq_len} tokens", "seeds": args.seeds,
        "distill": [{"alpha": a, "temperature": t, "teacher_dtype": d} for a, t, d in args.distill],
        "train_tokens": args.max_steps * specs[0].batch_size * specs[0].seq_len,
        "eval_tokens": specs[0].eval_blocks * specs[0].seq_len, "cloze": {"questions": task.num_questions,
        "choices": task.num_choices, "context_words": 40, "continuation_words": 8},
        "rows": rows, "summary": summarize(rows[1:], args),
        "note": "Training domain: python3.11-doc (held-out files); other source: git-doc, never trained on. Each run "
        "is a fresh process; step times and memory on a shared 2-core CPU. Same schedule, data and learning rate "
        "in every trained run; the seed changes the data order.",
    })  # fmt: skip


if __name__ == "__main__":
    main()
