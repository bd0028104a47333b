"""`hf-adapt-pruner`: command-line one-shot pruning and evaluation.

hf-adapt-pruner prune MODEL_DIR --target-ratio 0.7 --calibration TEXT_DIR --output OUT_DIR [--gguf-file F]
hf-adapt-pruner prune MODEL_DIR --target-ratio 0.7 --dataset NAME_OR_PATH [--split train] [--text-column text] ...
    [--dtype bfloat16] [--device auto]
hf-adapt-pruner eval MODEL_DIR --text TEXT_DIR [--blocks 32] [--seq-len 128] [--gguf-file F] [--dtype D] [--device D]
hf-adapt-pruner export MODEL_DIR --gguf OUT.gguf [--dtype f16]   (here --dtype is the GGUF tensor type)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging as logging_module
import os
import sys

import torch
from transformers.utils import logging

from .architectures import architecture_table
from .calibration import POOL_FACTOR, dataset_blocks
from .checks import resolve_device, vocabulary_size
from .config import PrunerConfig
from .data import check_token_ids, open_dataset, read_texts, split_files, text_files, token_blocks
from .evaluation import generate_sample, generation_speed, perplexity
from .gguf_export import GGUF_DTYPES, export_gguf
from .one_shot import checked_pruner, prune_model
from .pruner import count_parameters
from .serialization import load_for_pruning, save_pruned


TUNABLE = ("amplitude", "layer_importance", "group_importance", "attention_unit", "allocation", "inner_steps",
           "rescore_every", "round_to", "calibration_samples", "calibration_seq_len", "calibration_batch_size",
           "calibration_micro_batch_size", "calibration_checkpointing", "calibration_autocast", "min_heads",
           "min_kv_heads", "min_intermediate_size", "reconstruction", "reconstruction_damping", "seed",
           "layout")  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


def _add_load_arguments(p) -> None:
    """--dtype and --device of the commands that run the model (prune, eval)."""
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="Dtype the weights are loaded and run in; bfloat16 halves the memory (importance scores and "
                        "losses are still summed in float32). Saved weights keep this dtype.")  # fmt: skip
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="Where the model runs: auto takes cuda when available, else cpu.")  # fmt: skip


def _load(args: argparse.Namespace):
    """(model, tokenizer) as --gguf-file, --dtype and --device say; the device is checked first, in flag words."""
    device = resolve_device(args.device, option="--device")
    return load_for_pruning(args.model, gguf_file=args.gguf_file, dtype=DTYPES[args.dtype], device=device)


def _add_prune_parser(subparsers) -> None:
    p = subparsers.add_parser("prune", help="One-shot Adapt-Pruner on calibration text, then save_pruned.")
    p.add_argument("model", help="Model folder (safetensors, or a folder holding a GGUF file with --gguf-file).")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL (dequantized on load).")
    _add_load_arguments(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-ratio", type=float, help="Fraction of parameters to keep, e.g. 0.7.")
    target.add_argument("--target-params", type=int, help="Parameter count to keep.")
    _add_calibration_arguments(p)
    p.add_argument("--eval-blocks", type=int, default=32, help="Held-out blocks scored for perplexity (0: skip).")
    p.add_argument("--output", required=True, help="Folder to write the pruned model to.")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    p.add_argument("--prompt", default="What is a Python decorator?", help="Prompt for the generated sample.")
    fields = {f.name: f for f in dataclasses.fields(PrunerConfig)}
    for name in TUNABLE:
        f = fields[name]
        p.add_argument(f"--{name.replace('_', '-')}", type=type(f.default), default=f.default, help=f.metadata["help"])


def _add_calibration_arguments(p) -> None:
    """Where calibration (and held-out evaluation) text comes from: text files, or a dataset."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--calibration", help="A text file or a folder of .txt/.md/.rst files.")
    source.add_argument("--dataset", help="A dataset: a save_to_disk folder, a data file (.jsonl/.json/.parquet/.csv/"
                        ".txt), a folder of data files, or a Hub name (through datasets.load_dataset).")  # fmt: skip
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="Share of the text FILES held out for perplexity (never used for calibration).")  # fmt: skip
    p.add_argument("--dataset-config", help="Configuration of --dataset (load_dataset name=, e.g. wikitext-2-raw-v1).")
    p.add_argument("--split", default="train", help="Split of --dataset to calibrate on.")
    p.add_argument("--eval-split", help="Split of --dataset for held-out perplexity. Default: the first rows of "
                   "--split (as many as --eval-blocks need), calibration reading the rows after them.")  # fmt: skip
    p.add_argument("--text-column", default="text",
                   help="Column of --dataset with the text (a column input_ids is used instead, if any).")  # fmt: skip
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                   help="Read --dataset lazily, only the rows needed (--no-streaming prepares the whole split first; "
                        "save_to_disk folders are memory-mapped either way).")  # fmt: skip


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="Perplexity on a text file or folder, and generation speed.")
    p.add_argument("model", help="Model folder (pruned, stock, or holding a GGUF file with --gguf-file).")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL (dequantized on load).")
    _add_load_arguments(p)
    p.add_argument("--text", required=True, help="A text file or a folder of .txt/.md/.rst files.")
    p.add_argument("--blocks", type=int, default=32, help="Token blocks scored for perplexity.")
    p.add_argument("--seq-len", type=int, default=128, help="Tokens per block.")
    p.add_argument("--new-tokens", type=int, default=32, help="Tokens generated for the speed measurement (0: skip).")


