"""Every bad input gets a clear error: one table of bad inputs through the CLI, `PrunerConfig`, `prune_model`, the
callback (Trainer arguments, optimizers, data), `save_pruned`, `load_pruned`, `push_pruned_to_hub` and `export_gguf`.

Each row builds what its call needs (tiny models, folders under `tmp_path`) and returns the bad call. The test checks
the exception type, the words a user needs to read (the bad value, what was expected, the fix), and that nothing
changed: every model the row built keeps its state dict and config, and every file under `tmp_path` its bytes.
Command-line rows must exit with status 2 (message on stderr, no traceback) before any perplexity is computed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.optimization import Adafactor

from hf_adapt_pruner import (
    AdaptPrunerCallback,
    DistillationConfig,
    PrunerConfig,
    export_gguf,
    load_pruned,
    prune_model,
    push_pruned_to_hub,
    save_pruned,
)
from hf_adapt_pruner.cli import main

from tiny_models import bpe_tokenizer, calibration_blocks, pruned_tiny_model, tiny_config, tiny_model, tiny_tokenizer


CONFIG = PrunerConfig(target_ratio=0.7, inner_steps=1, calibration_samples=4)
TRAIN_DATA = [{"input_ids": row, "labels": row} for row in calibration_blocks(n=16, seq_len=16, seed=5)]


def blocks_with(*entries: tuple[int, int, int], n: int = 16, seq_len: int = 24) -> torch.Tensor:
    """Calibration blocks with `(sequence, position, token id)` planted in them."""
    blocks = calibration_blocks(n, seq_len)
    for i, j, value in entries:
        blocks[i, j] = value
    return blocks


def train_config(**overrides) -> PrunerConfig:
    values = dict(target_ratio=0.6, num_stages=3, importance_window=2, inner_steps=1, round_to=1)
    return PrunerConfig(**{**values, **overrides})


class CliError(Exception):
    """`hf-adapt-pruner` exited with status 2; the message is what it printed on stderr."""


@dataclass
class Assets:
    """Built once for the module; rows get copies."""

    pruned: torch.nn.Module
    saved: Path


class World:
    """What one row may build; `snapshot()` covers all of it."""

    call = staticmethod(partial)

    def __init__(self, tmp: Path, assets: Assets):
        self.tmp = tmp
        self.assets = assets
        self.models: list[torch.nn.Module] = []

    # --- models -------------------------------------------------------------------------------------------
    def track(self, model: torch.nn.Module) -> torch.nn.Module:
        self.models.append(model)
        return model

    def llama(self) -> torch.nn.Module:
        return self.track(tiny_model("llama"))

    def pruned(self) -> torch.nn.Module:
        """A tiny Llama pruned to 60 % of its parameters."""
        return self.track(copy.deepcopy(self.assets.pruned))

    def meta_llama(self) -> torch.nn.Module:
        with torch.device("meta"):
            return self.track(AutoModelForCausalLM.from_config(tiny_config("llama")))

    def gpt2(self) -> torch.nn.Module:
        return self.track(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128)))

    def with_optimizer(self, optimizer_class, **kwargs) -> tuple:
        """(model, CONFIG, calibration blocks, an optimizer over the model's parameters): prune_model's arguments."""
        model = self.llama()
        return model, CONFIG, calibration_blocks(), optimizer_class(model.parameters(), **kwargs)

    # --- files --------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.tmp / name

    def saved(self) -> Path:
        """A folder written by save_pruned (pruned tiny Llama and its tokenizer)."""
        return Path(shutil.copytree(self.assets.saved, self.tmp / "saved"))

    def folder(self, name: str, **files: str) -> Path:
        folder = self.tmp / name
        folder.mkdir()
        for file_name, text in files.items():
            (folder / file_name.replace("__", ".")).write_text(text)
        return folder

    def file(self, name: str, text: str = "x") -> Path:
        (self.tmp / name).write_text(text)
        return self.tmp / name

    def model_dir(self, tokenizer=None) -> Path:
        folder = self.tmp / "model"
        tiny_model("llama").save_pretrained(folder)
        (tokenizer or tiny_tokenizer()).save_pretrained(folder)
        return folder

    def text_dir(self, words: str | None = None) -> Path:
        folder = self.tmp / "text"
        folder.mkdir()
        for i in range(10):
            text = words or " ".join(f"w{3 + (i * 7 + j * 13) % 125}" for j in range(300))
            (folder / f"doc{i}.txt").write_text(text)
        return folder

    def prune_args(self, *extra: str, target: tuple[str, ...] = ("--target-ratio", "0.7")) -> list:
        """`prune` arguments that are all fine, followed by `extra` (argparse: the last value wins)."""
        return ["prune", self.model_dir(), "--calibration", self.text_dir(), "--output", self.tmp / "out",
                *target, "--inner-steps", "1", "--calibration-seq-len", "16", *extra]  # fmt: skip

    # --- calls --------------------------------------------------------------------------------------------
    def cli(self, *argv) -> Callable[[], None]:
        def run() -> None:
            stderr = io.StringIO()
            never = AssertionError("perplexity was computed before the bad input was refused")
            with contextlib.redirect_stderr(stderr), mock.patch("hf_adapt_pruner.cli.perplexity", side_effect=never):
                try:
                    code = main([str(arg) for arg in argv])
                except SystemExit as exit_:  # argparse
                    code = exit_.code
            assert code == 2, f"exit status {code}: {stderr.getvalue()}"
            raise CliError(stderr.getvalue())

        return run

    def train(self, config: PrunerConfig, model=None, calibration=None, distillation=None,
              **args_overrides) -> Callable[[], object]:  # fmt: skip
        """`trainer.train` of a Trainer with the callback (the bad input is refused in on_train_begin)."""
        model = model if model is not None else self.llama()
        args = dict(output_dir=str(self.tmp / "run"), max_steps=30, per_device_train_batch_size=4, report_to=[],
                    use_cpu=True, disable_tqdm=True, save_strategy="no")  # fmt: skip
        args.update(args_overrides)
        extra = {"eval_dataset": TRAIN_DATA[:4]} if "eval_strategy" in args_overrides else {}
        callback = AdaptPrunerCallback(config, calibration, distillation=distillation)
        trainer = Trainer(model=model.train(), args=TrainingArguments(**args), train_dataset=TRAIN_DATA,
                          callbacks=[callback], **extra)  # fmt: skip
        return trainer.train

    # --- nothing changed ----------------------------------------------------------------------------------
    def snapshot(self) -> tuple:
        models = []
        for model in self.models:
            state = {
                k: ("meta", tuple(v.shape)) if v.is_meta else v.detach().clone() for k, v in model.state_dict().items()
            }
            models.append((state, model.config.to_dict()))
        files = {str(p.relative_to(self.tmp)): p.read_bytes() if p.is_file() else "dir" for p in self.tmp.rglob("*")}
        return models, files


def same(before: tuple, after: tuple) -> bool:
    (models_a, files_a), (models_b, files_b) = before, after
    for (state_a, config_a), (state_b, config_b) in zip(models_a, models_b, strict=True):
        if config_a != config_b or state_a.keys() != state_b.keys():
            return False
        for key, a in state_a.items():
            b = state_b[key]
            if isinstance(a, tuple) != isinstance(b, tuple) or (
                a != b if isinstance(a, tuple) else not torch.equal(a, b)
            ):
                return False
    return files_a == files_b


@dataclass(frozen=True)
class Case:
    id: str
    error: type[BaseException]
    words: tuple[str, ...]
    act: Callable[[World], Callable[[], object]]  # builds what the call needs, returns the bad call
    hub: bool = False  # needs the Hub stand-in

    def __repr__(self) -> str:
        return self.id


def case(id: str, error: type[BaseException], words: tuple[str, ...] | str, act, hub: bool = False) -> Case:
    return Case(id, error, (words,) if isinstance(words, str) else words, act, hub)


CASES = [
    # --- command line: `hf-adapt-pruner prune | eval | export` ----------------------------------------------------
    case("cli-model-folder-missing", CliError, ("No such folder", "no-model"),
         lambda w: w.cli("prune", w.path("no-model"), "--target-ratio", "0.7", "--calibration", w.text_dir(),
                         "--output", w.path("out"))),
    case("cli-calibration-missing", CliError, ("no-text", "neither a file nor a folder", ".txt"),
         lambda w: w.cli(*w.prune_args("--calibration", w.path("no-text")))),
    case("cli-calibration-without-text-files", CliError, ("No text files", ".txt", "notes"),
         lambda w: w.cli(*w.prune_args("--calibration", w.folder("notes", data__json="{}")))),
    case("cli-eval-fraction", CliError, ("eval_fraction=1.5", "(0, 1)"),
         lambda w: w.cli(*w.prune_args("--eval-fraction", "1.5"))),
    case("cli-target-ratio", CliError, ("target_ratio=1.5", "(0, 1]"),
         lambda w: w.cli(*w.prune_args("--target-ratio", "1.5"))),
    case("cli-target-unreachable-before-perplexity", CliError, ("1,000 parameters is unreachable", "lower the floors"),
         lambda w: w.cli(*w.prune_args(target=("--target-params", "1000")))),
    case("cli-target-above-model", CliError, ("1,000,000,000", "not below", "Lower target_ratio / target_params"),
         lambda w: w.cli(*w.prune_args(target=("--target-params", "1000000000")))),
    case("cli-tokenizer-ids-outside-vocabulary", CliError,
         ("the --calibration text holds token id", "vocabulary has 128", "tokenizer in", "with 300 tokens"),
         lambda w: w.cli("prune", w.model_dir(tokenizer=bpe_tokenizer()), "--target-ratio", "0.7", "--calibration",
                         w.text_dir("the pruned model runs in llama cpp"), "--output", w.path("out"),
                         "--calibration-seq-len", "8")),
    case("cli-text-shorter-than-a-block", CliError, ("fewer than one block of seq_len=100000", "--calibration-seq"),
         lambda w: w.cli(*w.prune_args("--calibration-seq-len", "100000"))),
    case("cli-gguf-file-missing", CliError, ("no GGUF file 'nope.gguf'", "GGUF files there: none"),
         lambda w: w.cli(*w.prune_args("--gguf-file", "nope.gguf"))),
    case("cli-output-exists", CliError, ("already exists", "--overwrite"),
         lambda w: w.cli(*w.prune_args("--output", w.folder("out")))),
    case("cli-eval-text-missing", CliError, ("no-text", "neither a file nor a folder"),
         lambda w: w.cli("eval", w.model_dir(), "--text", w.path("no-text"))),
    case("cli-export-dtype", CliError, ("invalid choice: 'q4_0'", "q8_0"),
         lambda w: w.cli("export", w.saved(), "--gguf", w.path("m.gguf"), "--dtype", "q4_0")),
    case("cli-export-existing-file", CliError, ("m.gguf' already exists", "--overwrite"),
         lambda w: w.cli("export", w.saved(), "--gguf", w.file("m.gguf"))),
    # --- PrunerConfig (the range checks are in test_config_and_validation.py) -----------------------------------
    case("config-number-as-string", ValueError, ("amplitude='0.02'", "must be a number"),
         lambda w: w.call(PrunerConfig, target_ratio=0.7, amplitude="0.02")),
    case("config-flag-as-string", ValueError, ("prune_mlp='no'", "True or False"),
         lambda w: w.call(PrunerConfig, target_ratio=0.7, prune_mlp="no")),
    case("config-seed", ValueError, ("seed=1.5", "integer"),
         lambda w: w.call(PrunerConfig, target_ratio=0.7, seed=1.5)),
    case("config-from-dict-of-a-string", TypeError, ("got str", "PrunerConfig.from_dict({'target_ratio': 0.7})"),
         lambda w: w.call(PrunerConfig.from_dict, "target_ratio=0.7")),
    case("config-from-folder-without-it", FileNotFoundError, ("has no pruner_config.json", "save_pruned"),
         lambda w: w.call(PrunerConfig.from_pretrained, w.folder("empty"))),
    # --- prune_model: calibration data --------------------------------------------------------------------------
    case("prune-token-id-above-vocabulary", ValueError,
         ("token id 500 at sequence 2, position 5", "vocabulary has 128 tokens", "model's own tokenizer"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, blocks_with((2, 5, 500)), progress=False)),
    case("prune-negative-token-id", ValueError,
         ("negative token id -100 at sequence 1, position 3", "pad_token_id", "attention_mask"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, blocks_with((1, 3, -100)), progress=False)),
    case("prune-empty-calibration", ValueError, ("shape (0, 24)", "no tokens", "token_blocks"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, torch.zeros(0, 24, dtype=torch.long), progress=False)),
    case("prune-one-token-sequences", ValueError, ("shape (16, 1)", "at least 2 tokens"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, calibration_blocks(seq_len=1), progress=False)),
    case("prune-float-tensor", ValueError, ("integer token ids of shape (N, T)", "torch.float32", "token_blocks"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, torch.zeros(4, 8), progress=False)),
    case("prune-one-dimensional-tensor", ValueError, ("torch.int64 (24,)", "unsqueeze(0)"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, calibration_blocks()[0], progress=False)),
    case("prune-ragged-lists-shorter-than-a-block", ValueError,
         ("calibration_seq_len=128", "5 tokens, fewer than one block", "lower calibration_seq_len"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, [[5, 6, 7], [5, 6]], progress=False)),
    case("prune-batch-token-id-above-vocabulary", ValueError,
         ("calibration_data[1]['input_ids'] holds token id 999", "vocabulary has 128"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, [{"input_ids": calibration_blocks(4)},
                                                            {"input_ids": blocks_with((0, 0, 999), n=4)}],
                          progress=False)),
    case("prune-batch-mask-shape", ValueError, ("attention_mask'] has shape (4, 23)", "input_ids has (4, 24)"),
         lambda w: w.call(prune_model, w.llama(), CONFIG,
                          [{"input_ids": calibration_blocks(4), "attention_mask": torch.ones(4, 23)}],
                          progress=False)),
    # --- prune_model: model, config, optimizer, target ----------------------------------------------------------
    case("prune-target-above-model", ValueError, ("1,000,000,000 parameters is not below", "Lower target_ratio"),
         lambda w: w.call(prune_model, w.llama(), PrunerConfig(target_params=10**9), calibration_blocks())),
    case("prune-already-smaller-than-target", ValueError, ("already pruned to", "relative to that original"),
         lambda w: w.call(prune_model, w.pruned(), PrunerConfig(target_ratio=0.8), calibration_blocks())),
    case("prune-meta-device", ValueError, ("meta device", "model.embed_tokens.weight", "to_empty"),
         lambda w: w.call(prune_model, w.meta_llama(), CONFIG, calibration_blocks())),
    case("prune-model-is-a-path", TypeError, ("got str 'my-model'", "load_pruned('my-model')"),
         lambda w: w.call(prune_model, "my-model", CONFIG, calibration_blocks())),
    case("prune-config-is-a-dict", TypeError, ("config is a dict", "PrunerConfig.from_dict(d)"),
         lambda w: w.call(prune_model, w.llama(), {"target_ratio": 0.7}, calibration_blocks())),
    case("prune-unsliceable-optimizer", ValueError, ("Adafactor", "cannot be sliced", "optim='adamw_torch'"),
         lambda w: w.call(prune_model, *w.with_optimizer(Adafactor, lr=1e-3, relative_step=False))),
    case("prune-optimizer-name", TypeError, ("optimizer='adamw'", "not a torch.optim.Optimizer"),
         lambda w: w.call(prune_model, w.llama(), CONFIG, calibration_blocks(), "adamw")),
    # --- AdaptPrunerCallback inside a Trainer: refused before the first step -----------------------------------
    case("callback-config-string", TypeError, ("config='0.7' is a str", "PrunerConfig(target_ratio=0.7"),
         lambda w: w.call(AdaptPrunerCallback, "0.7")),
    case("callback-empty-calibration", ValueError, "shape (0, 16)",
         lambda w: w.call(AdaptPrunerCallback, train_config(importance_source="calibration"),
                          torch.zeros(0, 16, dtype=torch.long))),
    case("callback-calibration-outside-vocabulary", ValueError, ("token id 500", "vocabulary has 128"),
         lambda w: w.train(train_config(importance_source="calibration"), calibration=blocks_with((3, 4, 500)))),
    case("callback-calibration-without-data", ValueError,
         ("importance_source='calibration' needs calibration data", "calibration_data=token_blocks"),
         lambda w: w.train(train_config(importance_source="calibration"))),
    case("callback-adafactor", ValueError, ("Adafactor", "optim='adamw_torch'"),
         lambda w: w.train(train_config(), optim="adafactor")),
    case("callback-load-best-model", ValueError, ("load_best_model_at_end=True", "load_pruned(checkpoint)"),
         lambda w: w.train(train_config(), load_best_model_at_end=True, eval_strategy="steps",
                           save_strategy="steps")),
    case("callback-stages-do-not-fit", ValueError, ("num_stages=40", "max_steps=30", "Train for at least 437 steps"),
         lambda w: w.train(train_config(num_stages=40))),
    case("callback-target-above-model", ValueError, ("not below", "Lower target_ratio / target_params"),
         lambda w: w.train(train_config(target_ratio=None, target_params=10**9))),
    case("callback-target-unreachable", ValueError, ("unreachable", "lower the floors"),
         lambda w: w.train(train_config(target_ratio=None, target_params=1000))),
    case("callback-kl-alone-against-the-model-itself", ValueError,
         ("alpha=1.0 trains on KL(teacher || student) alone", "alpha below 1", "importance_source='calibration'"),
         lambda w: w.train(train_config(), distillation=DistillationConfig(alpha=1.0))),
    case("callback-unsupported-model-type", ValueError, ("'gpt2'", "register_architecture"),
         lambda w: w.train(train_config(), model=w.gpt2())),
    # --- save_pruned ------------------------------------------------------------------------------------------
    case("save-onto-a-file", FileExistsError, ("is a file, not a folder", "Choose another save_directory"),
         lambda w: w.call(save_pruned, w.pruned(), w.file("out"), overwrite=True)),
    case("save-tokenizer-name", TypeError, ("tokenizer='my-tokenizer'", "AutoTokenizer.from_pretrained"),
         lambda w: w.call(save_pruned, w.pruned(), w.path("out"), "my-tokenizer")),
    case("save-pruner-config-dict", TypeError, ("pruner_config is a dict", "PrunerConfig.from_dict"),
         lambda w: w.call(save_pruned, w.pruned(), w.path("out"), pruner_config={"target_ratio": 0.6})),
    case("save-eval-results-list", TypeError, ("eval_results=[21.3]", "{metric name: value}"),
         lambda w: w.call(save_pruned, w.pruned(), w.path("out"), eval_results=[21.3])),
    case("save-meta-device", ValueError, ("meta device", "save_pruned has nothing to"),
         lambda w: w.call(save_pruned, w.meta_llama(), w.path("out"))),
    case("save-model-is-a-path", TypeError, ("save_pruned takes a model object", "load_pruned("),
         lambda w: w.call(save_pruned, str(w.saved()), w.path("out"))),
    # --- load_pruned ------------------------------------------------------------------------------------------
    case("load-folder-missing", FileNotFoundError, ("No such folder", "no-model", "not a Hub repo id"),
         lambda w: w.call(load_pruned, w.path("no-model"))),
    case("load-a-file", NotADirectoryError, ("model.safetensors' is a file", "holds config.json"),
         lambda w: w.call(load_pruned, w.saved() / "model.safetensors")),
    case("load-folder-without-config", FileNotFoundError, "has no config.json",
         lambda w: w.call(load_pruned, w.folder("empty"))),
    case("load-damaged-config", ValueError, ("config.json' is not valid JSON", "Save the model again"),
         lambda w: w.call(load_pruned, w.folder("broken", config__json="{not json"))),
    case("load-neither-folder-nor-hub-repo", OSError,
         ("'tester/no-model' is neither a local folder", "nor a model the Hub serves", "RepositoryNotFoundError"),
         lambda w: w.call(load_pruned, "tester/no-model"), hub=True),
    # --- push_pruned_to_hub (refused before anything is saved or uploaded) ------------------------------------
    case("push-bad-repo-id", ValueError, ("repo_id='me/my model!'", "'owner/name'"),
         lambda w: w.call(push_pruned_to_hub, w.pruned(), "me/my model!", token="hf_test"), hub=True),
    case("push-folder-missing", FileNotFoundError, ("No such folder", "no-model"),
         lambda w: w.call(push_pruned_to_hub, w.path("no-model"), "tester/x", token="hf_test"), hub=True),
    case("push-state-dict", TypeError, ("got OrderedDict", "a model object or a folder written by save_pruned"),
         lambda w: w.call(push_pruned_to_hub, w.pruned().state_dict(), "tester/x", token="hf_test"), hub=True),
    # --- export_gguf ------------------------------------------------------------------------------------------
    case("export-to-a-folder", IsADirectoryError, ("is a folder", "model.gguf"),
         lambda w: w.call(export_gguf, w.pruned(), w.folder("out"), tokenizer=tiny_tokenizer(), overwrite=True)),
    case("export-tokenizer-gguf-missing", FileNotFoundError, ("base.gguf", "no such GGUF file"),
         lambda w: w.call(export_gguf, w.pruned(), w.path("m.gguf"), tokenizer=w.path("base.gguf"))),
    case("export-tokenizer-larger-than-vocabulary", ValueError, ("tokenizer has 300 tokens", "vocabulary has 128"),
         lambda w: w.call(export_gguf, w.llama(), w.path("m.gguf"), tokenizer=bpe_tokenizer())),
    case("export-without-tokenizer", ValueError, "pass tokenizer=",
         lambda w: w.call(export_gguf, w.pruned(), w.path("m.gguf"))),
    case("export-folder-missing", FileNotFoundError, ("No such folder", "no-model"),
         lambda w: w.call(export_gguf, w.path("no-model"), w.path("m.gguf"))),
    case("export-existing-file", FileExistsError, ("already exists", "overwrite=True"),
         lambda w: w.call(export_gguf, w.pruned(), w.file("m.gguf"), tokenizer=tiny_tokenizer())),
]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    pruned = pruned_tiny_model("llama")
    saved = save_pruned(pruned, tmp_path_factory.mktemp("assets") / "saved", tiny_tokenizer())
    return Assets(pruned, saved)


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(case: Case, tmp_path, assets, request, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the rows resolve here
    if case.hub:
        request.getfixturevalue("fake_hub")
    world = World(tmp_path, assets)
    bad_call = case.act(world)
    before = world.snapshot()
    with pytest.raises(case.error) as raised:
        bad_call()
    message = str(raised.value)
    missing = [word for word in case.words if word not in message]
    assert not missing, f"{type(raised.value).__name__}: {message}\nmissing: {missing}"
    assert same(before, world.snapshot()), "a model or a file changed"


def test_the_snapshot_notices_a_changed_weight_config_or_file(tmp_path, assets):
    world = World(tmp_path, assets)
    model = world.llama()
    before = world.snapshot()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert not same(before, world.snapshot())
    world = World(tmp_path, assets)
    model = world.llama()
    before = world.snapshot()
    model.config.head_dim = 4
    assert not same(before, world.snapshot())
    before = world.snapshot()
    world.file("new.txt")
    assert not same(before, world.snapshot())
