"""Disk and Hub: `save_pruned`, `load_pruned`, `push_pruned_to_hub`. The only module that writes files or talks
to the Hub."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
from transformers.utils import logging

from .architectures import get_architecture, is_lora_layer
from .card import PICTURE_FILE, model_card, pruning_picture
from .checks import check_model, check_save_arguments, resolve_device
from .config import PrunerConfig
from .history import HISTORY_FILE, adopt_history, read_history, write_history
from .layout import LAYOUT_KEY, MASK_KEY, PrunedLayout
from .modeling.modeling_adapt_pruner import block_sizes
from .plain import mark_saved_form
from .pruner import current_layout, materialize_masks, materialize_masks_
from .remote_code import base_model_type, clear_dequantized_gguf_marker, pruned_classes
from .sharding import gather_model, has_sharded_parameters


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------
def save_pruned(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    pruner_config: PrunerConfig | None = None,
    eval_results: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Save a pruned model as an ordinary Hugging Face checkpoint that loads anywhere.

    Writes safetensors weights, `config.json` (the base architecture's fields, `pruned_layout`, our `model_type` and
    `auto_map`), `configuration_adapt_pruner.py` and `modeling_adapt_pruner.py`, `pruning_history.json` (every prune
    event's kept indices), the generation config, the tokenizer files, `pruner_config.json` and a model card
    `README.md` showing `pruning.png` (per-layer widths and layer importance; written when matplotlib is installed).
    An unpruned model gets a plain save; a mask-mode model is saved sliced to its unmasked units.

    A model whose layers all have the same widths (`PrunerConfig(layout="uniform")`, or an adaptive run that ended
    that way) is saved as its stock architecture instead: `config.json` is the base `model_type`'s config with the
    new `num_attention_heads`, `num_key_value_heads`, `intermediate_size` and `head_dim` (plus `pruned_layout`, which
    stock code ignores), with no `auto_map` and no code files; `AutoModelForCausalLM.from_pretrained(folder)` loads it
    without remote code.

    Everything is written into a temporary folder beside `save_directory` and moved into place at the end, so a
    failure never leaves a half-written model; an existing `save_directory` is replaced only with `overwrite=True`.

    Args:
        model: the pruned `*ForCausalLM` (a GGUF-loaded, dequantized model is fine).
        save_directory: the folder to create.
        tokenizer: saved alongside when given.
        overwrite: replace an existing `save_directory`.
        pruner_config: recorded in `pruner_config.json` and the model card.
        eval_results: `{metric: value}` shown in the model card.
        base_model: Hub id of the model that was pruned, for the card's metadata (default: the model's
            `name_or_path` when it is not a local path).
        license: the card's license, when known.
        repo_id: the id shown in the card's usage snippet (default: the folder name).

    In a multi-process run (torch.distributed initialised) only rank 0 writes; the other ranks return at once. A
    sharded model (FSDP2) is first gathered into a plain copy on rank 0 (a collective: call it on every rank).
    """
    check_model(model, "save_pruned")
    check_save_arguments(tokenizer, pruner_config, eval_results)
    target = Path(save_directory).absolute()
    gathered = has_sharded_parameters(model)
    if gathered:
        model = gather_model(model)  # FSDP2: every rank takes part; rank 0 gets a plain copy
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return target  # in a multi-process run only rank 0 writes (as Trainer.save_model)
    if hasattr(model, "peft_config") or any(is_lora_layer(m) for m in model.modules()):
        raise TypeError(
            "save_pruned saves a plain transformers model, but this one carries PEFT adapters. Merge them first "
            "(model = peft_model.merge_and_unload()); to keep the adapter separate, save it with "
            "peft_model.save_pretrained(dir) and the base with save_pruned(peft_model.unload(), ...)."
        )
    _check_save_directory(target, overwrite)
    if getattr(model.config, MASK_KEY, None) is not None:
        model = materialize_masks_(model) if gathered else materialize_masks(model)  # slice to the unmasked units
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_dequantized_gguf_marker(model)
    pruned = getattr(model.config, LAYOUT_KEY, None) is not None
    if pruned:
        adopt_history(model)  # an old-form config holds it: config.json is written without it
        mark_saved_form(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if pruner_config is not None:
            pruner_config.save_pretrained(tmp)
        if pruned:
            write_history(model, tmp)
            _write_card(model, tmp, pruner_config, eval_results, base_model, license, repo_id or target.name)
            check_weights_match_layout(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"Saved {'pruned ' if pruned else ''}model to {target}")
    return target


def _write_card(
    model: nn.Module,
    folder: Path,
    pruner_config: PrunerConfig | None,
    eval_results: Mapping[str, Any] | None,
    base_model: str | None,
    license: str | None,
    repo_id: str,
) -> None:
    """README.md, and the picture it shows (`pruning.png`) when matplotlib is installed."""
    layout = current_layout(model)  # with its history, whose importances the picture shows
    picture = pruning_picture(layout)
    if picture is not None:
        (folder / PICTURE_FILE).write_bytes(picture)
    card = model_card(model, pruner_config, eval_results, base_model, license, repo_id,
                      picture=PICTURE_FILE if picture is not None else None)  # fmt: skip
    card.save(folder / "README.md")


def _check_save_directory(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FileExistsError(
            f"{str(target)!r} is a file, not a folder: save_pruned writes a folder, and overwrite=True replaces only "
            "folders. Choose another save_directory, or remove the file."
        )
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{str(target)!r} already exists: pass overwrite=True to replace it, or choose another save_directory."
        )


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# check and load
# ---------------------------------------------------------------------------------------------------------------
def _weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    shapes = {}
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_weights_match_layout(folder: str | os.PathLike) -> None:
    """Raise if the safetensors weights in `folder` disagree with its `config.json` layout, naming layer and tensor."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    layout = PrunedLayout.from_dict(config.get(LAYOUT_KEY), num_layers=config.get("num_hidden_layers"))
    spec = get_architecture(base_model_type(config["model_type"]))
    shapes = _weight_shapes(folder)
    d = layout.head_dim
    for i in range(layout.num_layers):
        heads, kv, channels = layout.layer(i).as_tuple()
        for path, dim, blocks in spec.pruned_tensors():
            key = f"{spec.layers}.{i}.{path}.weight"
            size = sum(block_sizes(blocks, heads, kv, channels, d))
            if key not in shapes:
                raise ValueError(f"layer {i}: tensor {key!r} is missing from the weights in {str(folder)!r}.")
            if shapes[key][dim] != size:
                raise ValueError(
                    f"layer {i}: tensor {key!r} has shape {list(shapes[key])} but config.json's {LAYOUT_KEY} "
                    f"({heads} heads, {kv} kv heads, {channels} MLP channels, head_dim {d}) needs size {size} in "
                    f"dimension {dim}. The config and the weights come from different saves."
                )


def load_pruned(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a pruned checkpoint (folder or Hub id) with the package's own classes: no code from the checkpoint runs.

    Keyword arguments go to `from_pretrained` (`revision`, `token`, `dtype`, `device_map`, ...). A checkpoint
    without a layout, or one saved in its stock-architecture form (equal widths in every layer), loads as its stock
    architecture. The pruning history is read from `pruning_history.json` when the checkpoint has one (or from
    `config.json`, where earlier versions kept it).
    """
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("load_pruned never runs remote code; drop trust_remote_code (or use AutoModelForCausalLM).")
    path = Path(pretrained_model_name_or_path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} has no config.json, so it holds no saved model: pass the folder save_pruned (or "
                "save_pretrained) wrote."
            )
    else:
        _refuse_missing_local_path(pretrained_model_name_or_path)
        config_file = _hub_config(str(pretrained_model_name_or_path), kwargs)
    config = _read_config(config_file)
    if config.get(LAYOUT_KEY) is None:
        return AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **kwargs)
    PrunedLayout.from_dict(config[LAYOUT_KEY], num_layers=config.get("num_hidden_layers"))
    if path.is_dir():
        check_weights_match_layout(path)
        history = read_history(path, config[LAYOUT_KEY])
    else:
        history = _hub_history(str(pretrained_model_name_or_path), kwargs, config[LAYOUT_KEY])
    base = base_model_type(config["model_type"])
    if base == config["model_type"]:  # the stock-architecture form
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **kwargs)
    else:
        _, model_cls = pruned_classes(base)
        model = model_cls.from_pretrained(pretrained_model_name_or_path, **kwargs)
    adopt_history(model, history if history is not None else config[LAYOUT_KEY].get("history", []))
    return model


