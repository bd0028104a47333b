"""`evaluate` metrics shipped with the package; pass the path to `evaluate.load` (works offline)."""

from pathlib import Path


PERPLEXITY_METRIC_PATH = str(Path(__file__).parent / "pruned_perplexity")
