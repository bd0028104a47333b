"""Prune-event memory: peak resident memory (RSS) of one prune event above the loaded model, and its time.

Rows: one-shot `prune_model` (one inner step; peak memory is per forward/backward pass, so a small calibration sample
measures it) on SmolLM2-135M and on randomly initialized models with the shapes of SmolLM2-360M, Qwen2.5-0.5B and
Llama-3.2-1B, in float32 and bfloat16; one callback event (importance from the Trainer's gradients, the default) on
top of a short Trainer run's own memory. Each row runs in a fresh process; the peak is the kernel's high-water mark
(VmHWM, reset through /proc/self/clear_refs just before the event), so no sampling misses a spike. Then a fitted line
bytes = a * params + b * tokens (tokens of one forward/backward pass), and a projection to 8B and 70B shapes.

    OMP_NUM_THREADS=1 python benchmarks/prune_memory.py [--smoke] [--rows smollm2-135m:float32,...]

A row is `model:dtype[:tokens per pass][:samples=N][:recompute]`: `samples=N` calibration sequences instead of 2,
`recompute` with `calibration_checkpointing="on"` (else `"off"`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import TEXT_DIR, load_model, parser, text_blocks, write

from hf_adapt_pruner.reconstruction import gram_bytes


# Shapes from the models' config.json files on the Hub (written here: nothing is downloaded).
SHAPES = {
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         head_dim=64),
}  # fmt: skip
# Projected shapes (Llama-3.1-8B, Llama-3.1-70B): layers, hidden, intermediate, heads, kv heads, vocab.
PROJECTED = {"8B": (32, 4096, 14336, 32, 8, 128256), "70B": (80, 8192, 28672, 64, 8, 128256)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ONE_SHOT_ROWS = [f"{m}:{d}" for m in ("smollm2-135m", *SHAPES) for d in DTYPES] + [
    f"smollm2-135m:{d}:512" for d in DTYPES
]
# The layers' activations recomputed in the backward pass (calibration_checkpointing), and the default calibration
# sample of 16 sequences (the peak depends on where a pass's activations land among the heap's free pages).
RECOMPUTE_ROWS = [f"{m}:float32:recompute" for m in ("smollm2-135m", *SHAPES)] + [
    f"smollm2-135m:float32:samples=16{flag}" for flag in ("", ":recompute")
]
CALLBACK_ROWS = ["callback:smollm2-135m:float32"]
SAMPLES = 2  # calibration sequences per event: two forward/backward passes of one sequence each


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def status_meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def estimated_weight_bytes(row: str) -> int:
    """Weights of a row's model from its shape (SmolLM2-135M: 134.5 M parameters)."""
    name, dtype = row.removeprefix("callback:").split(":")[:2]
    if name not in SHAPES:
        return int(134.5e6) * DTYPES[dtype].itemsize
    s = SHAPES[name]
    head_dim = s.get("head_dim", s["hidden_size"] // s["num_attention_heads"])
    attention = 2 * s["hidden_size"] * head_dim * (s["num_attention_heads"] + s["num_key_value_heads"])
    layer = attention + 3 * s["hidden_size"] * s["intermediate_size"]
    return (s["num_hidden_layers"] * layer + s["vocab_size"] * s["hidden_size"]) * DTYPES[dtype].itemsize


def reset_peak() -> None:
    """Make VmHWM the current RSS (Linux >= 4.0), so it reports the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(name: str, dtype: torch.dtype, smoke: bool, seq_len: int):
    """(model, calibration blocks) for a row."""
    if smoke or name == "smollm2-135m":
        model, tokenizer, _ = load_model(smoke)
        calibration, _ = text_blocks(tokenizer, smoke, TEXT_DIR, seq_len, 16, 1)
        return model.to(dtype), calibration
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = torch.randint(0, config.vocab_size, (16, seq_len), generator=torch.Generator().manual_seed(0))
    return model, blocks


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def one_shot(row: str, smoke: bool) -> dict:
    from hf_adapt_pruner import PrunerConfig, count_parameters, prune_model

    name, dtype, *rest = row.split(":")
    seq_len = next((int(part) for part in rest if part.isdigit()), 128)
    samples = next((int(part.removeprefix("samples=")) for part in rest if part.startswith("samples=")), SAMPLES)
    recompute = "recompute" in rest
    model, calibration = build(name, DTYPES[dtype], smoke, seq_len)
    config = PrunerConfig(target_ratio=0.7, inner_steps=1, calibration_samples=samples, calibration_seq_len=seq_len,
                          calibration_checkpointing="on" if recompute else "off")  # fmt: skip
    params, weights = count_parameters(model), weight_bytes(model)
    before = status("VmRSS:")
    reset_peak()
    start = time.perf_counter()
    prune_model(model, config, calibration, progress=False)
    seconds = time.perf_counter() - start
    peak = status("VmHWM:") - before
    return {"row": row, "kind": "one-shot", "model": name, "dtype": dtype, "params": params,
            "weight_bytes": weights, "tokens_per_pass": config.calibration_micro_batch_size * seq_len,
            "calibration_samples": samples, "calibration_checkpointing": recompute,
            "peak_above_model_bytes": peak, "peak_over_weights": round(peak / weights, 3),
            "seconds": round(seconds, 1)}  # fmt: skip


def callback_event(row: str, smoke: bool) -> dict:
    """A 4-step Trainer run with one prune event after step 2: the Trainer's own peak above the loaded model (steps
    1-2, the importance window's statistics included), and the event's peak above the memory just before it."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_adapt_pruner import AdaptPrunerCallback, PrunerConfig, count_parameters

    _, name, dtype = row.split(":")
    model, blocks = build(name, DTYPES[dtype], smoke, 128)
    params, weights = count_parameters(model), weight_bytes(model)
    marks: dict[str, float] = {}

    class Loaded(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["loaded"] = status("VmRSS:")
            reset_peak()

    config = PrunerConfig(target_ratio=0.7, num_stages=1, importance_window=2, recovery_fraction=0.0)
    pruner = AdaptPrunerCallback(config)
    prune_event = pruner._prune  # the event itself, wherever the callback sits in the Trainer's list (it moves first)

    def measured_event(*args, **kwargs):
        marks["trainer_peak"], marks["before_event"] = status("VmHWM:"), status("VmRSS:")
        reset_peak()
        start = time.perf_counter()
        prune_event(*args, **kwargs)
        marks["event_peak"], marks["seconds"] = status("VmHWM:"), time.perf_counter() - start

    pruner._prune = measured_event
    data = [{"input_ids": b, "labels": b} for b in blocks]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=2, report_to=[],
                                 save_strategy="no", disable_tqdm=True, use_cpu=True)  # fmt: skip
        Trainer(model=model.train(), args=args, train_dataset=data, callbacks=[Loaded(), pruner]).train()
    if [s.step for s in pruner.schedule] != [2] or "event_peak" not in marks:
        raise RuntimeError(f"expected one prune event after step 2, got the schedule {pruner.schedule}")
    trainer = marks["trainer_peak"] - marks["loaded"]
    event = marks["event_peak"] - marks["before_event"]
    return {"row": row, "kind": "callback", "model": name, "dtype": dtype, "params": params,
            "weight_bytes": weights, "tokens_per_pass": 2 * 128, "trainer_peak_above_model_bytes": trainer,
            "trainer_peak_over_weights": round(trainer / weights, 3), "peak_above_model_bytes": event,
            "peak_over_weights": round(event / weights, 3), "seconds": round(marks["seconds"], 1)}  # fmt: skip


def fit(rows: list[dict]) -> dict | None:
    """Least squares bytes = a * params + b * tokens over the one-shot rows of one dtype at the default calibration
    settings (None if too few)."""
    rows = [r for r in rows if r["kind"] == "one-shot" and not r.get("calibration_checkpointing")
            and r.get("calibration_samples", SAMPLES) == SAMPLES]  # fmt: skip
    if len(rows) < 2 or len({r["tokens_per_pass"] for r in rows}) < 2:
        return None
    x = torch.tensor([[r["params"], r["tokens_per_pass"]] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["peak_above_model_bytes"] for r in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(x, y[:, None]).solution.flatten().tolist()
    residual = (x @ torch.tensor([a, b], dtype=torch.float64) - y).abs().max()
    return {"bytes_per_param": round(a, 3), "bytes_per_token": round(b), "max_residual_bytes": int(residual)}


def projection(line: dict, dtype_bytes: int) -> list[dict]:
    """Projected event peaks for 8B and 70B shapes from a fitted line, and the host memory of their Gram matrices."""
    rows = []
    for name, (layers, hidden, inter, heads, kv, vocab) in PROJECTED.items():
        head_dim = hidden // heads
        prunable = layers * (2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter)
        params = prunable + 2 * vocab * hidden  # untied embeddings and head, as these models have
        peak = line["bytes_per_param"] * params + line["bytes_per_token"] * 128
        grams = layers * (gram_bytes(inter) + gram_bytes(heads * head_dim))  # down_proj and o_proj inputs
        rows.append({"model": name, "params": params, "weight_bytes": params * dtype_bytes, "event_peak_bytes": peak,
                     "gradient_bytes": prunable * dtype_bytes, "gram_host_bytes": grams})  # fmt: skip
    return rows


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--rows", help="Comma-separated rows (default: all); e.g. smollm2-135m:float32.")
    p.add_argument("--row", help=argparse.SUPPRESS)  # set for the child process that measures one row
    args = p.parse_args()
    if args.row:  # a child process: one row, its JSON on the last line of stdout
        run = callback_event if args.row.startswith("callback:") else one_shot
        print(json.dumps(run(args.row, args.smoke)))
        return
    rows = args.rows.split(",") if args.rows else (["smollm2-135m:float32"] if args.smoke else
                                                    ONE_SHOT_ROWS + RECOMPUTE_ROWS + CALLBACK_ROWS)  # fmt: skip
    results = []
    for row in rows:
        need, available = 3.0 * estimated_weight_bytes(row), status_meminfo("MemAvailable:")  # weights + ~2x
        if need > available:  # leave the machine's other work alone rather than risk the OOM killer
            skipped = f"skipped: needs ~{need / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
            results.append({"row": row, "error": skipped})
            print(json.dumps(results[-1]), flush=True)
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--row", row] + (["--smoke"] if args.smoke else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append({"row": row, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    measured = [r for r in results if "error" not in r]
    lines = {d: fit([r for r in measured if r["dtype"] == d]) for d in DTYPES}
    projected = {d: projection(line, DTYPES[d].itemsize) for d, line in lines.items() if line is not None}
    write("prune_memory", args, {
        "setting": f"one inner step, {SAMPLES} calibration sequences, micro-batches of 1 sequence, target_ratio 0.7, "
                   "reconstruction on (defaults otherwise); OMP_NUM_THREADS=1",
        "rows": results, "fit": lines, "projection": projected,
    })  # fmt: skip


if __name__ == "__main__":
    main()