def _hub_history(repo_id: str, kwargs: dict[str, Any], layout: dict[str, Any]) -> list | None:
    """The history file of a Hub repo, if it has one."""
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    try:
        return read_history(Path(hf_hub_download(repo_id, HISTORY_FILE, **hub_kwargs)).parent, layout)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _refuse_missing_local_path(name_or_path: str | os.PathLike) -> None:
    """A path that is a file, or that is neither a folder nor a Hub repo id, gets an error naming the local path."""
    path = Path(name_or_path)
    if path.exists():
        raise NotADirectoryError(
            f"{str(name_or_path)!r} is a file: pass the folder that holds config.json and the weights "
            f"({str(path.absolute().parent)!r})."
        )
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise FileNotFoundError(
            f"No such folder: {_where(path)}, and it is not a Hub repo id ('owner/name') either. Check the path: pass "
            "the folder save_pruned wrote, or a repo id."
        ) from None


def _where(path: Path) -> str:
    """`'path'`, with the absolute path it resolved to when it was relative."""
    return repr(str(path)) if path.is_absolute() else f"{str(path)!r} (looked for {str(path.absolute())!r})"


def _hub_config(repo_id: str, kwargs: dict[str, Any]) -> Path:
    """config.json of a Hub repo; a repo or file the Hub does not serve gets an error naming the local path too."""
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
    try:
        return Path(hf_hub_download(repo_id, "config.json", **hub_kwargs))
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, LocalEntryNotFoundError) as error:
        reason = str(error).strip().splitlines()[0]
        raise OSError(
            f"{repo_id!r} is neither a local folder (nothing at {str(Path(repo_id).absolute())!r}) nor a model "
            f"the Hub serves ({type(error).__name__}: {reason}). Check the path; for a Hub repo check the id, "
            "revision= and token= (private or gated repos need a token with access)."
        ) from error


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(config_file)!r} is not valid JSON ({error}): the file is damaged or was not written by "
            "save_pretrained. Save the model again, or restore the file."
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_file)!r} holds a JSON {type(config).__name__}, not a model config (an object).")
    return config


