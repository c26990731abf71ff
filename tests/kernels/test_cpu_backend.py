"""The cpu backend: chosen by 'auto' on a CPU where the kernels build, the twins otherwise
(said in one log line); and the whole PaLM forward with it equals the forward with the
torch twins, through chunked prefills, mixed prefill + decode steps and decodes."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys

import pytest
import torch

from palm_serve.kernels import cpu, cpu_backend, select_backend
from palm_serve.model import PaLM

from conftest import make_config, make_model
from triton_cases import Step, assert_matches, run_model_steps

CPU = torch.device("cpu")
CONFIGS = {
    "mqa": make_config(),
    "gqa-xpos": make_config(n_kv_heads=2, use_xpos=True, xpos_scale_base=16),
    "mha-plus-one-qknorm": make_config(
        n_kv_heads=4, layernorm_style="gamma_plus_one", qk_rmsnorm=True
    ),
}
# The forward carries the kernel's ~5e-7 through the layers and the scaled-up projections
# of the test models (conftest.make_model): hidden states (|h| ~3) to 1e-5 absolute, logits
# (|logit| ~20) to 1e-5 of their largest, the bar for two paths of one forward.
HIDDEN_ATOL = 1e-5
LOGITS_RTOL = 1e-5


def test_auto_picks_the_compiled_kernels() -> None:
    error = cpu.build_error()
    assert error is None, f"the CPU kernels did not build: {error}"
    assert select_backend("auto", CPU).name == "cpu"
    assert select_backend("cpu", CPU).name == "cpu"
    assert select_backend("cpu", CPU).plan_paged_attention(None, None, None, 16, 1) is None


def test_without_a_build_auto_falls_back_in_one_log_line(monkeypatch, caplog) -> None:
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: "RuntimeError: no C++ compiler")
    with caplog.at_level(logging.INFO, logger="palm_serve.kernels"):
        assert select_backend("auto", CPU).name == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        "compiled CPU kernels unavailable (RuntimeError: no C++ compiler): using the torch twins"
    ]
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        select_backend("cpu", CPU)


def _steps(vocab_size: int, block_size: int, num_blocks: int) -> list[Step]:
    rng = random.Random(0)
    pool = list(range(num_blocks))
    rng.shuffle(pool)  # non-contiguous, out-of-order tables
    per_seq = num_blocks // 3
    tables = [pool[i * per_seq : (i + 1) * per_seq] for i in range(3)]
    seqs = [[rng.randrange(vocab_size) for _ in range(60)] for _ in range(3)]
    return [
        # seq 0 prefills its first 37 tokens, seq 1 its whole 6-token prompt
        (tables[:2], [seqs[0][:37], seqs[1][:6]], [0, 0]),
        # seq 0's second chunk (2 tokens) over its cached prefix, seq 1 decodes, seq 2 arrives
        (tables, [seqs[0][37:39], seqs[1][6:7], seqs[2][:21]], [37, 6, 0]),
        # everyone decodes
        (tables, [seqs[0][39:40], seqs[1][7:8], seqs[2][21:22]], [39, 7, 21]),
    ]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_equals_torch_forward(name: str, block_size: int) -> None:
    config = CONFIGS[name]
    reference = make_model(config)
    model = PaLM(config, kernels=cpu_backend())
    model.load_state_dict(reference.state_dict())
    model.eval()
    num_blocks = 3 * (-(-60 // block_size))
    steps = _steps(config.vocab_size, block_size, num_blocks)
    expected = run_model_steps(reference, steps, num_blocks, block_size)
    actual = run_model_steps(model, steps, num_blocks, block_size)
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        diff = assert_matches(got, want, HIDDEN_ATOL)
        logits, reference_logits = model.compute_logits(got), reference.compute_logits(want)
        relative = (logits - reference_logits).abs().max() / reference_logits.abs().max()
        print(f"{name} BS={block_size} step {step}: hidden {diff:.3g}, logits {relative:.3g} rel")
        assert relative < LOGITS_RTOL
        assert torch.equal(logits.argmax(-1), reference_logits.argmax(-1))


def test_without_a_compiler_the_server_keeps_the_twins() -> None:
    """A process whose C++ compiler does not exist: available() is False with the reason,
    and 'auto' says so in one warning before it takes the twins."""
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from palm_serve.kernels import cpu, select_backend\n"
        "assert not cpu.available()\n"
        "print(select_backend('auto', torch.device('cpu')).name)\n"
    )
    env = {**os.environ, "CXX": "/nonexistent/c++"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch"
    assert done.stderr.strip().splitlines() == [
        "WARNING compiled CPU kernels unavailable (RuntimeError: no C++ compiler: "
        "'/nonexistent/c++' is not on PATH): using the torch twins"
    ]


def test_a_built_library_loads_from_a_read_only_directory() -> None:
    """The image's build lies read-only (a read-only root filesystem on Kubernetes; /opt is
    not the image user's either): a process whose filesystem refuses every lock file, as
    torch's cpp_extension creates one in the build directory, still loads the kernels."""
    from palm_serve.kernels import cpu

    assert cpu.available(), cpu.unavailable_reason()  # built (once) in the cache
    script = (
        "from torch.utils import file_baton\n"
        "def read_only(self):\n"
        "    raise OSError(30, 'Read-only file system', self.lock_file_path)\n"
        "file_baton.FileBaton.try_acquire = read_only\n"
        "from palm_serve.kernels import cpu\n"
        "assert cpu.available(), cpu.unavailable_reason()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
