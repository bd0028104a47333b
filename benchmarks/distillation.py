"""Distillation from the unpruned teacher during Adapt-Accel, against the LM loss alone, in and out of domain.

The main example's job (SmolLM2-135M -> keep 0.7 in 4 prune events, 80 steps x 4 x 128 tokens of python3.11-doc, WSD
learning rate 2e-4) is trained with the LM loss only and with `DistillationConfig(alpha=a, temperature=T)` for each
alpha (default 0.5 and 1.0, T = 1), for each seed (data order), every run in a fresh process (so that its peak memory
is its own). Each model, and the original for reference, is measured by

- held-out perplexity on python3.11-doc files never trained on (the training domain),
- held-out perplexity on git's documentation (`/usr/share/doc/git-doc/*.txt`: English from a source not used for
  training),
- zero-shot accuracy on a 4-way cloze task built from git-doc prose (`_mc_task.py`: context of 40 words, which
  8-word continuation is the real one), run through lm-eval's Python API with a local task file on the saved model
  folder loaded with `trust_remote_code=True`,
- the median training-step time (event steps excluded) and the time spent in the teacher and the loss per step,
- the peak resident memory while training (sampled every 5 ms), and a greedy sample on a git prompt.

About 1 hour on 2 CPU cores with the defaults (7 runs); `--smoke` runs the same pipeline on a tiny random model.

    python benchmarks/distillation.py [--smoke] [--seeds 0 1] [--alphas 0.5 1.0] [--temperature 1.0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _common import OTHER_TEXT_DIR, load_model, other_source_texts, parser, text_blocks, write
from _mc_task import ClozeTask, build_cloze_task, prose_paragraphs, run_lm_eval
from callback_overhead import StepTimer
from memory import PeakRSS, rss_bytes
from transformers import Trainer, TrainingArguments

from hf_adapt_pruner import AdaptPrunerCallback, DistillationConfig, PrunerConfig, count_parameters, save_pruned
from hf_adapt_pruner.data import token_blocks
from hf_adapt_pruner.evaluation import perplexity


TASK = "gitdoc_cloze"
PROMPT = {False: "To undo the last commit without losing your changes,", True: "w5 w6 w7 w8"}  # by --smoke


def arguments():
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--other-text-dir", default=OTHER_TEXT_DIR)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Runs at once (e.g. 2 with OMP_NUM_THREADS=1: step times then include the other run's load).",
    )
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--num-stages", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--recovery-fraction", type=float, default=0.2)
    p.add_argument("--eval-blocks", type=int, default=48)
    p.add_argument("--questions", type=int, default=300)
    for internal in ("--run", "--task-dir", "--run-out"):  # one run in a child process (run: original, lm, alpha)
        p.add_argument(internal, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.alphas, args.max_steps, args.num_stages, args.batch_size = (
            args.seeds[:1],
            args.alphas[-1:],
            8,
            2,
            2,
        )
        args.eval_blocks, args.questions = 4, 8
    args.seq_len = 32 if args.smoke else 128
    return args


def other_source_blocks(tokenizer, args) -> torch.Tensor:
    if args.smoke:
        return torch.randint(3, 128, (args.eval_blocks, args.seq_len), generator=torch.Generator().manual_seed(7))
    return token_blocks(tokenizer, other_source_texts(args.other_text_dir), args.seq_len, args.eval_blocks)


def cloze_paragraphs(args) -> list[list[str]]:
    if args.smoke:  # words of the tiny tokenizer's vocabulary
        g = torch.Generator().manual_seed(3)
        return [[f"w{int(i)}" for i in torch.randint(3, 128, (60,), generator=g)] for _ in range(12)]
    return prose_paragraphs(other_source_texts(args.other_text_dir), min_words=48)


def train(model, blocks, args, callback) -> dict:
    """The main example's Trainer run; returns step times, peak memory and wall time."""
    training_args = TrainingArguments(
        output_dir="/tmp/hf_adapt_pruner_bench", max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=max(1, args.max_steps // 20),
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": max(1, round(args.recovery_fraction * args.max_steps))},
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=args.seed, logging_steps=10,
    )  # fmt: skip
    timer = StepTimer()
    data = [{"input_ids": b, "labels": b} for b in blocks]
    trainer = Trainer(model=model.train(), args=training_args, train_dataset=data, callbacks=[callback, timer])
    before, start = rss_bytes(), time.perf_counter()
    with PeakRSS() as peak:
        trainer.train()
    seconds = time.perf_counter() - start
    events = {s.step for s in callback.schedule}
    steps = [t for step, t in enumerate(timer.times, start=1) if step not in events and step > 1]
    distiller = callback._distiller
    logs = [{k: round(v, 4) for k, v in h.items() if k.startswith("distill/") or k in ("step", "loss")}
            for h in trainer.state.log_history if "loss" in h]  # fmt: skip
    model.eval()
    return {"train_seconds": seconds, "median_step_s": statistics.median(steps),
            "teacher_seconds_per_step": distiller.seconds / args.max_steps if distiller else 0.0,
            "rss_before_train_bytes": before, "rss_peak_train_bytes": peak.peak,
            "event_steps": sorted(events), "logs": logs}  # fmt: skip


def one_run(args) -> dict:
    """One model: trained (unless `original`) and measured, in this process."""
    torch.manual_seed(args.seed)
    model, tokenizer, name = load_model(args.smoke)
    train_blocks, in_domain = text_blocks(tokenizer, args.smoke, args.text_dir, args.seq_len,
                                          args.max_steps * args.batch_size, args.eval_blocks)  # fmt: skip
    row = {"run": args.run, "seed": args.seed, "model": name}
    if args.run != "original":
        distillation = None if args.run == "lm" else DistillationConfig(alpha=float(args.run),
                                                                        temperature=args.temperature)  # fmt: skip
        config = PrunerConfig(target_ratio=0.7, num_stages=args.num_stages, importance_window=2 if args.smoke else 4,
                              recovery_fraction=args.recovery_fraction, inner_steps=5, calibration_samples=16,
                              calibration_seq_len=args.seq_len)  # fmt: skip
        row |= train(model, train_blocks, args, AdaptPrunerCallback(config, distillation=distillation))
    row |= {"params": count_parameters(model), "ppl_in_domain": perplexity(model, in_domain),
            "ppl_other_source": perplexity(model, other_source_blocks(tokenizer, args))}  # fmt: skip
    inputs = tokenizer(PROMPT[args.smoke], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=30, do_sample=False, repetition_penalty=1.2,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    row["sample"] = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    with tempfile.TemporaryDirectory() as folder:
        save_pruned(model, Path(folder) / "model", tokenizer)
        row["cloze"] = run_lm_eval(Path(folder) / "model", ClozeTask.load(Path(args.task_dir), TASK))
    return row


def launch(args, run: str, seed: int, task_dir: Path) -> dict:
    """`one_run` in a fresh process (its peak memory is its own)."""
    out = task_dir / f"{run}-{seed}.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--run", run, "--seed", str(seed), "--task-dir", str(task_dir),
               "--run-out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"run {run} (seed {seed}) failed:\n{result.stderr[-4000:]}")
    row = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in row.items() if k != "logs"}), flush=True)
    return row


