"""Importance: of decoder layers (input/output similarity) and of structural groups (heads, MLP channels).

Layer importance comes from forward hooks on the decoder layers; group importance from the weights and, for
Taylor, the gradients already sitting in `.grad`. Nothing here runs the model: callers do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import LayerModules, PrunedModule
from .sharding import full_tensor


# ---------------------------------------------------------------------------------------------------------------
# Layer importance
# ---------------------------------------------------------------------------------------------------------------
def _hidden_from_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_from_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerSimilarityCollector:
    """Forward hooks that accumulate, per decoder layer, how much the layer moves its input.

    Per token it records `cos(x, y)` (metric `cosine`), `||x - y||_2` (`euclidean`) or `||x - y||_1`
    (`manhattan`), where `x`, `y` are the layer's input and output hidden states. `importance()` turns the
    token means into "bigger = more important": `-cos` for cosine, the distance itself for the others (the
    official code negates distances too, which ranks layers backwards; see paper-notes section 6).

    Use as a context manager; hooks exist only inside it. Set `token_mask` (B, T) before a forward to skip padding.
    Under gradient checkpointing transformers recomputes inside the decoder layer, below these hooks, so a token is
    counted once (tested).
    """

    def __init__(self, layers: Sequence[nn.Module], metric: str):
        self.layers = list(layers)
        self.metric = metric
        self.sums = torch.zeros(len(self.layers), dtype=torch.float64)
        self.counts = torch.zeros(len(self.layers), dtype=torch.float64)
        self.token_mask: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> LayerSimilarityCollector:
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._make_hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, index: int):
        def hook(module, args, kwargs, output):
            with torch.no_grad():
                x = _hidden_from_input(args, kwargs).float()  # (B, T, H)
                y = _hidden_from_output(output).float()
                per_token = self._per_token(x, y)  # (B, T)
                if self.token_mask is not None and self.token_mask.shape == per_token.shape:
                    real = self.token_mask.to(per_token.device) != 0  # selected, not multiplied: 0 * NaN is NaN
                    self.sums[index] += float(per_token[real].sum())
                    self.counts[index] += float(real.sum())
                else:
                    self.sums[index] += float(per_token.sum())
                    self.counts[index] += per_token.numel()

        return hook

    def _per_token(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            return torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-8)
        if self.metric == "euclidean":
            return (x - y).norm(p=2, dim=-1)
        return (x - y).abs().sum(dim=-1)

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def importance(self) -> torch.Tensor:
        """(L,) raw importances, bigger = the layer transforms its input more."""
        if bool((self.counts == 0).any()):
            missing = (self.counts == 0).nonzero().flatten().tolist()
            raise RuntimeError(
                f"No tokens were seen by decoder layers {missing}: run a forward pass inside the collector."
            )
        mean = self.sums / self.counts
        return -mean if self.metric == "cosine" else mean


# ---------------------------------------------------------------------------------------------------------------
# Group importance
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class GroupScores:
    """Scores of one layer's groups: bigger = more important."""

    q_heads: torch.Tensor  # (num_attention_heads,)
    kv_heads: torch.Tensor  # (num_key_value_heads,)
    channels: torch.Tensor  # (intermediate_size,)

    def __add__(self, other: GroupScores) -> GroupScores:
        return GroupScores(
            self.q_heads + other.q_heads, self.kv_heads + other.kv_heads, self.channels + other.channels
        )

    def select(self, keep_q: torch.Tensor, keep_kv: torch.Tensor, keep_channels: torch.Tensor) -> GroupScores:
        return GroupScores(self.q_heads[keep_q], self.kv_heads[keep_kv], self.channels[keep_channels])

    def cpu_double(self) -> GroupScores:
        """float64 on the CPU, where allocation works (scores a scorer left on the model's device come back)."""
        return GroupScores(*(t.detach().double().cpu() for t in (self.q_heads, self.kv_heads, self.channels)))


def effective_weight(pruned: PrunedModule) -> torch.Tensor:
    """The weight the layer computes with: the base weight plus the deltas of its active LoRA adapters."""
    weight = pruned.module.weight.detach().float()
    adapter = pruned.adapter
    if adapter is None or getattr(adapter, "merged", False) or getattr(adapter, "disable_adapters", False):
        return weight
    for name in adapter.active_adapters:
        if name in adapter.lora_A:
            weight = weight + adapter.get_delta_weight(name).detach().float()
    return weight


def _entry_saliency(pruned: PrunedModule, metric: str) -> torch.Tensor:
    """Saliency summed per entry of the pruned dimension (weight, plus bias along dim 0), in float32."""
    total = None
    for param, dim in pruned.parameters():
        w = effective_weight(pruned) if param is pruned.module.weight else param.detach().float()
        if metric == "taylor":
            if param.grad is None:
                raise RuntimeError(
                    f"Taylor importance needs gradients of {pruned.path}: run a backward pass of the LM loss before "
                    "scoring (prune_model does this on the calibration data; with frozen weights, as under LoRA, use "
                    "importance_source='calibration')."
                )
            w = w * param.grad.detach().float()
        entries = full_tensor(w.abs().sum(dim=1 - dim) if w.dim() == 2 else w.abs())  # sharded: gathered
        total = entries if total is None else total + entries
    return total


def group_scores(
    modules: LayerModules, head_dim: int, metric: str, generator: torch.Generator | None = None
) -> GroupScores:
    """Score every query head, kv head and MLP channel of one layer.

    A query head couples its `head_dim` rows of the query projection with `head_dim` columns of the output
    projection (and of a full-width query norm); a kv head its rows of the key and value projections; an MLP
    channel a row of the gate and up projections and a column of the down projection. Fused projections are split
    block by block. `taylor` sums |w * grad| and `magnitude` sums |w| over every weight of the group.
    """
    if modules.live is not None:  # mask mode: score the units still in use
        full = group_scores(dataclasses.replace(modules, live=None), head_dim, metric, generator)
        return full.select(*modules.live)
    heads, kv_heads, channels = modules.widths(head_dim)
    if metric == "random":
        return GroupScores(
            torch.rand(heads, generator=generator, dtype=torch.float64, device="cpu"),  # the generator's device
            torch.rand(kv_heads, generator=generator, dtype=torch.float64, device="cpu"),
            torch.rand(channels, generator=generator, dtype=torch.float64, device="cpu"),
        )
    sizes = {"q": heads * head_dim, "kv": kv_heads * head_dim, "mlp": channels}
    sums = {kind: 0.0 for kind in sizes}
    for pruned in modules.pruned:
        entries = _entry_saliency(pruned, metric)
        for block, part in zip(pruned.blocks, entries.split([sizes[b] for b in pruned.blocks])):
            sums[block] = sums[block] + part
    return GroupScores(
        sums["q"].view(heads, head_dim).sum(dim=1).double().cpu(),
        sums["kv"].view(kv_heads, head_dim).sum(dim=1).double().cpu(),
        sums["mlp"].double().cpu(),
    )
