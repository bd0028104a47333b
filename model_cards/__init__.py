"""Model card templates, shipped inside the package as `hf_adapt_pruner.model_cards`."""
