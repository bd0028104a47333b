"""Reconstruction: refit the weights that read pruned units, by least squares on calibration inputs.

Removing a query head or an MLP channel deletes input columns of the projection that reads it (`o_proj`,
`down_proj`: the modules pruned along dimension 1). The kept columns can absorb part of what the removed ones
contributed. With `X` the projection's inputs over calibration tokens, `H = X^T X`, kept columns `K` and removed
columns `S`, the least-squares optimum of `||X W^T - X_K W_K'^T||` is

    W_K' = W_K + W_S H_SK H_KK^-1

(SlimGPT / ZipLM's structured OBS update). It is solved with ridge damping: `H_KK + damping * mean(diag H_KK) * I`,
which keeps the correction bounded where calibration tokens span fewer directions than the layer has inputs; a very
large damping gives no correction. Nothing else changes: the projection's outputs match the unpruned ones as well as
the kept inputs allow, the kept inputs themselves are untouched (each head and channel computes independently).

`GramStatistics` accumulates `H` for every consumer projection through forward pre-hooks, during the passes an event
already runs (the calibration passes of `CalibrationScorer`, or the training steps of the callback's importance
window), so reconstruction costs no extra forward pass. Memory: one float32 `(in, in)` symmetric matrix per consumer,
stored as its upper triangle, i.e. `layers x (intermediate_size^2 + (heads * head_dim)^2) x 2` bytes (0.16 GB for
SmolLM2-135M, 0.4 GB for a model of Llama-3.2-1B's shape), kept on the CPU unless `device` says otherwise; the device
holds one layer's matrix at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .architectures import LayerModules, PrunedModule
from .importance import effective_weight
from .sharding import full_tensor, is_sharded
from .surgery import kept_per_module


def consumers(lm: LayerModules) -> list[tuple[int, PrunedModule]]:
    """(position in `lm.pruned`, module) of the projections that read the layer's heads or channels."""
    return [(i, p) for i, p in enumerate(lm.pruned) if p.dim == 1 and p.module.weight.dim() == 2]


def _in_backward() -> bool:
    """Whether autograd is running a backward pass (where activation checkpointing recomputes forwards)."""
    task = getattr(torch._C, "_current_graph_task_id", None)  # private; absent in other torch versions
    return task is not None and task() != -1


