"""Our weights format, the reference converters and the `palm-serve convert` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palm_serve.model import CheckpointError, load_model, save_model_dir
from palm_serve.model.convert import convert_state_dict, read_checkpoint
from palm_serve.server.cli import main as cli_main

from conftest import make_config, make_model
from reference import palm_pytorch_class, palm_rlhf_class


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = make_model(make_config(qk_rmsnorm=True, use_xpos=True))
    save_model_dir(tmp_path, model.config, model.state_dict())
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))
    assert torch.equal(loaded.forward_dense(tokens), model.forward_dense(tokens))


@pytest.mark.parametrize("layout", ["palm-pytorch", "palm-rlhf-pytorch"])
def test_convert_cli_on_a_reference_checkpoint(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(3)
    if layout == "palm-pytorch":
        ref = palm_pytorch_class()(num_tokens=61, dim=32, depth=2, heads=2, dim_head=16)
    else:
        ref = palm_rlhf_class()(num_tokens=61, dim=32, depth=2, heads=2, dim_head=16)
    ref.eval()
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    (tmp_path / "extra.json").write_text('{"max_positions": 300, "eos_token_id": 0}')
    code = cli_main(
        [
            "convert",
            str(tmp_path / "ref.pt"),
            str(tmp_path / "out"),
            "--from",
            layout,
            "--config",
            str(tmp_path / "extra.json"),
        ]
    )
    assert code == 0
    ours = load_model(tmp_path / "out")
    assert ours.config.max_positions == 300 and ours.config.eos_token_id == 0
    tokens = torch.randint(0, 61, (2, 29))
    with torch.no_grad():
        diff = (ours.forward_dense(tokens) - ref(tokens.clone())).abs().max()
    assert diff < 1e-4


def test_console_script_converts(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it, exits 2 with a clear message."""
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    script = Path(sys.executable).parent / "palm-serve"
    result = subprocess.run(
        [str(script), "convert", str(bad), str(tmp_path / "o"), "--from", "palm-pytorch"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "garbage.pt: not a readable torch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def _reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(4)
    return palm_pytorch_class()(num_tokens=40, dim=32, depth=2, heads=2, dim_head=16).state_dict()


def test_missing_tensor_is_named() -> None:
    state = _reference_state()
    del state["2.fn.attn_out.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor '2\.fn\.attn_out\.weight'"):
        convert_state_dict(state, "palm-pytorch")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path: Path) -> None:
    model = make_model()
    state = model.state_dict()
    state["layers.1.ff_out.weight"] = torch.zeros(32, 100)
    from safetensors.torch import save_file

    save_model_dir(tmp_path, model.config, model.state_dict())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "'layers.1.ff_out.weight'" in message
    assert "(32, 100)" in message and "(32, 128)" in message


def test_truncated_checkpoints_fail_clearly(tmp_path: Path) -> None:
    torch.save(_reference_state(), tmp_path / "ref.pt")
    data = (tmp_path / "ref.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "cut.pt")
    model = make_model()
    save_model_dir(tmp_path / "m", model.config, model.state_dict())
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_model(tmp_path / "m")


def test_wrong_layout_is_reported() -> None:
    with pytest.raises(CheckpointError, match="not a palm-rlhf-pytorch state dict"):
        convert_state_dict(_reference_state(), "palm-rlhf-pytorch")
    with pytest.raises(CheckpointError, match="unknown layout"):
        convert_state_dict(_reference_state(), "gpt2")  # type: ignore[arg-type]
