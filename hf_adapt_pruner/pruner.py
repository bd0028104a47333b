"""The engine: `AdaptivePruner` runs prune events; `prune_model()` is one-shot pruning on calibration data."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .allocation import (
    allocation_step,
    check_reachable,
    model_params,
    normalize_importance,
    select_heads,
    select_top,
)
from .architectures import LayerModules, get_architecture, layer_modules, unwrap_peft
from .config import PrunerConfig
from .distributed import RankSync, is_distributed
from .history import adopt_history, pruning_history
from .importance import GroupScores
from .layout import LAYOUT_KEY, MASK_KEY, LayerWidths, PrunedLayout
from .modeling.modeling_adapt_pruner import pruned_parameters
from .plain import mark_saved_form
from .plans import LayerGeometry, layer_plans
from .reconstruction import GramStatistics, refit_layer_
from .remote_code import base_model_type
from .report import LayerReport, PruneReport
from .sharding import has_sharded_parameters
from .surgery import apply_masks_, lora_factors, mask_layer_, prune_layer_
from .uniform import check_uniform_start, expressible_units, uniform_step


logger = logging.get_logger(__name__)


class Scorer(Protocol):
    grams: GramStatistics | None  # input statistics of the scoring passes, for reconstruction

    def __call__(self, layers: Sequence[LayerModules], head_dim: int) -> tuple[torch.Tensor, list[GroupScores]]: ...

    def update(self, layer: int, keep_q: torch.Tensor, keep_kv: torch.Tensor, keep_channels: torch.Tensor) -> None: ...


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in model.parameters())


def module_widths(lm: LayerModules, head_dim: int) -> LayerWidths:
    """A layer's widths as its live modules have them."""
    return LayerWidths(*lm.widths(head_dim))


def unit_costs(lm: LayerModules, head_dim: int) -> dict[str, int]:
    """Parameters one query head, kv head and MLP channel hold in this layer (LoRA factors included)."""
    costs = {"q": 0, "kv": 0, "mlp": 0}
    for pruned in lm.pruned:
        for module in (pruned.module, *lora_factors(pruned)):
            for name, dim in pruned_parameters(module, pruned.dim):
                param = getattr(module, name)
                per_entry = param.numel() // param.shape[dim]
                for block in pruned.blocks:
                    costs[block] += per_entry * (1 if block == "mlp" else head_dim)
    return costs


def current_layout(model: nn.Module) -> PrunedLayout:
    """The model's layout: read from its config (and its history: `pruning_history`) after a prune event, else
    built from its uniform config."""
    model = unwrap_peft(model)
    config = model.config
    for key in (LAYOUT_KEY, MASK_KEY):
        stored = getattr(config, key, None)
        if stored is not None:
            layout = PrunedLayout.from_dict(stored, num_layers=config.num_hidden_layers)
            layout.history = copy.deepcopy(pruning_history(model))
            return layout
    spec = get_architecture(base_model_type(config.model_type))
    layers = layer_modules(model, spec)
    head_dim = int(getattr(layers[0].attention, "head_dim", None) or config.head_dim)
    widths = [module_widths(lm, head_dim) for lm in layers]
    base = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "num_parameters": count_parameters(model),
    }
    return PrunedLayout(
        head_dim=head_dim,
        num_attention_heads=[w.num_attention_heads for w in widths],
        num_key_value_heads=[w.num_key_value_heads for w in widths],
        intermediate_size=[w.intermediate_size for w in widths],
        base=base,
        sparsity=[0.0] * len(layers),
    )


