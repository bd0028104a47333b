"""The model card's picture (`pruning.png`): saved next to the weights, linked from README.md, pushed with the rest;
without matplotlib the card keeps its tables and links no picture."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys

import pytest

from hf_adapt_pruner import pruning_history, push_pruned_to_hub, save_pruned
from hf_adapt_pruner.card import PICTURE_FILE

from tiny_models import pruned_tiny_model, tiny_tokenizer


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason='pip install ".[card]" (matplotlib)')  # fmt: skip


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which a valid PNG has first."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def pruned():
    return pruned_tiny_model("llama")


@needs_matplotlib
def test_picture_is_saved_next_to_the_weights_and_linked(pruned, tmp_path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    folder = save_pruned(pruned, tmp_path / "m", tiny_tokenizer())
    data = (folder / PICTURE_FILE).read_bytes()
    width, height = png_size(data)
    assert width > 300 and height > 200 and len(data) > 5000
    card = (folder / "README.md").read_text()
    assert "](pruning.png)" in card and "layer importance" in card
    importance = json.loads((folder / "pruning_history.json").read_text())["history"][-1]["layer_importance"]
    assert len(importance) == 3 and max(abs(v) for v in importance) == 1.0  # centred and scaled
    assert "| layer | query heads | key/value heads | MLP channels | importance |" in card
    assert f"| 0 | 6 | 2 | {pruned.config.pruned_layout['intermediate_size'][0]} | {importance[0]:+.3f} |" in card
    # Drawn on a Figure with the Agg canvas: pyplot (global figures, backend selection) is never imported
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before
    assert not [p.name for p in tmp_path.iterdir() if p.name != "m"]  # written through the temporary folder


def test_without_matplotlib_the_card_has_its_tables_and_no_picture(pruned, tmp_path, monkeypatch):
    names = {"matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"}
    for name in names | {n for n in sys.modules if n.startswith("matplotlib.")}:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    folder = save_pruned(pruned, tmp_path / "m", tiny_tokenizer())
    assert not (folder / PICTURE_FILE).exists()
    card = (folder / "README.md").read_text()
    assert "pruning.png" not in card and "![" not in card
    assert "## Per-layer widths" in card and "| importance |" in card


@needs_matplotlib
def test_a_layout_without_importances_gets_a_widths_picture_and_table(tmp_path):
    model = pruned_tiny_model("qwen2")
    for event in pruning_history(model):  # as saved before importances were recorded
        del event["layer_importance"]
    folder = save_pruned(model, tmp_path / "m")
    png_size((folder / PICTURE_FILE).read_bytes())
    card = (folder / "README.md").read_text()
    assert "![Per-layer widths as fractions of the original](pruning.png)" in card
    assert "| layer | query heads | key/value heads | MLP channels |\n" in card


@needs_matplotlib
def test_push_uploads_the_picture(pruned, fake_hub):
    repo_id = "tester/pruned-picture"
    push_pruned_to_hub(pruned, repo_id, tiny_tokenizer(), token="hf_test")
    files = fake_hub.repos[repo_id].files
    png_size(files[PICTURE_FILE])
    assert b"](pruning.png)" in files["README.md"]
