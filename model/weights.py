"""Our weights format: a directory with config.json, model.safetensors and optionally
tokenizer.json. Loading checks every tensor's name and shape before touching the model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..kernels import KernelBackend
from .checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_state
from .config import PaLMConfig
from .decoder import DecoderModel
from .llama_config import LlamaConfig
from .llama_loader import is_llama_dir, load_llama, load_llama_config
from .palm import PaLM
from .quantization import install_int8_linears, split_int8_state


def expected_shapes(config: PaLMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a PaLM of this config is made of. Built on the meta
    device: shapes only, so checking a checkpoint neither allocates nor initialises a
    second model beside the one being loaded."""
    with torch.device("meta"):
        model = PaLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_state_dict(state: dict[str, torch.Tensor], config: PaLMConfig, source: str) -> None:
    """Every tensor present with its shape, none extra; a block linear may be int8 with its
    scales beside it (model/quantization.py)."""
    try:
        rest, int8 = split_int8_state(state)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    for module, (q, scales) in int8.items():
        if scales.shape != (q.shape[0],):
            shape = tuple(scales.shape)
            raise CheckpointError(
                f"{source}: tensor {module}.scales has shape {shape}, its weight {len(q)} rows"
            )
    state = rest | {module + ".weight": q for module, (q, _) in int8.items()}
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {shape})")
        got = tuple(state[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {got}, the config expects {shape}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {', '.join(extra[:5])}")


def save_model_dir(path: str | Path, config: PaLMConfig, state: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    check_state_dict(state, config, str(path))
    config.save(path / CONFIG_FILE)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def load_config(path: str | Path) -> PaLMConfig | LlamaConfig:
    """PaLMConfig of our format, or LlamaConfig of an HF Llama directory (model_type)."""
    if is_llama_dir(path):
        return load_llama_config(path)
    return load_palm_config(path)


def load_palm_config(path: str | Path) -> PaLMConfig:
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (is this a palm-serve model directory?)")
    try:
        return PaLMConfig.load(config_path)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None


def load_model(
    path: str | Path,
    kernels: KernelBackend | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> DecoderModel:
    """Build the model of a model directory, weights checked and loaded, in eval mode.

    config.json's "architecture": "palm" is ours; HF's "model_type": "llama" is a Llama."""
    if is_llama_dir(path):
        return load_llama(path, kernels, dtype, device)
    config = load_palm_config(path)
    state = load_state(path)
    check_state_dict(state, config, str(Path(path) / WEIGHTS_FILE))
    model = PaLM(config, kernels)
    rest, int8 = split_int8_state(state)
    if int8 and torch.device(device).type == "cpu" and dtype != torch.float32:
        # The CPU int8 kernel takes fp32 activations (as --quantization int8 requires).
        raise ValueError(
            f"{path} holds int8 weights: on the CPU they serve with dtype float32, not "
            f"{str(dtype).removeprefix('torch.')}"
        )
    # An int8 checkpoint (convert --quantization int8): its linears are built from the
    # int8 tensors, never as fp32; everything else loads as usual.
    # (check_state_dict made sure the int8 weights are all that is missing)
    model.load_state_dict(rest, strict=not int8)
    install_int8_linears(model, int8)
    # Parameters take the serving dtype; the rotary tables stay fp32 for accuracy.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.to(device).eval().requires_grad_(False)
