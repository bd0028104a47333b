"""The model card of a pruned model, and its picture: per-layer widths and layer importance.

Builds the card and the PNG in memory; `serialization.save_pruned` writes them (files are only written there). The
picture needs matplotlib (`pip install "hf_adapt_pruner[card]"`); without it the card is complete without a picture.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from transformers.utils import logging

from .config import PrunerConfig
from .layout import PrunedLayout
from .plain import is_plain
from .pruner import count_parameters, current_layout
from .remote_code import base_model_type


logger = logging.get_logger(__name__)

MODEL_CARD_TEMPLATE = "adapt_pruner.md"
PICTURE_FILE = "pruning.png"  # next to the weights; the card links it by this relative name


def last_layer_importance(layout: PrunedLayout) -> list[float] | None:
    """Layer importances of the last prune event that recorded them (None for layouts saved before they were)."""
    for event in reversed(layout.history):
        values = event.get("layer_importance")
        if isinstance(values, list) and len(values) == layout.num_layers:
            return [float(v) for v in values]
    return None


def _fractions(layout: PrunedLayout) -> dict[str, list[float]]:
    """Each layer's widths as fractions of the original widths (`layout.base`), by kind."""
    kinds = {"query heads": "num_attention_heads", "key/value heads": "num_key_value_heads",
             "MLP channels": "intermediate_size"}  # fmt: skip
    return {label: [w / layout.base[key] for w in getattr(layout, key)] for label, key in kinds.items()}


def pruning_picture(layout: PrunedLayout) -> bytes | None:
    """A PNG: per-layer widths as fractions of the original (grouped bars) and, when the layout records them, the
    last prune event's layer importances below. None when matplotlib is not installed.

    Drawn on a `matplotlib.figure.Figure` with the Agg canvas: pyplot is never imported, so no global figure,
    backend or rcParams change.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info('No matplotlib: the model card has no picture (pip install "hf_adapt_pruner[card]" adds it).')
        return None
    importance = last_layer_importance(layout)
    layers = range(layout.num_layers)
    figure = Figure(figsize=(max(7.0, 2.0 + 0.3 * layout.num_layers), 5.5 if importance else 3.2), dpi=100,
                    layout="constrained")  # fmt: skip
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 if importance else 1, 1, sharex=True, squeeze=False)[:, 0]
    width = 0.8 / 3
    for k, (label, values) in enumerate(_fractions(layout).items()):
        axes[0].bar([i + (k - 1) * width for i in layers], values, width, label=label)
    axes[0].set_ylim(0, 1.3)  # room above the bars for the legend
    axes[0].set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axes[0].set_ylabel("kept fraction")
    axes[0].set_title("Per-layer widths, as fractions of the original")
    axes[0].legend(loc="upper center", fontsize="small", ncols=3, frameon=False)
    if importance:
        colors = ["tab:green" if v >= 0 else "tab:red" for v in importance]
        axes[1].bar(list(layers), importance, 0.6, color=colors)
        axes[1].axhline(0.0, color="black", linewidth=0.8)
        axes[1].set_ylim(-1.1, 1.1)
        axes[1].set_ylabel("importance")
        axes[1].set_title("Layer importance, last prune event (centred, scaled to [-1, 1])")
    axes[-1].set_xlabel("decoder layer")
    axes[-1].set_xticks(list(layers)[:: max(1, layout.num_layers // 32)])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version string: same plot, same bytes
    return buffer.getvalue()


def _layer_rows(layout: PrunedLayout, importance: list[float] | None) -> list[dict[str, Any]]:
    """One row of the card's per-layer table per decoder layer."""
    rows = []
    for i in range(layout.num_layers):
        heads, kv_heads, channels = layout.layer(i).as_tuple()
        rows.append({"index": i, "heads": heads, "kv_heads": kv_heads, "intermediate": channels,
                     "importance": f"{importance[i]:+.3f}" if importance else None})  # fmt: skip
    return rows


def model_card(
    model: nn.Module,
    pruner_config: PrunerConfig | None,
    eval_results: Mapping[str, Any] | None,
    base_model: str | None,
    license: str | None,
    repo_id: str,
    picture: str | None = None,
) -> ModelCard:
    """The card of a pruned model; `picture` is the file name of its PNG next to the card (None: no picture)."""
    config = model.config
    layout = current_layout(model)  # with its history (the importances come from there)
    plain = is_plain(config)
    if base_model is None:
        name = str(getattr(config, "_name_or_path", "") or "")
        base_model = name if name.count("/") == 1 and not os.path.exists(name) else None
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=license,
        tags=["pruned", "adapt-pruner", "hf_adapt_pruner"] + ([] if plain else ["custom_code"]),
        pipeline_tag="text-generation",
    )
    importance = last_layer_importance(layout)
    template = resources.files("hf_adapt_pruner.model_cards").joinpath(MODEL_CARD_TEMPLATE).read_text("utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        base_model_type=base_model_type(config.model_type),
        params_before=layout.base.get("num_parameters", 0),
        params_after=count_parameters(model),
        layers=_layer_rows(layout, importance),
        has_importance=importance is not None,
        picture=picture,
        plain=plain,
        head_dim=layout.head_dim,
        base_heads=layout.base.get("num_attention_heads"),
        base_kv_heads=layout.base.get("num_key_value_heads"),
        base_intermediate=layout.base.get("intermediate_size"),
        eval_results=dict(eval_results or {}),
        pruner_config=pruner_config.to_json_string().strip() if pruner_config is not None else None,
    )
