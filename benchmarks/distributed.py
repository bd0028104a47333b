"""2-process DDP (gloo, CPU): training-step time before the first prune event and after the last, physical vs mask
mode, as ratios to the step time of the same training without the callback. Launches itself with torchrun; prints
and writes JSON.

    python benchmarks/distributed.py [--smoke] [--steps 20] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MODEL_NAMES, load_model, parser, text_blocks, write
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_adapt_pruner import AdaptPrunerCallback, PrunerConfig


WINDOW = 4  # the first event comes after step 4; steps 2..4 are the unpruned reference (step 1 warms up)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def worker(args) -> None:
    """One rank of one run (under torchrun)."""
    import torch.distributed as dist

    model, tokenizer, _ = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    blocks, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, args.steps * args.batch_size * 2, 1)
    training_args = TrainingArguments(  # output_dir: beside --worker-out, in the folder main() removes
        output_dir=str(Path(args.worker_out).with_suffix("")), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
        ddp_backend="gloo", seed=0,
    )  # fmt: skip
    timer = StepTimer()
    data = [{"input_ids": b, "labels": b} for b in blocks]
    trainer = Trainer(model=model.train(), args=training_args, train_dataset=data, callbacks=[timer])
    result = {"mode": args.worker_mode}
    if args.worker_mode != "none":
        config = PrunerConfig(target_ratio=0.7, num_stages=2, importance_window=WINDOW, recovery_fraction=0.4,
                              mode=args.worker_mode)  # fmt: skip
        callback = AdaptPrunerCallback(config).attach(trainer)  # first in the list, so the timer sees the events
    trainer.train()
    if args.worker_mode == "none":
        result["step_s"] = statistics.median(timer.times[1:])
    else:
        events = [s.step for s in callback.schedule]
        pruner = callback._pruner
        result.update(events=events, mode=pruner.mode,
                      before_first_event_step_s=statistics.median(timer.times[1:WINDOW]),  # steps 2..WINDOW
                      after_last_event_step_s=statistics.median(timer.times[events[-1] + 1 :]),
                      params_ratio=pruner.num_parameters() / pruner.layout.base["num_parameters"])  # fmt: skip
    if dist.get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps(result))


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--worker-mode", help=argparse.SUPPRESS)  # internal: one torchrun worker's mode and output
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.steps = 12
    if args.worker_mode:
        worker(args)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("none", "physical", "mask"):
            out = Path(tmp) / f"{mode}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       __file__, "--worker-mode", mode, "--worker-out", str(out), "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--text-dir", args.text_dir,
                       *(["--smoke"] if args.smoke else [])]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(command, check=True, env=env, stdin=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
    unpruned = runs.pop(0)["step_s"]
    for run in runs:
        run["before_first_event_ratio"] = run["before_first_event_step_s"] / unpruned
        run["after_last_event_ratio"] = run["after_last_event_step_s"] / unpruned
    write("distributed", args, {"model": MODEL_NAMES[args.smoke], "processes": 2,
                                "backend": "gloo (CPU, 1 thread per process)",
                                "batch": f"{args.batch_size} x {32 if args.smoke else 128} tokens per process",
                                "target_ratio": 0.7, "unpruned_step_s": unpruned, "runs": runs})  # fmt: skip


if __name__ == "__main__":
    main()
