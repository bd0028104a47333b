"""`PrunerConfig`: every knob of Adapt-Pruner in one validated, JSON-serialisable dataclass."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import logging

from .version import __version__


logger = logging.get_logger(__name__)

LAYER_IMPORTANCE_METRICS = ("cosine", "euclidean", "manhattan")
GROUP_IMPORTANCE_METRICS = ("taylor", "magnitude", "random")
ATTENTION_UNITS = ("kv_group", "query_head")
ALLOCATIONS = ("score", "proportional")
MODES = ("auto", "physical", "mask")
LAYOUTS = ("adaptive", "uniform")
DATA_SPLITS = ("linear", "constant", "cosine")
IMPORTANCE_SOURCES = ("training", "calibration")
CALIBRATION_AUTOCASTS = ("auto", "bfloat16", "off")
CALIBRATION_CHECKPOINTINGS = ("auto", "on", "off")
RECONSTRUCTIONS = ("auto", "none", "least_squares")


@dataclass
class PrunerConfig:
    """Configuration of Adapt-Pruner (arXiv 2502.03460).

    Args:
        target_ratio (`float`, *optional*):
            Fraction of the model's parameters to keep, in (0, 1]. Exactly one of `target_ratio` and
            `target_params` must be set.
        target_params (`int`, *optional*):
            Absolute number of parameters to keep (embeddings, norms and `lm_head` included).
        layer_importance (`str`, defaults to `"cosine"`):
            How a decoder layer's importance is measured from its input `x` and output `y` hidden states:
            `cosine` (importance = -cos(x, y)), `euclidean` (||x - y||_2) or `manhattan` (||x - y||_1).
        amplitude (`float`, defaults to `0.02`):
            The paper's `A`: how strongly layer importance skews the per-layer sparsity. `0` gives the uniform
            (LLM-Pruner-style) baseline.
        group_importance (`str`, defaults to `"taylor"`):
            Score of a head or an MLP channel: `taylor` (sum of |w * dL/dw| over the group), `magnitude`
            (sum of |w|) or `random`.
        target_tolerance (`float`, defaults to `0.005`): accepted relative miss of the final count; a larger miss
            is logged with its reason (unit sizes, floors).
        prune_attention, prune_mlp (`bool`, default `True`): remove whole attention heads / MLP channels.
        attention_unit (`str`, defaults to `"kv_group"`): under GQA, remove a key/value head with the query heads
            that share it (`kv_group`, as the paper's code; shrinks the KV cache) or one query head from every kv
            group at a time (`query_head`).
        allocation (`str`, defaults to `"score"`): how a layer's parameter budget is met. `score` ranks the layer's
            attention units and `round_to` blocks of MLP channels by importance per parameter and removes the
            cheapest first; `proportional` (the paper's code) keeps `round(keep * heads)` heads and lets the MLP take
            the rounding.
        min_heads, min_kv_heads, min_intermediate_size (`int`): floors per layer. round_to (`int`, default 8):
            kept MLP channels are a multiple of it. max_layer_sparsity (`float`, default 0.99): the paper's clamp.
        inner_steps (`int`): inner iterations per prune event. rescore_every (`int`): importances are re-measured
            every this many inner steps (the paper: 1) and reused in between with the removed units dropped.
        calibration_samples, calibration_seq_len, calibration_batch_size (`int`): calibration per inner step.
        calibration_micro_batch_size (`int`, defaults to 1): sequences per forward/backward pass. A calibration batch
            runs in micro-batches whose token-weighted gradients sum to the batch's, so scores are the same; only one
            micro-batch's activations and logits are alive at a time. E.g. 8 x 128-token sequences of SmolLM2-135M
            in float32: a pass of 1 sequence reached up to 0.5 GB, a pass of all 8 about 2.5 GB
            (docs/guides/memory.md). Raise it for speed when memory allows.
        calibration_checkpointing (`str`, defaults to `"auto"`): `on` recomputes each decoder layer's activations in
            the calibration backward pass instead of keeping them (same scores); `auto` does so where one pass would
            keep more than 64 MiB of activations (SmolLM2-135M at 128 tokens: about 160 MB); never under FSDP2. Peak
            and time: docs/guides/memory.md.
        calibration_autocast (`str`, defaults to `"auto"`): run the calibration forward/backward of a float32 model
            under bfloat16 autocast (`bfloat16`), not (`off`), or where the device multiplies bfloat16 in hardware
            (`auto`: GPUs with native bfloat16, CPUs with AMX). Scores are summed in float32 either way.
        seed (`int`): calibration sampling and random scores.
        mode (`str`, defaults to `"auto"`): `physical` slices weights, `mask` zeroes them (shapes fixed; sliced by
            `save_pruned`), `auto` picks physical unless the training engine shards parameters.
        num_stages, data_split, recovery_fraction, importance_source, importance_window: the Adapt-Accel schedule
            of `AdaptPrunerCallback` (see `hf_adapt_pruner.schedule` for a worked example).
        reconstruction (`str`, defaults to `"auto"`): `least_squares`: after each slicing, the kept input columns of
            the projections that read heads and channels (`o_proj`, `down_proj`) are refit by least squares on the
            inputs the event's passes saw, so their outputs stay as close to the unpruned ones as the kept inputs
            allow (`hf_adapt_pruner.reconstruction`); `none` leaves the surviving weights unchanged; `auto` refits in
            one-shot pruning and not in `AdaptPrunerCallback` events (where the refit measured worse).
        reconstruction_damping (`float`, defaults to `0.1`): ridge damping of that refit, relative to the mean
            diagonal of the inputs' Gram matrix; larger values shrink the refit toward none (the measured choice:
            docs/guides/reconstruction.md).
        layout (`str`, defaults to `"adaptive"`): `adaptive` gives each layer its own widths (the paper); `uniform`
            keeps the same number of query heads, kv heads and MLP channels in every layer, picked from the scores
            summed over layers (`hf_adapt_pruner.uniform`), so `save_pruned` writes the stock architecture's config
            and the model loads without remote code. `amplitude` is then unused.

    The per-layer schedule, as a worked example. Pruning a 30-layer model from 134.5 M to 94.2 M parameters
    (`target_ratio=0.7`) with `inner_steps=10`: 106.2 M of the parameters sit in decoder layers (prunable), so
    the layers must reach an average sparsity of 40.3 M / 106.2 M = 0.38. At each inner step the remaining gap is
    split evenly over the remaining steps (step 1: 0.038), and layer `i` moves by `0.038 - A * I_i`, where `I_i`
    in [-1, 1] is its centred, scaled importance: with `A = 0.02`, the most important layer (`I = 1`) gains
    0.018, the least important (`I = -1`) 0.058. Each layer then removes its units with the lowest importance per
    parameter (in SmolLM2 a kv group with its 3 query heads holds 294,912 parameters, an 8-channel MLP block
    13,824) until it is within its budget, and the last step is solved so that the final count lands on the
    target.
    """

    # --- target -------------------------------------------------------------------------------------------------
    target_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of all parameters to keep, in (0, 1]. Use this or target_params."}
    )
    target_params: int | None = field(
        default=None, metadata={"help": "Absolute parameter count to keep. Use this or target_ratio."}
    )
    target_tolerance: float = field(
        default=0.005,
        metadata={"help": "Accepted relative distance of the final parameter count from the target (0.005 = 0.5 %)."},
    )
    # --- importance ---------------------------------------------------------------------------------------------
    layer_importance: str = field(
        default="cosine",
        metadata={"help": "Layer importance from input/output hidden states: cosine, euclidean or manhattan."},
    )
    amplitude: float = field(
        default=0.02,
        metadata={
            "help": "Adapt-Pruner amplitude A: per-step sparsity of layer i moves by delta - A * I_i. 0 = uniform."
        },
    )
    group_importance: str = field(
        default="taylor",
        metadata={
            "help": "Score of a head / channel group: taylor (|w*grad| summed), magnitude (|w| summed), random."
        },
    )
    # --- what is pruned -----------------------------------------------------------------------------------------
    prune_attention: bool = field(default=True, metadata={"help": "Remove whole attention heads."})
    prune_mlp: bool = field(default=True, metadata={"help": "Remove MLP intermediate channels."})
    attention_unit: str = field(
        default="kv_group",
        metadata={
            "help": "Unit of head removal under GQA: kv_group (a key/value head with the query heads that share it, "
            "as in the paper's code; shrinks the KV cache) or query_head (one query head from every kv group)."
        },
    )
    allocation: str = field(
        default="score",
        metadata={
            "help": "How a layer's parameter budget is split between attention and MLP: score (remove the units with "
            "the lowest importance per parameter, kv groups and channel blocks alike) or proportional (the paper's "
            "code: heads in proportion to the layer's sparsity, the MLP takes the rounding)."
        },
    )
    min_heads: int = field(default=1, metadata={"help": "Minimum query heads kept in every layer."})
    min_kv_heads: int = field(default=1, metadata={"help": "Minimum key/value heads kept in every layer."})
    min_intermediate_size: int = field(default=8, metadata={"help": "Minimum MLP channels kept in every layer."})
    round_to: int = field(
        default=8, metadata={"help": "Kept MLP channels are a multiple of this (when the layer width allows)."}
    )
    max_layer_sparsity: float = field(
        default=0.99, metadata={"help": "Upper clamp of a layer's sparsity (paper: 0.99); the floors apply too."}
    )
    # --- the pruning loop ---------------------------------------------------------------------------------------
    inner_steps: int = field(
        default=10,
        metadata={
            "help": "Inner iterations per prune event (paper: 50); importances are re-measured every rescore_every of "
            "them. 10 x 16 calibration sequences is the measured knee for one-shot pruning (docs/benchmarks.md)."
        },
    )
    rescore_every: int = field(
        default=1,
        metadata={
            "help": "Re-measure importances on calibration data every N inner steps (1: every step, as the paper); in "
            "between, the last scores are reused with removed units dropped, N times fewer forward/backward passes."
        },
    )
    calibration_samples: int = field(
        default=16, metadata={"help": "Calibration sequences per scoring pass (resampled from the pool)."}
    )
    calibration_seq_len: int = field(default=128, metadata={"help": "Tokens per calibration sequence."})
    calibration_batch_size: int = field(
        default=8, metadata={"help": "Sequences per calibration batch (sampled and padded together)."}
    )
    calibration_micro_batch_size: int = field(
        default=1,
        metadata={
            "help": "Sequences per forward/backward pass: batches run in micro-batches whose gradients sum to the "
            "batch's (same scores), bounding activations and logits to one micro-batch. Raise it for speed when "
            "memory allows."
        },
    )
    calibration_checkpointing: str = field(
        default="auto",
        metadata={
            "help": "Recompute each decoder layer's activations in the calibration backward pass instead of keeping "
            "them (same scores): on, off, or auto (where one pass would keep more than 64 MiB of activations). A "
            "SmolLM2-135M prune peaks at 1.5x the weights instead of 1.9-2.7x, for 7-25 % more time."
        },
    )
    calibration_autocast: str = field(
        default="auto",
        metadata={
            "help": "Calibration passes of a float32 model under bfloat16 autocast: bfloat16, off, or auto (where the "
            "device has bfloat16 matrix units: recent GPUs, CPUs with AMX). Scores are summed in float32 either way."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for calibration sampling and random importance."})
    # --- incremental pruning during training (AdaptPrunerCallback) ----------------------------------------------
    num_stages: int = field(
        default=10,
        metadata={
            "help": "Prune events in Adapt-Accel (paper: 5-20, about 5 % of parameters each). 10 tie with or beat 4 "
            "at 80, 240 and 640 steps and beat 1 out of domain by 12, 8 and 5 %; needs max_steps >= 34 (linear split)."
        },
    )
    data_split: str = field(
        default="linear",
        metadata={
            "help": "How training steps are split across stages: linear (stage k gets a share ~ k), constant, cosine."
        },
    )
    recovery_fraction: float = field(
        default=0.1, metadata={"help": "Share of training steps kept after the last prune event, in [0, 1)."}
    )
    importance_source: str = field(
        default="training",
        metadata={
            "help": "training: scores from the Trainer's own gradients; calibration: a pass over calibration data."
        },
    )
    importance_window: int = field(
        default=8,
        metadata={"help": "Optimizer steps before a prune event over which training-based scores accumulate."},
    )
    mode: str = field(
        default="auto",
        metadata={
            "help": "physical (slice the weights: the model shrinks and trains faster), mask (zero the removed rows "
            "and columns and keep them at zero; shapes stay fixed, sliced at save_pruned), or auto: physical, and "
            "mask when the parameters are sharded (FSDP2)."
        },
    )
    # --- repairing what pruning removes -------------------------------------------------------------------------
    reconstruction: str = field(
        default="auto",
        metadata={
            "help": "After each slicing, refit the kept input columns of o_proj / down_proj by least squares on the "
            "inputs the event's passes saw (least_squares), or leave the surviving weights as they are (none); auto: "
            "least_squares in one-shot pruning, none in AdaptPrunerCallback events."
        },
    )
    reconstruction_damping: float = field(
        default=0.1,
        metadata={"help": "Ridge damping of the least-squares refit, relative to the mean input energy (0: none)."},
    )
    layout: str = field(
        default="adaptive",
        metadata={
            "help": "adaptive (each layer its own widths, Adapt-Pruner; loads with remote code or this package) or "
            "uniform (every layer the same heads, kv heads and channels, chosen from the scores summed over layers; "
            "saved as the stock architecture, which every engine serves without remote code)."
        },
    )
    library_version: str = field(default=__version__, metadata={"help": "hf_adapt_pruner version that wrote this."})

    def __post_init__(self) -> None:
        self._validate_target()
        _check_choice("layer_importance", self.layer_importance, LAYER_IMPORTANCE_METRICS)
        _check_choice("group_importance", self.group_importance, GROUP_IMPORTANCE_METRICS)
        _check_choice("attention_unit", self.attention_unit, ATTENTION_UNITS)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_choice("data_split", self.data_split, DATA_SPLITS)
        _check_choice("importance_source", self.importance_source, IMPORTANCE_SOURCES)
        _check_choice("mode", self.mode, MODES)
        _check_choice("calibration_autocast", self.calibration_autocast, CALIBRATION_AUTOCASTS)
        _check_choice("calibration_checkpointing", self.calibration_checkpointing, CALIBRATION_CHECKPOINTINGS)
        _check_choice("reconstruction", self.reconstruction, RECONSTRUCTIONS)
        _check_choice("layout", self.layout, LAYOUTS)
        if self.layout == "uniform" and self.amplitude != 0.02:
            logger.warning(f"amplitude={self.amplitude!r} is ignored with layout='uniform': every layer keeps the "
                           "same widths, whatever its importance.")  # fmt: skip
        _check_types(self)
        if not 0.0 <= self.amplitude <= 1.0:
            raise ValueError(
                f"amplitude={self.amplitude!r} is out of range: use a value in [0, 1] (paper: 0.02; 0 = uniform)."
            )
        if not 0.0 < self.target_tolerance < 0.5:
            raise ValueError(f"target_tolerance={self.target_tolerance!r}: use a fraction in (0, 0.5), e.g. 0.005.")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise ValueError(f"max_layer_sparsity={self.max_layer_sparsity!r}: use a value in (0, 1), e.g. 0.99.")
        if not 0.0 <= self.reconstruction_damping <= 100.0:
            raise ValueError(
                f"reconstruction_damping={self.reconstruction_damping!r}: use a value in [0, 100], e.g. 0.1 (larger "
                "values shrink the refit toward no correction; reconstruction='none' turns it off)."
            )
        if not 0.0 <= self.recovery_fraction < 1.0:
            raise ValueError(f"recovery_fraction={self.recovery_fraction!r}: use a value in [0, 1), e.g. 0.1.")
        for name in (
            "min_heads",
            "min_kv_heads",
            "min_intermediate_size",
            "round_to",
            "inner_steps",
            "rescore_every",
            "calibration_samples",
            "calibration_seq_len",
            "calibration_batch_size",
            "calibration_micro_batch_size",
            "num_stages",
            "importance_window",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (>= 1).")
        if not self.prune_attention and not self.prune_mlp:
            raise ValueError(
                "prune_attention=False and prune_mlp=False leaves nothing to prune: enable at least one of them."
            )

    def _validate_target(self) -> None:
        if (self.target_ratio is None) == (self.target_params is None):
            raise ValueError(
                f"Set exactly one of target_ratio and target_params (got target_ratio={self.target_ratio!r}, "
                f"target_params={self.target_params!r}), e.g. PrunerConfig(target_ratio=0.7)."
            )
        if self.target_ratio is not None and not (
            isinstance(self.target_ratio, (int, float)) and 0.0 < self.target_ratio <= 1.0
        ):
            raise ValueError(
                f"target_ratio={self.target_ratio!r} is the fraction of parameters to KEEP: use a value in (0, 1], "
                "e.g. 0.7 to remove 30 %."
            )
        if self.target_params is not None and (
            isinstance(self.target_params, bool) or not isinstance(self.target_params, int) or self.target_params < 1
        ):
            raise ValueError(f"target_params={self.target_params!r} must be a positive integer parameter count.")

    def refits(self, while_training: bool) -> bool:
        """Whether prune events refit the surviving weights: one-shot (`while_training=False`) or in the callback."""
        return self.reconstruction == "least_squares" or (self.reconstruction == "auto" and not while_training)

    def resolve_target(self, num_parameters: int) -> int:
        """The parameter count to reach, for a model that had `num_parameters` when pruning started."""
        if self.target_params is not None:
            return self.target_params
        return round(num_parameters * self.target_ratio)

    # --- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunerConfig:
        if not isinstance(data, dict):
            raise TypeError(
                f"PrunerConfig.from_dict takes a dict of fields, got {type(data).__name__} {data!r:.60}: e.g. "
                "PrunerConfig.from_dict({'target_ratio': 0.7}), or PrunerConfig(target_ratio=0.7)."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(f"PrunerConfig: ignoring unknown keys {unknown} (written by another version?).")
        kwargs = {k: v for k, v in data.items() if k in known and k != "library_version"}
        return cls(**kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, PRUNER_CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PrunerConfig:
        path = os.path.join(directory, PRUNER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{str(directory)!r} has no {PRUNER_CONFIG_NAME} (save_pruned(..., pruner_config=...) and "
                "config.save_pretrained(dir) write one): pass such a folder, or build the config with PrunerConfig()."
            )
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


PRUNER_CONFIG_NAME = "pruner_config.json"


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported: choose one of {', '.join(choices)}.")


NUMBER_FIELDS = ("amplitude", "target_tolerance", "max_layer_sparsity", "recovery_fraction", "reconstruction_damping")
FLAG_FIELDS = ("prune_attention", "prune_mlp")


def _check_types(config: PrunerConfig) -> None:
    """Numbers that are numbers, flags that are flags (a string "0.02" or "no" would compare or test wrongly)."""
    for name in NUMBER_FIELDS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} must be a number, e.g. {name}={getattr(PrunerConfig, name)!r}.")
    for name in FLAG_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be True or False.")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise ValueError(f"seed={config.seed!r} must be an integer, e.g. seed=0.")


def field_help() -> dict[str, str]:
    """`{field: help}` for every PrunerConfig field (used by the CLI)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(PrunerConfig)}
