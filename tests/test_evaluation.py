"""Evaluation interfaces: the offline `evaluate` metric and the perplexity helper agree."""

from __future__ import annotations

import json
import math

import evaluate
import pytest
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


@pytest.mark.slow  # importing lm-eval and its harness costs more than the rest of this file: CI runs it
def test_lm_eval_scores_a_pruned_model_on_a_local_task(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = save_pruned(pruned_tiny_model("llama"), tmp_path / "m", tiny_tokenizer())
    rows = [{"question": f"w{3 + i} w{4 + i}", "choices": [f"w{10 + i}", f"w{20 + i}"], "answer": i % 2}
            for i in range(6)]  # fmt: skip
    data = tmp_path / "tasks" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data.parent / "tiny_local_mc.yaml").write_text(
        "task: tiny_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,device=cpu,dtype=float32",
        tasks=["tiny_local_mc"],
        task_manager=TaskManager(include_path=str(data.parent)),
        batch_size=2,
    )
    accuracy = results["results"]["tiny_local_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    assert results["configs"]["tiny_local_mc"]["output_type"] == "multiple_choice"
