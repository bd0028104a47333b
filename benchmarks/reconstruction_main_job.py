"""Reconstruction in the main job: Adapt-Accel with distillation, with and without the least-squares refit.

SmolLM2-135M -> keep 0.7 in 10 prune events over 80 steps of 4 x 128 tokens of python3.11-doc (WSD learning rate
2e-4, distillation alpha 0.5 at T = 1, Taylor scores from the training gradients), once with
`reconstruction="none"` and once with `"least_squares"` (Gram matrices from the importance window's training
steps: no extra pass), for each seed (data order). Each run is measured as `_main_job.py` describes (held-out
perplexity in the training domain and on git-doc, a zero-shot cloze task on git-doc prose, times, peak memory).

    python benchmarks/reconstruction_main_job.py [--smoke] [--seeds 0 1] [--jobs 1] [--reuse RESULT.json ...]
"""

from __future__ import annotations

import dataclasses
import statistics

from _common import parser, write
from _main_job import add_arguments, run_all, spec


MODES = ("none", "least_squares")


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    add_arguments(p)
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--num-stages", type=int, default=10)
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.max_steps, args.num_stages = args.seeds[:1], 8, 2
    specs = [spec(args, "original", args.seeds[0], args.num_stages, args.max_steps)]
    specs += [dataclasses.replace(spec(args, "0.5", seed, args.num_stages, args.max_steps), reconstruction=mode)
              for seed in args.seeds for mode in MODES]  # fmt: skip
    rows, task = run_all(args, specs)
    summary = {}
    for mode in MODES:
        chosen = [r for r in rows[1:] if r["spec"].get("reconstruction", "none") == mode]
        summary[mode] = {
            key: statistics.mean(r[key] for r in chosen)
            for key in ("ppl_in_domain", "ppl_other_source", "train_seconds", "rss_peak_train_bytes")
        }
        summary[mode]["cloze"] = statistics.mean(r["cloze"]["acc"] for r in chosen)
    write("reconstruction_main_job", args, {
        "model": rows[0]["model"], "target_ratio": 0.7, "steps": args.max_steps, "stages": args.num_stages,
        "batch": f"{specs[0].batch_size} x {specs[0].seq_len} tokens", "seeds": args.seeds, "distill_alpha": 0.5,
        "eval_tokens": specs[0].eval_blocks * specs[0].seq_len,
        "cloze": {"questions": task.num_questions, "choices": task.num_choices},
        "rows": rows, "summary": summary,
    })  # fmt: skip


if __name__ == "__main__":
    main()