def _add_export_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="Write a pruned model as a GGUF file for llama.cpp.")
    p.add_argument("model", help="Folder written by save_pruned (or any Llama-family checkpoint folder).")
    p.add_argument("--gguf", required=True, help="The .gguf file to write.")
    p.add_argument("--dtype", choices=GGUF_DTYPES, default="f16",
                   help="GGUF type of the 2-D weight tensors (not a loading dtype: the checkpoint is read in the "
                        "dtype it was saved in, on the CPU).")  # fmt: skip
    p.add_argument("--tokenizer-gguf", help="Copy the tokenizer from this GGUF file (default: convert MODEL's).")
    p.add_argument("--overwrite", action="store_true", help="Replace --gguf if it exists.")


def _export(args: argparse.Namespace) -> dict:
    if os.path.isfile(args.gguf) and not args.overwrite:  # say it in the command line's words
        raise FileExistsError(f"{args.gguf!r} already exists: pass --overwrite to replace it.")
    path = export_gguf(args.model, args.gguf, dtype=args.dtype, tokenizer=args.tokenizer_gguf,
                       overwrite=args.overwrite)  # fmt: skip
    return {"model": args.model, "gguf": str(path), "dtype": args.dtype, "bytes": path.stat().st_size}


def _tokens(model, tokenizer, args: argparse.Namespace, texts: list[str], seq_len: int, blocks: int, what: str):
    """Token blocks of `texts`, refused (naming the tokenizer) when the model cannot look their ids up."""
    ids = token_blocks(tokenizer, texts, seq_len, blocks)
    return _checked(model, tokenizer, args, ids, what)


def _checked(model, tokenizer, args: argparse.Namespace, ids, what: str):
    source = f"the tokenizer in {args.model!r}, {type(tokenizer).__name__} with {len(tokenizer)} tokens"
    check_token_ids(ids, vocabulary_size(model), what=what, source=source)
    return ids


def _eval(args: argparse.Namespace) -> dict:
    files = text_files(args.text)
    model, tokenizer = _load(args)
    blocks = _tokens(model, tokenizer, args, read_texts(files), args.seq_len, args.blocks, "the --text text")
    result = {
        "model": args.model,
        "parameters": count_parameters(model),
        "perplexity": perplexity(model, blocks, progress=True),
        "blocks": len(blocks),
        "seq_len": args.seq_len,
    }
    if args.new_tokens:
        result.update(generation_speed(model, blocks[:1, :32], new_tokens=args.new_tokens))
    return result


def _calibration_source(args: argparse.Namespace, config: PrunerConfig):
    """Finds the text files or opens the dataset now, so a missing one fails before the model loads; returns
    `read(model, tokenizer) -> (calibration blocks, held-out evaluation blocks or None)`."""
    if args.dataset is None:
        files = split_files(text_files(args.calibration), args.eval_fraction, seed=config.seed)
        return lambda model, tokenizer: _text_blocks(model, tokenizer, args, config, *files)
    if args.eval_split == args.split:
        raise ValueError(
            f"--eval-split {args.eval_split!r} is the calibration split too: name another one, or leave --eval-split "
            "out to hold out the first rows of --split."
        )
    rows = iter(open_dataset(args.dataset, args.dataset_config, args.split, args.streaming))
    eval_rows = rows
    if args.eval_split is not None:
        eval_rows = iter(open_dataset(args.dataset, args.dataset_config, args.eval_split, args.streaming))
    return lambda model, tokenizer: _dataset_blocks(model, tokenizer, args, config, rows, eval_rows)


