"""Callback overhead: median training-step time with AdaptPrunerCallback (steps outside prune events) against the
same run without it, and the cost of one prune event in median-step units, for both importance sources.

    python benchmarks/callback_overhead.py [--smoke] [--steps 24] [--batch-size 2]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from _common import load_model, parser, text_blocks, write
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_adapt_pruner import AdaptPrunerCallback, PrunerConfig


WINDOW = 8  # importance window = step of the first event (training-based importance)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, prune events included (they run in on_step_end)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run(model, data, steps: int, batch_size: int, callback: AdaptPrunerCallback | None) -> dict:
    timer = StepTimer()
    callbacks = [callback, timer] if callback else [timer]  # the timer last: it sees the event's time
    args = TrainingArguments(
        output_dir="/tmp/hf_adapt_pruner_bench", max_steps=steps, per_device_train_batch_size=batch_size,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    Trainer(model=model.train(), args=args, train_dataset=data, callbacks=callbacks).train()
    events = {s.step for s in callback.schedule} if callback else set()
    plain = [t for step, t in enumerate(timer.times, start=1) if step not in events and step > 2]  # skip warm-up
    median = statistics.median(plain)
    early = statistics.median(timer.times[2 : WINDOW - 1])  # steps 3 .. WINDOW-1: full-size model, in the window
    result = {"median_step_s": median, "median_early_step_s": early, "steps": steps}
    if callback:
        result["event_cost_in_steps"] = [round(r.wall_time_s / median, 2) for r in callback.reports]
        result["event_prune_seconds"] = [round(r.wall_time_s, 3) for r in callback.reports]
    return result


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    blocks, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, args.steps * args.batch_size + 64, 1)
    data = [{"input_ids": b, "labels": b} for b in blocks[: args.steps * args.batch_size]]
    common = dict(target_ratio=0.8, num_stages=2, importance_window=WINDOW, recovery_fraction=0.25, inner_steps=5,
                  calibration_samples=8, calibration_seq_len=seq_len)  # fmt: skip
    runs = {"without callback": run(copy.deepcopy(model), data, args.steps, args.batch_size, None)}
    for source in ("training", "calibration"):
        callback = AdaptPrunerCallback(PrunerConfig(**common, importance_source=source), calibration_data=blocks[-64:])
        runs[f"callback, importance_source={source}"] = run(copy.deepcopy(model), data, args.steps, args.batch_size,
                                                            callback)  # fmt: skip
    base = runs["without callback"]["median_early_step_s"]
    for result in runs.values():
        result["early_step_overhead"] = result["median_early_step_s"] / base - 1
    write("callback_overhead", args, {"model": name, "batch": f"{args.batch_size} x {seq_len} tokens", "runs": runs,
                                      "note": "early steps (3..7): full-size model, before the first event; with "
                                      "importance_source=training they are the importance window (hooks + Taylor "
                                      "accumulation), with calibration the model was already pruned at step 0. "
                                      "Event cost = prune time / median step of the same run."})  # fmt: skip


if __name__ == "__main__":
    main()
