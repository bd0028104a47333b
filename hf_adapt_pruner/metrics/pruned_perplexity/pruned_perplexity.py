"""An `evaluate` metric: perplexity of texts under a (pruned) causal LM, loadable offline.

    import evaluate
    from hf_adapt_pruner.metrics import PERPLEXITY_METRIC_PATH
    metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    metric.compute(predictions=texts, model_id="path/to/pruned-model")  # {"perplexities": [...], "mean_perplexity": x}

The model loads through `hf_adapt_pruner.load_pruned` (no code from the checkpoint runs); a GGUF file inside a
folder is named with `gguf_file=`.
"""

import math

import datasets
import evaluate
import torch

from hf_adapt_pruner.serialization import load_for_pruning


_DESCRIPTION = "Perplexity of each text under a causal language model (pruned with hf_adapt_pruner or stock)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the texts to score.
    model_id (`str`): a folder (or Hub id) of a pruned or stock checkpoint.
    gguf_file (`str`, optional): a GGUF file inside `model_id`.
    max_length (`int`, default 512): texts are truncated to `max_length` tokens.
Returns:
    perplexities (`list[float]`), mean_perplexity (`float`, token-weighted over all texts).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrunedPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, gguf_file=None, max_length=512):
        model, tokenizer = load_for_pruning(model_id, gguf_file=gguf_file)
        model.eval()
        perplexities, total_loss, total_tokens = [], 0.0, 0
        for text in predictions:  # one text at a time: no padding, exact per-text losses
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.shape[1] < 2:
                raise ValueError(f"Text {text[:40]!r} has fewer than 2 tokens: its perplexity is undefined.")
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # (T-1, V)
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            perplexities.append(math.exp(loss / (ids.shape[1] - 1)))
            total_loss, total_tokens = total_loss + loss, total_tokens + ids.shape[1] - 1
        return {"perplexities": perplexities, "mean_perplexity": math.exp(total_loss / total_tokens)}