class GramStatistics:
    """Running `X^T X` of the inputs of every layer's consumer projections (`o_proj`, `down_proj`).

    Use as a context manager around forward passes: the hooks exist only inside it. Set `token_mask` (B, T) before a
    forward to leave padding out. Statistics accumulate over every pass until the engine uses them; after physical
    slicing `select_` keeps the rows and columns of the kept inputs.

    Across several processes (DDP, FSDP2) each rank sees its own tokens: `settle(sync)` sums what the ranks added since
    the last call, so every rank holds the same matrices and makes the identical refit.
    """

    def __init__(self, layers: Sequence[LayerModules], device: torch.device | str | None = "cpu"):
        self.layers = list(layers)
        self.device = device
        self.grams: dict[tuple[int, int], torch.Tensor] = {}  # upper triangles, row by row (`matrix` unpacks)
        self.tokens = 0  # tokens whose inputs the matrices hold (every rank's, once settled)
        self.token_mask: torch.Tensor | None = None
        self._handles: list = []
        self._counted: tuple[int, int] | None = None  # the consumer whose inputs count `tokens`
        self._world_size = 1
        self._settled = True
        self._settled_tokens = 0

    def __enter__(self) -> GramStatistics:
        if self._world_size > 1 and self.grams:  # settle() will sum over ranks: keep 1/world of what they share
            for gram in self.grams.values():
                gram.div_(self._world_size)
        self._settled = False
        for lm in self.layers:
            for position, pruned in consumers(lm):
                self._counted = self._counted or (lm.index, position)
                if (lm.index, position) not in self.grams:  # allocated up front, not between a pass's activations
                    width, device = pruned.module.weight.shape[1], self.device or pruned.module.weight.device
                    self.grams[(lm.index, position)] = torch.zeros(width * (width + 1) // 2, device=device)
                hook = self._make_hook((lm.index, position))
                self._handles.append(pruned.module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.token_mask = None

    def _make_hook(self, key: tuple[int, int]):
        def hook(module, args):
            if _in_backward():  # activation checkpointing recomputes the forward: its inputs are counted already
                return
            with torch.no_grad():
                x = args[0]  # (B, T, in)
                if self.token_mask is not None and self.token_mask.shape == x.shape[:-1]:
                    x = x[self.token_mask.to(x.device) != 0]
                x = x.reshape(-1, x.shape[-1]).float()
                rows, cols = _triangle(x.shape[-1], x.device)
                gram = (x.T @ x).view(-1).index_select(0, rows * x.shape[-1] + cols)  # the rest mirrors it
                if key == self._counted:
                    self.tokens += x.shape[0]
                total = self.grams[key]
                total.add_(gram.to(total.device))

        return hook

    def settle(self, sync) -> None:
        """Sum the statistics over the ranks of `sync` (a `RankSync`, or None in one process); a no-op until new
        passes have added to them. Every rank must call it at the same point."""
        if sync is None or self._settled:
            self._settled = True
            self._settled_tokens = self.tokens
            return
        fresh = torch.tensor([self.tokens - self._settled_tokens], dtype=torch.long, device=sync.device)
        torch.distributed.all_reduce(fresh, group=sync.group)
        self.tokens = self._settled_tokens = self._settled_tokens + int(fresh)
        for key in sorted(self.grams):
            gram = self.grams[key]
            reduced = gram.to(sync.device)
            torch.distributed.all_reduce(reduced, group=sync.group)  # gloo and nccl both sum
            gram.copy_(reduced)
        self._world_size = sync.world_size
        self._settled = True

    def select_(self, layer: int, kept: dict[int, torch.Tensor]) -> None:
        """After physical slicing: keep the rows and columns of the kept inputs (`kept`: position -> entries)."""
        for position, index in kept.items():
            gram = self.matrix((layer, position))
            if gram is not None:
                index = index.to(gram.device)
                rows, cols = _triangle(len(index), gram.device)
                self.grams[(layer, position)] = gram[index[rows], index[cols]]

    def matrix(self, key: tuple[int, int]) -> torch.Tensor | None:
        """The whole `(in, in)` matrix of consumer `key` (layer, position), or None if it has none."""
        packed = self.grams.get(key)
        if packed is None:
            return None
        width = int(((8 * packed.numel() + 1) ** 0.5 - 1) / 2)
        rows, cols = _triangle(width, packed.device)
        full = torch.zeros(width, width, dtype=packed.dtype, device=packed.device)
        full[rows, cols] = packed
        full[cols, rows] = packed  # the lower triangle mirrors the upper one (the diagonal is written twice, equal)
        return full

    def bytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grams.values())


_TRIANGLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (rows, cols) of the widest triangle yet


def _triangle(width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols), int64: the upper triangle of a (width, width) matrix with its diagonal, column by column ((0, 0),
    (0, 1), (1, 1), (0, 2), ...), the order of a packed Gram matrix. A narrower triangle's order is a prefix of a wider
    one's, so one pair of index vectors per device (the widest seen, stored as int32) serves every width: the hooks
    call this in every pass, for layers of different widths."""
    count = width * (width + 1) // 2
    rows, cols = _TRIANGLES.get(str(device), (None, None))
    if rows is None or rows.numel() < count:
        cols = torch.arange(width, device=device).repeat_interleave(torch.arange(1, width + 1, device=device))
        rows = torch.arange(count, device=device) - cols * (cols + 1) // 2
        rows, cols = rows.int(), cols.int()
        _TRIANGLES[str(device)] = rows, cols
    return rows[:count].long(), cols[:count].long()


def least_squares_correction(
    weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, damping: float
) -> torch.Tensor:
    """`W_S H_SK (H_KK + damping * mean(diag H_KK) * I)^-1`: what the kept columns `kept` of `weight` (out, in) add so
    the outputs on inputs with Gram matrix `gram` (in, in) stay closest to the unpruned ones. (out, |K|), float64."""
    gram = gram.double()
    h_kk = gram[kept][:, kept]
    h_ks = gram[kept][:, removed]
    scale = float(h_kk.diagonal().mean())
    if not scale > 0:
        raise RuntimeError(
            "Reconstruction: the Gram matrix of a pruned layer's inputs is zero (no calibration token reached it)."
        )
    h_kk.diagonal().add_(damping * scale)
    factor, info = torch.linalg.cholesky_ex(h_kk)
    # (|K|, |S|) = H_KK^-1 H_KS; a singular H_KK (damping 0, too few tokens) takes the least-norm solution
    solution = torch.cholesky_solve(h_ks, factor) if int(info) == 0 else torch.linalg.lstsq(h_kk, h_ks).solution
    w_s = weight.detach().double()[:, removed.to(weight.device)].to(gram.device)
    return w_s @ solution.T  # (out, |K|)


def refit_layer_(
    lm: LayerModules, head_dim: int, plan: Sequence[torch.Tensor], grams: GramStatistics, damping: float
) -> dict[int, torch.Tensor]:
    """Before a layer loses units: add to the kept input columns of its consumer projections the least-squares
    correction for the removed ones. `plan` is (query heads, kv heads, channels) to keep, relative to the units in use
    (as the surgery takes it). Returns position -> kept entries, for `GramStatistics.select_` after slicing."""
    live = lm.live if lm.live is not None else lm.all_units(head_dim)
    keep = [units[index] for units, index in zip(live, plan)]
    live_entries = {id(p): entries for p, entries in kept_per_module(lm, head_dim, live)}
    kept_entries = {id(p): entries for p, entries in kept_per_module(lm, head_dim, keep)}
    result = {}
    for position, pruned in consumers(lm):
        kept, alive = kept_entries[id(pruned)], live_entries[id(pruned)]
        result[position] = kept
        removed = alive[~torch.isin(alive, kept)]
        gram = grams.matrix((lm.index, position))
        if removed.numel() == 0 or gram is None:
            continue
        weight = full_tensor(effective_weight(pruned))  # every rank computes the whole correction
        correction = least_squares_correction(weight, gram, kept, removed, damping)
        _add_columns_(pruned.module.weight, kept, correction)
    return result


def _add_columns_(weight: nn.Parameter, columns: torch.Tensor, values: torch.Tensor) -> None:
    """`weight[:, columns] += values` in the weight's dtype; on a sharded weight, each rank adds to its rows."""
    with torch.no_grad():
        if is_sharded(weight):
            if any(placement.is_shard() and placement.dim != 0 for placement in weight.placements):
                raise ValueError(
                    f"Reconstruction needs weights sharded by rows (Shard(0), fully_shard's default), not "
                    f"{weight.placements}: set PrunerConfig(reconstruction='none') for this model."
                )
            local = weight.to_local()
            values = values[_local_rows(weight)]
            if values.shape[0] != local.shape[0]:
                raise RuntimeError(f"Reconstruction: {local.shape[0]} local rows, expected {values.shape[0]}.")
        else:
            local = weight.data
        columns = columns.to(local.device)
        local[:, columns] += values.to(device=local.device, dtype=local.dtype)


def _local_rows(weight) -> slice:
    """The rows of a `Shard(0)` DTensor this rank holds (torch.chunk's split, as FSDP2 uses)."""
    mesh = weight.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    rows = weight.shape[0]
    per_rank = -(-rows // world)
    start = min(rank * per_rank, rows)
    return slice(start, min(start + per_rank, rows))
