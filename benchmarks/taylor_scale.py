"""Are Taylor scores of kv groups and of MLP channels on one scale? Measured against real loss changes.

`allocation="score"` ranks a layer's kv groups and MLP channel blocks by Taylor importance per parameter, so the two
kinds must be comparable. For a few layers of SmolLM2-135M this zeroes each kv group (with its query heads), and MLP
channel blocks of the same parameter count (the least, median and most important channels by Taylor score), and
measures the calibration loss change. Scores are the library's own (`group_scores`, after one backward pass of the
same batches). Prints and writes JSON.

    python benchmarks/taylor_scale.py [--smoke] [--layers 2 14 26]
"""

from __future__ import annotations

import statistics

import torch
from _common import load_model, parser, text_blocks, write

from hf_adapt_pruner.architectures import get_architecture, layer_modules
from hf_adapt_pruner.importance import group_scores
from hf_adapt_pruner.plans import kv_group_scores
from hf_adapt_pruner.pruner import current_layout, unit_costs
from hf_adapt_pruner.scorers import prunable_parameters


def zeroed(lm, head_dim: int, units: dict[str, torch.Tensor]):
    """Zero the given query heads, kv heads and channels of layer `lm`; returns a function that restores them."""
    sizes = dict(zip(("q", "kv", "mlp"), lm.widths(head_dim)))
    entries = {"q": head_dim, "kv": head_dim, "mlp": 1}
    saved = []
    for pruned in lm.pruned:
        offset, index = 0, []
        for block in pruned.blocks:
            for unit in units.get(block, torch.tensor([], dtype=torch.long)).tolist():
                start = offset + unit * entries[block]
                index.extend(range(start, start + entries[block]))
            offset += sizes[block] * entries[block]
        for param, dim in pruned.parameters():
            saved.append((param, param.detach().clone()))
            param.data.index_fill_(dim, torch.tensor(index, dtype=torch.long), 0.0)

    def restore():
        for param, value in saved:
            param.data.copy_(value)

    return restore


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 14, 26])
    p.add_argument("--samples", type=int, default=16)
    args = p.parse_args()
    model, tokenizer, name = load_model(args.smoke)
    if args.smoke:
        args.layers, args.samples = [0, 3], 4
    seq_len = 32 if args.smoke else 128
    blocks, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, args.samples, 1)
    batches = blocks.split(8)
    layers = layer_modules(model, get_architecture(model.config.model_type))
    head_dim = current_layout(model).head_dim
    model.eval().requires_grad_(False)
    for param in prunable_parameters(layers):
        param.requires_grad_(True)

    def loss() -> float:
        with torch.no_grad():
            return statistics.mean(float(model(input_ids=b, labels=b).loss) for b in batches)

    for batch in batches:
        (model(input_ids=batch, labels=batch).loss / len(batches)).backward()
    base = loss()
    rows = []
    for i in args.layers:
        lm = layers[i]
        scores, costs = group_scores(lm, head_dim, "taylor"), unit_costs(lm, head_dim)
        heads, kv, channels = lm.widths(head_dim)
        group = heads // kv
        group_cost = group * costs["q"] + costs["kv"]
        for j, score in enumerate(kv_group_scores(scores).tolist()):
            restore = zeroed(lm, head_dim, {"q": torch.arange(j * group, (j + 1) * group), "kv": torch.tensor([j])})
            rows.append({"layer": i, "unit": f"kv group {j}", "params": group_cost, "taylor": score,
                         "loss_change": loss() - base})  # fmt: skip
            restore()
            print(rows[-1], flush=True)
        n = max(1, round(group_cost / costs["mlp"]))  # channels worth one kv group
        order = torch.argsort(scores.channels)
        for label, start in (("least", 0), ("median", (channels - n) // 2), ("most", channels - n)):
            picked = order[start : start + n]
            restore = zeroed(lm, head_dim, {"mlp": picked})
            rows.append({"layer": i, "unit": f"{n} channels, {label} important", "params": n * costs["mlp"],
                         "taylor": float(scores.channels[picked].sum()), "loss_change": loss() - base})  # fmt: skip
            restore()
            print(rows[-1], flush=True)
    # Per layer: does the score pick the same kind to remove first (cheapest kv group or least important channels of
    # the same size) as the measured loss change does?
    choices = []
    for i in args.layers:
        kv_rows = [r for r in rows if r["layer"] == i and r["unit"].startswith("kv group")]
        channel_row = next(r for r in rows if r["layer"] == i and r["unit"].endswith("least important"))
        cheapest = min(r["taylor"] / r["params"] for r in kv_rows)
        by_score = "kv group" if cheapest < channel_row["taylor"] / channel_row["params"] else "channels"
        cheapest_loss = min(r["loss_change"] for r in kv_rows)
        by_loss = "kv group" if cheapest_loss < channel_row["loss_change"] else "channels"
        choices.append({"layer": i, "score_removes_first": by_score, "loss_change_removes_first": by_loss})
    write("taylor_scale", args, {"model": name, "calibration_tokens": args.samples * seq_len, "base_loss": base,
                                 "rows": rows, "first_removal": choices})  # fmt: skip


if __name__ == "__main__":
    main()
