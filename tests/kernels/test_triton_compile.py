"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32)) runs the whole NVIDIA
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) on the CPU. We check shared
memory against the architecture's limit and that attention's PTX uses tensor cores, and
print each variant's figures (`pytest -s`). Register and spill counts come from the cubin
through the cuobjdump that triton ships (the compiled object's n_regs/n_spills are only
filled in when a driver loads it, i.e. on a GPU); LOCAL > 0 there means spills."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from palm_serve.kernels.triton.launch import COMPILE_OPTIONS, is_interpreted

# The package re-exports functions under the modules' names, so fetch the modules.
int8_linear = importlib.import_module("palm_serve.kernels.triton.int8_linear")
kv_cache = importlib.import_module("palm_serve.kernels.triton.kv_cache")
paged_attention = importlib.import_module("palm_serve.kernels.triton.paged_attention")
rotary = importlib.import_module("palm_serve.kernels.triton.rotary")

# triton.language's helpers are only compilable when this process imported triton without
# TRITON_INTERPRET=1 (the interpreted tests run in a child process for that reason).
pytestmark = pytest.mark.skipif(
    is_interpreted(paged_attention._paged_attention_kernel),
    reason="TRITON_INTERPRET=1 was set when this process imported triton: nothing can compile",
)

# What the wrappers launch with at these sizes (H=32, D=64/128; Hkv=1).
ROTARY_OPTIONS = {"num_warps": 4, **COMPILE_OPTIONS}
WRITE_OPTIONS = {"num_warps": 1, **COMPILE_OPTIONS}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16")
CAPS = (80, 90)
HEAD_DIMS = (64, 128)
# Strides over whole heads or blocks (multiples of head_dim), and block_size 16.
ALIGNED_INTS = {"stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                "stride_cb", "stride_cs", "stride_ch", "stride_os", "stride_ot", "stride_oh",
                "stride_ps", "stride_cos", "block_size", "stride_xm", "stride_wn",
                "stride_om"}  # fmt: skip
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _compile(kernel, signature: dict[str, str], constexprs: dict, cap: int, options: dict):
    """Compile as a launch would: the JIT marks pointers and integer arguments that are
    multiples of 16 as such (tt.divisibility, which enables vector loads); pointers from
    torch always are, and so are our strides at head_dim 64/128 and block_size 16. Counts
    that may be anything (num_seqs, num_heads, stride_bt, T * H) are left unmarked."""
    fn = kernel
    for name in constexprs:
        signature[name] = "constexpr"
    aligned = [n for n in signature if n.endswith("_ptr") or n in ALIGNED_INTS]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)


def _resources(compiled) -> str:
    """'REG:.. STACK:.. SHARED:.. LOCAL:..' from the cubin, or why not."""
    if not CUOBJDUMP.exists() or "cubin" not in compiled.asm:
        return "registers: n/a (no cuobjdump or cubin)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run(
            [str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return match.group(0) if match else "registers: n/a (unparsed)"


def _report(name: str, cap: int, compiled) -> None:
    shared = compiled.metadata.shared
    print(f"\n{name} sm_{cap}: shared {shared} B (dynamic), {_resources(compiled)}")
    assert shared <= SHARED_LIMIT[cap], f"{name}: {shared} B of shared memory on sm_{cap}"


def _attention_signature(dtype: str, split: bool, cache: str | None = None) -> dict[str, str]:
    cache = cache or dtype
    ints = ["num_seqs", "stride_qt", "stride_qh", "stride_cb", "stride_cs", "stride_ch",
            "stride_os", "stride_ot", "stride_oh", "stride_bt", "num_heads", "stride_ms",
            "stride_ml", "block_size"]  # fmt: skip
    sig = {"q_ptr": f"*{dtype}", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}",
           "out_ptr": "*fp32" if split else f"*{dtype}", "ml_ptr": "*fp32",
           "block_tables_ptr": "*i32", "query_start_loc_ptr": "*i32",
           "context_lens_ptr": "*i32", "scale_log2": "fp32"}  # fmt: skip
    sig.update({name: "i32" for name in ints})
    return sig


def _attention_constexprs(head_dim: int, group: int, decode: bool, splits: int,
                          fp32: bool = False, widen_cache: bool = False) -> dict:  # fmt: skip
    block_m, block_q = paged_attention.tile_shape(1 if decode else 2, 1, group)
    block_n = paged_attention.FP32_BLOCK_N if fp32 else paged_attention.BLOCK_N
    return dict(GROUP=group, HEAD_DIM=head_dim, D_PAD=head_dim, BLOCK_M=block_m,
                BLOCK_Q=block_q, BLOCK_N=block_n, NUM_SPLITS=splits, DOT_FP32=False,
                DOT_PRECISION="ieee" if fp32 else "tf32", WIDEN_CACHE=widen_cache)  # fmt: skip


# (label, group, decode tiles?, splits): the mixed-batch tile, and a split decode tile.
ATTENTION_SHAPES = [("mixed", 8, False, 1), ("decode-split", 8, True, 4)]


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_paged_attention_compiles_with_tensor_cores(cap: int, dtype: str, head_dim: int) -> None:
    for label, group, decode, splits in ATTENTION_SHAPES:
        if splits > 1 and dtype == "bf16":
            continue  # the split variant differs in its epilogue only: fp16 covers it
        compiled = _compile(
            paged_attention._paged_attention_kernel,
            _attention_signature(dtype, split=splits > 1),
            _attention_constexprs(head_dim, group, decode, splits),
            cap,
            dict(paged_attention.LAUNCH_OPTIONS),
        )
        _report(f"paged_attention[{label}] {dtype} D={head_dim}", cap, compiled)
        ptx = compiled.asm["ptx"]
        mma = re.search(r"\b(wgmma\.mma_async|mma\.sync)\.\S+", ptx)
        assert mma, f"no tensor-core instruction in the sm_{cap} PTX ({label}, {dtype}, {head_dim})"
        assert cap == 90 or "wgmma" not in ptx
        print(f"  tensor cores: {mma.group(0)}")