def summarize(rows: list[dict], args) -> dict:
    def mean(run: str, key: str) -> float:
        values = [r[key] if key != "cloze" else r["cloze"]["acc"] for r in rows if r["run"] == run]
        return statistics.mean(values)

    methods = {"lm": "LM loss only", **{str(a): f"distillation, alpha {a}" for a in args.alphas}}
    summary = {}
    for run, label in methods.items():
        summary[label] = {key: mean(run, key) for key in ("ppl_in_domain", "ppl_other_source", "cloze",
                                                          "median_step_s", "rss_peak_train_bytes")}  # fmt: skip
    lm = summary["LM loss only"]
    for label in methods.values():
        entry = summary[label]
        entry["other_source_ppl_reduction_vs_lm"] = 1 - entry["ppl_other_source"] / lm["ppl_other_source"]
        entry["step_time_overhead_vs_lm"] = entry["median_step_s"] / lm["median_step_s"] - 1
        entry["peak_memory_over_lm_bytes"] = entry["rss_peak_train_bytes"] - lm["rss_peak_train_bytes"]
    best = max((summary[methods[str(a)]] for a in args.alphas), key=lambda e: e["other_source_ppl_reduction_vs_lm"])
    return {"by_method": summary, "best_other_source_reduction": best["other_source_ppl_reduction_vs_lm"],
            "target_met": best["other_source_ppl_reduction_vs_lm"] >= 0.30}  # fmt: skip


def main() -> None:
    args = arguments()
    if args.run is not None:
        Path(args.run_out).write_text(json.dumps(one_run(args)))
        return
    with tempfile.TemporaryDirectory() as folder:
        task = build_cloze_task(cloze_paragraphs(args), Path(folder), TASK, args.questions)
        runs = [("original", args.seeds[0])] + [
            (run, seed) for seed in args.seeds for run in ["lm", *map(str, args.alphas)]
        ]
        with ThreadPoolExecutor(args.jobs) as pool:  # child processes; rows stay in this order
            rows = list(pool.map(lambda run: launch(args, *run, task.folder), runs))
    original = rows[0]
    write("distillation", args, {
        "model": original["model"], "target_ratio": 0.7, "steps": args.max_steps, "stages": args.num_stages,
        "batch": f"{args.batch_size} x {args.seq_len} tokens", "seeds": args.seeds, "alphas": args.alphas,
        "temperature": args.temperature, "train_tokens": args.max_steps * args.batch_size * args.seq_len,
        "eval_tokens": args.eval_blocks * args.seq_len, "cloze": {"questions": task.num_questions,
        "choices": task.num_choices, "context_words": 40, "continuation_words": 8},
        "rows": rows, "summary": summarize(rows[1:], args),
        "note": "Training domain: python3.11-doc (held-out files); other source: git-doc, never trained on. Each run "
        "is a fresh process; step times and memory on a shared 2-core CPU. Same schedule, data and learning rate "
        "in every trained run; the seed changes the data order.",
    })  # fmt: skip


if __name__ == "__main__":
    main()
