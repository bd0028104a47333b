"""Evaluation interfaces: the offline `evaluate` metric and the perplexity helper agree."""

from __future__ import annotations

import math

import evaluate
import torch

from hf_adapt_pruner import save_pruned
from hf_adapt_pruner.evaluation import perplexity
from hf_adapt_pruner.metrics import PERPLEXITY_METRIC_PATH

from tiny_models import pruned_tiny_model, tiny_tokenizer


def test_evaluate_metric_loads_offline_and_matches_perplexity(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    model = pruned_tiny_model("qwen3")
    tokenizer = tiny_tokenizer()
    folder = save_pruned(model, tmp_path / "m", tokenizer)
    texts = ["w5 w6 w7 w8 w9 w10", "w11 w12 w13 w14 w15 w16"]
    metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    result = metric.compute(predictions=texts, model_id=str(folder))
    assert len(result["perplexities"]) == 2
    blocks = torch.tensor([tokenizer(t)["input_ids"] for t in texts])
    assert math.isclose(result["mean_perplexity"], perplexity(model, blocks), rel_tol=1e-5)
