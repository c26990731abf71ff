"""What a model directory holds, and how reading one fails: the file names, CheckpointError,
and the raw safetensors read every loader shares. A leaf: it imports no model code."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the tensor."""


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}")
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from None
