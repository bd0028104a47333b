"""Test set-up. The environment lines run before anything imports huggingface_hub or transformers: both read
these variables at import time (see ../shared/hub-notes.md)."""

import atexit
import os
import shutil
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every Hub request of the suite goes to 127.0.0.1 (the `fake_hub` fixture serves there; otherwise it is refused).
HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
if "HF_HOME" not in os.environ:  # a cache of the suite's own, removed when the session's process exits
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf_adapt_pruner_tests_hf_home_")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from fake_hub import FakeHub
from tiny_models import MODEL_TYPES, tiny_model


torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 2 unless the caller says


@pytest.fixture(params=MODEL_TYPES)
def model_type(request) -> str:
    return request.param


@pytest.fixture
def fake_hub():
    """A Hub stand-in at HF_ENDPOINT for the duration of one test; it must record no protocol error."""
    with FakeHub(port=HUB_PORT, token="hf_test") as hub:
        yield hub
    assert hub.errors == []


@pytest.fixture
def tiny_llama():
    return tiny_model("llama", gqa_ratio=3)


RUN_SLOW = os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("HF_ADAPT_PRUNER_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    """Slow tests (the real SmolLM2 model) run in CI (CI=true), with HF_ADAPT_PRUNER_SLOW=1, or when selected by
    marker (`-m slow`)."""
    marks = config.getoption("markexpr") or ""
    if RUN_SLOW or ("slow" in marks and "not slow" not in marks):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow, CI=true or HF_ADAPT_PRUNER_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
