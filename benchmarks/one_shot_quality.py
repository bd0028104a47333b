"""One-shot quality: held-out perplexity of SmolLM2-135M pruned once (no training) at several keep ratios.

Modes: adaptive (the default: score allocation, amplitude 0.02), the previous proportional allocation, uniform
(amplitude 0) and attention not pruned (MLP channels only), each with the default inner steps and calibration and
float32 scoring passes, and adaptive with bfloat16-autocast scoring passes (`calibration_autocast="auto"` picks it
on GPUs and CPUs with AMX).
Perplexity on held-out files of the calibration source and on English prose from another source (git-doc), for two
seeds (the calibration sample). Prints and writes JSON.

    python benchmarks/one_shot_quality.py [--smoke] [--ratios 0.9 0.8 0.7 0.6 0.5] [--seeds 0 1]
        [--modes ...] [--reuse RESULT.json ...]

The paired comparison of adaptive against attention not pruned (four seeds, eight at keeps 0.9 and 0.6, four times
the held-out tokens; make_docs renders it beside the sweep):

    python benchmarks/one_shot_quality.py --ratios 0.9 0.8 0.7 0.6 0.5 --seeds 0 1 2 3 --eval-blocks 128 \
        --modes adaptive "attention not pruned" --out benchmarks/results/one_shot_pairs.json

and the same with `--ratios 0.9 0.6 --seeds 4 5 6 7 --out ...`, whose rows were added to that file.

What the servable layout costs (`layout="uniform"`, saved as the stock architecture; docs/guides/serving-layouts.md):

    python benchmarks/one_shot_quality.py --ratios 0.7 --seeds 0 1 --modes adaptive "uniform layout" \
        --out benchmarks/results/uniform_layout.json
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

from _common import held_out_sets, load_model, parser, text_blocks, write

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model
from hf_adapt_pruner.evaluation import perplexity


FLOAT32 = {"calibration_autocast": "off"}  # the allocations are compared with float32 scoring on every machine
MODES = {  # name: PrunerConfig overrides
    "adaptive": FLOAT32,
    "proportional (previous)": {"allocation": "proportional", **FLOAT32},
    "uniform A=0": {"amplitude": 0.0, **FLOAT32},
    "attention not pruned": {"prune_attention": False, **FLOAT32},
    "adaptive, bfloat16 scoring": {"calibration_autocast": "bfloat16"},  # the default where bfloat16 is fast
    "uniform layout": {"layout": "uniform", **FLOAT32},  # equal widths in every layer: the stock architecture
}


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--reuse", type=Path, nargs="*", default=[],
                   help="Result JSONs whose rows (keep, mode, seed) are taken instead of run again.")  # fmt: skip
    args = p.parse_args()
    budget = {}  # the defaults' inner steps and calibration
    if args.smoke:
        args.ratios, args.seeds, args.eval_blocks, budget = [0.7], [0], 4, {"inner_steps": 2, "calibration_samples": 4}
    model, tokenizer, name = load_model(args.smoke)
    seq_len = 32 if args.smoke else 128
    calibration, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 256, 1)
    held_out = held_out_sets(tokenizer, args.smoke, args.text_dir, seq_len, args.eval_blocks)
    kv_heads = model.config.num_key_value_heads * model.config.num_hidden_layers
    reused = {(r["ratio"], r["mode"], r["seed"]): r for path in args.reuse
              for r in json.loads(path.read_text())["rows"] if "seed" in r}  # fmt: skip
    rows = [{"ratio": 1.0, "mode": "original", "params": count_parameters(model), "kv_heads": kv_heads,
             **{f"ppl {k}": perplexity(model, v) for k, v in held_out.items()}}]  # fmt: skip
    for ratio in args.ratios:
        for mode in args.modes:
            for seed in args.seeds:
                if (ratio, mode, seed) in reused:
                    rows.append(reused[ratio, mode, seed])
                    continue
                pruned = copy.deepcopy(model)
                config = PrunerConfig(target_ratio=ratio, calibration_seq_len=seq_len, seed=seed, **budget,
                                      **MODES[mode])  # fmt: skip
                start = time.perf_counter()
                report = prune_model(pruned, config, calibration, progress=False)
                seconds = time.perf_counter() - start
                kv_heads = sum(layer.after.num_key_value_heads for layer in report.layers)
                rows.append({"ratio": ratio, "mode": mode, "seed": seed, "params": report.params_after,
                             "prune_seconds": seconds, "kv_heads": kv_heads,
                             **{f"ppl {k}": perplexity(pruned, v) for k, v in held_out.items()},
                             "widths": [layer.after.as_tuple() for layer in report.layers]})  # fmt: skip
                print(rows[-1], flush=True)
                del pruned
    summary = {}
    for row in rows[1:]:
        entry = summary.setdefault(f"{row['ratio']}", {}).setdefault(row["mode"], {})
        for source in held_out:
            entry.setdefault(source, []).append(row[f"ppl {source}"])
    summary = {r: {m: {s: statistics.mean(v) for s, v in e.items()} for m, e in modes.items()}
               for r, modes in summary.items()}  # fmt: skip
    write("one_shot_quality", args, {"model": name, "defaults": PrunerConfig(target_ratio=0.7, **budget).to_dict(),
                                     "calibration": "256 x 128-token blocks from python3.11-doc (training files)",
                                     "eval_tokens": args.eval_blocks * seq_len, "rows": rows,
                                     "mean_perplexity": summary})  # fmt: skip


if __name__ == "__main__":
    main()
