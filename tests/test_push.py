"""push_pruned_to_hub against a stand-in of the Hub's HTTP endpoints on 127.0.0.1 (HTTP/LFS path, no Xet)."""

from __future__ import annotations

import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_adapt_pruner import load_pruned, push_pruned_to_hub, save_pruned

from test_serialization import INPUT, load_in_fresh_process, logits
from tiny_models import pruned_tiny_model, tiny_tokenizer


def repo_name() -> str:
    return f"tester/pruned-{uuid.uuid4().hex[:8]}"


def test_push_then_load_back_anywhere(fake_hub):
    model = pruned_tiny_model("qwen2")
    repo_id = repo_name()
    url = push_pruned_to_hub(model, repo_id, tiny_tokenizer(), token="hf_test", private=True)
    repo = fake_hub.repos[repo_id]
    assert url.endswith(repo.sha) and len(repo.commits) == 1 and repo.private
    assert {"model.safetensors", "config.json", "modeling_adapt_pruner.py", "README.md", "tokenizer.json"} <= set(
        repo.files
    )
    assert "model.safetensors" in repo.lfs
    assert repo_id in repo.files["README.md"].decode()

    loaded = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True, attn_implementation="eager")
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(logits(load_pruned(repo_id, attn_implementation="eager")), logits(model))
    fresh = load_in_fresh_process(repo_id)  # a new process without hf_adapt_pruner, through HF_ENDPOINT
    assert (torch.tensor(fresh["logits"]) - logits(model, INPUT)).abs().max() <= 1e-6


def test_push_a_saved_folder_leaves_it_untouched_and_repush_is_a_noop(fake_hub, tmp_path):
    folder = save_pruned(pruned_tiny_model("llama"), tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    repo_id = repo_name()
    push_pruned_to_hub(folder, repo_id, token="hf_test")
    push_pruned_to_hub(folder, repo_id, token="hf_test", commit_message="again")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert fake_hub.repos[repo_id].files["config.json"] == before["config.json"]


def test_wrong_token_says_authentication_failed(fake_hub, tmp_path):
    folder = save_pruned(pruned_tiny_model("llama"), tmp_path / "saved")
    with pytest.raises(RuntimeError, match="authentication failed"):
        push_pruned_to_hub(folder, repo_name(), token="hf_wrong")
    assert (folder / "model.safetensors").exists()


def test_refused_commit_is_reported(fake_hub):
    fake_hub.fail_commits = True
    with pytest.raises(RuntimeError, match=r"authentication failed|HTTP 403"):
        push_pruned_to_hub(pruned_tiny_model("llama"), repo_name(), token="hf_test")


def test_unreachable_hub_is_reported():  # no fake_hub fixture: nothing listens at HF_ENDPOINT
    with pytest.raises(RuntimeError, match="unreachable"):
        push_pruned_to_hub(pruned_tiny_model("llama"), repo_name(), token="hf_test")


def test_pushing_a_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        push_pruned_to_hub(tmp_path, repo_name(), token="hf_test")