def load_for_pruning(
    pretrained_model_name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """(dense model, tokenizer) ready for pruning: a pruned checkpoint through `load_pruned`, a GGUF file dequantized.

    The weights load in `dtype` straight onto `device` (`"cpu"`, `"cuda"`, `"cuda:1"` or `"auto"`: CUDA when
    available); importance scores and losses are summed in float32 whatever `dtype` is. A model loaded from GGUF has
    its quantizer marker cleared, so it saves like any other model; it remembers the file, whose tokenizer
    `export_gguf` copies.
    """
    device_map = resolve_device(device)  # one device: the weights go there as they load, with no CPU copy first
    if gguf_file is not None:
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            _refuse_missing_local_path(folder)
        elif not (folder / gguf_file).is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise FileNotFoundError(
                f"There is no GGUF file {gguf_file!r} in {str(folder)!r} (GGUF files there: "
                f"{', '.join(found) or 'none'}): pass one of them as gguf_file (--gguf-file), or leave it out to load "
                "safetensors weights."
            )
        model = AutoModelForCausalLM.from_pretrained(
            pretrained_model_name_or_path, gguf_file=gguf_file, dtype=dtype, device_map=device_map,
            quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True),
        )  # fmt: skip
        clear_dequantized_gguf_marker(model)
        local = Path(pretrained_model_name_or_path) / gguf_file
        if local.is_file():
            model._hf_adapt_pruner_gguf_source = local
    else:
        model = load_pruned(pretrained_model_name_or_path, dtype=dtype, device_map=device_map)
    tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, gguf_file=gguf_file)
    return model, tokenizer
