"""Run in a fresh process where hf_adapt_pruner cannot be imported: load a pruned folder the way a user without the
package would, and print JSON with what was checked.

usage: python fresh_load.py MODEL_DIR_OR_REPO [MODEL_DIR_OR_REPO ...] INPUT_IDS_JSON [plain]

One source prints one JSON object; several print a JSON list, one object per source in order (one process start and
one import of torch and transformers for all of them). With `plain`, nothing is loaded with `trust_remote_code=True`
(models saved as their stock architecture).
"""

import importlib.abc
import json
import sys


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("hf_adapt_pruner", "hf_adapt_pruner_generated"):
            raise ImportError(f"{name} is deliberately not importable in this process")


sys.meta_path.insert(0, _Blocked())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402


arguments = sys.argv[1:]
trust = arguments[-1] != "plain"
*sources, input_ids = arguments if trust else arguments[:-1]
input_ids = torch.tensor(json.loads(input_ids))


def check(source: str) -> dict:
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust, attn_implementation="eager")
    with torch.no_grad():
        logits = model(input_ids).logits
    attention_mask = torch.ones_like(input_ids)
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    tokenizer = AutoTokenizer.from_pretrained(source)  # no flag: the y/N trust question finds no terminal, is declined
    generator = pipeline("text-generation", model=source, trust_remote_code=trust)
    text = generator("w5 w6 w7", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    return {
        "class": type(model).__module__ + "." + type(model).__name__,
        "logits": logits.tolist(),
        "generated_shape": list(generated.shape),
        "tokenized": tokenizer("w5 w6")["input_ids"],
        "pipeline_text": text,
    }


results = [check(source) for source in sources]
print("\n" + json.dumps(results[0] if len(results) == 1 else results))