def _text_blocks(model, tokenizer, args, config: PrunerConfig, calibration_files: list, eval_files: list):
    """Whole files are held out for evaluation (--eval-fraction)."""
    seq_len, max_blocks = config.calibration_seq_len, POOL_FACTOR * config.calibration_samples
    calibration = _tokens(model, tokenizer, args, read_texts(calibration_files), seq_len, max_blocks,
                          "the --calibration text")  # fmt: skip
    evaluation = None
    if args.eval_blocks:
        evaluation = _tokens(model, tokenizer, args, read_texts(eval_files), seq_len, args.eval_blocks,
                             "the held-out evaluation text")  # fmt: skip
    return calibration, evaluation


def _dataset_blocks(model, tokenizer, args, config: PrunerConfig, rows, eval_rows):
    """Evaluation reads first: from --eval-split, or else the first rows of --split, calibration then reading the rows
    after them, so the two never share a row (and only the rows needed are read from a stream)."""

    def blocks(rows, n_blocks: int, what: str):
        ids = dataset_blocks(rows, tokenizer, config.calibration_seq_len, n_blocks, args.text_column)
        return _checked(model, tokenizer, args, ids, what)

    evaluation = None
    if args.eval_blocks:
        evaluation = blocks(eval_rows, args.eval_blocks, f"the held-out rows of --dataset {args.dataset!r}")
    first = next(rows, None)
    if first is None:
        raise ValueError(
            f"--dataset {args.dataset!r} (split {args.split!r}) has no rows left for calibration after the first "
            f"ones, held out for --eval-blocks {args.eval_blocks}: evaluate on another split (--eval-split), on fewer "
            "blocks, or not at all (--eval-blocks 0)."
        )
    rows = itertools.chain([first], rows)
    calibration = blocks(rows, POOL_FACTOR * config.calibration_samples, f"the rows of --dataset {args.dataset!r}")
    return calibration, evaluation


def _prune(args: argparse.Namespace) -> dict:
    config = PrunerConfig(target_ratio=args.target_ratio, target_params=args.target_params,
                          **{name: getattr(args, name) for name in TUNABLE})  # fmt: skip
    if os.path.exists(args.output) and not args.overwrite:  # fail before the expensive part
        raise FileExistsError(f"{args.output!r} already exists: pass --overwrite to replace it.")
    read_blocks = _calibration_source(args, config)  # a missing file or dataset fails before the model loads
    model, tokenizer = _load(args)
    checked_pruner(model, config)  # an unreachable target is refused before any text is read or scored
    calibration, evaluation = read_blocks(model, tokenizer)
    result = {"perplexity_before": perplexity(model, evaluation, progress=True) if evaluation is not None else None}
    report = prune_model(model, config, calibration)
    print(report.table())
    if evaluation is not None:
        result["perplexity_after"] = perplexity(model, evaluation, progress=True)
    result["sample"] = generate_sample(model, tokenizer, args.prompt)
    eval_results = {"held-out perplexity": round(result["perplexity_after"], 2)} if evaluation is not None else None
    save_pruned(model, args.output, tokenizer, overwrite=args.overwrite, pruner_config=config,
                eval_results=eval_results)  # fmt: skip
    result.update(params_before=report.params_before, params_after=report.params_after, output=args.output,
                  wall_time_s=round(report.wall_time_s, 1))  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-adapt-pruner", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_prune_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_export_parser(subparsers)
    subparsers.add_parser("architectures", help="Print the supported architectures as a Markdown table.")
    args = parser.parse_args(argv)
    if args.command == "architectures":
        print(architecture_table(), end="")
        return 0
    logger = logging.get_logger("hf_adapt_pruner")
    logger.setLevel("INFO")
    handler = logging_module.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    torch.manual_seed(0)
    try:
        result = {"prune": _prune, "eval": _eval, "export": _export}[args.command](args)
    except (ValueError, TypeError, OSError) as error:  # bad input: the message says what to change
        print(f"hf-adapt-pruner: error: {error}", file=sys.stderr)
        return 2
    finally:  # main() called in-process (tests, notebooks) must not leave a handler on a stream that may close
        logger.removeHandler(handler)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
