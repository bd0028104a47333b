"""Calibration data in every form users hold: equivalent forms prune to the same weights, ragged sequences are packed,
batches keep their padding (which the scores ignore), text needs a tokenizer, and a form that cannot work is refused
with the forms that do. The command line reads datasets from local json, parquet, text and save_to_disk folders."""

from __future__ import annotations

import json
from unittest import mock

import datasets
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from hf_adapt_pruner import (
    AdaptivePruner,
    AdaptPrunerCallback,
    CalibrationPool,
    CalibrationScorer,
    PrunerConfig,
    calibration_blocks,
    prune_model,
    token_blocks,
)
from hf_adapt_pruner.cli import main

from tiny_models import MODEL_TYPES, VOCAB, tiny_model, tiny_tokenizer


SEQ_LEN = 16
CONFIG = PrunerConfig(target_ratio=0.7, inner_steps=2, calibration_samples=8, calibration_seq_len=SEQ_LEN, round_to=1)
TOKENIZER = tiny_tokenizer()  # word-level: "w5 w9" -> [5, 9]; EOS is 2
BLOCKS = torch.randint(3, VOCAB, (12, SEQ_LEN), generator=torch.Generator().manual_seed(1))
RAGGED = [BLOCKS[i, : 5 + i] for i in range(12)]  # 5 .. 16 tokens: 126 tokens, 7 blocks of 16 when packed


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two (conftest's) are ~20x slower while other jobs load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_of(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def pruned(data, **kwargs) -> dict[str, torch.Tensor]:
    model = tiny_model("llama", gqa_ratio=3)
    before = sum(p.numel() for p in model.parameters())
    prune_model(model, CONFIG, data, progress=False, **kwargs)
    after = sum(p.numel() for p in model.parameters())
    assert abs(after / before - CONFIG.target_ratio) < 0.01
    return model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape and torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return pruned(BLOCKS)


# --- equivalent forms give the same pruned model -----------------------------------------------------------------
EQUAL_LENGTH_FORMS = {
    "list of 1-D tensors": lambda: list(BLOCKS),
    "list of 2-D tensors": lambda: [BLOCKS[:5], BLOCKS[5:6], BLOCKS[6:]],
    "list of token lists": lambda: BLOCKS.tolist(),
    "dict of input_ids": lambda: {"input_ids": BLOCKS, "attention_mask": torch.ones_like(BLOCKS)},
    "BatchEncoding": lambda: TOKENIZER([text_of(row) for row in BLOCKS], add_special_tokens=False),
    "Dataset with input_ids": lambda: datasets.Dataset.from_dict({"input_ids": BLOCKS.tolist()}),
    "IterableDataset with input_ids": lambda: datasets.Dataset.from_dict(
        {"input_ids": BLOCKS.tolist()}
    ).to_iterable_dataset(),
    "generator of token lists": lambda: (row.tolist() for row in BLOCKS),
}


@pytest.mark.parametrize("form", list(EQUAL_LENGTH_FORMS))
def test_equal_length_forms_prune_like_the_tensor(form, reference):
    assert_same_weights(pruned(EQUAL_LENGTH_FORMS[form]()), reference)


def test_texts_with_a_tokenizer_prune_like_their_token_blocks():
    texts = [text_of(row) for row in RAGGED]
    expected = token_blocks(TOKENIZER, texts, SEQ_LEN)
    assert torch.equal(calibration_blocks(texts, TOKENIZER, SEQ_LEN), expected)
    reference = pruned(expected)
    assert_same_weights(pruned(texts, tokenizer=TOKENIZER), reference)
    assert_same_weights(pruned(datasets.Dataset.from_dict({"text": texts, "n": list(range(12))}),
                               tokenizer=TOKENIZER), reference)  # fmt: skip
    # the same sequences as token ids are packed with the tokenizer's EOS between them, as the text is
    assert_same_weights(pruned([row.tolist() for row in RAGGED], tokenizer=TOKENIZER), reference)


def test_ragged_sequences_are_packed_into_blocks():
    packed = calibration_blocks(RAGGED, seq_len=SEQ_LEN)  # without a tokenizer: no separator
    assert packed.shape == (7, SEQ_LEN) and torch.equal(packed.flatten(), torch.cat(RAGGED)[: 7 * SEQ_LEN])
    with_eos = calibration_blocks(RAGGED, TOKENIZER, seq_len=SEQ_LEN)
    assert torch.equal(with_eos.flatten()[:6], torch.cat([RAGGED[0], torch.tensor([2])]))
    reference = pruned(packed)
    padded = torch.zeros(12, SEQ_LEN, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, row in enumerate(RAGGED):
        padded[i, : len(row)], mask[i, : len(row)] = row, 1
    for form in (RAGGED, [row.tolist() for row in RAGGED],  # padding of a dict's rows is dropped, then packed
                 datasets.Dataset.from_dict({"input_ids": [row.tolist() for row in RAGGED]}),
                 {"input_ids": padded, "attention_mask": mask}):  # fmt: skip
        assert_same_weights(pruned(form), reference)


# --- batches ------------------------------------------------------------------------------------------------------
def test_dataloaders_and_lists_of_batches_prune_alike():
    rows = datasets.Dataset.from_dict({"input_ids": BLOCKS.tolist()})
    as_lists = pruned(DataLoader(rows, batch_size=4))  # default_collate: a list of T tensors (B,), stacked back
    assert_same_weights(pruned(DataLoader(rows.with_format("torch"), batch_size=4)), as_lists)
    assert_same_weights(pruned([{"input_ids": BLOCKS[i : i + 4]} for i in range(0, 12, 4)]), as_lists)
    ragged = datasets.Dataset.from_dict({"input_ids": [row.tolist() for row in RAGGED]})
    padding = DataLoader(ragged, batch_size=4, collate_fn=DataCollatorWithPadding(TOKENIZER))
    pruned(padding)  # padded batches with an attention_mask reach the target too


def test_iterables_are_read_only_as_far_as_the_pool_needs():
    read = []

    def batches():
        for i in range(1000):
            read.append(i)
            yield {"input_ids": BLOCKS[:4]}

    pruned(batches())
    assert len(read) == 8 * CONFIG.calibration_samples // 4  # the pool: 8 x calibration_samples sequences


def scores(model_type: str, batches: list[dict[str, torch.Tensor]]):
    model = tiny_model(model_type, gqa_ratio=3)
    pruner = AdaptivePruner(model, PrunerConfig(target_ratio=0.7))
    scorer = CalibrationScorer(model, CalibrationPool(batches, 16, 8, seed=0), "cosine", "taylor", seed=0,
                               progress=False)  # fmt: skip
    return scorer(pruner.layers, pruner.head_dim)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padding_counts_neither_in_layer_similarity_nor_in_the_loss(model_type):
    """One padded batch (right or left padding) scores like the sequences run one by one, unpadded: padded tokens are
    skipped by the layer similarity, are no loss targets, and every real token weighs the same."""
    sequences = [BLOCKS[0], BLOCKS[1, :9], BLOCKS[2, :4]]
    importance, groups = scores(model_type, [{"input_ids": s[None]} for s in sequences])
    for side in ("right", "left"):
        ids = torch.zeros(3, SEQ_LEN, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            span = slice(0, len(s)) if side == "right" else slice(SEQ_LEN - len(s), SEQ_LEN)
            ids[i, span], mask[i, span] = s, 1
        padded_importance, padded_groups = scores(model_type, [{"input_ids": ids, "attention_mask": mask}])
        torch.testing.assert_close(padded_importance, importance, rtol=1e-5, atol=1e-6)
        for got, expected in zip(padded_groups, groups):
            for name in ("q_heads", "kv_heads", "channels"):
                torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-4, atol=1e-7)


# --- forms that cannot work ---------------------------------------------------------------------------------------
def empty_generator():
    yield from ()


BAD_FORMS = {
    "dict without input_ids": ({"text": ["w5 w6"]}, ValueError, ("keys ['text'], but no 'input_ids'", "LongTensor")),
    "floats": ([[0.5, 1.5, 2.5]], ValueError, ("holds torch.float32 values", "integer token ids", "LongTensor")),
    "a set": ({1, 2, 3}, ValueError, ("a set, which has no order", "pass a list")),
    "an empty generator": (empty_generator(), ValueError, ("yielded nothing", "LongTensor (N, T)")),
    "an empty list": ([], ValueError, ("empty list", "LongTensor (N, T)")),
    "a 3-D tensor": (BLOCKS.view(3, 4, SEQ_LEN), ValueError, ("shape (N, T)", "torch.int64 (3, 4, 16)", "BatchEnc")),
    "a list of 3-D tensors": ([BLOCKS.view(3, 4, SEQ_LEN)], ValueError, ("shape (3, 4, 16)", "1-D (T,) or 2-D")),
    "one string": ("w5 w6 w7", ValueError, ("single str", "pass a list of texts")),
    "strings without a tokenizer": (["w5 w6 w7"], ValueError, ("no tokenizer was given", "tokenizer=AutoTokenizer")),
    "text then ids": (["w5 w6", [5, 6]], ValueError, ("calibration_data[1] is a list", "every entry a string")),
    "ragged rows in a DataLoader": (
        DataLoader(datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [5, 6]]}), batch_size=2),
        ValueError, ("pad them in the collator", "DataCollatorWithPadding"),
    ),
    "a Dataset without text or ids": (
        datasets.Dataset.from_dict({"content": ["w5 w6"]}), ValueError,
        ("columns ['content']", "neither 'input_ids' nor a text column 'text'", "text_column="),
    ),
    "a DatasetDict": (
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["w5"]})}), ValueError,
        ("DatasetDict with splits ['train']", "pass one split", "data['train']"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("form", list(BAD_FORMS))
def test_a_form_that_cannot_work_names_the_forms_that_do(form):
    data, error, words = BAD_FORMS[form]
    model = tiny_model("llama", gqa_ratio=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = None if form == "strings without a tokenizer" else TOKENIZER
    with pytest.raises(error) as raised:
        prune_model(model, CONFIG, data, progress=False, tokenizer=tokenizer)
    missing = [w for w in words if w not in str(raised.value)]
    assert not missing, f"{raised.value}\nmissing: {missing}"
    assert_same_weights(model.state_dict(), before)


def test_a_tokenizer_given_by_name_is_refused():
    with pytest.raises(TypeError, match=r"tokenizer='gpt2' is a str.*AutoTokenizer.from_pretrained\('gpt2'"):
        prune_model(tiny_model("llama"), CONFIG, ["w5 w6"], tokenizer="gpt2", progress=False)


# --- the callback ---------------------------------------------------------------------------------------------------
def train(callback: AdaptPrunerCallback, tmp_path, **trainer_kwargs) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in BLOCKS]
    trainer = Trainer(model=tiny_model("llama").train(), args=args, train_dataset=data, callbacks=[callback],
                      **trainer_kwargs)  # fmt: skip
    trainer.train()
    return trainer


def test_callback_tokenizes_text_with_the_trainers_tokenizer(tmp_path):
    config = PrunerConfig(target_ratio=0.7, num_stages=1, importance_source="calibration", inner_steps=2,
                          calibration_samples=8, calibration_seq_len=SEQ_LEN, round_to=1)  # fmt: skip
    texts = [text_of(row) for row in BLOCKS]
    with pytest.raises(ValueError, match=r"no tokenizer reached the callback.*processing_class=tokenizer"):
        train(AdaptPrunerCallback(config, calibration_data=texts), tmp_path)
    callback = AdaptPrunerCallback(config, calibration_data=texts)
    trainer = train(callback, tmp_path, processing_class=TOKENIZER)
    assert torch.equal(callback.calibration_data, token_blocks(TOKENIZER, texts, SEQ_LEN))
    assert abs(callback.reports[-1].params_after / callback.reports[0].params_before - 0.7) < 0.01
    assert sum(p.numel() for p in trainer.model.parameters()) == callback.reports[-1].params_after
    loader = DataLoader(datasets.Dataset.from_dict({"input_ids": BLOCKS.tolist()}), batch_size=4)
    assert len(AdaptPrunerCallback(config, calibration_data=iter(loader)).calibration_data) == 3  # read once, now


# --- the command line: --dataset ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_model("qwen3", gqa_ratio=3).save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    return folder


# 40 rows of 30 to 40 words
ROWS = [
    text_of(torch.randint(3, VOCAB, (30 + i % 11,), generator=torch.Generator().manual_seed(i))) for i in range(40)
]


def stream_from(row: int) -> torch.Tensor:
    """The token stream of ROWS[row:], an EOS after each row (as calibration text and packed ids are)."""
    return torch.tensor(
        [i for text in ROWS[row:] for i in [*TOKENIZER(text, add_special_tokens=False)["input_ids"], 2]]
    )


def write_dataset(kind: str, folder) -> str:
    if kind == "jsonl":
        (folder / "rows.jsonl").write_text(
            "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(ROWS))
        )
        return str(folder / "rows.jsonl")
    if kind == "parquet":
        datasets.Dataset.from_dict({"body": ROWS}).to_parquet(str(folder / "rows.parquet"))
        return str(folder / "rows.parquet")
    if kind == "txt":
        (folder / "rows.txt").write_text("\n".join(ROWS))
        return str(folder / "rows.txt")
    rows = datasets.Dataset.from_dict({"text": ROWS})
    if kind == "save_to_disk":
        rows.save_to_disk(str(folder / "saved"))
    else:  # DatasetDict, pre-tokenized
        ids = rows.map(lambda row: TOKENIZER(row["text"], add_special_tokens=False), remove_columns=["text"])
        datasets.DatasetDict({"train": ids, "validation": ids.select(range(5))}).save_to_disk(str(folder / "saved"))
    return str(folder / "saved")


def run_cli(model_dir, tmp_path, *extra):
    argv = ["prune", str(model_dir), "--target-ratio", "0.7", "--output", str(tmp_path / "out"), "--inner-steps", "1",
            "--calibration-samples", "4", "--calibration-seq-len", str(SEQ_LEN), "--round-to", "1", "--eval-blocks",
            "3", "--prompt", "w5", *extra]  # fmt: skip
    seen = {}
    with mock.patch("hf_adapt_pruner.cli.prune_model", wraps=prune_model) as prune, \
            mock.patch("hf_adapt_pruner.cli.perplexity", return_value=9.0) as perplexity:  # fmt: skip
        code = main(argv)
        seen["calibration"] = prune.call_args.args[2] if prune.called else None
        seen["evaluation"] = perplexity.call_args.args[1] if perplexity.called else None
    return code, seen


@pytest.mark.parametrize(("kind", "options"), [
    ("jsonl", []), ("parquet", ["--text-column", "body", "--no-streaming"]), ("txt", []), ("save_to_disk", []),
    ("DatasetDict of input_ids", ["--eval-split", "validation"]),
])  # fmt: skip
def test_cli_prunes_on_a_local_dataset(model_dir, tmp_path, capsys, kind, options):
    code, seen = run_cli(model_dir, tmp_path, "--dataset", write_dataset(kind, tmp_path), *options)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads(printed.out[printed.out.index("{\n") :])
    assert abs(result["params_after"] / result["params_before"] - 0.7) < 0.01
    calibration, evaluation = seen["calibration"], seen["evaluation"]
    assert calibration.shape == (32, SEQ_LEN)  # a pool of 8 x --calibration-samples blocks
    assert evaluation.shape == (3, SEQ_LEN)  # --eval-blocks
    assert torch.equal(evaluation.flatten(), stream_from(0)[: 3 * SEQ_LEN])  # the first rows (of --eval-split)
    # without --eval-split, text is read until the held-out blocks are full: 2 rows of 31 + 32 tokens (EOS too) >= 48
    first_calibration_row = 0 if "--eval-split" in options else 2
    assert torch.equal(calibration.flatten(), stream_from(first_calibration_row)[: 32 * SEQ_LEN])


def test_cli_dataset_errors_name_the_option_to_change(model_dir, tmp_path, capsys):
    path = write_dataset("jsonl", tmp_path)
    command = ["prune", str(model_dir), "--target-ratio", "0.7", "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit):  # exactly one of --calibration and --dataset
        main(command)
    assert "one of the arguments --calibration --dataset is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*command, "--dataset", path, "--calibration", path])
    assert "argument --calibration: not allowed with argument --dataset" in capsys.readouterr().err
    code, _ = run_cli(model_dir, tmp_path, "--dataset", path, "--text-column", "body")
    assert code == 2 and "neither 'input_ids' nor a text column 'body'" in capsys.readouterr().err
    code, _ = run_cli(model_dir, tmp_path, "--dataset", path, "--eval-blocks", "1000")
    assert code == 2 and "no rows left for calibration" in capsys.readouterr().err
    code, _ = run_cli(model_dir, tmp_path, "--dataset", path, "--eval-split", "test")
    assert code == 2 and "only split is 'train', not 'test'" in capsys.readouterr().err
    code, _ = run_cli(model_dir, tmp_path, "--dataset", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "no such file or folder" in capsys.readouterr().err
    for local in (path, write_dataset("save_to_disk", tmp_path)):  # configurations exist only for Hub/folder builders
        code, _ = run_cli(model_dir, tmp_path, "--dataset", local, "--dataset-config", "wikitext-2-raw-v1")
        assert code == 2 and "(--dataset-config) cannot apply: leave it out" in capsys.readouterr().err
