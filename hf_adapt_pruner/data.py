"""Calibration and evaluation text: read files and datasets, cut token blocks, sample batches."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")

# Token blocks, sequences, batch dicts, DataLoaders, Datasets, texts: the forms are in calibration.py.
CalibrationData = Union[torch.Tensor, Mapping[str, Any], Iterable[Any]]


def text_files(path: str | os.PathLike) -> list[Path]:
    """A text file, or every text file under a folder (recursively, sorted, so splits are reproducible)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"Calibration/evaluation text {str(path)!r} is neither a file nor a folder: pass a text file or a folder "
            f"of {', '.join(TEXT_SUFFIXES)} files."
        )
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise ValueError(
            f"No text files ({', '.join(TEXT_SUFFIXES)}) under {str(path)!r}: only files with these suffixes are "
            "read; point to another folder or rename the files."
        )
    return files


def read_texts(files: Sequence[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def split_files(files: Sequence[Path], eval_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split whole files into (calibration, evaluation) so the two never share text."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(
            f"eval_fraction={eval_fraction!r} is the share of text files held out for evaluation: use a value in "
            "(0, 1), e.g. 0.1."
        )
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed), device="cpu").tolist()
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
        raise ValueError(
            f"The text gives {len(stream)} tokens, fewer than one block of seq_len={seq_len}: give more text, or "
            "shorter blocks (seq_len; on the command line --calibration-seq-len / --seq-len)."
        )
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
                      ".text": "text", ".arrow": "arrow"}  # fmt: skip
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes (Dataset, DatasetDict)


