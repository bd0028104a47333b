"""The docs' code runs: every ```python block of README.md and docs/ placed right after a `<!-- test: run -->` line.

Each marked block runs in a fresh namespace holding what the pages say the reader has: `model` (a tiny random Llama
with a byte-level BPE tokenizer, as Llama-family models use), `tokenizer`, `texts` (a list of strings) and
`train_data` (`input_ids` / `labels` blocks for a Trainer). The blocks of a page share one working folder, in page
order, so a block can load what an earlier one saved. Pushes go to the Hub stand-in on 127.0.0.1; nothing here
touches the network.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tiny_models import BPE_VOCAB, bpe_tokenizer, tiny_model


ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- test: run -->"
BLOCK = re.compile(r"^<!-- test: run -->\n```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKED = [page for page in PAGES if MARKER in page.read_text(encoding="utf-8")]
WORDS = ["the", "pruned", "model", "keeps", "its", "heads", "and", "channels", "where", "layers", "matter", "most"]


def reader_namespace() -> dict:
    tokenizer = bpe_tokenizer()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (24,), generator=g)) for _ in range(160)]
    ids = torch.randint(3, BPE_VOCAB, (64, 32), generator=g)
    return {
        "model": tiny_model("llama", gqa_ratio=3, vocab_size=BPE_VOCAB).float(),
        "tokenizer": tokenizer,
        "texts": texts,
        "train_data": [{"input_ids": block, "labels": block} for block in ids],
    }


def test_every_marker_precedes_a_python_block():
    for page in MARKED:
        text = page.read_text(encoding="utf-8")
        assert text.count(MARKER) == len(BLOCK.findall(text)), (
            f"{page.relative_to(ROOT)}: every {MARKER} line must be followed by a ```python block"
        )


@pytest.mark.parametrize("page", MARKED, ids=lambda page: str(page.relative_to(ROOT)))
def test_marked_blocks_run(page, tmp_path, monkeypatch, fake_hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    for number, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8")), start=1):
        exec(compile(code, f"{page.relative_to(ROOT)} block {number}", "exec"), reader_namespace())
