"""Building the C++ kernels: once per machine on first use (torch.utils.cpp_extension and
ninja), then loaded from the cache in every later process.

The build registers the ops torch.ops.palm_cpu.*; their fake (meta) implementations are
registered here so that torch.compile can trace through them without a graph break."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

NAME = "palm_cpu_kernels"
SOURCES = (
    "paged_attention.cpp",
    "rotary_kv_cache.cpp",
    "int8_linear.cpp",
    "prepacked_linear.cpp",
    "argmax.cpp",
    "panel_linear.cpp",
    "decoder_forward.cpp",
)
HEADERS = (
    "vec.h",
    "panels.h",
    "panel_tile.h",
    "claimed_work.h",
    "isa.h",
    "attention_avx512.h",
    "attention_heads_avx2.h",
    "attention_tile_avx2.h",
    "attention_tile_avx512.h",
    "paged_attention.h",
    "panel_linear.h",
    "rotary_rows.h",
)
SOURCE_DIR = Path(__file__).parent
# The flags of the build this process loaded: its ops and fakes are registered once.
_loaded: dict[str, list[str]] = {}


def isa_flags() -> list[str]:
    """AVX2 + FMA + F16C where this CPU has them (vec.h falls back to scalar loops without).
    Not -march=native: the CI machines have no AVX-512, and the cache may travel."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def build_directory(isa: list[str]) -> Path:
    """TORCH_EXTENSIONS_DIR if set (torch's own variable), else ~/.cache/palm-serve; one
    directory per Python, torch, instruction set and version of the sources, as the binary
    depends on all four (two checkouts of different sources must never share a build)."""
    torch_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = Path(torch_dir) if torch_dir else Path(cache) / "palm-serve" / "cpu-kernels"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    tag = "avx2" if isa else "scalar"
    return root / f"{NAME}-{py}-torch{torch.__version__}-{tag}-{_sources_digest()}"


def _sources_digest() -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((SOURCE_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH, which lacks the venv's bin directory when python is run
    by its path; the ninja package knows where its binary is."""
    saved = os.environ.get("PATH", "")
    try:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, saved])
    except ImportError:
        pass  # torch then says that ninja is missing
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def load(isa: list[str] | None = None, verbose: bool = False) -> None:
    """Build the kernels if the cache lacks them, load them into this process and register
    their fake implementations. Raises (with the compiler's message) when that fails.
    isa: the instruction-set flags, isa_flags() by default ([] builds the scalar loops)."""
    isa = isa_flags() if isa is None else isa
    if "isa" in _loaded:
        if _loaded["isa"] != isa:
            raise RuntimeError(f"this process already loaded the build with {_loaded['isa']}")
        return
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH")
    directory = build_directory(isa)
    built = directory / f"{NAME}.so"
    if built.is_file():
        # The directory's name carries the sources' digest, so this library is theirs. Loaded
        # as cpp_extension would, but without the lock file it first creates in the
        # directory: the image's build lies on a read-only filesystem (readOnlyRootFilesystem
        # on Kubernetes; and /opt is not the image user's to write either).
        torch.ops.load_library(str(built))
    else:
        _build_and_load(directory, isa, verbose)
    _register_fakes()
    _loaded["isa"] = isa


def _build_and_load(directory: Path, isa: list[str], verbose: bool) -> None:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    logger.info("building the CPU kernels (once, about a minute) in %s", directory)
    started = time.perf_counter()
    with _ninja_on_path():
        cpp_extension.load(
            name=NAME,
            sources=[str(SOURCE_DIR / s) for s in SOURCES],
            # fp-contract off: no FMA the source does not ask for (rotary_kv_cache.cpp
            # equals the twins bit for bit only if each product is rounded as in torch).
            extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off", *isa],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(SOURCE_DIR)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    seconds = time.perf_counter() - started
    logger.info("built the CPU kernels in %.1f s (cached in %s)", seconds, directory)


def _register_fakes() -> None:
    """Shapes only: what torch.compile's fake tensors need to trace past the ops."""

    @torch.library.register_fake("palm_cpu::paged_attention")
    def _(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        block_tables: Tensor,
        query_start_loc: Tensor,
        context_lens: Tensor,
        scale: float,
    ) -> Tensor:
        return torch.empty_like(q)

    @torch.library.register_fake("palm_cpu::paged_attention_out")
    def _(
        q: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        block_tables: Tensor,
        query_start_loc: Tensor,
        context_lens: Tensor,
        scale: float,
        out: Tensor,
    ) -> None:
        return None

    @torch.library.register_fake("palm_cpu::int8_linear")
    def _(x: Tensor, packed: Tensor, scales: Tensor, out_features: int) -> Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("palm_cpu::prepacked_linear")
    def _(x: Tensor, packed: Tensor, out_features: int) -> Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("palm_cpu::panel_linear")
    def _(x: Tensor, panels: Tensor, out_features: int) -> Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("palm_cpu::rotary_embedding")
    def _(
        q: Tensor,
        k: Tensor,
        positions: Tensor,
        cos_sin_cache: Tensor,
        xpos_scale_cache: Tensor | None,
    ) -> None:
        return None

    @torch.library.register_fake("palm_cpu::write_kv_cache")
    def _(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
        return None

    @torch.library.register_fake("palm_cpu::rotary_write_kv_cache")
    def _(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        positions: Tensor,
        slot_mapping: Tensor,
        cos_sin_cache: Tensor,
        xpos_scale_cache: Tensor | None,
    ) -> None:
        return None


@functools.cache
def build_error() -> Exception | None:
    """None once the kernels are loaded in this process; else why they cannot be built or
    loaded here (the compiler's output included). Tried once per process."""
    try:
        load()
    except Exception as error:  # a missing compiler or ninja, a failed build, a bad binary
        return error
    return None


def summary(error: Exception) -> str:
    """One line of an error: build failures carry the whole compiler log."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
