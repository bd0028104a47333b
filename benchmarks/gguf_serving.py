"""Serving pruned models with llama.cpp: GGUF export of SmolLM2-135M pruned to keep 0.8 and 0.6, run through
llama-cpp-python. Reports generation tokens/s against the unpruned model at the same quantization (and the parameter
ratio), fidelity of the f32 export (top-1 agreement, max |logit diff| against transformers on the same weights), and
held-out perplexity of the f16 / q8_0 exports against the transformers model. Prints and writes JSON.

    python benchmarks/gguf_serving.py [--smoke] [--ratios 0.8 0.6] [--layouts adaptive] [--new-tokens 64] [--repeats 3]

`--layouts adaptive uniform` prunes each ratio with both layouts (`PrunerConfig.layout`): the uniform model is an
ordinary `llama` GGUF, the adaptive one llama.cpp's `deci` graph with per-layer widths.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import load_model, parser, text_blocks, write

from hf_adapt_pruner import PrunerConfig, count_parameters, export_gguf, prune_model
from hf_adapt_pruner.evaluation import perplexity


def llama(path: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, verbose=False, seed=0)


def cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def cpp_perplexity(llm, blocks: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for block in blocks.tolist():
        logits = cpp_logits(llm, block)[:-1]
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= log_probs[np.arange(len(block) - 1), block[1:]].sum()
        count += len(block) - 1
    return float(np.exp(nll / count))


def tokens_per_second(llm, prompt: list[int], new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        for generated, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True), start=1):
            if generated == new_tokens:
                break
        times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--layouts", nargs="+", default=["adaptive"], choices=["adaptive", "uniform"])
    args = p.parse_args()
    torch.manual_seed(0)
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import BPE_VOCAB, bpe_tokenizer, tiny_model

        model, tokenizer, name = tiny_model("llama", vocab_size=BPE_VOCAB), bpe_tokenizer(), "tiny-random-llama"
        source = tokenizer
        args.ratios, args.new_tokens, args.repeats, args.eval_blocks = [0.6], 8, 1, 2
    else:
        model, tokenizer, name = load_model(False)
        source = model._hf_adapt_pruner_gguf_source  # copy SmolLM2's own tokenizer metadata
    seq_len = 32 if args.smoke else 128
    calibration, evaluation = text_blocks(tokenizer, args.smoke, args.text_dir, seq_len, 64, args.eval_blocks + 1)
    prompt, evaluation = evaluation[0].tolist(), evaluation[1:]
    models = {(1.0, "original"): model}
    for ratio in args.ratios:
        for layout in args.layouts:
            models[ratio, layout] = copy.deepcopy(model)
            config = PrunerConfig(target_ratio=ratio, inner_steps=3, calibration_samples=8,
                                  calibration_seq_len=seq_len, layout=layout)  # fmt: skip
            prune_model(models[ratio, layout], config, calibration, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for (ratio, layout), pruned in models.items():
            row = {"keep": ratio, "layout": layout, "params": count_parameters(pruned),
                   "hf_perplexity": perplexity(pruned, evaluation)}  # fmt: skip
            path = export_gguf(pruned, Path(tmp) / f"{ratio}-{layout}-f32.gguf", dtype="f32", tokenizer=source)
            with torch.no_grad():
                expected = pruned(torch.tensor([prompt])).logits[0].double().numpy()
            llm = llama(path, 2 * seq_len)
            actual = cpp_logits(llm, prompt)
            llm.close()
            row["f32_top1_agreement"] = float((actual.argmax(-1) == expected.argmax(-1)).mean())
            row["f32_max_abs_logit_diff"] = float(np.abs(actual - expected).max())
            for dtype in ("f16", "q8_0"):
                path = export_gguf(pruned, Path(tmp) / f"{ratio}-{layout}-{dtype}.gguf", dtype=dtype, tokenizer=source)
                llm = llama(path, 2 * seq_len)
                row[f"{dtype}_bytes"] = path.stat().st_size
                row[f"{dtype}_perplexity"] = cpp_perplexity(llm, evaluation)
                row[f"{dtype}_tokens_per_s"] = tokens_per_second(llm, prompt[:16], args.new_tokens, args.repeats)
                llm.close()
            rows.append(row)
            print(row, flush=True)
    base = rows[0]
    for row in rows:
        row["param_ratio"] = row["params"] / base["params"]
        for dtype in ("f16", "q8_0"):
            row[f"{dtype}_speedup"] = row[f"{dtype}_tokens_per_s"] / base[f"{dtype}_tokens_per_s"]
    write("gguf_serving", args, {"model": name, "engine": "llama.cpp via llama-cpp-python, 2 threads",
                                 "new_tokens": args.new_tokens, "repeats": args.repeats,
                                 "eval_tokens": len(evaluation) * seq_len, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
