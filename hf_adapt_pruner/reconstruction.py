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
stored as its lower triangle in blocks of rows (each block a rectangle up to its diagonal: a few per cent over the
triangle), i.e. about `layers x (intermediate_size^2 + (heads * head_dim)^2) x 2` bytes (0.17 GB for SmolLM2-135M),
kept on the CPU unless `device` says otherwise; the device holds one layer's matrix at a time. Each pass adds one
matrix product per block (`X_rows^T X`), about half the multiply-adds of the whole `X^T X`, with no index gathering.
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
    slicing `select_` keeps the rows and columns of the kept inputs. `matrix(key)` gives the whole matrix.

    Across several processes (DDP, FSDP2) each rank sees its own tokens: `settle(sync)` sums what the ranks added since
    the last call, so every rank holds the same matrices and makes the identical refit.
    """

    def __init__(self, layers: Sequence[LayerModules], device: torch.device | str | None = "cpu"):
        self.layers = list(layers)
        self.device = device
        self.grams: dict[tuple[int, int], list[torch.Tensor]] = {}  # row blocks of the lower triangle (`_row_blocks`)
        self.tokens = 0  # tokens whose inputs the matrices hold (every rank's, once settled)
        self.token_mask: torch.Tensor | None = None
        self._handles: list = []
        self._counted: tuple[int, int] | None = None  # the consumer whose inputs count `tokens`
        self._world_size = 1
        self._settled = True
        self._settled_tokens = 0

    def __enter__(self) -> GramStatistics:
        if self._world_size > 1 and self.grams:  # settle() will sum over ranks: keep 1/world of what they share
            for blocks in self.grams.values():
                for block in blocks:
                    block.div_(self._world_size)
        self._settled = False
        for lm in self.layers:
            for position, pruned in consumers(lm):
                self._counted = self._counted or (lm.index, position)
                if (lm.index, position) not in self.grams:  # allocated up front, not between a pass's activations
                    width, device = pruned.module.weight.shape[1], self.device or pruned.module.weight.device
                    self.grams[(lm.index, position)] = [
                        torch.zeros(end - start, end, device=device) for start, end in _row_blocks(width)
                    ]
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
                if key == self._counted:
                    self.tokens += x.shape[0]
                for block in self.grams[key]:  # rows [start, end) against the columns [0, end)
                    end = block.shape[1]
                    rows = x[:, end - block.shape[0] : end]
                    if block.device == x.device:
                        block.addmm_(rows.T, x[:, :end])
                    else:
                        block.add_((rows.T @ x[:, :end]).to(block.device))

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
            for block in self.grams[key]:
                reduced = block.to(sync.device)
                torch.distributed.all_reduce(reduced, group=sync.group)  # gloo and nccl both sum
                block.copy_(reduced)
        self._world_size = sync.world_size
        self._settled = True

    def select_(self, layer: int, kept: dict[int, torch.Tensor]) -> None:
        """After physical slicing: keep the rows and columns of the kept inputs (`kept`: position -> entries)."""
        for position, index in kept.items():
            gram = self.matrix((layer, position))
            if gram is not None:
                index = index.to(gram.device)
                gram = gram[index[:, None], index]
                self.grams[(layer, position)] = [
                    gram[start:end, :end].clone() for start, end in _row_blocks(len(index))
                ]

    def matrix(self, key: tuple[int, int]) -> torch.Tensor | None:
        """The whole `(in, in)` matrix of consumer `key` (layer, position), or None if it has none."""
        blocks = self.grams.get(key)
        if blocks is None:
            return None
        width = blocks[-1].shape[1]
        full = blocks[0].new_empty(width, width)
        for block in blocks:  # rows [start, end), columns [0, end); the rest of those columns is its mirror
            end = block.shape[1]
            start = end - block.shape[0]
            full[start:end, :end] = block
            full[:start, start:end] = block[:, :start].T
            diagonal = full[start:end, start:end]  # exactly symmetric: its upper triangle from its lower one
            diagonal.copy_(diagonal.tril() + diagonal.tril(-1).T)
        return full

    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for blocks in self.grams.values() for b in blocks)


def gram_bytes(width: int) -> int:
    """Bytes of the statistics `GramStatistics` keeps for a consumer with `width` inputs (float32 row blocks)."""
    return 4 * sum((end - start) * end for start, end in _row_blocks(width))


def _row_blocks(width: int) -> list[tuple[int, int]]:
    """[start, end) of the row blocks a (width, width) Gram matrix is stored in: at most 32 blocks of at least 64 rows;
    block `[start, end)` holds rows start..end-1 and columns 0..end-1, so the storage is the lower triangle plus half
    of each diagonal block (4 % over the triangle for 1,536 inputs)."""
    size = max(64, -(-width // 32))
    return [(start, min(start + size, width)) for start in range(0, width, size)]


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
