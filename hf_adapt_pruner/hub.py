"""Pushing a pruned model, or a folder written by `save_pruned`, to the Hugging Face Hub in one commit."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from .checks import check_repo_id
from .layout import LAYOUT_KEY
from .serialization import _where, check_weights_match_layout, save_pruned


def push_pruned_to_hub(
    model: nn.Module | str | os.PathLike,
    repo_id: str,
    tokenizer: Any = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    **save_kwargs: Any,
) -> str:
    """Push a pruned model (or a folder written by `save_pruned`) to the Hub in one commit; returns the commit URL.

    The repository is created if missing. A model is first saved with `save_pruned` into a temporary folder (extra
    keyword arguments go there); a folder is uploaded as it is and never modified.
    """
    check_repo_id(repo_id)
    if not isinstance(model, (str, os.PathLike, nn.Module)):
        raise TypeError(
            f"push_pruned_to_hub takes a model object or a folder written by save_pruned, got "
            f"{type(model).__name__} {model!r:.60}."
        )
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_adapt_pruner_push_") as tmp:
        if isinstance(model, (str, os.PathLike)):
            folder = Path(model)
            if not folder.is_dir():
                raise FileNotFoundError(f"No such folder: {_where(folder)}. Pass a folder written by save_pruned, "
                                        "or the model object.")  # fmt: skip
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"{str(folder)!r} has no config.json: pass a folder written by save_pruned.")
            if json.loads((folder / "config.json").read_text()).get(LAYOUT_KEY) is not None:
                check_weights_match_layout(folder)
        else:
            folder = save_pruned(model, Path(tmp) / repo_id.split("/")[-1], tokenizer, repo_id=repo_id, **save_kwargs)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=commit_message or "Upload model pruned with hf_adapt_pruner",
            )
        except HfHubHTTPError as error:
            status = getattr(error.response, "status_code", None)
            hint = (
                "authentication failed: pass token= with write access or run `hf auth login`"
                if status in (401, 403)
                else f"the Hub answered HTTP {status}"
            )
            raise RuntimeError(
                f"Pushing to {repo_id!r} failed ({hint}). Nothing local was changed. {error}"
            ) from error
        except Exception as error:  # connection errors come from the HTTP client (not OSError subclasses)
            message = f"Pushing to {repo_id!r} failed: the Hub is unreachable or the transfer broke ({error!r})."
            raise RuntimeError(message) from error
    return commit.commit_url if hasattr(commit, "commit_url") else str(commit)
