"""Configuration of a model pruned with Adapt-Pruner (hf_adapt_pruner). Imports only transformers.

It is the stock configuration of `BASE_MODEL_TYPE` with one more key, `pruned_layout`: the per-layer query heads,
key/value heads and MLP widths (see `modeling_adapt_pruner.py`).
"""

from transformers.models.auto.configuration_auto import CONFIG_MAPPING


BASE_MODEL_TYPE = "llama"  # written by hf_adapt_pruner when the model is saved
LAYOUT_KEY = "pruned_layout"


class AdaptPrunedConfig(CONFIG_MAPPING[BASE_MODEL_TYPE]):
    model_type = "adapt_pruned_" + BASE_MODEL_TYPE
