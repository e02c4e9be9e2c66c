"""Shared memory of the window importance kernel compiled for sm_90 (H100/H200) by the installed
triton, on a machine without a GPU: run as a script (the Triton interpreter must be off, so the
tests call it in a subprocess). Usage: python tests/sm90_shared_memory.py D b rd dtype -> bytes."""
from __future__ import annotations

import sys


def window_importance_shared_bytes(D: int, b: int, rd: int, dtype: str) -> int:
    """Bytes of shared memory per block of _window_importance_kernel for head dim D, block b, rd
    dot rows, dtype fp32/bf16, with the launch options step_window_importance picks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tca_attention.methods.tca import triton_select as TT

    fn = TT._window_importance_kernel
    elt = 4 if dtype == "fp32" else 2
    const = dict(G=8, HP=8, R=16, RD=rd, BLOCK=b, HEAD_D=D, DK=TT.dot_chunk(b, D, elt), BAND=True,
                 PREC="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    ints, tensors = {"KEY_START", "NB"}, {"Q", "K"}
    ptrs = {"M", "LS", "S", "MASS", "H", "SB"} | ints | tensors
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*i64" if name in ints else f"*{dtype}" if name in tensors else "*fp32"
        else:
            sig[name] = "fp32" if name in ("scaling", "w_mass", "w_conc") else "i32"
    # pointers 16-byte aligned, as a launch specialises them (pipelined loads then use shared memory)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=4 if rd * b <= 4096 else 8, num_stages=TT.window_importance_stages(b, D, elt))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).metadata.shared


if __name__ == "__main__":
    D, b, rd, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(window_importance_shared_bytes(D, b, rd, dtype))
