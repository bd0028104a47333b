"""Memory: peak resident memory (RSS) during a one-shot prune event, relative to the model's size.

RSS is sampled every 5 ms from /proc/self/status while `prune_model` runs (calibration forward/backward passes,
Taylor scores, slicing).

    python benchmarks/memory.py [--smoke] [--calibration-batch-size 8]
"""

from __future__ import annotations

import threading
import time

import torch
from _common import load_model, parser, text_blocks, write

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--calibration-batch-size", type=int, default=8)
    args = p.parse_args()
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    calibration, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 64, 1)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = rss_bytes()
    config = PrunerConfig(target_ratio=0.7, inner_steps=3, calibration_samples=16, calibration_seq_len=seq_len,
                          calibration_batch_size=args.calibration_batch_size)  # fmt: skip
    with PeakRSS() as peak:
        prune_model(model, config, calibration, progress=False)
    after = rss_bytes()
    write("memory", args, {
        "model": name, "params": count_parameters(model), "model_bytes": model_bytes,
        "calibration_batch": f"{args.calibration_batch_size} x {seq_len} tokens",
        "rss_before_bytes": before, "rss_peak_bytes": peak.peak, "rss_after_bytes": after,
        "peak_over_before_in_model_sizes": (peak.peak - before) / model_bytes,
        "peak_in_model_sizes": peak.peak / model_bytes, "threads": torch.get_num_threads(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
