"""The README's main job (Adapt-Accel, SmolLM2-135M to keep 0.7) with the score vs the proportional allocation.

Both allocations run the main example's schedule (4 prune events in 80 optimizer steps of 4 x 128 tokens, importance
from the training gradients, WSD learning rate) from the same weights, with the same data order per seed; two seeds
(the Trainer's data order). Held-out perplexity on files of the training source never trained on and on English
prose from another source (git-doc). Prints and writes JSON.

    python benchmarks/main_job_allocation.py [--smoke] [--seeds 0 1] [--allocations score proportional]
"""

from __future__ import annotations

import copy
import time

import torch
from _common import held_out_sets, load_model, parser, text_blocks, write
from incremental_vs_one_shot import train

from hf_adapt_pruner import AdaptPrunerCallback, PrunerConfig, count_parameters
from hf_adapt_pruner.evaluation import perplexity


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--allocations", nargs="+", default=["score", "proportional"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--target-ratio", type=float, default=0.7)
    p.add_argument("--num-stages", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--recovery-fraction", type=float, default=0.2)
    p.add_argument("--eval-blocks", type=int, default=48)
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.max_steps, args.batch_size, args.eval_blocks, args.num_stages = [0], 16, 2, 4, 2
    torch.manual_seed(0)
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    blocks, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, args.max_steps * args.batch_size, 1)
    held_out = held_out_sets(tokenizer, args.smoke, args.text_dir, seq_len, args.eval_blocks)
    rows = [{"run": "original", "params": count_parameters(model),
             **{f"ppl {k}": perplexity(model, v) for k, v in held_out.items()}}]  # fmt: skip
    for seed in args.seeds:
        args.seed = seed
        for allocation in args.allocations:
            pruned = copy.deepcopy(model)
            config = PrunerConfig(target_ratio=args.target_ratio, num_stages=args.num_stages, importance_window=4,
                                  recovery_fraction=args.recovery_fraction, inner_steps=5, calibration_samples=16,
                                  calibration_seq_len=seq_len, allocation=allocation)  # fmt: skip
            callback = AdaptPrunerCallback(config)
            start = time.perf_counter()
            train(pruned, blocks, args, callbacks=[callback])
            rows.append({"run": f"Adapt-Accel, {allocation} allocation", "allocation": allocation, "seed": seed,
                         "seconds": time.perf_counter() - start, "params": count_parameters(pruned),
                         "kv_heads": sum(pruned.config.pruned_layout["num_key_value_heads"]),
                         **{f"ppl {k}": perplexity(pruned, v) for k, v in held_out.items()}})  # fmt: skip
            print(rows[-1], flush=True)
            del pruned
    write("main_job_allocation", args, {
        "model": name, "target_ratio": args.target_ratio, "steps": args.max_steps, "num_stages": args.num_stages,
        "batch": f"{args.batch_size} x {seq_len} tokens", "eval_tokens": args.eval_blocks * seq_len, "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
