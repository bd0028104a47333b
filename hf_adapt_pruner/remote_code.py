"""The code written next to pruned weights, and the live classes made from it.

`render()` fills the templates in `hf_adapt_pruner/modeling/` for one base `model_type`. `pruned_classes()` writes
the rendered files into a cache folder and imports them, so the in-memory pruned model is an instance of exactly the
class `from_pretrained(..., trust_remote_code=True)` builds elsewhere. Because those classes are registered for the
auto classes, `model.save_pretrained()` (and so `Trainer.save_model()` and Trainer checkpoints) copies the two
files next to the weights and writes `auto_map` into config.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import HF_MODULES_CACHE, logging
from transformers.utils.quantization_config import QuantizationMethod

from .architectures import get_architecture
from .layout import LAYOUT_KEY


logger = logging.get_logger(__name__)

CONFIG_FILE = "configuration_adapt_pruner.py"
MODELING_FILE = "modeling_adapt_pruner.py"
MODEL_TYPE_PREFIX = "adapt_pruned_"
_MODULES_PACKAGE = "hf_adapt_pruner_generated"


def pruned_model_type(base_model_type: str) -> str:
    return MODEL_TYPE_PREFIX + base_model_type


def base_model_type(model_type: str) -> str:
    """`adapt_pruned_llama` -> `llama`; a stock model_type is returned as it is."""
    return model_type.removeprefix(MODEL_TYPE_PREFIX)


def render(base: str) -> dict[str, str]:
    """The two code files for a pruned model whose stock architecture is `base`."""
    table = get_architecture(base).modeling_table()
    templates = resources.files("hf_adapt_pruner.modeling")
    config_text = templates.joinpath(CONFIG_FILE).read_text(encoding="utf-8")
    config_text, n_base = re.subn(r'^BASE_MODEL_TYPE = "[^"]*"', f"BASE_MODEL_TYPE = {json.dumps(base)}", config_text,
                                  flags=re.M)  # fmt: skip
    modeling_text = templates.joinpath(MODELING_FILE).read_text(encoding="utf-8")
    pruned = "".join(f"        {json.dumps(entry)},\n" for entry in table.pop("pruned"))
    fields = "".join(f"    {json.dumps(k)}: {json.dumps(v)},\n" for k, v in table.items())
    table_literal = f'ARCHITECTURE = {{\n{fields}    "pruned": [\n{pruned}    ],\n}}\n'
    modeling_text, n_table = re.subn(r"^ARCHITECTURE = \{.*?^\}\n", lambda _: table_literal, modeling_text,
                                     flags=re.M | re.S)  # fmt: skip
    if n_base != 1 or n_table != 1:
        raise RuntimeError("hf_adapt_pruner's modeling templates lost their BASE_MODEL_TYPE / ARCHITECTURE lines.")
    return {CONFIG_FILE: config_text, MODELING_FILE: modeling_text}


def _write_atomically(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def pruned_classes(base: str) -> tuple[type, type]:
    """(config class, model class) for pruned models of `base`, imported from the rendered code and registered."""
    files = render(base)
    digest = hashlib.sha256("".join(files.values()).encode()).hexdigest()[:12]
    package = f"{_MODULES_PACKAGE}.{base}_{digest}"
    module_name = f"{package}.modeling_adapt_pruner"
    if module_name not in sys.modules:
        folder = Path(HF_MODULES_CACHE) / _MODULES_PACKAGE / f"{base}_{digest}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in {**files, "__init__.py": ""}.items():
            _write_atomically(folder / name, text)
        _import_package(_MODULES_PACKAGE, folder.parent)
        _import_package(package, folder)
        for sub in ("configuration_adapt_pruner", "modeling_adapt_pruner"):
            spec = importlib.util.spec_from_file_location(f"{package}.{sub}", folder / f"{sub}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
    modeling = sys.modules[module_name]
    config_cls, model_cls = modeling.AdaptPrunedConfig, modeling.AdaptPrunedForCausalLM
    if config_cls._auto_class is None:
        config_cls.register_for_auto_class("AutoConfig")
        model_cls.register_for_auto_class("AutoModelForCausalLM")
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


def _import_package(name: str, folder: Path) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if not (folder / "__init__.py").exists():
        _write_atomically(folder / "__init__.py", "")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def clear_dequantized_gguf_marker(model: nn.Module) -> None:
    """A model loaded from GGUF keeps a quantizer marker that makes `save_pretrained` refuse, although its weights
    were dequantized into ordinary tensors on load. Drop the marker when that is the case."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    dense = all(p.dtype.is_floating_point for p in model.parameters())
    if not (method == QuantizationMethod.GGUF and dense):
        raise ValueError(
            f"The model is quantized ({method or type(quantizer).__name__}); hf_adapt_pruner prunes and saves dense "
            "models. Load it unquantized (for GGUF: quantization_config=GgufConfig(dequantize=True))."
        )
    quantizer.remove_quantization_config(model)


def mark_pruned(model: nn.Module) -> None:
    """Turn a model whose config carries a layout into an instance of the pruned classes, in place.

    No weight, module or parameter changes: only the model's and config's classes (subclasses of the stock ones that
    add nothing but the constructor) and `auto_map`, so every later save writes a loadable pruned checkpoint.
    """
    config = model.config
    if getattr(config, LAYOUT_KEY, None) is None:
        raise ValueError(f"model.config has no {LAYOUT_KEY!r}: nothing was pruned.")
    clear_dequantized_gguf_marker(model)
    base = base_model_type(config.model_type)
    config_cls, model_cls = pruned_classes(base)
    for obj, cls in ((config, config_cls), (model, model_cls)):
        if type(obj) is cls:
            continue
        if type(obj) is not cls.__mro__[1]:
            raise TypeError(
                f"Cannot mark a {type(obj).__name__} as pruned: expected the stock {cls.__mro__[1].__name__} of "
                f"model_type {base!r} (subclasses are not supported)."
            )
        obj.__class__ = cls
    config.auto_map = {"AutoConfig": f"{CONFIG_FILE[:-3]}.AdaptPrunedConfig",
                       "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.AdaptPrunedForCausalLM"}  # fmt: skip
