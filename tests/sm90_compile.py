"""The TCA prefill, block-sparse and ragged decode kernels compiled for sm_90 (H100/H200) by the installed triton,
on a machine without a GPU: a kernel change that does not lower for Hopper fails here, before a
GPU session. Run as a script (the Triton interpreter must be off, so the tests call it in a
subprocess). Usage: python tests/sm90_compile.py prefill|block|decode|compaction|select HAS_BIAS(0/1)
-> one line of JSON: shared memory bytes and counts of PTX instructions (wgmma, fma, ex2)."""
from __future__ import annotations

import json
import sys


def _compile(fn, const: dict, types: dict[str, str], num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_prefill(bias: bool):
    """_prefill_kernel with the H100 tile of head dim 128 (pointer loads: TMA descriptors need a device)."""
    from tca_attention.engine import triton_prefill as TP

    const = dict(G=4, GP=4, BLOCK_P=32, BLOCK_N=128, HEAD_D=128, UPCAST=False, USE_TMA=False, PREC="tf32",
                 HAS_BIAS=bias, NB=2)
    types = {**dict.fromkeys(("Q", "K", "V", "KC", "VC", "OUT"), "*bf16"),
             **dict.fromkeys(("KIDX", "KSTART", "NFAR", "WINDOW", "BPOS"), "*i32"),
             **dict.fromkeys(("KEY_START", "LOCAL_START"), "*i64"), "BVAL": "*fp32", "qk_scale": "fp32"}
    return _compile(TP._prefill_kernel, const, types, 8, 3)


def compile_block(bias: bool):
    """_block_prefill_kernel with in-loop skipping (the BLASST path) and without the key bias."""
    from tca_attention.engine import triton_block as TB

    const = dict(HG=4, GP=4, PER_KV=1, BLOCK_Q=128, BLOCK_K=64, BLOCK_P=32, BLOCK_N=64, HEAD_D=128, HAS_EXTRA=False,
                 SKIP=True, UPCAST=False, PREC="tf32", HAS_BIAS=bias, NB=2)
    types = {**dict.fromkeys(("Q", "K", "V", "OUT"), "*bf16"), **dict.fromkeys(("INDPTR", "INDICES", "BPOS"), "*i32"),
             **dict.fromkeys(("KEY_START", "EXTRA", "DROPPED"), "*i64"),
             **dict.fromkeys(("SKIP_LOG2", "BVAL"), "*fp32"), "qk_scale": "fp32"}
    return _compile(TB._block_prefill_kernel, const, types, 8, 2)


def compile_decode(bias: bool):
    """_decode_split_kernel with the default launch (block_n 32, 4 warps, 4 stages), 8B shape (g = 4)."""
    from tca_attention.engine import triton_decode as TD

    const = dict(G=4, ROWS=16, BLOCK_N=32, HEAD_D=128, BKV_P=8, UPCAST=False, PREC="tf32", USE_TMA=False,
                 SELECTED=False, PAGE=16, HAS_BIAS=bias, NB=2)
    types = {**dict.fromkeys(("Q", "GK", "GV", "TK", "TV"), "*bf16"),
             **dict.fromkeys(("QPOS", "GPOS", "GOFF", "TPOS"), "*i64"),
             **dict.fromkeys(("PAGES", "NSEL", "BPOS"), "*i32"),
             **dict.fromkeys(("PACC", "PML", "BVAL"), "*fp32"), "qk_scale": "fp32"}
    return _compile(TD._decode_split_kernel, const, types, 4, 4)


def compile_compaction(bias: bool):
    """prepare_prefill's _compact_kernel (head dim 128, bf16) and _bounds_kernel; -> the latter."""
    from tca_attention.engine import triton_prefill as TP

    types = {**dict.fromkeys(("K", "V", "KC", "VC"), "*bf16"), "KEPT_IDX": "*i64", "KEPT_LEN": "*i32", "KIDX": "*i32"}
    _compile(TP._compact_kernel, dict(HEAD_D=128, ROWS=32), types, 4, 3)
    types = {**dict.fromkeys(("KIDX", "KEPT_LEN", "KSTART", "NFAR"), "*i32"),
             **dict.fromkeys(("KEY_START", "LOCAL_START", "WINDOW"), "*i64")}
    return _compile(TP._bounds_kernel, dict(TILES=1024), types, 4, 3)


def compile_select(bias: bool):
    """The fused selection's in-block ranking kernels (block 128, option span 7 computed inside):
    _select_kernel and _window_select_kernel (GS 1, with the band); -> the latter."""
    from tca_attention.methods.tca import triton_select as TT

    types = {**dict.fromkeys(("S", "MASS"), "*fp32"), **dict.fromkeys(("KEEP", "COUNT"), "*i32"),
             **dict.fromkeys(("KEY_START", "NB"), "*i64"), "SEL": "*i8"}
    _compile(TT._select_kernel, dict(BLOCK=128, HALF=3), types, 8, 3)
    types = {**dict.fromkeys(("S", "SB", "MASS_IN", "MASS"), "*fp32"), **dict.fromkeys(("KEEP", "COUNT"), "*i32"),
             **dict.fromkeys(("KEY_START", "NB"), "*i64"), "SEL": "*i8"}
    return _compile(TT._window_select_kernel, dict(GS=1, GSP=1, BLOCK=128, BAND=True, HALF=3), types, 8, 3)


if __name__ == "__main__":
    kernel = {"prefill": compile_prefill, "block": compile_block, "decode": compile_decode,
              "compaction": compile_compaction, "select": compile_select}[sys.argv[1]](sys.argv[2] == "1")
    ptx = kernel.asm["ptx"]
    print(json.dumps({"shared": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
                      "fma": ptx.count("fma.rn.f32"), "ex2": ptx.count("ex2.approx")}))
