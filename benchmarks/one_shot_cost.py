"""One-shot cost: held-out perplexity of SmolLM2-135M pruned to keep 0.7 against inner steps x calibration tokens.

Each setting is `inner_steps` allocation steps, `calibration_samples` x 128-token sequences per scoring pass and a
scoring pass every `rescore_every` steps (so `inner_steps / rescore_every` forward/backward passes). The reference
is the previous default: proportional allocation, 50 inner steps x 32 sequences, rescored every step. Perplexity on
held-out files of the calibration source and on English prose from another source (git-doc); two seeds.

    python benchmarks/one_shot_cost.py [--smoke] [--seeds 0 1] [--reference]
"""

from __future__ import annotations

import copy
import time

from _common import held_out_sets, load_model, parser, text_blocks, write

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model
from hf_adapt_pruner.evaluation import perplexity


# name: PrunerConfig overrides (allocation defaults to "score")
SETTINGS = {
    "5 steps x 16, rescore every step": {"inner_steps": 5, "calibration_samples": 16},
    "10 steps x 8, rescore every step": {"inner_steps": 10, "calibration_samples": 8},
    "10 steps x 16, rescore every step": {"inner_steps": 10, "calibration_samples": 16},
    "10 steps x 64, one scoring pass": {"inner_steps": 10, "calibration_samples": 64, "rescore_every": 10},
    "10 steps x 32, rescore every 5": {"inner_steps": 10, "calibration_samples": 32, "rescore_every": 5},
    "25 steps x 16, rescore every step": {"inner_steps": 25, "calibration_samples": 16},
}
REFERENCE = {"previous default (proportional, 50 steps x 32)": {"allocation": "proportional", "inner_steps": 50,
                                                                "calibration_samples": 32}}  # fmt: skip


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--target-ratio", type=float, default=0.7)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--settings", nargs="*", help="Names from SETTINGS (default: all; none with --reference alone).")
    p.add_argument("--reference", action="store_true", help="Also run the previous default (~9 min a seed).")
    p.add_argument("--eval-blocks", type=int, default=32)
    args = p.parse_args()
    settings = dict(SETTINGS) if args.settings is None else {name: SETTINGS[name] for name in args.settings}
    if args.reference:
        settings |= REFERENCE
    if args.smoke:
        settings = {"smoke": {"inner_steps": 2, "calibration_samples": 4}}
        args.seeds, args.eval_blocks = [0], 4
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    calibration, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 256, 1)
    held_out = held_out_sets(tokenizer, args.smoke, args.text_dir, seq_len, args.eval_blocks)
    rows = [{"setting": "original", "params": count_parameters(model),
             **{f"ppl {k}": perplexity(model, v) for k, v in held_out.items()}}]  # fmt: skip
    print(rows[-1], flush=True)
    for setting, overrides in settings.items():
        for seed in args.seeds:
            pruned = copy.deepcopy(model)
            config = PrunerConfig(target_ratio=args.target_ratio, calibration_seq_len=seq_len, seed=seed, **overrides)
            start = time.perf_counter()
            report = prune_model(pruned, config, calibration, progress=False)
            seconds = time.perf_counter() - start
            passes = -(-config.inner_steps // config.rescore_every)
            rows.append({"setting": setting, "seed": seed, "params": report.params_after, "prune_seconds": seconds,
                         "scoring_passes": passes, "calibration_tokens": passes * config.calibration_samples * seq_len,
                         **{f"ppl {k}": perplexity(pruned, v) for k, v in held_out.items()},
                         "widths": [layer.after.as_tuple() for layer in report.layers]})  # fmt: skip
            print(rows[-1], flush=True)
            del pruned
    write("one_shot_cost", args, {"model": name, "target_ratio": args.target_ratio, "seeds": args.seeds,
                                  "eval_tokens": args.eval_blocks * seq_len, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
