"""Reconstruction: one-shot SmolLM2-135M with and without the least-squares refit, at several keep ratios.

Each (keep, seed) is pruned twice from one calibration sample, with `reconstruction="none"` and with
`"least_squares"` at `--damping` (everything else at its default, float32 scoring passes), so the pair differs only
by the refit and by what the refit changes in later inner steps' scores. Held-out perplexity on files of the
calibration source (python3.11-doc) and on English from another source (git-doc), prune time, and the peak resident
memory during the prune above the resident memory before it (`/proc/self/status` sampled every 5 ms). Prints and
writes JSON.

    python benchmarks/reconstruction.py [--smoke] [--ratios 0.7 0.5 0.9 0.8 0.6] [--seeds 0 1] [--eval-blocks 128]
        [--modes none least_squares] [--damping 0.1] [--baseline one_shot_pairs.json] [--out FILE]

`--baseline` takes the `adaptive` rows of a one-shot quality result (the same defaults and calibration sample, so
the same prune as `reconstruction="none"`, which did not exist then) as the `none` rows, where the held-out text of a
source scores the original identically; a source whose text changed since (another Debian package version) is left
out of those rows. The JSON is rewritten after every row.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch
from _common import held_out_sets, load_model, parser, text_blocks, write
from memory import PeakRSS, rss_bytes

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model
from hf_adapt_pruner.evaluation import perplexity


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.7, 0.5, 0.9, 0.8, 0.6])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--modes", nargs="+", default=["none", "least_squares"])
    p.add_argument("--eval-blocks", type=int, default=128)
    p.add_argument(
        "--damping",
        type=float,
        default=PrunerConfig.reconstruction_damping,
        help="reconstruction_damping of the least_squares rows (each row records its own).",
    )
    p.add_argument("--baseline", type=Path, help="A one_shot_quality JSON whose adaptive rows serve as the none rows.")
    args = p.parse_args()
    budget = {}
    if args.smoke:
        args.ratios, args.seeds, args.eval_blocks, budget = [0.7], [0], 4, {"inner_steps": 2, "calibration_samples": 4}
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    calibration, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 256, 1)
    held_out = held_out_sets(tokenizer, args.smoke, args.text_dir, seq_len, args.eval_blocks)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [{"ratio": 1.0, "mode": "original", "params": count_parameters(model),
             **{f"ppl {k}": perplexity(model, v) for k, v in held_out.items()}}]  # fmt: skip
    print(rows[-1], flush=True)
    baseline = baseline_rows(args.baseline, rows[0]) if args.baseline else {}
    for ratio in args.ratios:
        for seed in args.seeds:
            for mode in args.modes:
                if mode == "none" and (ratio, seed) in baseline:
                    rows.append(baseline[ratio, seed])
                    continue
                pruned = copy.deepcopy(model)
                config = PrunerConfig(target_ratio=ratio, calibration_seq_len=seq_len, seed=seed, reconstruction=mode,
                                      reconstruction_damping=args.damping, calibration_autocast="off",
                                      **budget)  # fmt: skip
                before = rss_bytes()
                start = time.perf_counter()
                with PeakRSS() as peak:
                    report = prune_model(pruned, config, calibration, progress=False)
                seconds = time.perf_counter() - start
                rows.append({"ratio": ratio, "mode": mode, "seed": seed,
                             **({"damping": args.damping} if mode != "none" else {}),
                             "params": report.params_after,
                             "prune_seconds": round(seconds, 2),
                             "peak_over_before_in_model_sizes": round((peak.peak - before) / model_bytes, 3),
                             **{f"ppl {k}": perplexity(pruned, v) for k, v in held_out.items()},
                             "widths": [layer.after.as_tuple() for layer in report.layers]})  # fmt: skip
                print({k: v for k, v in rows[-1].items() if k != "widths"}, flush=True)
                del pruned
                save(args, name, model_bytes, budget, rows, held_out)
    save(args, name, model_bytes, budget, rows, held_out)


def variant(row: dict) -> str:
    """`none`, or `least_squares, damping D`: what a row was pruned with."""
    return "none" if row["mode"] == "none" else f"least_squares, damping {row['damping']:g}"


def baseline_rows(path: Path, original: dict) -> dict[tuple[float, int], dict]:
    """(keep, seed) -> the `adaptive` row of a one-shot quality result as a `none` row, without the perplexity of any
    source whose held-out text scores the original differently now."""
    result = json.loads(path.read_text())
    then = result["rows"][0]
    changed = [k for k in original if k.startswith("ppl ") and abs(then.get(k, 0) - original[k]) > 1e-6 * original[k]]
    return {(r["ratio"], r["seed"]): {**{k: v for k, v in r.items() if k not in changed}, "mode": "none",
                                      "from": f"{path.name} (adaptive, {result['date']})"}
            for r in result["rows"][1:] if r.get("mode") == "adaptive"}  # fmt: skip


def save(args, name: str, model_bytes: int, budget: dict, rows: list[dict], held_out: dict) -> None:
    summary = {}
    for row in rows[1:]:
        entry = summary.setdefault(f"{row['ratio']}", {}).setdefault(variant(row), {})
        for key in [f"ppl {source}" for source in held_out] + ["prune_seconds", "peak_over_before_in_model_sizes"]:
            if key in row:
                entry.setdefault(key, []).append(row[key])
    summary = {r: {m: {k: statistics.mean(v) for k, v in e.items()} for m, e in modes.items()}
               for r, modes in summary.items()}  # fmt: skip
    write("reconstruction", args, {
        "model": name, "model_bytes": model_bytes, "threads": torch.get_num_threads(),
        "defaults": PrunerConfig(target_ratio=0.7, **budget).to_dict(),
        "calibration": "256 x 128-token blocks from python3.11-doc (training files)",
        "eval_tokens": next(iter(held_out.values())).numel(), "rows": rows, "mean": summary,
    })  # fmt: skip


if __name__ == "__main__":
    main()
