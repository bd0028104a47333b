"""Incremental vs one-shot at an equal budget: Adapt-Accel with N prune events against prune-once-then-train.

Every run starts from the same SmolLM2-135M weights, trains the same optimizer steps on the same blocks (same order,
same WSD learning-rate schedule) and ends at the same size (keep 0.7). "prune once, then train" prunes before the
first step with calibration data (one-shot Adapt-Pruner) and then trains every step; "Adapt-Accel, N stages" prunes
in N events during training with importance from the training gradients (N = 1 is one event after the importance
window). Held-out perplexity on files never trained on. Prints and writes JSON.

    python benchmarks/incremental_vs_one_shot.py [--smoke] [--stages 1 5 10] [--max-steps 80] [--batch-size 4]
"""

from __future__ import annotations

import copy
import time

import torch
from _common import load_model, parser, text_blocks, write
from transformers import Trainer, TrainingArguments

from hf_adapt_pruner import AdaptPrunerCallback, PrunerConfig, count_parameters, prune_model
from hf_adapt_pruner.evaluation import perplexity


def train(model, blocks, args, callbacks) -> float:
    """Seconds for an ordinary Trainer run over `blocks` (WSD learning rate, as the main example)."""
    training_args = TrainingArguments(
        output_dir="/tmp/hf_adapt_pruner_bench", max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=max(1, args.max_steps // 20),
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": max(1, round(args.recovery_fraction * args.max_steps))},
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=getattr(args, "seed", 0),
    )  # fmt: skip
    data = [{"input_ids": b, "labels": b} for b in blocks]
    trainer = Trainer(model=model.train(), args=training_args, train_dataset=data, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    model.eval()
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--target-ratio", type=float, default=0.7)
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--recovery-fraction", type=float, default=0.2)
    p.add_argument("--importance-window", type=int, default=4)
    p.add_argument("--eval-blocks", type=int, default=48)
    args = p.parse_args()
    if args.smoke:
        args.stages, args.max_steps, args.batch_size, args.eval_blocks = [1, 3], 16, 2, 4
    torch.manual_seed(0)
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    blocks, evaluation = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len,
                                     args.max_steps * args.batch_size, args.eval_blocks)  # fmt: skip
    common = dict(target_ratio=args.target_ratio, recovery_fraction=args.recovery_fraction, inner_steps=5,
                  calibration_samples=16, calibration_seq_len=seq_len,
                  importance_window=args.importance_window)  # fmt: skip
    rows = [{"run": "original, no training", "params": count_parameters(model),
             "perplexity": perplexity(model, evaluation)}]  # fmt: skip

    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    prune_model(pruned, PrunerConfig(**common), blocks, progress=False)
    prune_seconds = time.perf_counter() - start
    rows.append({"run": "prune once, then train", "stages": 0, "prune_seconds": prune_seconds,
                 "train_seconds": train(pruned, blocks, args, callbacks=[])})  # fmt: skip
    rows[-1] |= {"params": count_parameters(pruned), "perplexity": perplexity(pruned, evaluation)}
    print(rows[-1], flush=True)
    del pruned

    for n in args.stages:
        pruned = copy.deepcopy(model)
        callback = AdaptPrunerCallback(PrunerConfig(**common, num_stages=n))
        seconds = train(pruned, blocks, args, callbacks=[callback])
        rows.append({"run": f"Adapt-Accel, {n} stage{'s' if n > 1 else ''}", "stages": n, "train_seconds": seconds,
                     "event_steps": [s.step for s in callback.schedule],
                     "prune_seconds": sum(r.wall_time_s for r in callback.reports),
                     "params": count_parameters(pruned), "perplexity": perplexity(pruned, evaluation)})  # fmt: skip
        print(rows[-1], flush=True)
        del pruned

    write("incremental_vs_one_shot", args, {
        "model": name, "target_ratio": args.target_ratio, "steps": args.max_steps,
        "batch": f"{args.batch_size} x {seq_len} tokens", "train_tokens": args.max_steps * args.batch_size * seq_len,
        "eval_tokens": args.eval_blocks * seq_len, "rows": rows,
        "note": "prune-once uses 5 inner steps x 16 calibration sequences from the training blocks before step 1; "
        "Adapt-Accel reads importance from the Trainer's gradients over the steps before each event "
        f"(importance_window={args.importance_window} before the first). Same steps, data order, learning rate.",
    })  # fmt: skip


if __name__ == "__main__":
    main()
