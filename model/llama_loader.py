"""Loading a Llama from a Hugging Face model directory: config.json (model_type "llama")
and model.safetensors with transformers' tensor names. The separate q/k/v and gate/up
projections are concatenated into the model's fused ones; every name and shape is checked
first, and a mismatch names the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..kernels import KernelBackend
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_state
from .llama import Llama
from .llama_config import LlamaConfig

# Fused parameter -> the HF tensors concatenated (along the output dim) to make it.
FUSED = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
RENAMED = {
    "o_proj": "self_attn.o_proj",
    "down_proj": "mlp.down_proj",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}


def is_llama_dir(path: str | Path) -> bool:
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        return json.loads(config_path.read_text()).get("model_type") == "llama"
    except (ValueError, OSError):
        return False


def load_llama_config(path: str | Path) -> LlamaConfig:
    config_path = Path(path) / CONFIG_FILE
    try:
        return LlamaConfig.load(config_path)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{config_path}: {exc!r}") from None


def hf_expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """transformers' LlamaForCausalLM tensor name -> shape (rotary inv_freq excluded)."""
    c, (q, kv, _) = config, config.qkv_dims
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.dim), "model.norm.weight": (c.dim,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    per_layer = {
        "input_layernorm.weight": (c.dim,),
        "post_attention_layernorm.weight": (c.dim,),
        "self_attn.q_proj.weight": (q, c.dim),
        "self_attn.k_proj.weight": (kv, c.dim),
        "self_attn.v_proj.weight": (kv, c.dim),
        "self_attn.o_proj.weight": (c.dim, q),
        "mlp.gate_proj.weight": (c.ff_inner, c.dim),
        "mlp.up_proj.weight": (c.ff_inner, c.dim),
        "mlp.down_proj.weight": (c.dim, c.ff_inner),
    }
    for i in range(c.depth):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def convert_hf_state(
    state: dict[str, torch.Tensor], config: LlamaConfig, source: str
) -> dict[str, torch.Tensor]:
    """Check an HF Llama state dict and turn it into our (fused) parameter names."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = hf_expected_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {shape})")
        if tuple(state[name].shape) != shape:
            got = tuple(state[name].shape)
            raise CheckpointError(f"{source}: tensor {name!r} has shape {got}, expected {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])}")
    out = {"embed_tokens.weight": state["model.embed_tokens.weight"]}
    out["norm.weight"] = state["model.norm.weight"]
    if not config.tie_word_embeddings:
        out["logits_head.weight"] = state["lm_head.weight"]
    for i in range(config.depth):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for name, parts in FUSED.items():
            out[f"{ours}{name}.weight"] = torch.cat([state[f"{hf}{p}.weight"] for p in parts])
        for name, hf_name in RENAMED.items():
            out[f"{ours}{name}.weight"] = state[f"{hf}{hf_name}.weight"]
    return out


def load_llama(
    path: str | Path,
    kernels: KernelBackend | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Llama:
    """Build the Llama of an HF model directory, weights checked and loaded, in eval mode."""
    config = load_llama_config(path)
    state = convert_hf_state(load_state(path), config, str(Path(path) / WEIGHTS_FILE))
    model = Llama(config, kernels)
    model.load_state_dict(state)
    for param in model.parameters():  # rotary tables stay fp32
        param.data = param.data.to(dtype)
    return model.to(device).eval().requires_grad_(False)
