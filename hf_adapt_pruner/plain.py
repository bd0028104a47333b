"""A pruned model whose layers all have the same widths is an ordinary model of its own architecture.

Its config is the stock config of the base `model_type` with the new `num_attention_heads`, `num_key_value_heads`,
`intermediate_size` and an explicit `head_dim`: `AutoModelForCausalLM.from_pretrained(folder)` builds it without
remote code, and so do engines that read only stock configs (vLLM, TGI, SGLang, llama.cpp's converter). The config
keeps `pruned_layout` (the widths, the original sizes, the per-layer sparsity state), which stock code ignores and
this package reads to continue pruning; there is no `auto_map` and no modeling file.

A model with per-layer widths keeps the remote-code form (`remote_code.mark_pruned`).
"""

from __future__ import annotations

import copy

from torch import nn

from .layout import LAYOUT_KEY, LayerWidths, PrunedLayout
from .remote_code import MODEL_TYPE_PREFIX, base_model_type, clear_dequantized_gguf_marker, mark_pruned


def uniform_widths(layout: PrunedLayout) -> LayerWidths | None:
    """The widths every layer shares, or None when they differ."""
    widths = {layout.layer(i).as_tuple() for i in range(layout.num_layers)}
    return LayerWidths(*widths.pop()) if len(widths) == 1 else None


def stock_config_refusal(config, widths: LayerWidths, head_dim: int) -> str | None:
    """Why the stock config class of `config` does not accept these global widths, or None if it does.

    Every supported architecture reads an explicit `head_dim`, but some configs still validate the head count
    against the hidden size: in transformers 5.25, `LlamaConfig`, `Gemma2Config` and `Gemma3TextConfig` require
    `hidden_size % num_attention_heads == 0`, so SmolLM2 (hidden 576) may keep 9, 6 or 3 heads but Llama-3-8B
    (hidden 4096, 8 kv groups of 4) only 32, 16, 8 or 4. The config's own validation decides (`config.validate()`);
    a config that does not validate as it is gets no say.
    """
    candidate = copy.deepcopy(config)
    if type(candidate).__name__.startswith("AdaptPruned"):
        candidate.__class__ = type(candidate).__mro__[1]
    validate = getattr(candidate, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception:  # whatever the config's own check raises: it has no say
        return None
    candidate.num_attention_heads, candidate.num_key_value_heads, candidate.intermediate_size = widths.as_tuple()
    candidate.head_dim = head_dim
    try:
        validate()
    except Exception as error:  # strict dataclass validators raise their own error types
        return str(error).strip().splitlines()[-1].strip()
    return None


def plain_form_refusal(config, layout: PrunedLayout) -> str | None:
    """Why a model with `config` and `layout` cannot be saved as its stock architecture, or None if it can."""
    widths = uniform_widths(layout)
    if widths is None:
        return "its layers have different widths"
    reason = stock_config_refusal(config, widths, layout.head_dim)
    if reason is not None:
        return f"the stock {base_model_type(config.model_type)!r} config does not accept its widths ({reason})"
    return None


def is_plain(config) -> bool:
    """True for a pruned model in its stock-architecture form (a layout, and the stock model_type)."""
    return getattr(config, LAYOUT_KEY, None) is not None and not config.model_type.startswith(MODEL_TYPE_PREFIX)


def mark_plain(model: nn.Module) -> None:
    """Turn a pruned model whose layers share their widths into a stock model of its architecture, in place.

    No weight changes: the config's global widths are set to the layers' widths (with an explicit `head_dim`), the
    model and config go back to the stock classes (if they were the pruned remote-code classes) and `auto_map` goes.
    """
    config = model.config
    layout = PrunedLayout.from_dict(getattr(config, LAYOUT_KEY), num_layers=config.num_hidden_layers)
    refusal = plain_form_refusal(config, layout)
    if refusal is not None:
        raise ValueError(f"Cannot save this model as its stock architecture: {refusal}.")
    clear_dequantized_gguf_marker(model)
    widths = uniform_widths(layout)
    for obj in (config, model):
        if type(obj).__name__.startswith("AdaptPruned"):  # the remote-code subclass: back to the stock class
            obj.__class__ = type(obj).__mro__[1]
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = widths.as_tuple()
    config.head_dim = layout.head_dim
    if "auto_map" in config.__dict__:
        del config.auto_map


def mark_saved_form(model: nn.Module) -> None:
    """The form every later save of the pruned `model` writes: its stock architecture when its layers share their
    widths and its config can say so (`mark_plain`), else the remote-code form (`mark_pruned`)."""
    config = model.config
    layout = PrunedLayout.from_dict(getattr(config, LAYOUT_KEY), num_layers=config.num_hidden_layers)
    if plain_form_refusal(config, layout) is None:
        mark_plain(model)
    else:
        mark_pruned(model)
