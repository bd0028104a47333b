"""Calibration and evaluation text: read files, cut token blocks, sample batches."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import torch


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")

CalibrationData = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[dict[str, torch.Tensor]]]


def text_files(path: str | os.PathLike) -> list[Path]:
    """A text file, or every text file under a folder (recursively, sorted, so splits are reproducible)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"Calibration/evaluation text {str(path)!r} is neither a file nor a folder.")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise ValueError(f"No text files ({', '.join(TEXT_SUFFIXES)}) under {str(path)!r}.")
    return files


def read_texts(files: Sequence[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def split_files(files: Sequence[Path], eval_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split whole files into (calibration, evaluation) so the two never share text."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction!r} must be in (0, 1).")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(len(files) * eval_fraction))
    evaluation = sorted(files[i] for i in order[:n_eval])
    calibration = sorted(files[i] for i in order[n_eval:])
    return calibration, evaluation


def token_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate `texts` (separated by EOS) and cut the token stream into (N, seq_len) blocks."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.extend(separator)
        if max_blocks is not None and len(stream) >= max_blocks * seq_len:
            break
    n_blocks = len(stream) // seq_len
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(f"The text gives {len(stream)} tokens, fewer than one block of seq_len={seq_len}.")
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


class CalibrationPool:
    """Calibration sequences, resampled at every inner step (as the paper's code does).

    Accepts a LongTensor of shape (N, T), a list of token-id lists of equal length, or a list of ready batches
    (dicts with `input_ids` and optionally `attention_mask`), which are used as they are, without resampling.
    """

    def __init__(self, data: CalibrationData, num_samples: int, batch_size: int, seed: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.blocks: torch.Tensor | None = None
        self.batches: list[dict[str, torch.Tensor]] | None = None
        if isinstance(data, torch.Tensor):
            if data.dim() != 2 or data.dtype not in (torch.long, torch.int):
                raise ValueError(
                    f"calibration_data tensor must be integer token ids of shape (N, T), got {data.dtype} "
                    f"{tuple(data.shape)}."
                )
            self.blocks = data.long()
        elif isinstance(data, Sequence) and data and isinstance(data[0], dict):
            if not all("input_ids" in batch for batch in data):
                raise ValueError("Every calibration batch dict needs an 'input_ids' tensor.")
            self.batches = list(data)
        elif isinstance(data, Sequence) and data:
            try:
                self.blocks = torch.tensor([list(seq) for seq in data], dtype=torch.long)
            except (ValueError, TypeError) as error:
                raise ValueError(
                    "calibration_data as a list must hold token-id lists of equal length (or batch dicts); "
                    f"building a tensor failed: {error}"
                ) from None
        else:
            raise ValueError(
                "calibration_data must be a LongTensor (N, T), a non-empty list of token-id lists, or a list of batch "
                f"dicts; got {type(data).__name__}. hf_adapt_pruner.data.token_blocks(tokenizer, texts, seq_len) "
                "builds the tensor from text."
            )

    def sample(self) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one inner step."""
        if self.batches is not None:
            yield from self.batches
            return
        n = self.blocks.shape[0]
        if n > self.num_samples:
            chosen = torch.randperm(n, generator=self.generator)[: self.num_samples]
        else:
            chosen = torch.arange(n)
        for start in range(0, len(chosen), self.batch_size):
            yield {"input_ids": self.blocks[chosen[start : start + self.batch_size]]}

    def num_batches(self) -> int:
        if self.batches is not None:
            return len(self.batches)
        n = min(self.blocks.shape[0], self.num_samples)
        return -(-n // self.batch_size)
