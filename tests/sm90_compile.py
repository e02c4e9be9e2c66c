"""The TCA prefill, block-sparse and ragged decode kernels compiled for sm_90 (H100/H200) by the installed triton,
on a machine without a GPU: a kernel change that does not lower for Hopper fails here, before a
GPU session. Run as a script (the Triton interpreter must be off, so the tests call it in a
subprocess). Usage: python tests/sm90_compile.py prefill|block|decode|decode_pdl|compaction|select|ring_append HAS_BIAS(0/1)
-> one line of JSON: shared memory bytes, counts of PTX instructions (wgmma, fma, ex2), and the
registers and stack bytes per thread of the cubin (cuobjdump, bundled with triton; -1 without it):
stack beyond a few bytes means register spills)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile


def _compile(fn, const: dict, types: dict[str, str], num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    # a launch specialises pointers to 16-byte aligned tensors (every buffer here is), which is what
    # lets loads vectorise and the pipeliner turn them into cp.async: without it the lowering differs
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()}, attrs=attrs)
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


def compile_decode(bias: bool, pdl: bool = False):
    """_decode_split_kernel with the default launch (block_n 32, 4 warps, 4 stages), 8B shape (g = 4)."""
    from tca_attention.engine import triton_decode as TD

    const = dict(G=4, ROWS=16, BLOCK_N=32, HEAD_D=128, BKV_P=8, UPCAST=False, PREC="tf32", USE_TMA=False,
                 SELECTED=False, PAGE=16, HAS_BIAS=bias, NB=2, PDL=pdl)
    types = {**dict.fromkeys(("Q", "GK", "GV", "TK", "TV"), "*bf16"),
             **dict.fromkeys(("QPOS", "GPOS", "GOFF", "TPOS"), "*i64"),
             **dict.fromkeys(("PAGES", "NSEL", "BPOS"), "*i32"),
             **dict.fromkeys(("PACC", "PML", "BVAL"), "*fp32"), "qk_scale": "fp32"}
    return _compile(TD._decode_split_kernel, const, types, 4, 4)


def compile_decode_merge(pdl: bool):
    """_decode_combine_kernel (8B shape, 128 items a pass, the whole head dim a program)."""
    from tca_attention.engine import triton_decode as TD

    const = dict(G=4, ROWS=16, HEAD_D=128, BLOCK_D=128, SPLIT_B=128, BKV_P=8, PDL=pdl)
    types = {**dict.fromkeys(("PACC", "PML", "LSE"), "*fp32"), "GOFF": "*i64", "OUT": "*bf16"}
    return _compile(TD._decode_combine_kernel, const, types, 4, 1)


def compile_decode_pdl(bias: bool):
    """Both decode kernels as programmatic dependent launches (pdl=1); -> the split kernel. The
    merge's PTX must wait on the split grid; without PDL neither kernel carries griddepcontrol."""
    merge = compile_decode_merge(True).asm["ptx"]
    assert merge.count("griddepcontrol.wait") == 1, "the PDL merge does not wait for the split grid"
    assert "griddepcontrol" not in compile_decode_merge(False).asm["ptx"]
    assert "griddepcontrol" not in compile_decode(bias, False).asm["ptx"]
    return compile_decode(bias, True)


def compile_compaction(bias: bool):
    """prepare_prefill's _compact_kernel (head dim 128, bf16) and _bounds_kernel; -> the latter."""
    from tca_attention.engine import triton_prefill as TP

    types = {**dict.fromkeys(("K", "V", "KC", "VC"), "*bf16"), "KEPT_IDX": "*i64", "KEPT_LEN": "*i32", "KIDX": "*i32"}
    _compile(TP._compact_kernel, dict(HEAD_D=128, ROWS=32), types, 4, 3)
    types = {**dict.fromkeys(("KIDX", "KEPT_LEN", "KSTART", "NFAR"), "*i32"),
             **dict.fromkeys(("KEY_START", "LOCAL_START", "WINDOW"), "*i64")}
    return _compile(TP._bounds_kernel, dict(TILES=1024), types, 4, 3)


def compile_select(bias: bool):
    """The fused selection's option-span kernel (span 7) and in-block ranking kernels (block 128):
    _span_kernel, _select_kernel and _window_select_kernel (GS 1 and 4, with the band); -> the
    latter at GS 4."""
    from tca_attention.methods.tca import triton_select as TT

    _compile(TT._span_kernel, dict(HALF=3, BLOCK=1024), {"S": "*fp32", "RANK": "*fp32"}, 4, 3)
    types = {**dict.fromkeys(("S", "RANK", "MASS"), "*fp32"), **dict.fromkeys(("KEEP", "COUNT"), "*i32"),
             **dict.fromkeys(("KEY_START", "NB"), "*i64"), "SEL": "*i8"}
    _compile(TT._select_kernel, dict(BLOCK=128), types, 8, 3)
    types = {**dict.fromkeys(("S", "RANK", "SB", "MASS_IN", "MASS"), "*fp32"), **dict.fromkeys(("KEEP", "COUNT"), "*i32"),
             **dict.fromkeys(("KEY_START", "NB"), "*i64"), "SEL": "*i8"}
    _compile(TT._window_select_kernel, dict(GS=1, GSP=1, BLOCK=128, BAND=True), types, 8, 3)
    # gqa="union" at g = 4 (the default options on the 8B shape): computing the span scores in
    # here spilled 464 bytes a thread and ran 4x slower on an H100 (239 -> 1030 us at 128K)
    return _compile(TT._window_select_kernel, dict(GS=4, GSP=4, BLOCK=128, BAND=True), types, 8, 3)


def compile_ring_append(bias: bool):
    """The static caches' one-token ring append (bf16 ring, head dim 128), with the tail's
    positions and the query position (StaticRaggedLayer) and without (StaticWindowLayer); -> the former."""
    from tca_attention.engine import triton_ring_append as TR

    types = {**dict.fromkeys(("K", "V", "TK", "TV"), "*bf16"), **dict.fromkeys(("TPOS", "COUNTER", "QPOS"), "*i64")}
    _compile(TR._ring_append_kernel, dict(HAS_TPOS=False, HAS_QPOS=False, BLOCK_D=128), types, 1, 1)
    return _compile(TR._ring_append_kernel, dict(HAS_TPOS=True, HAS_QPOS=True, BLOCK_D=128), types, 1, 1)


def resource_usage(kernel) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the compiled cubin, or (-1, -1) without cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(reg.group(1)), int(stack.group(1))) if reg and stack else (-1, -1)


if __name__ == "__main__":
    kernel = {"prefill": compile_prefill, "block": compile_block, "decode": compile_decode,
              "decode_pdl": compile_decode_pdl,
              "compaction": compile_compaction, "select": compile_select,
              "ring_append": compile_ring_append}[sys.argv[1]](sys.argv[2] == "1")
    ptx = kernel.asm["ptx"]
    reg, stack = resource_usage(kernel)
    print(json.dumps({"shared": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
                      "fma": ptx.count("fma.rn.f32"), "ex2": ptx.count("ex2.approx"), "reg": reg, "stack": stack,
                      "gdc_wait": ptx.count("griddepcontrol.wait"),
                      "gdc_launch": ptx.count("griddepcontrol.launch_dependents")}))
