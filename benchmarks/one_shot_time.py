"""One-shot wall time: the default `prune_model` of SmolLM2-135M to keep 0.7, alone on the machine, every thread.

What `hf-adapt-pruner prune --target-ratio 0.7` spends pruning (loading and saving excluded), with the default inner
steps and calibration budget, once per seed (the calibration sample) and `calibration_autocast` setting (`auto`, the
default, scores in bfloat16 on CPUs with AMX; `off` in float32). The other benchmarks run several processes of one
thread side by side, so their seconds compare settings only roughly; run this one with nothing else running.

    python benchmarks/one_shot_time.py [--smoke] [--seeds 0 1] [--autocast auto off]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from _common import load_model, parser, text_blocks, write

from hf_adapt_pruner import PrunerConfig, prune_model
from hf_adapt_pruner.scorers import autocast_dtype


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--target-ratio", type=float, default=0.7)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--autocast", nargs="+", default=["auto", "off"], help="calibration_autocast settings to time.")
    args = p.parse_args()
    budget = {"inner_steps": 2, "calibration_samples": 4} if args.smoke else {}
    if args.smoke:
        args.seeds = args.seeds[:1]
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    calibration, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 256, 1)
    rows = []
    for autocast in args.autocast:
        for seed in args.seeds:
            pruned = copy.deepcopy(model)
            config = PrunerConfig(target_ratio=args.target_ratio, calibration_seq_len=seq_len, seed=seed,
                                  calibration_autocast=autocast, **budget)  # fmt: skip
            start = time.perf_counter()
            report = prune_model(pruned, config, calibration, progress=False)
            seconds = time.perf_counter() - start
            rows.append({"autocast": autocast, "runs_in": str(autocast_dtype(autocast, model) or torch.float32),
                         "seed": seed, "prune_seconds": seconds, "params": report.params_after})  # fmt: skip
            print(rows[-1], flush=True)
            del pruned
    mean = {a: statistics.mean(r["prune_seconds"] for r in rows if r["autocast"] == a) for a in args.autocast}
    write("one_shot_time", args, {"model": name, "target_ratio": args.target_ratio, "threads": torch.get_num_threads(),
                                  "config": PrunerConfig(target_ratio=args.target_ratio, **budget).to_dict(),
                                  "rows": rows, "mean_seconds": mean})  # fmt: skip


if __name__ == "__main__":
    main()
