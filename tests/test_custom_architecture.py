"""register_architecture: a Llama-like model type defined here, with a fused MLP under other names, prunes, saves
and loads like a built-in one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from hf_adapt_pruner import ArchitectureSpec, PrunerConfig, count_parameters, load_pruned, prune_model, save_pruned
from hf_adapt_pruner.architectures import architecture_table, get_architecture, register_architecture

from tiny_models import VOCAB, calibration_blocks, tiny_config


MODEL_TYPE = "hf_adapt_pruner_test_fused_llama"


class FusedConfig(LlamaConfig):
    model_type = MODEL_TYPE


class FusedMLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one `w12` ([gate; up] rows) and the down projection `w3`."""

    def __init__(self, config):
        super().__init__()
        self.w12 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(gate) * up)


class FusedDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with the MLP under another name."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        del self.mlp
        self.feed_forward = FusedMLP(config)

    def forward(self, hidden_states, **kwargs):
        attention, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = hidden_states + attention
        return hidden_states + self.feed_forward(self.post_attention_layernorm(hidden_states))


class FusedForCausalLM(LlamaForCausalLM):
    config_class = FusedConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.layers = nn.ModuleList(FusedDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


@pytest.fixture(scope="module", autouse=True)
def registered():
    AutoConfig.register(MODEL_TYPE, FusedConfig, exist_ok=True)
    AutoModelForCausalLM.register(FusedConfig, FusedForCausalLM, exist_ok=True)
    register_architecture(ArchitectureSpec(MODEL_TYPE, mlp="feed_forward", gate_up_proj="w12", down_proj="w3",
                                           notes="defined in a test"), overwrite=True)  # fmt: skip


def fused_model():
    torch.manual_seed(0)
    config = FusedConfig(**{**tiny_config("llama").to_dict(), "model_type": MODEL_TYPE})
    model = FusedForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    return model.eval()


def test_registered_type_prunes_saves_and_loads(tmp_path):
    assert get_architecture(MODEL_TYPE).gate_up_proj == "w12"
    assert f"`{MODEL_TYPE}`" in architecture_table()
    model = fused_model()
    original = copy.deepcopy(model)
    config = PrunerConfig(target_ratio=0.7, inner_steps=3, calibration_samples=8, round_to=1)
    report = prune_model(model, config, calibration_blocks(), progress=False)
    assert abs(report.params_after - round(report.params_before * 0.7)) <= 0.01 * report.params_before
    mlp = model.model.layers[0].feed_forward
    channels = model.config.pruned_layout["intermediate_size"][0]
    assert mlp.w12.out_features == 2 * channels and mlp.w3.in_features == channels
    assert count_parameters(model) < count_parameters(original)

    prompt = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(prompt).logits
    save_pruned(model, tmp_path / "fused")
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "fused", trust_remote_code=True),
                   load_pruned(tmp_path / "fused")):  # fmt: skip
        assert isinstance(loaded, FusedForCausalLM)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(prompt).logits, expected, atol=1e-6, rtol=0)


def test_registering_a_type_twice_needs_overwrite():
    with pytest.raises(ValueError, match="overwrite=True"):
        register_architecture(ArchitectureSpec(MODEL_TYPE))
