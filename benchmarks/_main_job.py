"""The README's main job as a measured run, shared by `distillation.py` and `stages_budget.py`.

A run is a `Spec` (JSON): SmolLM2-135M -> keep 0.7 with `AdaptPrunerCallback` in an ordinary Trainer (WSD learning
rate, 4 x 128-token batches of python3.11-doc, the same blocks in the same order for every run of a seed), with the LM
loss or distillation, a number of prune events and a step budget. Each run is a fresh process (its peak memory is its
own) that measures

- held-out perplexity on python3.11-doc files never trained on (the training domain),
- held-out perplexity on git's documentation (`/usr/share/doc/git-doc/*.txt`: English from a source not used for
  training),
- zero-shot accuracy on a 4-way cloze task built from git-doc prose (`_mc_task.py`: context of 40 words, which
  8-word continuation is the real one), through lm-eval's Python API with a local task file on the saved folder
  loaded with `trust_remote_code=True`,
- wall time, the median training-step time (event steps excluded), the teacher's time per step, and the peak
  resident memory while training (sampled every 5 ms), and a greedy sample on a git prompt.

    python benchmarks/_main_job.py --spec '{"method": "lm", ...}' --task-dir DIR --run-out FILE   (one run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _common import OTHER_TEXT_DIR, TEXT_DIR, load_model, other_source_texts, parser, text_blocks, write
from _mc_task import ClozeTask, build_cloze_task, prose_paragraphs, run_lm_eval
from callback_overhead import StepTimer
from memory import PeakRSS, rss_bytes
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_adapt_pruner import AdaptPrunerCallback, DistillationConfig, PrunerConfig, count_parameters, save_pruned
from hf_adapt_pruner.checks import torch_optimizer
from hf_adapt_pruner.data import token_blocks
from hf_adapt_pruner.evaluation import perplexity
from hf_adapt_pruner.reconstruction import consumers


TASK = "gitdoc_cloze"
PROMPT = {False: "To undo the last commit without losing your changes,", True: "w5 w6 w7 w8"}  # by smoke


@dataclasses.dataclass(frozen=True)
class Spec:
    """One run. `method`: "original" (no training), "lm" (LM loss only) or an alpha for distillation, as a string."""

    method: str
    seed: int = 0
    stages: int = 4
    steps: int = 80
    temperature: float = 1.0
    batch_size: int = 4
    learning_rate: float = 2e-4
    recovery_fraction: float = 0.2
    eval_blocks: int = 48
    bf16: bool = False  # train under bfloat16 autocast (evaluation stays float32)
    teacher_dtype: str | None = None  # DistillationConfig.teacher_dtype of a distilled run
    reconstruction: str = "none"  # PrunerConfig.reconstruction (rows measured before it existed had none)
    reconstruction_damping: float = 0.01  # PrunerConfig.reconstruction_damping (rows without the field had 0.01)
    reset_refit_state: bool = False  # drop the optimizer state of the weights each event refits (see ResetRefitState)
    layout: str = "adaptive"  # PrunerConfig.layout
    smoke: bool = False
    text_dir: str = TEXT_DIR
    other_text_dir: str = OTHER_TEXT_DIR

    @property
    def seq_len(self) -> int:
        return 32 if self.smoke else 128

    def key(self) -> tuple:
        """What makes two runs the same run (a row measured for one benchmark serves another); the original model
        is not trained, so its training settings do not count, and the LM loss has no temperature."""
        untrained = (
            "stages",
            "steps",
            "temperature",
            "learning_rate",
            "recovery_fraction",
            "batch_size",
            "bf16",
            "reconstruction",
            "reconstruction_damping",
            "reset_refit_state",
            "layout",
        )
        ignored = ("text_dir", "other_text_dir", *(untrained if self.method == "original" else ()),
                   *(("temperature",) if self.method == "lm" else ()))  # fmt: skip
        return tuple(v for k, v in dataclasses.asdict(self).items() if k not in ignored)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--other-text-dir", default=OTHER_TEXT_DIR)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Runs at once (e.g. 2 with OMP_NUM_THREADS=1: step times then include the other run's load).",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--recovery-fraction", type=float, default=0.2)
    p.add_argument("--eval-blocks", type=int, default=48)
    p.add_argument("--bf16", action="store_true", help="Train under bfloat16 autocast (fast on CPUs with AMX).")
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--reuse", type=Path, nargs="*", default=[],
                   help="Result JSONs whose rows of an identical spec are taken instead of run again.")  # fmt: skip


def spec(args, method: str, seed: int, stages: int, steps: int, temperature: float = 1.0,
         teacher_dtype: str | None = None) -> Spec:  # fmt: skip
    """A run of `method` with the common command-line settings (smoke shrinks everything)."""
    common = dict(batch_size=args.batch_size, learning_rate=args.learning_rate, text_dir=args.text_dir,
                  recovery_fraction=args.recovery_fraction, eval_blocks=args.eval_blocks,
                  other_text_dir=args.other_text_dir, temperature=temperature, bf16=args.bf16)  # fmt: skip
    if args.smoke:
        common |= dict(batch_size=2, eval_blocks=4, smoke=True)
    return Spec(method=method, seed=seed, stages=stages, steps=steps, teacher_dtype=teacher_dtype, **common)


class ResetRefitState(TrainerCallback):
    """After each prune event of `pruner_callback` (listed before this one): drop the optimizer state (AdamW's moments
    and step) of the consumer projections (`o_proj`, `down_proj`) of every layer that lost units, i.e. of the weights
    the least-squares refit changed, so AdamW starts them afresh instead of continuing the moments of the old
    weights. The alternative to what the callback does (slice the state and keep it)."""

    def __init__(self, pruner_callback: AdaptPrunerCallback):
        self.pruner_callback, self.events_seen, self.reset = pruner_callback, 0, 0

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        callback = self.pruner_callback
        if callback.events_done == self.events_seen:
            return
        self.events_seen = callback.events_done
        report, optimizer = callback.reports[-1], torch_optimizer(optimizer)
        for lm, layer in zip(callback._pruner.layers, report.layers):
            if layer.before.as_tuple() != layer.after.as_tuple():
                for _, pruned in consumers(lm):
                    self.reset += optimizer.state.pop(pruned.module.weight, None) is not None


def train(model, blocks, spec: Spec, callback, output_dir: str, extra: list | None = None) -> dict:
    """The main example's Trainer run (`extra`: more Trainer callbacks); returns step times, peak memory and wall
    time."""
    training_args = TrainingArguments(
        output_dir=output_dir, max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, warmup_steps=max(1, spec.steps // 20),
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": max(1, round(spec.recovery_fraction * spec.steps))},
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=spec.seed, logging_steps=10,
        bf16=spec.bf16,
    )  # fmt: skip
    timer = StepTimer()
    data = [{"input_ids": b, "labels": b} for b in blocks]
    trainer = Trainer(model=model.train(), args=training_args, train_dataset=data,
                      callbacks=[callback, *(extra or []), timer])  # fmt: skip
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
            "teacher_seconds_per_step": distiller.seconds / spec.steps if distiller else 0.0,
            "rss_before_train_bytes": before, "rss_peak_train_bytes": peak.peak,
            "event_steps": sorted(events), "logs": logs}  # fmt: skip


def one_run(spec: Spec, task: ClozeTask) -> dict:
    """One model: trained (unless `original`) and measured, in this process."""
    torch.manual_seed(spec.seed)
    model, tokenizer, name = load_model(spec.smoke)
    train_blocks, in_domain = text_blocks(tokenizer, spec.smoke, spec.text_dir, spec.seq_len,
                                          spec.steps * spec.batch_size, spec.eval_blocks)  # fmt: skip
    row = {"run": spec.method, "seed": spec.seed, "stages": spec.stages, "steps": spec.steps, "model": name,
           "spec": dataclasses.asdict(spec)}  # fmt: skip
    if spec.method != "original":
        distillation = None
        if spec.method != "lm":
            distillation = DistillationConfig(alpha=float(spec.method), temperature=spec.temperature,
                                              teacher_dtype=spec.teacher_dtype)  # fmt: skip
        config = PrunerConfig(target_ratio=0.7, num_stages=spec.stages, importance_window=2 if spec.smoke else 4,
                              recovery_fraction=spec.recovery_fraction, inner_steps=5, calibration_samples=16,
                              calibration_seq_len=spec.seq_len, reconstruction=spec.reconstruction,
                              reconstruction_damping=spec.reconstruction_damping, layout=spec.layout)  # fmt: skip
        with tempfile.TemporaryDirectory() as output_dir:  # its own prune_events.json (runs may be concurrent)
            callback = AdaptPrunerCallback(config, distillation=distillation)
            extra = [ResetRefitState(callback)] if spec.reset_refit_state else []
            row |= train(model, train_blocks, spec, callback, output_dir, extra)
            if extra:
                row["optimizer_states_reset"] = extra[0].reset
    row |= {"params": count_parameters(model), "ppl_in_domain": perplexity(model, in_domain),
            "ppl_other_source": perplexity(model, other_source_blocks(tokenizer, spec))}  # fmt: skip
    inputs = tokenizer(PROMPT[spec.smoke], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=30, do_sample=False, repetition_penalty=1.2,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    row["sample"] = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    with tempfile.TemporaryDirectory() as folder:
        save_pruned(model, Path(folder) / "model", tokenizer)
        row["cloze"] = run_lm_eval(Path(folder) / "model", task)
    return row


def other_source_blocks(tokenizer, spec: Spec) -> torch.Tensor:
    if spec.smoke:
        return torch.randint(3, 128, (spec.eval_blocks, spec.seq_len), generator=torch.Generator().manual_seed(7))
    return token_blocks(tokenizer, other_source_texts(spec.other_text_dir), spec.seq_len, spec.eval_blocks)


def cloze_paragraphs(smoke: bool, other_text_dir: str) -> list[list[str]]:
    if smoke:  # words of the tiny tokenizer's vocabulary
        g = torch.Generator().manual_seed(3)
        return [[f"w{int(i)}" for i in torch.randint(3, 128, (60,), generator=g)] for _ in range(12)]
    return prose_paragraphs(other_source_texts(other_text_dir), min_words=48)


def launch(spec: Spec, task: ClozeTask) -> dict:
    """`one_run` in a fresh process (its peak memory is its own)."""
    out = task.folder / f"run-{abs(hash(spec.key()))}.json"
    command = [sys.executable, __file__, "--spec", json.dumps(dataclasses.asdict(spec)), "--task-dir",
               str(task.folder), "--run-out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"run {spec} failed:\n{result.stderr[-4000:]}")
    row = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in row.items() if k != "logs"}), flush=True)
    return row


def run_all(args, specs: list[Spec]) -> tuple[list[dict], ClozeTask]:
    """Rows of `specs` in their order: taken from `--reuse` files where measured already, else run `--jobs` at a
    time. The cloze task is rebuilt from the same text and seed, so reused rows were scored on the same questions."""
    reused = {}
    for path in args.reuse:
        for row in json.loads(Path(path).read_text())["rows"]:
            if "spec" in row:
                reused[Spec(**row["spec"]).key()] = row
    with tempfile.TemporaryDirectory() as folder:
        paragraphs = cloze_paragraphs(args.smoke, args.other_text_dir)
        task = build_cloze_task(paragraphs, Path(folder), TASK, 8 if args.smoke else args.questions)
        with ThreadPoolExecutor(args.jobs) as pool:  # child processes; rows stay in this order
            rows = list(pool.map(lambda s: reused.get(s.key()) or launch(s, task), specs))
    return rows, task


def compare(name: str, description: str, variants: dict[str, dict]) -> None:
    """A benchmark driver: the original model, then the main job with distillation (alpha 0.5) once for each variant
    (label -> `Spec` fields that differ from the defaults) and each seed; writes `results/<name>.json` with the rows,
    the variants and the mean of each."""
    p = parser(description)
    add_arguments(p)
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--num-stages", type=int, default=10)
    p.add_argument("--variants", nargs="+", choices=list(variants), default=list(variants), help="Run only these.")
    args = p.parse_args()
    if args.smoke:
        args.seeds, args.max_steps, args.num_stages = args.seeds[:1], 8, 2
    variants = {label: variants[label] for label in args.variants}
    specs = [spec(args, "original", args.seeds[0], args.num_stages, args.max_steps)]
    specs += [dataclasses.replace(spec(args, "0.5", seed, args.num_stages, args.max_steps), **fields)
              for seed in args.seeds for fields in variants.values()]  # fmt: skip
    rows, task = run_all(args, specs)
    summary = {}
    for label in variants:
        chosen = variant_rows(rows[1:], variants, label)
        summary[label] = {
            key: statistics.mean(r[key] for r in chosen)
            for key in ("ppl_in_domain", "ppl_other_source", "train_seconds", "rss_peak_train_bytes")
        }
        summary[label]["cloze"] = statistics.mean(r["cloze"]["acc"] for r in chosen)
    write(name, args, {
        "model": rows[0]["model"], "target_ratio": 0.7, "steps": args.max_steps, "stages": args.num_stages,
        "batch": f"{specs[0].batch_size} x {specs[0].seq_len} tokens", "seeds": args.seeds, "distill_alpha": 0.5,
        "eval_tokens": specs[0].eval_blocks * specs[0].seq_len, "variants": variants,
        "cloze": {"questions": task.num_questions, "choices": task.num_choices},
        "rows": rows, "summary": summary,
    })  # fmt: skip


def variant_rows(rows: list[dict], variants: dict[str, dict], label: str) -> list[dict]:
    """The rows of variant `label`: every field any variant sets has the value `label` gives it, or its `Spec`
    default (a field a row's spec lacks has its default too)."""
    default = Spec(method="0.5")
    fields = {k: variants[label].get(k, getattr(default, k)) for v in variants.values() for k in v}
    return [r for r in rows if all(getattr(Spec(**r["spec"]), k) == v for k, v in fields.items())]


def main() -> None:
    p = argparse.ArgumentParser(description="One run of the main job (used by the benchmark drivers).")
    p.add_argument("--spec", required=True)
    p.add_argument("--task-dir", type=Path, required=True)
    p.add_argument("--run-out", type=Path, required=True)
    args = p.parse_args()
    row = one_run(Spec(**json.loads(args.spec)), ClozeTask.load(args.task_dir, TASK))
    args.run_out.write_text(json.dumps(row))


if __name__ == "__main__":
    main()
