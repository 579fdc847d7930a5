"""Compile the training kernels (PDMA and the address decoder) and the decoding step kernels for sm_90 (Hopper) without a GPU,
with every flag off and every flag on; prints one line per kernel.

Run by ``test_kernels_compile.py`` in a fresh process: under ``TRITON_INTERPRET=1`` the kernels
are interpreted functions and cannot be compiled. The interpreter runs Python, so it accepts code
that does not lower (a type mismatch, a non-constexpr where a constexpr is needed); this catches it
on a machine without a GPU. Each line also gives the kernel's stack frame, where registers spill (the
address decoder's forward spilled 344 bytes a thread at the paper's shape from 3bc9c1f until 412912c).
"""

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ramnet.ops.address import triton_kernels as decoder_kernels
from ramnet.ops.address.triton import beam_search_constants, decoder_constants
from ramnet.ops.pdma import token_triton_kernels as token_kernels
from ramnet.ops.pdma import triton_kernels as kernels
from ramnet.ops.pdma.triton import GROUP
from ramnet.ops.ram import step_kernels
from ramnet.ops.ram.step import fused_step_constants
from ramnet.states import offload, offload_kernels

FLOAT_ARGS = {"empty_z", "eps", "tau"}
POINTER_TYPES = {"perm_ptr": "*i32", "start_ptr": "*i8", "sidx_ptr": "*i64", "v_ptr": "*bf16", "grad_o_ptr": "*bf16",
                 "shift_ptr": "*i64", "index_ptr": "*i64", "write_idx_ptr": "*i64", "read_idx_ptr": "*i64",
                 "cu_ptr": "*i32"}
# The step and offload kernels' arguments by name: bf16 activations, fp32 state and rows, int64 slots and scalars.
ARG_TYPES = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "o": "*bf16", "S": "*fp32", "z": "*fp32",
                 "offset": "*i64", "gamma": "*fp32", "cape": "*i1", "write_idx": "*i64", "read_idx": "*i64",
                 "write_w": "*fp32", "read_w": "*fp32", "decay": "*fp32", "z_slot": "*i64", "z_val": "*fp32",
                 # the host-resident state's row movement (ramnet/states/offload_kernels.py)
                 "data": "*fp32", "host": "*fp32", "table": "*fp32", "line": "*i64", "host_row": "*i64",
                 "flags": "*i64", "dirty": "*u8", "slots": "*i64", "tags": "*i32", "last": "*i32", "count": "*i64",
                 "counts": "*i64", "line_out": "*i64", "host_row_out": "*i64", "flags_out": "*i64", "clock": "*i64",
                 "memory_slots": "i64"}


def signature(fn, constexprs):
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in ARG_TYPES:
            return ARG_TYPES[name]
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
        # Token-by-token PDMA at K 8: slices of 32 columns on one warp, or all 64 on two; packed
        # sequences and the saved rows with every flag on.
        token = dict(K=8, KP=8, DS=64 if flag else 32, VARLEN=flag, KEEP="evict_last" if flag else "",
                     STREAM="evict_first" if flag else "", num_warps=2 if flag else 1)
        yield token_kernels.token_fwd_kernel, dict(token, SAVE=flag)
        yield token_kernels.token_bwd_kernel, token
        # The paper's decoder (U 5, d_p 4: int32 slot indices) and one with M = 16**8 = 2**32 (int64).
        constants = decoder_constants(20 if not flag else 128, 5 if not flag else 8, 8, has_shift=flag)
        constants.pop("num_warps")
        yield decoder_kernels.beam_topk_fwd_kernel, beam_search_constants(constants, 8)
        yield decoder_kernels.beam_topk_bwd_kernel, constants
    # M = 2**62 over U = 62 partitions: the loop over partitions is not unrolled (it took minutes).
    constants = decoder_constants(124, 62, 8, has_shift=True)
    constants.pop("num_warps")
    yield decoder_kernels.beam_topk_fwd_kernel, beam_search_constants(constants, 8)
    yield decoder_kernels.beam_topk_bwd_kernel, constants
    # Decoding: the step kernel, and the step that decodes its own addresses (paper shape; M = 2**32).
    for bump in (False, True):
        yield step_kernels.pdma_step_kernel, dict(K=8, K_PAD=8, D_V=64, BLOCK_DV=64, BUMP_OFFSET=bump)
        # a store's step on its table of gathered rows (ramnet/states), as the dense layout's tiles launch it
        yield step_kernels.table_step_kernel, dict(K=8, K_PAD=8, D_V=64, BLOCK_DV=64, BUMP_OFFSET=bump, num_warps=2)
    # The layouts of step.py: fused (the beam, and at M 1024 the dense decoder), split (dense), the
    # split's z commit, the separate decoder. (The beam at M = 2**32 once: minutes of compile each.)
    for d_k, u, dense, block_dv in ((20, 5, False, None), (128, 8, False, None), (20, 5, True, None), (20, 5, True, 16)):
        constants = dict(fused_step_constants(d_k, u, 8, 64, dense, block_dv))
        constants.pop("num_warps")
        yield step_kernels.split_step_kernel if block_dv else step_kernels.fused_step_kernel, constants
    yield step_kernels.commit_z_kernel, dict(KB=8)
    constants = beam_search_constants(decoder_constants(20, 5, 8, has_shift=True), 8)
    for name in ("num_warps", "HAS_SHIFT"):
        constants.pop(name)
    yield step_kernels.decode_pairs_kernel, dict(constants, DENSE=False, MB=1, TOP=1)
    # The host-resident state's fill and store (2K = 16 lanes, rows of d_v + 1 = 65 floats).
    for lfu in (False, True):  # 10% of M = 1024: 6 sets of 16 ways
        yield offload_kernels.plan_fill_kernel, dict(N=16, N_PAD=16, SETS=6, W=16, W_PAD=16, LFU=lfu, ROW=65, COLS=128,
                                                     num_warps=offload.PLAN_WARPS)  # as launched (1 warp spills)
    yield offload_kernels.step_store_kernel, dict(K=8, K_PAD=8, D_V=64, BLOCK_DV=64, COLS=128, num_warps=2)
    # ... and as a store's step runs it (step_addresses): one pair per program, the dense decoder at M 1024.
    fused = fused_step_constants(20, 5, 8, 64, True)
    yield step_kernels.decode_pairs_kernel, dict(constants, DENSE=True, MB=fused["MB"], TOP=fused["TOP"], BLOCK_N=2,
                                                 num_warps=fused["num_warps"])


# cuobjdump ships with Triton's NVIDIA backend (beside its ptxas).
CUOBJDUMP = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"


def stack_bytes(cubin: bytes) -> int:
    """The kernel's per-thread stack frame (``cuobjdump -res-usage``'s STACK): where registers spill."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    for fn, constexprs in cases():
        constexprs = dict(constexprs)
        warps = constexprs.pop("num_warps", 1)  # a launch option, not an argument (1: the kernels' default)
        compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, constexprs), constexprs=constexprs),
                                  target=target, options=dict(num_warps=warps))
        cubin = compiled.asm["cubin"]
        print(f"{fn.__name__} {constexprs}: {len(cubin)} bytes of cubin, stack {stack_bytes(cubin)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
