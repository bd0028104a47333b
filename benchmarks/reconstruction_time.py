"""Reconstruction's cost in time: one-shot `prune_model` of SmolLM2-135M with and without the least-squares refit.

Each setting prunes from the same calibration sample at the defaults (float32 scoring passes), alternately,
`--repeats` times each, in one process with nothing else running; loading and evaluation are not timed: `none` and
`least_squares`, and `none` without calibration recomputation (`calibration_checkpointing="off"`: the prune as it was
before the refit and the recomputation existed). Prints and writes JSON.

    python benchmarks/reconstruction_time.py [--smoke] [--ratio 0.7] [--repeats 1]
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from _common import load_model, parser, text_blocks, write

from hf_adapt_pruner import PrunerConfig, prune_model


SETTINGS = {  # name: PrunerConfig overrides
    "none": {"reconstruction": "none"},
    "least_squares": {"reconstruction": "least_squares"},
    "none, no recomputation": {"reconstruction": "none", "calibration_checkpointing": "off"},
}


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    budget = {"inner_steps": 2, "calibration_samples": 4} if args.smoke else {}
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    calibration, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 256, 1)
    rows = []
    for repeat in range(args.repeats):
        for mode, overrides in SETTINGS.items():
            pruned = copy.deepcopy(model)
            config = PrunerConfig(target_ratio=args.ratio, calibration_seq_len=seq_len, calibration_autocast="off",
                                  **overrides, **budget)  # fmt: skip
            start = time.perf_counter()
            report = prune_model(pruned, config, calibration, progress=False)
            seconds = round(time.perf_counter() - start, 2)
            rows.append({"mode": mode, "repeat": repeat, "prune_seconds": seconds, "params": report.params_after,
                         "reconstruction_tokens": report.reconstruction_tokens})  # fmt: skip
            print(rows[-1], flush=True)
            del pruned
    means = {mode: statistics.mean(r["prune_seconds"] for r in rows if r["mode"] == mode) for mode in SETTINGS}
    write("reconstruction_time", args, {
        "model": name, "target_ratio": args.ratio, "threads": torch.get_num_threads(),
        "rows": rows, "mean_seconds": means, "ratio_least_squares_to_none": means["least_squares"] / means["none"],
        "ratio_least_squares_to_none_without_recomputation": means["least_squares"] / means["none, no recomputation"],
    })  # fmt: skip


if __name__ == "__main__":
    main()
