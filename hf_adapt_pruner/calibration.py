"""Calibration data in the forms users hold, turned into what `CalibrationPool` takes.

- a LongTensor (N, T): N sequences of T tokens, as they are;
- sequences: a list of 1-D / 2-D integer tensors or of token-id lists, a dict or `BatchEncoding` with `input_ids`,
  a `datasets.Dataset` (or any iterable of rows) with `input_ids`: padding (`attention_mask` 0) is dropped, then
  sequences of one length are used as they are and sequences of different lengths are packed;
- text: a list (or iterable) of strings, or a `datasets.Dataset` with a text column, with `tokenizer=`: tokenized
  and packed, as `token_blocks` does;
- batches: a list, `DataLoader` or other iterable of batch dicts (`input_ids` (B, T), optional `attention_mask`):
  used as given, with whole batches resampled; padding is masked out of the scores and the loss.

Packing concatenates the sequences (the tokenizer's EOS between them when a tokenizer is given) and cuts the stream
into `calibration_seq_len` blocks, the tail shorter than a block dropped: the paper's code does this, every token
counts, and the pool can resample equal blocks. Batches keep the user's padding: the scorer masks it (layer
similarity skips padded tokens, labels are -100 there, and each batch's loss is weighted by its real tokens).

Text, Datasets and iterables are read only as far as the pool needs (`max_blocks` blocks, or sequences of batches);
in-memory tensors and lists of token ids are used whole. `datasets` is imported by the caller, never here.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .data import CalibrationPool, token_blocks


POOL_FACTOR = 8  # the pool holds this many times calibration_samples blocks, resampled at every inner step
FORMS = (
    "calibration_data can be: a LongTensor (N, T) of token ids; a list of 1-D or 2-D integer tensors or of token-id "
    "lists (lengths may differ: they are packed); a dict or BatchEncoding with 'input_ids'; a list, DataLoader or "
    "other iterable of batch dicts with 'input_ids' (B, T) and optionally 'attention_mask'; a datasets.Dataset with "
    "an 'input_ids' or a text column; or a list of strings together with tokenizer=."
)


class MissingTokenizerError(ValueError):
    """Text came without a tokenizer (the callback waits for the Trainer's `processing_class` instead)."""


def calibration_blocks(
    data: Any, tokenizer: Any = None, seq_len: int = 128, max_blocks: int | None = None, text_column: str = "text"
) -> torch.Tensor | list[dict[str, torch.Tensor]]:
    """Token blocks (N, T), or a list of batch dicts, from calibration data in any supported form (module docstring).

    Args:
        data: the calibration data (see `FORMS`).
        tokenizer: needed for text; with token ids, its EOS separates packed sequences.
        seq_len: block length when packing (`PrunerConfig.calibration_seq_len`).
        max_blocks: read text, Datasets and iterables only until this many blocks (or sequences) are gathered.
        text_column: the column holding the text in a `datasets.Dataset` without `input_ids`.
    """
    if tokenizer is not None and (isinstance(tokenizer, str) or not callable(tokenizer)):
        raise TypeError(
            f"tokenizer={tokenizer!r} is a {type(tokenizer).__name__}, not a tokenizer: pass "
            f"AutoTokenizer.from_pretrained({tokenizer!r} or the model's folder)."
        )
    if isinstance(data, torch.Tensor):
        return _tensor_blocks(data)
    if isinstance(data, (str, bytes)):
        raise ValueError(
            f"calibration_data is a single {type(data).__name__} ({str(data)[:40]!r}...): pass a list of texts "
            "[text, ...] with tokenizer= (files: hf_adapt_pruner.data.read_texts(text_files(path)))."
        )
    reader = Reader(tokenizer, seq_len, max_blocks, text_column)
    if _is_hf(data, "DatasetDict", "IterableDatasetDict"):
        raise ValueError(f"calibration_data is a {type(data).__name__} with splits {list(data)}: pass one split, "
                         f"e.g. data[{next(iter(data), 'train')!r}].")  # fmt: skip
    if _is_hf(data, "Dataset", "IterableDataset"):
        return reader.rows(iter(data))
    if isinstance(data, Mapping):
        return reader.mapping(data)
    if isinstance(data, (set, frozenset)):
        raise ValueError(f"calibration_data is a {type(data).__name__}, which has no order: pass a list. {FORMS}")
    if isinstance(data, Sequence):
        if not data:
            raise ValueError(f"calibration_data is an empty {type(data).__name__}. {FORMS}")
        return Reader(tokenizer, seq_len, max_blocks, text_column, whole=True).items(iter(data), data[0])
    if isinstance(data, Iterable):
        items = _collated(iter(data))
        first = next(items, _END)
        if first is _END:
            raise ValueError(f"calibration_data ({type(data).__name__}) yielded nothing. {FORMS}")
        return reader.items(itertools.chain([first], items), first)
    raise ValueError(f"calibration_data is a {type(data).__name__}. {FORMS}")


def calibration_pool(
    data: Any, config: Any, vocab_size: int | None = None, tokenizer: Any = None, seed: int | None = None
) -> CalibrationPool:
    """The pool a scorer samples from, for data in any form and a `PrunerConfig`."""
    blocks = calibration_blocks(data, tokenizer, config.calibration_seq_len, POOL_FACTOR * config.calibration_samples)
    seed = config.seed if seed is None else seed
    return CalibrationPool(blocks, config.calibration_samples, config.calibration_batch_size, seed, vocab_size)


def prepared_calibration(data: Any, config: Any, tokenizer: Any = None) -> tuple[Any, bool]:
    """`(data, waits)`: the data read once into blocks or batches (a DataLoader or a generator can be read only once).
    Text without a tokenizer is returned as it is with `waits=True` (the callback then takes the Trainer's
    `processing_class`), unless it is an iterator whose first rows are already gone."""
    try:
        pool_size = POOL_FACTOR * config.calibration_samples
        return calibration_blocks(data, tokenizer, config.calibration_seq_len, pool_size), False
    except MissingTokenizerError:
        if iter(data) is data:
            raise
        return data, True


def dataset_blocks(rows: Iterable[Mapping], tokenizer: Any, seq_len: int, max_blocks: int | None, text_column: str):
    """Blocks (N, T) from dataset rows with `input_ids` or a text column, reading only the rows needed (the rest of an
    iterator stays unread, e.g. for evaluation)."""
    return Reader(tokenizer, seq_len, max_blocks, text_column).rows(iter(rows))


def pack_sequences(rows: Iterable[torch.Tensor], seq_len: int, eos: int | None, max_blocks: int | None = None):
    """Concatenate 1-D token sequences (EOS between them unless one already ends with it), cut into (N, seq_len)."""
    pieces: list[torch.Tensor] = []
    for row in rows:
        if not row.numel():
            continue
        pieces.append(row)
        if eos is not None and int(row[-1]) != eos:
            pieces.append(torch.tensor([eos], device=row.device))
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    n_blocks = len(stream) // seq_len if max_blocks is None else min(len(stream) // seq_len, max_blocks)
    if n_blocks == 0:
        raise ValueError(
            f"The sequences of different lengths are packed into blocks of calibration_seq_len={seq_len} tokens, but "
            f"they hold {len(stream)} tokens, fewer than one block: give more, or lower calibration_seq_len (on the "
            "command line --calibration-seq-len)."
        )
    return stream[: n_blocks * seq_len].view(n_blocks, seq_len)


# ---------------------------------------------------------------------------------------------------------------
_END = object()


def _is_hf(data: Any, *names: str) -> bool:
    """A `datasets` object, checked without importing `datasets` (whoever built one has imported it)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(data, tuple(getattr(module, name) for name in names))


def _collated(items: Iterator) -> Iterator:
    """`items`, with default_collate's failure on rows of different lengths explained."""
    try:
        yield from items
    except RuntimeError as error:
        if "equal size" not in str(error):
            raise
        raise ValueError(
            f"The DataLoader could not batch calibration rows of different lengths ({error}): pad them in the "
            "collator (DataLoader(..., collate_fn=DataCollatorWithPadding(tokenizer))), or pass the dataset itself "
            "(sequences of different lengths are packed)."
        ) from None


def _ndim(x: Any) -> int:
    if hasattr(x, "ndim"):
        return int(x.ndim)
    if isinstance(x, (list, tuple)):
        return 1 + _ndim(x[0]) if x else 1
    return 0


def _int_tensor(x: Any, where: str) -> torch.Tensor:
    """Token ids (or a mask) as a LongTensor; floats, booleans and strings are refused."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"{where} is not a sequence of integer token ids ({error}). {FORMS}") from None
    if x.numel() == 0:
        return x.long()
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{where} holds {x.dtype} values, not integer token ids {tuple(x.shape)}. {FORMS}")
    return x.long()


def _tensor_blocks(data: torch.Tensor) -> torch.Tensor:
    if data.dim() != 2 or data.dtype not in (torch.long, torch.int):
        fix = " A single sequence needs .unsqueeze(0)." if data.dim() == 1 else ""
        raise ValueError(
            f"calibration_data tensor must be integer token ids of shape (N, T), got {data.dtype} "
            f"{tuple(data.shape)}.{fix} hf_adapt_pruner.data.token_blocks(tokenizer, texts, seq_len) builds it from "
            f"text. {FORMS}"
        )
    return data.long()


class Reader:
    """Reads one form into blocks. Text is tokenized only up to `max_blocks` blocks; token ids and batches are read
    up to `max_blocks` sequences too, unless `whole` (an in-memory list: used as given, like a tensor)."""

    def __init__(self, tokenizer, seq_len: int, max_blocks: int | None, text_column: str, whole: bool = False):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.text_max = max_blocks
        self.max_blocks = None if whole else max_blocks
        self.text_column = text_column
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def items(self, items: Iterator, first: Any):
        """Entries of a list or an iterable, all of the kind of `first`."""
        if isinstance(first, str):
            return self.texts(items)
        if isinstance(first, (list, tuple)) and first and isinstance(first[0], str):  # a DataLoader over texts
            return self.texts(text for batch in items for text in batch)
        if isinstance(first, Mapping):
            return self.batches(items) if _ndim(first.get("input_ids", [])) >= 2 else self.rows(items)
        if isinstance(first, torch.Tensor) or _ndim(first) >= 1:
            return self.sequences(_int_tensor(item, f"calibration_data[{k}]") for k, item in enumerate(items))
        raise ValueError(f"calibration_data[0] is a {type(first).__name__} ({first!r:.40}). {FORMS}")

    def texts(self, texts: Iterable[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise MissingTokenizerError(
                "calibration_data holds text, and no tokenizer was given to turn it into token ids: pass the model's "
                "tokenizer, prune_model(model, config, texts, tokenizer=AutoTokenizer.from_pretrained(<the model>)) "
                "or AdaptPrunerCallback(config, calibration_data=texts, tokenizer=tokenizer)."
            )
        texts = (_checked_text(k, text) for k, text in enumerate(texts))
        return token_blocks(self.tokenizer, texts, self.seq_len, self.text_max)

    def mapping(self, data: Mapping) -> torch.Tensor:
        """A dict of columns (`tokenizer(texts)`): its rows are sequences."""
        if "input_ids" not in data:
            raise ValueError(f"calibration_data is a {type(data).__name__} with keys {list(data)[:8]}, but no "
                             f"'input_ids'. {FORMS}")  # fmt: skip
        ids, mask = data["input_ids"], data.get("attention_mask")
        if _ndim(ids) == 1:  # one sequence
            ids, mask = [ids], None if mask is None else [mask]
        masks = mask if mask is not None else itertools.repeat(None)
        return self.sequences(self._row(k, i, m) for k, (i, m) in enumerate(zip(ids, masks)))

    def rows(self, rows: Iterator[Mapping]) -> torch.Tensor:
        """Dataset rows: `input_ids` (and `attention_mask`), or text in `text_column`."""
        rows = iter(rows)
        first = next(rows, _END)
        if first is _END:
            raise ValueError(f"The calibration dataset has no rows. {FORMS}")
        rows = (_checked_row(k, row) for k, row in enumerate(itertools.chain([first], rows)))
        if "input_ids" in first:
            return self.sequences(self._row(k, row.get("input_ids"), row.get("attention_mask"))
                                  for k, row in enumerate(rows))  # fmt: skip
        if isinstance(first.get(self.text_column), str):
            return self.texts(row[self.text_column] for row in rows)
        raise ValueError(
            f"The calibration rows have columns {list(first)}, but neither 'input_ids' nor a text column "
            f"{self.text_column!r}: name the text column (text_column=...; on the command line --text-column), or "
            "tokenize the rows into 'input_ids'."
        )

    def _row(self, k: int, ids: Any, mask: Any) -> torch.Tensor:
        row = _int_tensor(ids, f"calibration row {k} 'input_ids'")
        if row.dim() != 1:
            raise ValueError(f"calibration row {k} 'input_ids' has shape {tuple(row.shape)}; a row is one sequence "
                             f"(1-D). {FORMS}")  # fmt: skip
        if mask is not None:
            mask = _batch_tensor(mask, f"calibration row {k} 'attention_mask'", mask=True)
            if mask.shape != row.shape:
                raise ValueError(f"calibration row {k}: 'attention_mask' has shape {tuple(mask.shape)} but "
                                 f"'input_ids' has {tuple(row.shape)}: give one mask entry per token.")  # fmt: skip
            row = row[mask.to(row.device).bool()]  # padding dropped: the sequence is what remains
        return row

    def sequences(self, items: Iterable[torch.Tensor]) -> torch.Tensor:
        """1-D or 2-D id tensors: rows of one length as they are, rows of different lengths packed."""
        rows: list[torch.Tensor] = []
        tokens = 0
        for k, item in enumerate(items):
            if item.dim() not in (1, 2):
                raise ValueError(f"calibration_data[{k}] has shape {tuple(item.shape)}: sequences are 1-D (T,) or "
                                 f"2-D (B, T). {FORMS}")  # fmt: skip
            for row in item.unbind(0) if item.dim() == 2 else [item]:
                if row.numel():
                    rows.append(row)
                    tokens += row.numel()
            if self.max_blocks is not None and min(len(rows), tokens // self.seq_len) >= self.max_blocks:
                break  # enough for max_blocks blocks, whether the rows are stacked or packed
        if len({row.numel() for row in rows}) <= 1:
            blocks = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.long)
            return blocks if self.max_blocks is None else blocks[: self.max_blocks]
        return pack_sequences(rows, self.seq_len, self.eos, self.max_blocks)

    def batches(self, items: Iterator[Mapping]) -> list[dict[str, torch.Tensor]]:
        batches: list[dict[str, torch.Tensor]] = []
        sequences = 0
        for k, batch in enumerate(items):
            batches.append(_as_batch(k, batch))
            sequences += len(batches[-1]["input_ids"])
            if self.max_blocks is not None and sequences >= self.max_blocks:
                break
        return batches


def _checked_row(k: int, row: Any) -> Mapping:
    if not isinstance(row, Mapping):
        raise ValueError(f"calibration row {k} is a {type(row).__name__}, but row 0 is a dict: make every row a dict "
                         f"with 'input_ids' or the text column. {FORMS}")  # fmt: skip
    return row


def _checked_text(k: int, text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"calibration_data[{k}] is a {type(text).__name__}, but the entries before it are text: "
                         f"make every entry a string. {FORMS}")  # fmt: skip
    return text


def _batch_tensor(value: Any, where: str, mask: bool = False) -> torch.Tensor:
    """A collated field as a (B, T) tensor (a row's mask: (T,)). default_collate turns a field of equal-length lists
    into a list of T tensors of shape (B,) (one per position), which is stacked back along dim 1; lists of lists are
    rows."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in value):
        value = torch.stack(list(value), dim=1)
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (ValueError, TypeError, RuntimeError) as error:
            if _ndim(value) != 2:
                raise ValueError(f"{where} is not a (B, T) array of token ids ({error}). {FORMS}") from None
            raise ValueError(
                f"{where} holds rows of different lengths: pad them in the collator (DataCollatorWithPadding"
                "(tokenizer)), or pass the rows unbatched (sequences of different lengths are packed)."
            ) from None
    return (value != 0).long() if mask else _int_tensor(value, where)  # masks may come as bool or float


def _as_batch(k: int, batch: Any) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"calibration_data[{k}] is a {type(batch).__name__}, but calibration_data[0] is a batch dict: make every "
            "entry a dict with 'input_ids' (and optionally 'attention_mask')."
        )
    if "input_ids" not in batch:
        raise ValueError(f"calibration batch {k} has keys {list(batch)[:8]}, but no 'input_ids'. {FORMS}")
    where = f"calibration_data[{k}]"
    out = {"input_ids": _batch_tensor(batch["input_ids"], f"{where}['input_ids']")}
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = _batch_tensor(batch["attention_mask"], f"{where}['attention_mask']", mask=True)
    return out