class AdaptivePruner:
    """Runs Adapt-Pruner prune events on a live model (one-shot, from a Trainer callback or a custom loop).

    Example:
        ```python
        pruner = AdaptivePruner(model, PrunerConfig(target_ratio=0.7))
        scorer = CalibrationScorer(model, CalibrationPool(blocks, 32, 8, seed=0), "cosine", "taylor", seed=0)
        report = pruner.prune_to(pruner.final_target(), scorer)
        ```
    """

    def __init__(self, model: nn.Module, config: PrunerConfig, mode: str | None = None):
        self.model = model = unwrap_peft(model)
        self.config = config
        sharded = has_sharded_parameters(model)
        self.mode = mode or ("mask" if config.mode == "mask" or (config.mode == "auto" and sharded) else "physical")
        if sharded and self.mode != "mask":
            raise ValueError(
                f"mode={self.mode!r} cannot resize sharded parameters (FSDP2): the model's parameters are DTensors "
                "(fully_shard), whose shapes stay fixed. Use mode='mask' or 'auto'; the masked heads and channels are "
                "sliced away by save_pruned."
            )
        self.spec = get_architecture(base_model_type(model.config.model_type))
        self.layers = layer_modules(model, self.spec)
        self.layout = current_layout(model)
        self._restore_masks()
        self.head_dim = self.layout.head_dim
        self.sparsity = torch.tensor(self.layout.sparsity or [0.0] * len(self.layers), dtype=torch.float64)
        self.geometries = [self._geometry(lm) for lm in self.layers]
        self.sync = RankSync() if is_distributed() else None  # decisions agreed across ranks
        self._check_layout_matches_modules()
        if config.layout == "uniform":  # head counts the stock config cannot express are never chosen
            check_uniform_start(self.widths(), config)
            self.uniform_units = expressible_units(model.config, self.widths()[0], self.head_dim, config)

    # --- bookkeeping --------------------------------------------------------------------------------------------
    def _restore_masks(self) -> None:
        stored = getattr(self.model.config, MASK_KEY, None)
        if self.mode == "mask" and (self.spec.q_norm or self.spec.k_norm):
            raise ValueError(
                f"mode='mask' cannot represent pruning of {self.spec.model_type!r}: its q/k norms span all heads, so "
                "zeroed heads still change the kept ones. Use mode='physical'."
            )
        if stored is None:
            return
        if self.mode != "mask":
            raise ValueError(
                f"The model carries masks from a mask-mode run (config.{MASK_KEY}): continue it with "
                "PrunerConfig(mode='mask'), or slice it first with save_pruned (or materialize_masks(model))."
            )
        for lm, live in zip(self.layers, stored["live"]):
            lm.live = [torch.tensor(index, dtype=torch.long) for index in live]

    def _geometry(self, lm: LayerModules) -> LayerGeometry:
        base, costs = self.layout.base, unit_costs(lm, self.head_dim)
        return LayerGeometry(
            base=LayerWidths(base["num_attention_heads"], base["num_key_value_heads"], base["intermediate_size"]),
            q_head_cost=costs["q"],
            kv_head_cost=costs["kv"],
            channel_cost=costs["mlp"],
        )

    def _check_layout_matches_modules(self) -> None:
        for lm in self.layers:
            actual = module_widths(lm, self.head_dim).as_tuple()
            if actual != self.layout.layer(lm.index).as_tuple():
                raise ValueError(
                    f"layer {lm.index}: the modules have (heads, kv heads, intermediate) = {actual} but "
                    f"config.{LAYOUT_KEY} says {self.layout.layer(lm.index).as_tuple()}; the config does not "
                    "describe these weights."
                )

    def widths(self) -> list[LayerWidths]:
        return [self.layout.layer(i) for i in range(len(self.layers))]

    def num_parameters(self) -> int:
        """Parameters of the model; in mask mode, those not masked."""
        masked = 0
        for lm, geometry in zip(self.layers, self.geometries):
            if lm.live is not None:
                shape, live = lm.shape_widths(self.head_dim), lm.widths(self.head_dim)
                costs = (geometry.q_head_cost, geometry.kv_head_cost, geometry.channel_cost)
                masked += sum(cost * (full - kept) for cost, full, kept in zip(costs, shape, live))
        return count_parameters(self.model) - masked

    def reapply_masks(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Mask mode: zero the masked weights (and optimizer state) again, e.g. after an optimizer step."""
        for lm in self.layers:
            apply_masks_(lm, self.head_dim, optimizer)

    def final_target(self) -> int:
        """The config's target; `target_ratio` is relative to the original (unpruned) model's parameter count."""
        return self.config.resolve_target(self.layout.base["num_parameters"])

    def check_target(self, target_params: int) -> None:
        """Refuse an unreachable target before any weight changes."""
        fixed = self.num_parameters() - model_params(self.geometries, self.widths(), 0)
        check_reachable(self.geometries, self.widths(), target_params, fixed, self.config)

    # --- a prune event ------------------------------------------------------------------------------------------
    def prune_to(
        self,
        target_params: int,
        scorer: Scorer,
        optimizer: torch.optim.Optimizer | None = None,
        progress: bool = True,
    ) -> PruneReport:
        """Remove heads and channels until the model has at most `target_params` parameters."""
        start = time.perf_counter()
        self.check_target(target_params)
        before = self.widths()
        params_before = self.num_parameters()
        fixed = params_before - model_params(self.geometries, before, 0)
        prunable_base = sum(g.prunable_base(self.config) for g in self.geometries)
        kept = [[torch.arange(w) for w in lw.as_tuple()] for lw in before]  # per layer: q, kv, channel indices
        importance = torch.zeros(len(self.layers), dtype=torch.float64)
        steps = self.config.inner_steps
        params = params_before
        step = 0
        grams = None
        bar = tqdm(total=steps, desc="prune", disable=not progress or params <= target_params)
        while params > target_params and step < steps:
            raw, scores = scorer(self.layers, self.head_dim)
            raw, scores = raw.detach().double().cpu(), [s.cpu_double() for s in scores]  # from any device
            if self.sync is not None:
                raw, scores = self.sync.average(raw, scores)
            grams = getattr(scorer, "grams", None)  # present where the config refits (PrunerConfig.refits)
            if grams is not None:
                grams.settle(self.sync)  # every rank refits from the same statistics
            importance = normalize_importance(raw)
            if self.config.layout == "uniform":  # the same widths in every layer (hf_adapt_pruner.uniform)
                result = uniform_step(self.geometries, self.widths(), scores, params, target_params, steps - step,
                                      fixed, self.config, self.uniform_units)  # fmt: skip
            else:
                delta = (params - target_params) / prunable_base / (steps - step)
                plans = layer_plans(self.geometries, self.widths(), scores, importance, self.config)
                result = allocation_step(plans, self.sparsity, importance, delta, target_params, fixed, self.config,
                                         final=step == steps - 1)  # fmt: skip
            kept_units = {
                i: self._select(new, scores[i])
                for i, (old, new) in enumerate(zip(self.widths(), result.widths))
                if old != new
            }
            if self.sync is not None:
                self.sync.check_agreement(f"prune event, inner step {step + 1}", kept_units)
            for i, units in kept_units.items():
                self._apply(i, result.widths[i], units, scorer, kept[i], optimizer, grams)
            self.sparsity = result.sparsity
            params = self.num_parameters()
            if params != result.num_parameters:
                raise RuntimeError(f"parameter count {params} differs from the plan's {result.num_parameters}")
            step += 1
            bar.update(1)
            bar.set_postfix(params=f"{params / 1e6:.2f}M")
        bar.close()
        self._record_event(before, kept, params, importance)
        report = self._report(before, params_before, target_params, importance, step, time.perf_counter() - start)
        report.reconstruction_tokens = grams.tokens if grams is not None else 0
        self._log_outcome(report)
        return report

    def _select(self, widths: LayerWidths, scores: GroupScores) -> tuple[torch.Tensor, ...]:
        """(query heads, kv heads, channels) a layer keeps to reach `widths`: the highest scored."""
        keep_q, keep_kv = select_heads(scores, widths)
        return keep_q, keep_kv, select_top(scores.channels, widths.intermediate_size)

    def _apply(
        self,
        index: int,
        widths: LayerWidths,
        plan: tuple[torch.Tensor, ...],
        scorer: Scorer,
        kept: list[torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        grams: GramStatistics | None = None,
    ) -> None:
        keep_q, keep_kv, keep_ch = plan
        lm = self.layers[index]
        if grams is not None:  # the kept columns absorb what the removed ones added, before they go
            kept_inputs = refit_layer_(lm, self.head_dim, plan, grams, self.config.reconstruction_damping)
        surgery = mask_layer_ if self.mode == "mask" else prune_layer_
        surgery(lm, self.head_dim, keep_q, keep_kv, keep_ch, optimizer)
        if grams is not None and self.mode == "physical":
            grams.select_(index, kept_inputs)
        scorer.update(index, keep_q, keep_kv, keep_ch)
        kept[0], kept[1], kept[2] = kept[0][keep_q], kept[1][keep_kv], kept[2][keep_ch]
        self.layout.set_layer(index, widths)

    def _record_event(self, before: list[LayerWidths], kept: list, params: int, importance: torch.Tensor) -> None:
        changed = {
            str(i): {"q_heads": k[0].tolist(), "kv_heads": k[1].tolist(), "channels": k[2].tolist()}
            for i, (k, old) in enumerate(zip(kept, before))
            if old != self.layout.layer(i)
        }
        key = MASK_KEY if self.mode == "mask" else LAYOUT_KEY
        if not changed and getattr(self.model.config, key, None) is None:
            return  # nothing pruned yet: the model stays a stock model
        if changed:
            importance = [round(float(v), 6) for v in importance]  # the last measurement, for the model card
            self.layout.history.append({"num_parameters": params, "layer_importance": importance, "layers": changed})
        self.layout.sparsity = self.sparsity.tolist()
        self.model.config.head_dim = self.head_dim
        adopt_history(self.model, self.layout.history)  # the history goes to its own file, not to config.json
        if self.mode == "mask":  # shapes unchanged: a stock checkpoint that carries its masks
            live = [[index.tolist() for index in lm.live or lm.all_units(self.head_dim)] for lm in self.layers]
            setattr(self.model.config, MASK_KEY, {**self.layout.to_dict(history=False), "live": live})
            return
        setattr(self.model.config, LAYOUT_KEY, self.layout.to_dict(history=False))
        mark_saved_form(self.model)

    def _report(
        self,
        before: list[LayerWidths],
        params_before: int,
        target: int,
        importance: torch.Tensor,
        steps: int,
        seconds: float,
    ) -> PruneReport:
        layers = [
            LayerReport(i, b, self.layout.layer(i), float(importance[i]), float(self.sparsity[i]))
            for i, b in enumerate(before)
        ]
        return PruneReport(
            params_before=params_before,
            params_after=self.num_parameters(),
            target_params=target,
            layers=layers,
            inner_steps=steps,
            wall_time_s=seconds,
        )

    def _log_outcome(self, report: PruneReport) -> None:
        for line in report.describe_changes():
            logger.info(line)
        if report.params_after > report.target_params and report.params_before > report.target_params:
            logger.warning(
                f"Stopped at {report.params_after:,} parameters, above the target {report.target_params:,}, after "
                f"inner_steps={self.config.inner_steps}; raise inner_steps."
            )
        miss = abs(report.params_after - report.target_params) / report.target_params
        if report.params_before > report.target_params and miss > self.config.target_tolerance:
            unit = max(max(g.q_head_cost * g.base.num_attention_heads // g.base.num_key_value_heads, g.channel_cost)
                       for g in self.geometries)  # fmt: skip
            logger.warning(
                f"Final count {report.params_after:,} is {miss:.2%} from the target {report.target_params:,} "
                f"(tolerance {self.config.target_tolerance:.2%}): the smallest removable units here cost up to "
                f"{unit:,} parameters each (whole heads, round_to={self.config.round_to} channels) and the floors "
                "may bind. Lower round_to or use attention_unit='query_head' for finer steps."
            )


def materialize_masks(model: nn.Module) -> nn.Module:
    """A mask-mode model sliced to its unmasked units: a pruned model like physical pruning gives (a copy; the
    masked model is left as it is). `save_pruned` calls this for models that carry masks."""
    if getattr(model.config, MASK_KEY, None) is None:
        raise ValueError(f"model.config has no {MASK_KEY!r}: the model carries no masks.")
    return materialize_masks_(copy.deepcopy(unwrap_peft(model)))


def materialize_masks_(sliced: nn.Module) -> nn.Module:
    """`materialize_masks` in place (for a model that is already a copy)."""
    adopt_history(sliced)  # an old-form config holds it
    stored = getattr(sliced.config, MASK_KEY)
    spec = get_architecture(base_model_type(sliced.config.model_type))
    layout = PrunedLayout.from_dict(stored, num_layers=sliced.config.num_hidden_layers)
    for lm, live in zip(layer_modules(sliced, spec), stored["live"]):
        prune_layer_(lm, layout.head_dim, *(torch.tensor(index, dtype=torch.long) for index in live))
    delattr(sliced.config, MASK_KEY)
    sliced.config.head_dim = layout.head_dim
    setattr(sliced.config, LAYOUT_KEY, layout.to_dict(history=False))
    mark_saved_form(sliced)
    return sliced
