"""Compile the PDMA kernels for sm_90 (Hopper) without a GPU, with every flag off and every flag
on; prints one line per kernel.

Run by ``test_kernels_compile.py`` in a fresh process: under ``TRITON_INTERPRET=1`` the kernels
are interpreted functions and cannot be compiled. The interpreter runs Python, so it accepts code
that does not lower (a type mismatch, a non-constexpr where a constexpr is needed); this catches it
on a machine without a GPU.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ramnet.ops.pdma import triton_kernels as kernels
from ramnet.ops.pdma.triton_segments import GROUP

FLOAT_ARGS = {"empty_z", "eps"}
POINTER_TYPES = {"perm_ptr": "*i32", "start_ptr": "*i8", "sidx_ptr": "*i64", "v_ptr": "*bf16", "grad_o_ptr": "*bf16"}


def signature(fn, constexprs):
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return POINTER_TYPES.get(name, "*fp32")
        return "fp32" if name in FLOAT_ARGS else "i32"
    return {name: kind(name) for name in fn.arg_names}


def cases():
    for flag in (False, True):
        base = dict(K=8, DV=64, CH=64, G=GROUP, HAS_H0=flag)
        yield kernels.fwd_aggregate_kernel, base
        yield kernels.fwd_output_kernel, dict(base, STORE_FINAL=flag)
        yield kernels.bwd_aggregate_kernel, dict(base, HAS_GRAD_FINAL=flag)
        yield kernels.bwd_output_kernel, dict(base, HAS_GRAD_FINAL=flag)
        yield kernels.carry_kernel, dict(DV=64, REVERSE=flag, G_CARRY=32)


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    for fn, constexprs in cases():
        compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, constexprs), constexprs=constexprs),
                                  target=target, options=dict(num_warps=1))
        print(f"{fn.__name__} {constexprs}: {len(compiled.asm['cubin'])} bytes of cubin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