@pytest.mark.parametrize("cap", [80])  # one target: fp32 is not a GPU serving dtype
def test_paged_attention_compiles_in_fp32(cap: int) -> None:
    """fp32 (exact FMA dots, its own tile and warps): compiles within shared memory."""
    compiled = _compile(
        paged_attention._paged_attention_kernel,
        _attention_signature("fp32", split=False),
        _attention_constexprs(128, 8, decode=False, splits=1, fp32=True),
        cap,
        dict(paged_attention.FP32_LAUNCH_OPTIONS),
    )
    _report("paged_attention[mixed] fp32 D=128", cap, compiled)


@pytest.mark.parametrize("cap", [80])
@pytest.mark.parametrize("cache", ["bf16", "fp16"])
def test_paged_attention_compiles_in_fp32_over_a_16bit_cache(cap: int, cache: str) -> None:
    """--kv-cache-dtype with fp32 weights: the cache widened to fp32 as it is loaded."""
    compiled = _compile(
        paged_attention._paged_attention_kernel,
        _attention_signature("fp32", split=False, cache=cache),
        _attention_constexprs(128, 8, decode=False, splits=1, fp32=True, widen_cache=True),
        cap,
        dict(paged_attention.FP32_LAUNCH_OPTIONS),
    )
    _report(f"paged_attention[mixed] fp32 over {cache} D=128", cap, compiled)


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_merge_kernel_compiles(cap: int, head_dim: int) -> None:
    sig = {
        "partial_ptr": "*fp32",
        "ml_ptr": "*fp32",
        "out_ptr": "*fp16",
        "num_rows": "i32",
        "num_heads": "i32",
        "stride_ml": "i32",
        "stride_ot": "i32",
        "stride_oh": "i32",
    }
    block_r = paged_attention.MERGE_TILE // head_dim
    for dtype in DTYPES:
        sig["out_ptr"] = f"*{dtype}"
        constexprs = dict(HEAD_DIM=head_dim, D_PAD=head_dim, BLOCK_R=block_r, NUM_SPLITS=4)
        compiled = _compile(paged_attention._merge_splits_kernel, dict(sig), constexprs, cap,
                            dict(paged_attention.MERGE_OPTIONS))  # fmt: skip
        _report(f"merge_splits {dtype} D={head_dim}", cap, compiled)


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rotary_and_cache_write_compile(cap: int, head_dim: int) -> None:
    for dtype in DTYPES:
        sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "positions_ptr": "*i64",
               "cos_sin_ptr": "*fp32", "xpos_ptr": "*fp32"}  # fmt: skip
        sig.update(
            {
                n: "i32"
                for n in (
                    "stride_qt",
                    "stride_qh",
                    "stride_kt",
                    "stride_kh",
                    "stride_cos",
                    "stride_xpos",
                    "n_q_heads",
                    "n_k_heads",
                )
            }
        )
        constexprs = dict(HALF=head_dim // 2, HALF_PAD=head_dim // 2, HEADS_PAD=32, USE_XPOS=True)
        compiled = _compile(rotary._rotary_kernel, sig, constexprs, cap, ROTARY_OPTIONS)
        _report(f"rotary {dtype} D={head_dim}", cap, compiled)

        sig = {"k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}",
               "v_cache_ptr": f"*{dtype}", "slot_mapping_ptr": "*i64"}  # fmt: skip
        sig.update(
            {
                n: "i32"
                for n in (
                    "stride_kt",
                    "stride_kh",
                    "stride_vt",
                    "stride_vh",
                    "stride_cb",
                    "stride_cs",
                    "stride_ch",
                    "n_kv_heads",
                    "block_size",
                )
            }
        )
        constexprs = dict(HEAD_DIM=head_dim, D_PAD=head_dim, HEADS_PAD=1)
        compiled = _compile(kv_cache._write_kv_cache_kernel, sig, constexprs, cap, WRITE_OPTIONS)
        _report(f"write_kv_cache {dtype} D={head_dim}", cap, compiled)


def test_cuobjdump_is_shipped() -> None:
    """The register figures above need triton's bundled cuobjdump; say so if it moved."""
    assert CUOBJDUMP.exists() or shutil.which("cuobjdump"), f"no cuobjdump at {CUOBJDUMP}"


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 64, 256])
def test_int8_linear_compiles_with_tensor_cores(cap: int, dtype: str, rows: int) -> None:
    """Each of tile_shape's tiles: the int8 weight widened in registers feeds mma."""
    sig = {"x_ptr": f"*{dtype}", "w_ptr": "*i8", "scales_ptr": "*fp32", "out_ptr": f"*{dtype}"}
    sig.update({n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_wn", "stride_om")})
    block_m, block_n, block_k, options = int8_linear.tile_shape(rows)
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION="tf32",
                      DOT_FP32=False)  # fmt: skip
    compiled = _compile(int8_linear._int8_linear_kernel, sig, constexprs, cap, dict(options))
    _report(f"int8_linear {dtype} {block_m}x{block_n}x{block_k}", cap, compiled)
    ptx = compiled.asm["ptx"]
    mma = re.search(r"\b(wgmma\.mma_async|mma\.sync)\.\S+", ptx)
    assert mma, f"no tensor-core instruction in the sm_{cap} PTX (int8_linear {dtype}, {rows})"
    assert re.search(r"\bld\.global\S*\.(b8|u8|s8|b32|v\d\.b32)", ptx), "int8 weight loads"
    print(f"  tensor cores: {mma.group(0)}")
