"""One-shot pruning: `prune_model` scores a model on calibration data and prunes it to its target in place."""

from __future__ import annotations

import torch
from torch import nn

from .calibration import calibration_pool
from .checks import check_model, check_optimizer, check_target_below, vocabulary_size
from .config import PrunerConfig
from .data import CalibrationData
from .pruner import AdaptivePruner
from .report import PruneReport
from .scorers import CalibrationScorer


def checked_pruner(
    model: nn.Module, config: PrunerConfig, optimizer: torch.optim.Optimizer | None = None
) -> tuple[AdaptivePruner, int]:
    """(engine, target) for one-shot pruning, after refusing bad inputs: a model without real weights, a config or
    optimizer of the wrong kind, a target above the model's size or below its floors. Nothing changes here."""
    check_model(model, "prune_model")
    if not isinstance(config, PrunerConfig):
        raise TypeError(
            f"config is a {type(config).__name__}, not a PrunerConfig: pass PrunerConfig(target_ratio=0.7, ...) "
            "(PrunerConfig.from_dict(d) for a dict)."
        )
    check_optimizer(optimizer)
    pruner = AdaptivePruner(model, config)
    target = pruner.final_target()
    check_target_below(target, pruner.num_parameters(), pruner.layout.base["num_parameters"], allow_equal=True)
    pruner.check_target(target)
    return pruner, target


def prune_model(
    model: nn.Module,
    config: PrunerConfig,
    calibration_data: CalibrationData,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    tokenizer=None,
) -> PruneReport:
    """One-shot Adapt-Pruner: prune `model` in place to the config's target, scoring on `calibration_data`.

    Args:
        model: a `*ForCausalLM` of a supported `model_type` (dense weights, any device).
        config: the `PrunerConfig`; `target_ratio` is relative to the original model's parameter count.
        calibration_data: token blocks (N, T), token-id sequences of any lengths, batch dicts, a DataLoader, a
            `datasets.Dataset`, or texts with `tokenizer` (the forms: `hf_adapt_pruner.calibration`).
        optimizer: if given, its state for the pruned parameters is sliced along with them.
        progress: show tqdm progress bars.
        tokenizer: the model's tokenizer, for text (its EOS also separates packed sequences of token ids).

    Returns:
        A `PruneReport` (parameters before/after, per-layer widths, layer importances, wall time).
    """
    pruner, target = checked_pruner(model, config, optimizer)  # before touching data or weights
    pool = calibration_pool(calibration_data, config, vocabulary_size(model), tokenizer)
    scorer = CalibrationScorer.from_config(model, pool, config, progress)
    return pruner.prune_to(target, scorer, optimizer=optimizer, progress=progress)
