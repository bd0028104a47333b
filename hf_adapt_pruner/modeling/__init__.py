"""Templates of the code written next to pruned weights (see `hf_adapt_pruner.remote_code`).

The two modules are importable here (rendered for llama) so the package shares their helpers, but what a saved
model runs is the rendered copy in its own folder, which imports only torch and transformers.
"""
