"""Are Taylor scores of kv groups and of MLP channels on one scale? Measured against real loss changes.

`allocation="score"` ranks a layer's kv groups and MLP channel blocks by Taylor importance per parameter, so the two
kinds must be comparable. For a few layers of SmolLM2-135M this zeroes each kv group (with its query heads), and MLP
channel blocks of the same parameter count (picked at five quantiles of the Taylor ranking, least important first),
and measures the loss change on calibration sequences the scores did not see. Two estimators are graded:

- `taylor`: the library's score (`group_scores`, Σ|w·∂L/∂w| over the unit's weights), after one backward pass;
- `fisher`: the second-order term of removing the unit, `½ S Σ_s d_s²` with `d_s` the unit's activation times its
  gradient summed over sequence `s` (the input of the output projection for a kv group's query heads, of the down
  projection for channels), from the same backward pass: the empirical Fisher at sequence granularity.

Per seed (which calibration sequences), it reports Spearman's rank correlation of each estimator with the measured
loss change, and per layer which kind each would remove first. Prints and writes JSON.

    python benchmarks/taylor_scale.py [--smoke] [--layers 0 1 2 14 20 26 29] [--seeds 0 1]
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


QUANTILES = (0.0, 0.2, 0.4, 0.6, 0.8)  # where in the Taylor ranking of channels a block starts


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


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(values: list[float]) -> torch.Tensor:
        return torch.argsort(torch.argsort(torch.tensor(values, dtype=torch.float64))).double()

    rx, ry = ranks(x), ranks(y)
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


class SequenceProducts:
    """Per sequence, activation x gradient summed over tokens at the input of each layer's output and down projections
    (the modules pruned along their inputs): one row per sequence, one column per input entry."""

    def __init__(self, layers):
        self.sums = {(lm.index, blocks): [] for lm in layers for blocks in (("q",), ("mlp",))}
        self.handles = []
        for lm in layers:
            for pruned in lm.pruned:
                if pruned.dim == 1 and (lm.index, pruned.blocks) in self.sums:
                    self.handles.append(pruned.module.register_forward_pre_hook(self._hook(lm.index, pruned.blocks)))

    def _hook(self, index: int, blocks: tuple[str, ...]):
        def hook(module, args):
            x = args[0]
            if x.requires_grad:
                x.register_hook(lambda g: self.sums[index, blocks].append((x.detach() * g).float().sum(dim=1)))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def get(self, index: int, blocks: tuple[str, ...]) -> torch.Tensor:
        return torch.cat(self.sums[index, blocks]).double()


def measure(model, layers, head_dim: int, blocks: torch.Tensor, layer_indices: list[int]) -> dict:
    """Scores from the first half of `blocks`, loss changes on the second half."""
    estimate, held = blocks[: len(blocks) // 2].split(8), blocks[len(blocks) // 2 :].split(8)
    chosen = [layers[i] for i in layer_indices]
    model.zero_grad(set_to_none=True)
    products = SequenceProducts(chosen)
    for batch in estimate:
        (model(input_ids=batch, labels=batch).loss / len(estimate)).backward()
    products.remove()
    sequences = len(blocks) // 2

    def loss() -> float:
        with torch.no_grad():
            return statistics.mean(float(model(input_ids=b, labels=b).loss) for b in held)

    def fisher(d: torch.Tensor) -> float:  # d: (sequences,), products under the gradient of the mean loss
        return float(0.5 * sequences * (d**2).sum())

    base, rows = loss(), []
    for lm in chosen:
        i = lm.index
        scores, costs = group_scores(lm, head_dim, "taylor"), unit_costs(lm, head_dim)
        heads, kv, channels = lm.widths(head_dim)
        group = heads // kv
        group_cost = group * costs["q"] + costs["kv"]
        per_head = products.get(i, ("q",)).view(sequences, heads, head_dim).sum(-1)
        per_channel = products.get(i, ("mlp",))
        for j, score in enumerate(kv_group_scores(scores).tolist()):
            restore = zeroed(lm, head_dim, {"q": torch.arange(j * group, (j + 1) * group), "kv": torch.tensor([j])})
            rows.append({"layer": i, "unit": f"kv group {j}", "params": group_cost, "taylor": score,
                         "fisher": fisher(per_head[:, j * group : (j + 1) * group].sum(1)),
                         "loss_change": loss() - base})  # fmt: skip
            restore()
        n = max(1, round(group_cost / costs["mlp"]))  # channels worth one kv group
        order = torch.argsort(scores.channels)
        for q in QUANTILES:
            picked = order[int(q * (channels - n)) :][:n]
            restore = zeroed(lm, head_dim, {"mlp": picked})
            rows.append({"layer": i, "unit": f"{n} channels from quantile {q}", "params": n * costs["mlp"],
                         "taylor": float(scores.channels[picked].sum()),
                         "fisher": fisher(per_channel[:, picked].sum(1)), "loss_change": loss() - base})  # fmt: skip
            restore()
    model.zero_grad(set_to_none=True)
    return {"base_loss": base, "rows": rows}


def first_removals(rows: list[dict], layer_indices: list[int]) -> list[dict]:
    """Per layer, which kind each estimator (and the measured loss change) removes first: the cheapest kv group per
    parameter, or the cheapest channel block."""
    out = []
    for i in layer_indices:
        mine = [r for r in rows if r["layer"] == i]
        choice = {}
        for key in ("taylor", "fisher", "loss_change"):
            kv = min(r[key] / r["params"] for r in mine if r["unit"].startswith("kv group"))
            channels = min(r[key] / r["params"] for r in mine if not r["unit"].startswith("kv group"))
            choice[key] = "kv group" if kv < channels else "channels"
        out.append({"layer": i, **choice})
    return out


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 14, 20, 26, 29])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples", type=int, default=16, help="Sequences to score on (as many again to measure on).")
    args = p.parse_args()
    model, tokenizer, name = load_model(args.smoke)
    if args.smoke:
        args.layers, args.samples, args.seeds = [0, 1], 8, [0]
    seq_len = 32 if args.smoke else 128
    pool, _ = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 256, 1)
    layers = layer_modules(model, get_architecture(model.config.model_type))
    head_dim = current_layout(model).head_dim
    model.eval().requires_grad_(False)
    for param in prunable_parameters(layers):
        param.requires_grad_(True)
    runs = []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        blocks = pool[torch.randperm(len(pool), generator=g)[: 2 * args.samples]]
        run = {"seed": seed, **measure(model, layers, head_dim, blocks, args.layers)}
        run["spearman"] = {key: spearman([r[key] for r in run["rows"]], [r["loss_change"] for r in run["rows"]])
                           for key in ("taylor", "fisher")}  # fmt: skip
        run["first_removal"] = first_removals(run["rows"], args.layers)
        print({k: v for k, v in run.items() if k != "rows"}, flush=True)
        runs.append(run)
    write("taylor_scale", args, {"model": name, "calibration_tokens": args.samples * seq_len, "runs": runs})


if __name__ == "__main__":
    main()
