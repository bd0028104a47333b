"""When incremental pruning pays: prune events (`num_stages`) x training budget, in and out of domain, two seeds.

The main job (`_main_job.py`: SmolLM2-135M -> keep 0.7, 4 x 128-token batches of python3.11-doc, WSD learning rate,
linear data split) for each budget of optimizer steps and each number of prune events, with the same blocks in the
same order for every run of a seed. Held-out perplexity on python3.11-doc and on git-doc (never trained on), the
git-doc cloze task, wall time; a plot of perplexity against the number of events, per budget, in docs/.

    python benchmarks/stages_budget.py [--smoke] [--budgets 80 640] [--stages 1 4 10] [--seeds 0 1]
        [--method lm|ALPHA] [--recovery-fraction 0.2] [--jobs 2] [--reuse benchmarks/results/distillation.json]
"""

from __future__ import annotations

import statistics

from _common import parser, write
from _main_job import add_arguments, run_all, spec


def arguments():
    p = parser(__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--budgets", type=int, nargs="+", default=[80, 640])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--method", default="lm", help="'lm' (LM loss only) or a distillation alpha, e.g. 0.5.")
    args = p.parse_args()
    if args.smoke:
        args.budgets, args.stages, args.seeds = [8, 16], [1, 2], args.seeds[:1]
    return args


def summarize(rows: list[dict]) -> dict:
    """Mean and spread over seeds, per budget and number of events, and the best number of events per budget."""
    summary: dict[str, dict] = {}
    for r in rows:
        entry = summary.setdefault(str(r["steps"]), {}).setdefault(str(r["stages"]), {})
        for key in ("ppl_in_domain", "ppl_other_source", "train_seconds"):
            entry.setdefault(key, []).append(r[key])
        entry.setdefault("cloze", []).append(r["cloze"]["acc"])
    for by_stages in summary.values():
        for entry in by_stages.values():
            for key in list(entry):
                values = entry.pop(key)
                entry[key] = statistics.mean(values)
                entry[f"{key}_range"] = [min(values), max(values)]
    best = {budget: {source: min(by_stages, key=lambda n: by_stages[n][source])
                     for source in ("ppl_in_domain", "ppl_other_source")}
            for budget, by_stages in summary.items()}  # fmt: skip
    return {"by_budget_and_stages": summary, "fewest_perplexity_at_stages": best}


def main() -> None:
    args = arguments()
    specs = [spec(args, "original", args.seeds[0], 1, args.budgets[0])]
    specs += [spec(args, args.method, seed, stages, steps)
              for steps in args.budgets for stages in args.stages for seed in args.seeds]  # fmt: skip
    rows, task = run_all(args, specs)
    write("stages_budget", args, {
        "model": rows[0]["model"], "target_ratio": 0.7, "method": args.method, "budgets": args.budgets,
        "stages": args.stages, "recovery_fraction": args.recovery_fraction, "seeds": args.seeds,
        "batch": f"{specs[0].batch_size} x {specs[0].seq_len} tokens",
        "eval_tokens": specs[0].eval_blocks * specs[0].seq_len,
        "cloze": {"questions": task.num_questions, "choices": task.num_choices},
        "rows": rows, "summary": summarize(rows[1:]),
        "note": "Training domain: python3.11-doc (held-out files); other source: git-doc, never trained on. Each run "
        "is a fresh process on a shared 2-core CPU. Within a seed every run trains on the same blocks in the same "
        "order, with the same learning-rate schedule; only the number of prune events differs.",
    })  # fmt: skip


if __name__ == "__main__":
    main()
