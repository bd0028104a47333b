"""Scorers: where a prune event's importances come from.

A scorer is called once per inner step and returns `(raw layer importance (L,), [GroupScores per layer])`; after
the engine slices a layer it calls `update(layer, keep_q, keep_kv, keep_channels)` so cached scores follow.

- `CalibrationScorer` runs a forward/backward pass over calibration data at every call (the paper's recipe), or
  every `rescore_every` calls, serving the last measurement in between with removed units dropped.
- `StaticScorer` serves scores gathered elsewhere (e.g. accumulated from training gradients by the callback).

A scorer's `grams` (a `GramStatistics`, or None) are the input statistics of the same passes, for the engine's
least-squares reconstruction.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .architectures import LayerModules
from .config import PrunerConfig
from .data import CalibrationPool
from .importance import GroupScores, LayerSimilarityCollector, group_scores
from .reconstruction import GramStatistics
from .sharding import has_sharded_parameters


logger = logging.get_logger(__name__)


class StaticScorer:
    """Scores measured once; re-indexed as layers are sliced."""

    def __init__(
        self, layer_importance: torch.Tensor, scores: Sequence[GroupScores], grams: GramStatistics | None = None
    ):
        self.layer_importance = layer_importance
        self.scores = list(scores)
        self.grams = grams

    def __call__(self, layers: Sequence[LayerModules], head_dim: int) -> tuple[torch.Tensor, list[GroupScores]]:
        return self.layer_importance, self.scores

    def update(self, layer: int, keep_q: torch.Tensor, keep_kv: torch.Tensor, keep_channels: torch.Tensor) -> None:
        self.scores[layer] = self.scores[layer].select(keep_q, keep_kv, keep_channels)


def prunable_parameters(layers: Sequence[LayerModules]) -> list[nn.Parameter]:
    return [param for lm in layers for pruned in lm.pruned for param, _ in pruned.parameters()]


class CalibrationScorer:
    """Re-measures importances on a fresh calibration sample at every inner step (every `rescore_every` steps).

    One pass gives both: forward hooks record layer similarity, and the backward pass of the LM loss fills the
    gradients Taylor scores need. Only the prunable projections get gradients (embeddings and `lm_head` do not),
    dropout is off, and every parameter's `requires_grad` and `.grad` are restored afterwards, so this can run
    in the middle of training. Batches run in micro-batches of `micro_batch_size` sequences whose token-weighted
    losses sum to the batch's, so activations and logits are bounded by one micro-batch and scores do not change.
    """

    def __init__(
        self,
        model: nn.Module,
        pool: CalibrationPool,
        layer_metric: str,
        group_metric: str,
        seed: int,
        progress: bool = True,
        rescore_every: int = 1,
        autocast: str = "off",
        collect_grams: bool = False,
        micro_batch_size: int | None = None,
        checkpointing: str = "auto",
    ):
        self.model = model
        self.pool = pool
        self.layer_metric = layer_metric
        self.group_metric = group_metric
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = progress
        self.rescore_every = rescore_every
        self.autocast = autocast
        self.collect_grams = collect_grams
        self.micro_batch_size = micro_batch_size  # sequences per forward/backward pass; None: whole batches
        self.checkpointing = checkpointing  # recompute layers' activations in the backward pass: auto / on / off
        self.grams: GramStatistics | None = None  # created at the first pass, over the layers it is given
        self._calls = 0
        self._last: StaticScorer | None = None
        if group_metric == "taylor" and any(p.dtype == torch.float16 for p in model.parameters()):
            logger.warning(
                "The model runs in float16: the calibration backward pass has no loss scaling, so gradients below "
                "float16's range (~6e-5) lose precision or become zero, and Taylor scores with them. Load the model "
                "in bfloat16 (float32's range; --dtype bfloat16 on the command line) or float32 to prune it."
            )

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        pool: CalibrationPool,
        config: PrunerConfig,
        progress: bool = True,
        while_training: bool = False,
    ) -> CalibrationScorer:
        """The scorer a `PrunerConfig` describes (`while_training`: for a callback event)."""
        return cls(model, pool, config.layer_importance, config.group_importance, config.seed, progress,
                   rescore_every=config.rescore_every, autocast=config.calibration_autocast,
                   collect_grams=config.refits(while_training),
                   micro_batch_size=config.calibration_micro_batch_size,
                   checkpointing=config.calibration_checkpointing)  # fmt: skip

    def __call__(self, layers: Sequence[LayerModules], head_dim: int) -> tuple[torch.Tensor, list[GroupScores]]:
        self._calls += 1
        if self._last is None or (self._calls - 1) % self.rescore_every == 0:
            self._last = StaticScorer(*self._measure(layers, head_dim))
        return self._last(layers, head_dim)

    def _measure(self, layers: Sequence[LayerModules], head_dim: int) -> tuple[torch.Tensor, list[GroupScores]]:
        needs_grad = self.group_metric == "taylor"
        params = list(self.model.parameters())
        saved = [(p.requires_grad, p.grad) for p in params]
        was_training = self.model.training
        collector = LayerSimilarityCollector([lm.layer for lm in layers], self.layer_metric)
        try:
            self.model.eval()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            if needs_grad:
                for p in prunable_parameters(layers):
                    p.requires_grad_(True)
                    # allocated before the first pass, so the gradients do not end up scattered between its freed
                    # activations (the host allocator keeps such holes resident); the passes add into them in place
                    p.grad = torch.zeros_like(p)
            if self.collect_grams and self.grams is None:
                self.grams = GramStatistics(layers)
            self._run(layers, collector, needs_grad)
            scores = [group_scores(lm, head_dim, self.group_metric, self.generator) for lm in layers]
        finally:
            for p, (requires_grad, grad) in zip(params, saved):
                p.requires_grad_(requires_grad)
                p.grad = grad
            self.model.train(was_training)
        return collector.importance(), scores

    def _run(self, layers: Sequence[LayerModules], collector: LayerSimilarityCollector, needs_grad: bool) -> None:
        device = next(self.model.parameters()).device
        autocast = autocast_dtype(self.autocast, self.model)
        passes = [part for batch in self.pool.sample() for part in micro_batches(batch, self.micro_batch_size)]
        # Each pass's mean loss is weighted by its share of the predicted tokens, so the summed gradient is that of
        # the mean over every real token of the sample, however padding, batches and micro-batches split it.
        predicted = [_predicted_tokens(batch) for batch in passes]
        total = sum(predicted)
        if needs_grad and total == 0:  # the gradients would stay at the zeros they start from
            raise ValueError(
                f"The calibration sample ({len(passes)} passes) has no next-token target: every sequence has fewer "
                "than 2 real tokens, so Taylor scores would all be zero. Use longer calibration sequences "
                "(calibration_seq_len) or group_importance='magnitude'."
            )
        bar = tqdm(total=len(passes), desc="calibration", leave=False, disable=not self.progress)
        grams = self.grams if self.grams is not None else contextlib.nullcontext()
        recompute = needs_grad and recomputes(self.checkpointing, self.model, layers, passes)
        with collector, grams, recomputed([lm.layer for lm in layers] if recompute else []), \
                torch.set_grad_enabled(needs_grad):  # fmt: skip
            for batch, n_predicted in zip(passes, predicted):
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = mask.to(device) if mask is not None else None
                labels = input_ids if mask is None else input_ids.masked_fill(~_scored(mask), -100)
                collector.token_mask = mask
                if self.grams is not None:
                    self.grams.token_mask = mask
                with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                    loss = self.model(input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False).loss
                if needs_grad and n_predicted:  # a pass of padding only has no loss (NaN), only similarities
                    (loss.float() * (n_predicted / total)).backward()
                del loss  # the logits go with it, before the next pass allocates its own
                if device.type == "cpu":
                    trim_host_heap()
                bar.update(1)
        bar.close()

    def update(self, layer: int, keep_q: torch.Tensor, keep_kv: torch.Tensor, keep_channels: torch.Tensor) -> None:
        """The last measurement follows the slicing (a re-measurement replaces it anyway)."""
        if self._last is not None:
            self._last.update(layer, keep_q, keep_kv, keep_channels)


def autocast_dtype(setting: str, model: nn.Module) -> torch.dtype | None:
    """The dtype calibration passes autocast to (`PrunerConfig.calibration_autocast`), or None to run as loaded.

    `auto` chooses bfloat16 only for a float32 model on a device with bfloat16 matrix units (a GPU with native, not
    emulated, bfloat16, or a CPU with AMX tiles, where a SmolLM2-135M scoring pass runs twice as fast); a model
    loaded in a 16-bit dtype already runs in it.
    """
    if setting == "off":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    params = list(model.parameters())
    if not params or any(p.is_floating_point() and p.dtype != torch.float32 for p in params):
        return None
    device = params[0].device
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: absent in other torch versions
    return torch.bfloat16 if device.type == "cpu" and amx is not None and amx() else None


RECOMPUTE_ABOVE = 64 * 2**20  # bytes of activations one pass would keep, above which `auto` recomputes them


def recomputes(setting: str, model: nn.Module, layers: Sequence[LayerModules], passes: list[dict]) -> bool:
    """Whether calibration passes recompute layer activations (`PrunerConfig.calibration_checkpointing`). `auto`
    estimates what a pass keeps for its backward: about two tensors per linear output of every layer (the outputs,
    and the norms, activations and residuals beside them), for the pass with the most tokens."""
    if setting == "off" or has_sharded_parameters(model):
        return False
    if setting == "on":
        return True
    tokens = max(batch["input_ids"].numel() for batch in passes)
    widths = sum(m.out_features for lm in layers for m in lm.layer.modules() if isinstance(m, nn.Linear))
    element = next(model.parameters()).element_size()
    return 2 * tokens * widths * element > RECOMPUTE_ABOVE


@contextlib.contextmanager
def recomputed(layers: Sequence[nn.Module]):
    """Inside, each of `layers` keeps only its inputs for the backward pass and recomputes its activations there
    (non-reentrant `torch.utils.checkpoint` around its forward): a forward/backward pass then holds one layer's
    activations at a time instead of every layer's. The layers' own hooks run once, outside the recomputation."""
    saved = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (e.g. accelerate's)
    for layer in layers:
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def micro_batches(batch: dict[str, torch.Tensor], size: int | None) -> list[dict[str, torch.Tensor]]:
    """`batch` split along its sequences into parts of at most `size` (None: the batch whole). Views, no copies."""
    n = batch["input_ids"].shape[0]
    if size is None or n <= size:
        return [batch]
    return [{key: value[start : start + size] for key, value in batch.items()} for start in range(0, n, size)]


def trim_host_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's `malloc_trim`; elsewhere a no-op).

    Between calibration passes on the CPU, glibc keeps the pages of a pass's freed activations resident, scattered
    among live blocks: after 16 passes of SmolLM2-135M the process held 1.88x the weights' bytes above the loaded model
    without trimming, 1.09x (gradients and Gram matrices) with it (docs/guides/memory.md). A few milliseconds per pass.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no C library found, or one without malloc_trim (musl)
        return None


def _scored(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: tokens that are a loss target, i.e. real tokens predicted from a real token. With left padding the
    first real token would otherwise be predicted from padding, a target the unpadded sequence never has."""
    scored = mask != 0
    scored[:, 1:] &= scored[:, :-1].clone()
    return scored


def _predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Next-token targets the LM loss averages over (position 0 is never one)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch["input_ids"][:, 1:].numel()
    return int(_scored(mask)[:, 1:].sum())
