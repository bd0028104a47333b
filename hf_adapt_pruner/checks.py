"""Checks where models, optimizers and targets enter the library.

A bad input is refused with the value, what was expected and the fix, before any weight or file changes. Token ids
are checked where calibration data enters (`hf_adapt_pruner.data.check_token_ids`, used by `CalibrationPool`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .architectures import unwrap_peft
from .config import PrunerConfig


# Optimizers whose every state tensor is per-element (shaped like its parameter), so it can be sliced with it.
SLICEABLE_OPTIMIZERS = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adagrad,
    torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
)  # fmt: skip


def torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model(model: Any, caller: str) -> None:
    """`model` is a module whose weights hold values (not a path, not a meta-device skeleton)."""
    if not isinstance(model, nn.Module):
        if isinstance(model, (str, os.PathLike)):
            fix = f"load it first: model = load_pruned({str(model)!r}) or AutoModelForCausalLM.from_pretrained(...)"
        else:
            fix = "pass a transformers *ForCausalLM (e.g. AutoModelForCausalLM.from_pretrained(...))"
        raise TypeError(f"{caller} takes a model object, got {type(model).__name__} {_short(model)}: {fix}.")
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = next(((name, t) for name, t in tensors if t.is_meta), None)
    if meta is not None:
        name, tensor = meta
        raise ValueError(
            f"The model's weights are on the meta device ({name} has shape {tuple(tensor.shape)} but no values), so "
            f"{caller} has nothing to score, slice or save. Load real weights: from_pretrained(...) outside "
            "init_empty_weights() / torch.device('meta') and without offloading to disk, or model.to_empty(device="
            "'cpu') followed by model.load_state_dict(...)."
        )


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding: token ids must lie in [0, rows). None when the model has no embedding."""
    try:
        embedding = unwrap_peft(model).get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if rows is not None else None


def check_optimizer(optimizer: Any) -> None:
    """`optimizer` is None or a torch optimizer whose state can be sliced with the pruned weights."""
    if optimizer is None:
        return
    inner = torch_optimizer(optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer={_short(optimizer)} is a {type(optimizer).__name__}, not a torch.optim.Optimizer: pass the "
            "optimizer whose state should be sliced with the weights (e.g. trainer.optimizer), or None."
        )
    if not isinstance(inner, SLICEABLE_OPTIMIZERS):
        raise ValueError(
            f"The optimizer {type(inner).__name__} keeps state that cannot be sliced with the pruned weights. Use an "
            "element-wise optimizer (TrainingArguments(optim='adamw_torch'), AdamW, SGD, ...)."
        )


def check_target_below(target: int, current: int, original: int, *, allow_equal: bool = False) -> None:
    """Pruning only removes parameters: refuse a target above the model's current size (or equal to it, unless
    `allow_equal`; `prune_model` with `target_ratio=1.0` is a no-op, a prune schedule without events is not)."""
    if target < current or (allow_equal and target == current):
        return
    already = ""
    if current < original:
        already = (
            f" The model was already pruned to {current / original:.1%} of its original {original:,} parameters, "
            "and target_ratio is relative to that original."
        )
    raise ValueError(
        f"The target of {target:,} parameters is not below the model's current {current:,}: pruning only removes "
        f"parameters, so there is nothing to prune.{already} Lower target_ratio / target_params (target_params "
        "counts every parameter, embeddings included)."
    )


def check_save_arguments(tokenizer: Any, pruner_config: Any, eval_results: Any) -> None:
    """save_pruned's optional arguments are of the kinds it writes."""
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(
            f"tokenizer={tokenizer!r} is a {type(tokenizer).__name__}, not a tokenizer object: pass "
            "AutoTokenizer.from_pretrained(...) (or leave it out and save the tokenizer yourself)."
        )
    if pruner_config is not None and not isinstance(pruner_config, PrunerConfig):
        raise TypeError(
            f"pruner_config is a {type(pruner_config).__name__}, not a PrunerConfig: pass the PrunerConfig used for "
            "pruning (PrunerConfig.from_dict(d) for a dict)."
        )
    if eval_results is not None and not isinstance(eval_results, Mapping):
        raise TypeError(
            f"eval_results={eval_results!r} is a {type(eval_results).__name__}: pass a mapping "
            "{metric name: value}, e.g. eval_results={'perplexity': 21.3}."
        )


def check_repo_id(repo_id: Any) -> None:
    """A repo id the Hub accepts, checked before anything is saved or uploaded."""
    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id={repo_id!r} is a {type(repo_id).__name__}: pass a string 'owner/name'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"repo_id={repo_id!r} is not a Hub repo id: use 'owner/name' (or 'name' for your own namespace) with "
            f"letters, digits, '-', '_' and '.', at most 96 characters ({error})."
        ) from None


def resolve_device(device: str | torch.device, option: str = "device") -> torch.device:
    """The device to load and run a model on: `auto` is CUDA when available, else the CPU.

    A CUDA device on a machine without CUDA is refused with the reason and the fix. `option` names the argument in
    that message: `--device` on the command line, `device` in Python.
    """

    def spelled(value: str) -> str:
        return f"{option} {value}" if option.startswith("--") else f"{option}={value!r}"

    if str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{spelled(str(device))} is not a device: use cpu, cuda (cuda:N) or auto.") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        reason = ("this torch is a CPU-only build" if torch.version.cuda is None
                  else "no GPU is visible: check nvidia-smi and CUDA_VISIBLE_DEVICES")  # fmt: skip
        raise ValueError(
            f"{spelled(str(device))}: CUDA is not available here ({reason}; torch {torch.__version__}). Use "
            f"{spelled('cpu')}, or {spelled('auto')} to take the GPU when there is one."
        )
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"{spelled(str(device))}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
        )
    return torch.device("cuda", index)
