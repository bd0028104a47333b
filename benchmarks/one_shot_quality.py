"""One-shot quality: held-out perplexity of SmolLM2-135M pruned once (no training) at several keep ratios.

Modes: adaptive (Taylor, amplitude 0.02, plus a small amplitude sweep), uniform (amplitude 0), magnitude and random
group importance. Calibration and evaluation text come from disjoint files. Prints and writes JSON.

    python benchmarks/one_shot_quality.py [--smoke] [--ratios 0.9 0.8 0.7 0.6] [--inner-steps 5]
"""

from __future__ import annotations

import copy
import time

from _common import load_model, parser, text_blocks, write

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model
from hf_adapt_pruner.evaluation import perplexity


MODES = {  # name: PrunerConfig overrides
    "adaptive A=0.02": {"amplitude": 0.02},
    "uniform A=0": {"amplitude": 0.0},
    "magnitude A=0.02": {"amplitude": 0.02, "group_importance": "magnitude"},
    "random A=0.02": {"amplitude": 0.02, "group_importance": "random"},
    "adaptive A=0.01": {"amplitude": 0.01},
    "adaptive A=0.05": {"amplitude": 0.05},
}


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--calibration-samples", type=int, default=8)
    p.add_argument("--eval-blocks", type=int, default=32)
    args = p.parse_args()
    if args.smoke:
        args.ratios, args.eval_blocks = [0.7], 4
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    calibration, evaluation = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 128, args.eval_blocks)
    rows = [
        {
            "ratio": 1.0,
            "mode": "original",
            "params": count_parameters(model),
            "perplexity": perplexity(model, evaluation),
        }
    ]
    for ratio in args.ratios:
        for mode, overrides in MODES.items():
            pruned = copy.deepcopy(model)
            config = PrunerConfig(target_ratio=ratio, inner_steps=args.inner_steps, calibration_seq_len=seq_len,
                                  calibration_samples=args.calibration_samples, **overrides)  # fmt: skip
            start = time.perf_counter()
            report = prune_model(pruned, config, calibration, progress=False)
            seconds = time.perf_counter() - start
            row = {"ratio": ratio, "mode": mode, "params": report.params_after, "prune_seconds": seconds}
            rows.append({**row, "perplexity": perplexity(pruned, evaluation)})
            print(rows[-1], flush=True)
    by_ratio = {}
    for row in rows[1:]:
        by_ratio.setdefault(row["ratio"], {})[row["mode"]] = row["perplexity"]
    ratios = {r: modes["adaptive A=0.02"] / modes["uniform A=0"] for r, modes in by_ratio.items()}
    write("one_shot_quality", args, {"model": name, "inner_steps": args.inner_steps,
                                     "calibration": f"{args.calibration_samples} x {seq_len} tokens per inner step",
                                     "eval_tokens": args.eval_blocks * seq_len, "rows": rows,
                                     "adaptive_over_uniform": ratios})  # fmt: skip


if __name__ == "__main__":
    main()