def open_dataset(name_or_path: str, config_name: str | None = None, split: str = "train", streaming: bool = True):
    """The rows of one split, read lazily: a `save_to_disk` folder (`load_from_disk`, memory-mapped), a data file
    (by suffix: json/jsonl, parquet, csv, txt: one row per line, arrow), a folder of data files, or a dataset on the
    Hub (`load_dataset`; streamed unless `streaming=False`, so only the rows read are fetched)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "Reading a dataset needs the datasets package: pip install 'hf_adapt_pruner[train]' (or datasets)."
        ) from None
    path = Path(name_or_path).expanduser()
    saved = path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)
    if config_name is not None and (saved or path.is_file()):
        kind = "a save_to_disk folder" if saved else "a single data file"
        raise ValueError(f"{name_or_path!r} is {kind}, which has no configurations, so dataset_config="
                         f"{config_name!r} (--dataset-config) cannot apply: leave it out.")  # fmt: skip
    if saved:
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{name_or_path!r} holds the splits {list(loaded)}, not {split!r}: name one of them "
                                 "(--split / --eval-split).")  # fmt: skip
            loaded = loaded[split]
        return loaded
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{name_or_path!r} is not a data file datasets reads: use one of {', '.join(DATA_FILE_BUILDERS)}, or "
                "a folder (save_to_disk, or data files)."
            )
        if split != "train":
            raise ValueError(
                f"{name_or_path!r} is a single data file, so its only split is 'train', not {split!r}: put the splits "
                "in a folder as files named after them (train.jsonl, validation.jsonl), or leave --eval-split out."
            )
        return datasets.load_dataset(builder, data_files=str(path), split=split, streaming=streaming)
    if not path.is_dir() and _looks_local(name_or_path):
        raise FileNotFoundError(f"{name_or_path!r}: no such file or folder (a Hub dataset is named 'name' or "
                                "'owner/name').")  # fmt: skip
    return datasets.load_dataset(name_or_path, name=config_name, split=split, streaming=streaming)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix.lower() in DATA_FILE_BUILDERS


def check_token_ids(
    input_ids: torch.Tensor, vocab_size: int | None, what: str = "calibration_data", source: str | None = None
) -> None:
    """Refuse token blocks (N, T) a model cannot learn from: no sequences, fewer than 2 tokens each, or ids outside
    [0, vocab_size). `source` names where the ids came from (e.g. a tokenizer), for the message."""
    shape = tuple(input_ids.shape)
    if input_ids.numel() == 0 or input_ids.shape[0] == 0:
        raise ValueError(
            f"{what} has shape {shape}: there are no tokens to measure importance on. Pass at least one sequence of "
            "token ids, e.g. hf_adapt_pruner.data.token_blocks(tokenizer, texts, seq_len=128)."
        )
    if input_ids.shape[-1] < 2:
        raise ValueError(
            f"{what} has shape {shape}: sequences of length {input_ids.shape[-1]} give no next-token loss to score "
            "importance with. Use sequences of at least 2 tokens (e.g. seq_len=128)."
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    came_from = f" (made by {source})" if source else ""
    if low < 0:
        where = _position(input_ids == low)
        raise ValueError(
            f"{what} holds the negative token id {low} at {where}{came_from}; token ids are indices into the "
            "embedding, >= 0. -100 marks ignored labels, not inputs: pad input_ids with the tokenizer's pad_token_id "
            "and mark padding with attention_mask = 0."
        )
    if vocab_size is not None and high >= vocab_size:
        where = _position(input_ids >= vocab_size)
        raise ValueError(
            f"{what} holds token id {high} at {where}{came_from}, but the model's vocabulary has {vocab_size} tokens "
            f"(embedding rows, ids 0 to {vocab_size - 1}). The ids come from another model's tokenizer, or from "
            "tokens added to the tokenizer without model.resize_token_embeddings(len(tokenizer)): tokenize with this "
            "model's own tokenizer (AutoTokenizer.from_pretrained(<the model's folder or repo>))."
        )


def _position(hits: torch.Tensor) -> str:
    index = hits.nonzero()[0].tolist()
    if len(index) == 2:
        return f"sequence {index[0]}, position {index[1]}"
    return f"position {index}"


def _check_batch(k: int, batch: Any, vocab_size: int | None) -> None:
    if not isinstance(batch, dict):
        raise ValueError(
            f"calibration_data[{k}] is a {type(batch).__name__}, but calibration_data[0] is a batch dict: make every "
            "entry a dict with 'input_ids' (and optionally 'attention_mask')."
        )
    ids = batch.get("input_ids")
    what = f"calibration_data[{k}]['input_ids']"
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        described = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(
            f"{what} must be an integer tensor of token ids, shape (B, T); got {described}. Every batch dict needs "
            "'input_ids' (and optionally an 'attention_mask' of the same shape)."
        )
    check_token_ids(ids, vocab_size, what)
    mask = batch.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"calibration_data[{k}]['attention_mask'] has shape {shape} but input_ids has {tuple(ids.shape)}: give "
            "one mask entry per token (1 = token, 0 = padding), or leave the mask out."
        )


class CalibrationPool:
    """Calibration sequences, resampled at every inner step (as the paper's code does).

    Accepts a LongTensor of shape (N, T), a list of token-id lists of equal length, or a list of ready batches
    (dicts with `input_ids` and optionally `attention_mask`), which are used as they are: when they hold more than
    `num_samples` sequences, whole batches are drawn at random until `num_samples` are covered. Other forms (text,
    ragged sequences, Datasets, DataLoaders) go through `hf_adapt_pruner.calibration.calibration_blocks` first.
    """

    def __init__(
        self, data: CalibrationData, num_samples: int, batch_size: int, seed: int, vocab_size: int | None = None
    ):
        """`vocab_size`: the model's embedding rows (`checks.vocabulary_size(model)`); ids outside are refused."""
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.blocks: torch.Tensor | None = None
        self.batches: list[dict[str, torch.Tensor]] | None = None
        if isinstance(data, torch.Tensor):
            if data.dim() != 2 or data.dtype not in (torch.long, torch.int):
                raise ValueError(
                    f"calibration_data tensor must be integer token ids of shape (N, T), got {data.dtype} "
                    f"{tuple(data.shape)}. hf_adapt_pruner.data.token_blocks(tokenizer, texts, seq_len) builds it "
                    "from text; a single sequence needs .unsqueeze(0)."
                )
            self.blocks = data.long()
        elif isinstance(data, Sequence) and data and isinstance(data[0], dict):
            self.batches = list(data)
        elif isinstance(data, Sequence) and not isinstance(data, str) and data:
            try:
                self.blocks = torch.tensor([list(seq) for seq in data], dtype=torch.long)
            except (ValueError, TypeError) as error:
                raise ValueError(
                    "calibration_data as a list must hold token-id lists of equal length (or batch dicts); "
                    f"building a tensor failed: {error}. hf_adapt_pruner.calibration_blocks(data, tokenizer) packs "
                    "sequences of different lengths (prune_model and the callback call it for you)."
                ) from None
        else:
            raise ValueError(
                "calibration_data must be a LongTensor (N, T), a non-empty list of token-id lists, or a list of batch "
                f"dicts; got {type(data).__name__}. hf_adapt_pruner.data.token_blocks(tokenizer, texts, seq_len) "
                "builds the tensor from text."
            )
        if self.blocks is not None:
            check_token_ids(self.blocks, vocab_size)
        for k, batch in enumerate(self.batches or []):
            _check_batch(k, batch, vocab_size)

    def sample(self) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one inner step."""
        if self.batches is not None:
            yield from self._sample_batches()
            return
        n = self.blocks.shape[0]
        if n > self.num_samples:
            chosen = torch.randperm(n, generator=self.generator, device="cpu")[: self.num_samples]
        else:
            chosen = torch.arange(n)
        for start in range(0, len(chosen), self.batch_size):
            yield {"input_ids": self.blocks[chosen[start : start + self.batch_size]]}

    def _sample_batches(self) -> list[dict[str, torch.Tensor]]:
        sizes = [len(batch["input_ids"]) for batch in self.batches]
        if sum(sizes) <= self.num_samples:
            return self.batches
        chosen, covered = [], 0
        for i in torch.randperm(len(self.batches), generator=self.generator, device="cpu").tolist():
            chosen.append(self.batches[i])
            covered += sizes[i]
            if covered >= self.num_samples:
                break
        return chosen
