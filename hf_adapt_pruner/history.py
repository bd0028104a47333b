"""The pruning history (every prune event's kept indices) in its own file beside the weights, not in `config.json`.

`config.json` carries only what loading needs: the per-layer widths under `pruned_layout`. The history can grow to
megabytes (the kept channel indices of every layer, per event), so it lives in `pruning_history.json`:

```json
{"format_version": 1, "num_attention_heads": [...], "num_key_value_heads": [...], "intermediate_size": [...],
 "history": [{"num_parameters": ..., "layer_importance": [...], "layers": {"1": {"q_heads": [...], ...}}}]}
```

The widths in the file are those of the model it was written with, so a file that does not belong to the config
beside it is noticed (and ignored, with a warning). In memory the history is an attribute of the transformers model
(`HISTORY_ATTR`): what transformers serialises (the config) never holds it. Models saved before the split kept the
history inside `config.json` (`pruned_layout.history`); they still load, and the history moves out at their next
save.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils import logging

from .architectures import unwrap_peft
from .layout import LAYOUT_KEY, MASK_KEY


logger = logging.get_logger(__name__)

HISTORY_FILE = "pruning_history.json"
HISTORY_ATTR = "_hf_adapt_pruner_history"
HISTORY_FORMAT_VERSION = 1
WIDTH_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _stored_layout(config) -> dict | None:
    for key in (LAYOUT_KEY, MASK_KEY):
        stored = getattr(config, key, None)
        if isinstance(stored, dict):
            return stored
    return None


def pruning_history(model: nn.Module) -> list[dict[str, Any]]:
    """The prune events of `model` (oldest first): kept indices per changed layer, parameter count, importances.

    Read from the model (after a prune event, or `load_pruned`), else from an old-form `config.json` that held it,
    else from `pruning_history.json` in the folder the model was loaded from; `[]` when there is none.
    """
    model = unwrap_peft(model)
    history = model.__dict__.get(HISTORY_ATTR)
    if history is not None:
        return history
    layout = _stored_layout(model.config)
    if layout is None:
        return []
    if layout.get("history"):
        return layout["history"]
    folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if str(folder) and folder.is_dir():
        return read_history(folder, layout) or []
    return []


def adopt_history(model: nn.Module, history: list[dict[str, Any]] | None = None) -> None:
    """Keep `history` (default: `pruning_history(model)`) on the model and take it out of the config, so that every
    later save (`save_pretrained`, Trainer checkpoints) writes a `config.json` without it."""
    model = unwrap_peft(model)
    history = pruning_history(model) if history is None else history
    model.__dict__[HISTORY_ATTR] = history
    for key in (LAYOUT_KEY, MASK_KEY):
        stored = getattr(model.config, key, None)
        if isinstance(stored, dict) and "history" in stored:
            setattr(model.config, key, {k: v for k, v in stored.items() if k != "history"})


def history_document(model: nn.Module) -> dict[str, Any] | None:
    """The JSON object `pruning_history.json` holds for `model`; None for a model that was never pruned."""
    model = unwrap_peft(model)
    layout = _stored_layout(model.config)
    if layout is None:
        return None
    return {"format_version": HISTORY_FORMAT_VERSION, **{key: list(layout[key]) for key in WIDTH_KEYS},
            "history": pruning_history(model)}  # fmt: skip


def write_history(model: nn.Module, folder: str | os.PathLike) -> Path | None:
    """Write `pruning_history.json` for `model` into `folder` (atomically: a temporary file renamed into place).
    Nothing is written for a model that was never pruned. Returns the file written."""
    document = history_document(model)
    if document is None:
        return None
    path = Path(folder) / HISTORY_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_history(folder: str | os.PathLike, layout: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The history in `folder/pruning_history.json`, if the file is there and belongs to `layout` (the config's
    `pruned_layout`); None otherwise. A damaged or foreign file is reported and ignored, never deleted."""
    path = Path(folder) / HISTORY_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning(f"{str(path)!r} is not valid JSON ({error}); the model loads without its pruning history.")
        return None
    if not isinstance(document, dict) or not isinstance(document.get("history"), list):
        logger.warning(f"{str(path)!r} holds no 'history' list; the model loads without its pruning history.")
        return None
    if document.get("format_version", HISTORY_FORMAT_VERSION) != HISTORY_FORMAT_VERSION:
        logger.warning(f"{str(path)!r} has format_version={document.get('format_version')!r}, which this version of "
                       "hf_adapt_pruner does not read (upgrade it); the model loads without its history.")  # fmt: skip
        return None
    mismatched = [key for key in WIDTH_KEYS if document.get(key) != layout.get(key)]
    if mismatched:
        logger.warning(
            f"{str(path)!r} was written for other widths than config.json's {LAYOUT_KEY} ({mismatched[0]} differs): "
            "it belongs to another save, and the model loads without its pruning history."
        )
        return None
    return document["history"]
