"""The decoding step for serving, on the kernels of ``step_kernels.py``: ``pdma_step_triton`` does
what ``pdma_step(..., inplace=True)`` (recurrent.py) does in one launch, touching the K written rows
(read and written back) and the K read rows of ``S`` and ``z`` and nothing else;
``ram_decode_step`` decodes one token's addresses and runs the step, in one launch with
``triton_decode``.

Both are for serving: no validation, no host synchronisation and no allocation whose size depends on
the data, so one step can be captured in a CUDA graph and replayed. ``ram_attention(...,
inplace_state=True)`` is the validated entry point for the same step.
"""

from __future__ import annotations

import functools

import torch

from ..checks import compute_dtype
from ..triton_support import HAS_TRITON, require_triton
from .common import decode_tokens
from .spec import DEFAULT_PROXY_EPS, RAMSpec, build_spec
from .state import RAMState

if HAS_TRITON:  # an optional dependency: without it the steps raise require_triton's error
    import triton

    from ..address.triton import beam_search_constants, decoder_constants
    from . import step_kernels as kernels


# The layouts of ``ram_decode_step`` (``step_kernels.py``'s docstring describes them):
#   "fused"    one program per (b, h) decodes its key and query with the beam search, then steps
#   "dense"    the same with the dense decoder (all M slots scored at once; M <= DENSE_MAX_SLOTS)
#   "split"    grid (b, h) x d_v column blocks, each program decoding (densely where M allows);
#              z is committed by a second kernel
#   "separate" the Triton decoder over many rows per program, then the step kernel
#   "torch"    the torch decoder (in the state's dtype), then the step kernel
LAYOUTS = ("fused", "dense", "split", "separate", "torch")
# The default layout (fp32 states; fp64 ones take "torch"). "dense" (which falls back to the beam
# search where M > DENSE_MAX_SLOTS): on an H200 at the paper's layer shape, in CUDA graphs, it took
# 0.042 / 0.141 ms at B 64 / 256 against the fused beam step's 0.150 / 0.355 and every other layout's
# 0.069-0.549 (benchmarks/bench_step_variants.py at 3dfc8f1, one partial run: low SM clocks, B 1 and 16
# not timed). At B 1 the beam decoder is about 90% of the fused step: one row per thread in a chain of
# dependent picks, which the dense decoder spreads over all threads.
DEFAULT_LAYOUT = "dense"
# The dense decoder scores all M slots of a row in registers: only for small memories.
DENSE_MAX_SLOTS = 4096
# The split layout's d_v columns per program (None: _launch_config's block, i.e. no split at d_v 64).
SPLIT_BLOCK_DV = 16
# The dense layout's warps per (sequence, head) program, by the step's B * H rows: (at most this many rows,
# warps), then 1. Its [M, 2] decoder tile sized them before (8 at M 1024, about 8 scores a thread), which is
# best for latency at B 1 but wastes the GPU at large B: on an H100 (75643be, benchmarks/results/
# step_variants_h100_75643be.md, CUDA-graph bursts, paper shape) 4 warps took 0.0099 ms at B 1 (8: 0.0103),
# 2 warps 0.0111 at B 16 (8: 0.0137) and 1 warp 0.0619 at B 256 (8: 0.1439; the separate layout 0.1278; fla's
# Gated DeltaNet step 0.2195). B 64 (1024 rows) was not timed: 1 warp from there is an interpolation.
DENSE_WARPS_BY_ROWS = ((64, 4), (512, 2))
# Fixed warps for the dense layout instead of DENSE_WARPS_BY_ROWS (benchmarks/bench_step_variants.py's dense_wN).
DENSE_WARPS: int | None = None


def dense_warps(rows: int) -> int:
    """The dense layout's warps per program for a step of ``rows`` = B * H (sequence, head) pairs."""
    if DENSE_WARPS is not None:
        return DENSE_WARPS
    return next((warps for most, warps in DENSE_WARPS_BY_ROWS if rows <= most), 1)
# The step kernels compile without contracting a * b + c into one FMA. A sparse or host-resident state's
# step runs the decoder and the step in two kernels (step_addresses, pdma_step_triton) and must give the
# fused kernel's bits; contraction is the compiler's choice per kernel, so the same source could round
# differently in the two (the interpreter never contracts). On an H100 at 19f676d a store's z of a written
# row differed from the dense state's after one token while the outputs matched, which one contraction more
# or less in z_new = decay * z + w would explain (tests/states; suspected, not yet confirmed on a GPU).
EXACT_ROUNDING = dict(enable_fp_fusion=False)


def default_layout(dtype: torch.dtype) -> str:
    """``ram_decode_step``'s layout when none is asked for, for a state of ``dtype``."""
    return "torch" if dtype == torch.float64 else DEFAULT_LAYOUT


def _launch_config(topk: int, d_v: int) -> tuple[int, int, int]:
    """The step kernels' launch shape: K padded to a power of two, the d_v columns per block (tiles
    of at most about 4K entries) and the warps."""
    k_pad = max(2, 1 << (topk - 1).bit_length())
    block_dv = min(max(16, 1 << (d_v - 1).bit_length()), max(16, 4096 // k_pad))
    tile = k_pad * block_dv
    num_warps = 4 if tile >= 2048 else 2 if tile >= 512 else 1
    return k_pad, block_dv, num_warps


def pdma_step_triton(S, z, write_idx, write_w, decay, v, read_idx, read_w, eps: float,
                     launch: tuple[int, int, int] | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One PDMA step in one kernel: the semantics of ``pdma_step(..., inplace=True)``.

    ``S [B, H, M, d_v]`` and ``z [B, H, M]`` (fp32, or fp64) are updated in place on the K written
    rows only (``new = decay * old + w * [v, 1]``); then ``o = sum_k r_k S[read_k] / (z[read_k] +
    eps)`` over the K read rows, after this step's write. ``write_idx, write_w, decay, read_idx,
    read_w`` are ``[B, H, K]`` (int64 slots, distinct within a row, and float weights), ``v [B, H,
    d_v]`` any float dtype (computed in S's dtype). Returns ``o [B, H, d_v]`` in S's dtype, or in
    ``out_dtype``, rounded by the kernel's store as the fused step rounds it.

    No checks, no host synchronisation: safe to capture in a CUDA graph. ``launch``: the kernel's
    ``(K_PAD, BLOCK_DV, num_warps)`` (default ``_launch_config``'s; ``step_addresses`` gives the fused
    step's, for the same reductions in the same tiles).
    """
    require_triton(S.device, "pdma_step_triton")
    batch, heads, _, d_v = S.shape
    topk = write_idx.shape[-1]
    o = torch.empty(batch, heads, d_v, dtype=out_dtype or S.dtype, device=S.device)
    if batch * heads == 0 or d_v == 0:
        return o
    k_pad, block_dv, num_warps = launch or _launch_config(topk, d_v)
    kernels.pdma_step_kernel[(batch * heads,)](
        S, z, write_idx.contiguous(), write_w.contiguous(), decay.contiguous(), v.contiguous(),
        read_idx.contiguous(), read_w.contiguous(), o, write_idx,  # offset: unused without BUMP_OFFSET
        heads, float(eps), topk,
        *S.stride(), *z.stride(),
        K=topk, K_PAD=k_pad, D_V=d_v, BLOCK_DV=block_dv, BUMP_OFFSET=False, num_warps=num_warps, **EXACT_ROUNDING,
    )
    return o


@torch.no_grad()
def ram_decode_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RAMState, spec: RAMSpec, *,
    triton_decode: bool | None = None, layout: str | None = None
) -> torch.Tensor:
    """Decode one token per sequence: ``q, k [B, H, d_k]``, ``v [B, H, d_v]``.

    ``state`` (``S``, ``z`` in fp32 or fp64, ``offset`` int64 ``[B]``) is updated in place,
    ``offset += 1`` included; returns ``o [B, H, d_v]`` in v's dtype. The same step as
    ``ram_attention(q[:, None], k[:, None], v[:, None], initial_state=state, inplace_state=True)``
    (which validates its arguments; this function trusts them, never synchronises with the host
    and can be captured in a CUDA graph). ``spec`` comes from ``decode_spec``.

    ``layout`` picks the kernels (``LAYOUTS``; the same step and the same slots in each, see
    ``step_kernels.py``): "fused" and "dense" decode the addresses inside the step kernel (in fp32),
    one launch ``offset += 1`` included; "split" too, in two launches; "separate" the Triton decoder over many rows per
    program, then the step kernel (two launches); "torch" the torch decoder (in the state's dtype)
    and then the step kernel (a dozen small launches, ``benchmarks/results/decode_h100.md``).
    ``triton_decode`` is the older switch: False is "torch", True the default Triton layout. With
    neither, ``default_layout(dtype)``: "torch" for fp64 states, else ``DEFAULT_LAYOUT``.
    """
    compute = state.S.dtype
    if layout is None:
        if triton_decode is False:
            layout = "torch"
        else:
            layout = default_layout(torch.float32 if triton_decode else compute)
    if layout == "torch":
        write_idx, write_w, decay, read_idx, read_w = decode_tokens(
            q[:, None].to(compute), k[:, None].to(compute), spec, state.offset[:, None]
        )
        o = pdma_step_triton(
            state.S, state.z, write_idx[:, 0], write_w[:, 0], decay[:, 0], v, read_idx[:, 0], read_w[:, 0], spec.eps
        ).to(v.dtype)
        state.offset.add_(1)
        return o
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _triton_step(q, k, v, state, spec, layout)


@functools.lru_cache(maxsize=None)
def fused_step_constants(d_k: int, num_partitions: int, topk: int, d_v: int, dense: bool = False,
                         block_dv: int | None = None, warps: int | None = None) -> dict:
    """The step kernels' compile-time constants and warps for one geometry (computed once: the step
    is on the serving hot path). ``dense``: the dense decoder (where M <= DENSE_MAX_SLOTS);
    ``block_dv``: the columns per program (the split layout); ``warps``: the dense decoder's warps
    (``dense_warps``; None: sized by its tile)."""
    constants = beam_search_constants(decoder_constants(d_k, num_partitions, topk, has_shift=True), topk)
    _, default_dv, num_warps = _launch_config(topk, d_v)  # its K_PAD is the decoder's KB
    dense = bool(dense) and constants["M"] <= DENSE_MAX_SLOTS
    names = ("U", "DP", "DP_PAD", "K", "KP", "KPB", "KB", "K_OUT", "M", "INDEX_64", "UNROLL")
    mb = triton.next_power_of_2(constants["M"]) if dense else 1
    if dense:  # the dense decoder's [M, 2] tile: about 8 scores per thread, or the warps asked for
        num_warps = warps or max(num_warps, min(8, max(1, 2 * mb // 256)))
    return dict({name: constants[name] for name in names}, D_V=d_v, BLOCK_DV=block_dv or default_dv, DENSE=dense,
                MB=mb, TOP=constants["DP"] ** (num_partitions - 1) if dense else 1, num_warps=num_warps)


def _triton_step(q, k, v, state: RAMState, spec: RAMSpec, layout: str) -> torch.Tensor:
    """The Triton layouts of ``ram_decode_step`` (all but "torch"), ``offset += 1`` included."""
    require_triton(q.device, "ram_decode_step")
    batch, heads, d_k = q.shape
    d_v = v.shape[-1]
    o = torch.empty_like(v)
    if batch * heads == 0 or d_v == 0:
        state.offset.add_(1)
        return o
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    S, z, offset = state.S, state.z, state.offset
    if layout == "separate":
        return _separate_step(q, k, v, state, spec, o)
    dense = layout in ("dense", "split")
    block_dv = None
    if layout == "split":
        block_dv = min(SPLIT_BLOCK_DV or d_v, max(16, triton.next_power_of_2(d_v)))
    constants = fused_step_constants(d_k, spec.num_partitions, spec.topk, d_v, dense, block_dv,
                                     dense_warps(batch * heads) if layout == "dense" else None)
    args = (heads, float(spec.eps), float(spec.tau),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            *S.stride(), *z.stride())
    if layout != "split":
        kernels.fused_step_kernel[(batch * heads,)](q, k, v, S, z, offset, spec.gamma, spec.cape, o, *args,
                                                   **constants, **EXACT_ROUNDING)  # offset += 1 included
        return o
    kb = constants["KB"]
    z_slot = torch.empty(batch * heads * kb, dtype=torch.int64, device=q.device)
    z_val = torch.empty(batch * heads * kb, dtype=z.dtype, device=q.device)
    grid = (batch * heads, triton.cdiv(d_v, constants["BLOCK_DV"]))
    kernels.split_step_kernel[grid](q, k, v, S, z, offset, spec.gamma, spec.cape, o, z_slot, z_val, *args,
                                    **constants, **EXACT_ROUNDING)
    kernels.commit_z_kernel[(batch * heads,)](z, offset, z_slot, z_val, heads, *z.stride(), KB=kb, num_warps=1)
    return o


def _decode_pairs(q, k, offset, spec: RAMSpec, fused: dict | None = None) -> tuple[torch.Tensor, ...]:
    """``decode_pairs_kernel``: one token's ``slots [B * H, 2K]`` (the K write slots, then the K read
    slots) and ``write_w, decay, read_w [B * H, K]``, CAPE and the write decay applied; ``offset [B]`` is
    read (CAPE), not advanced. Without ``fused``, the "separate" layout's launch: the beam search over
    many rows per program. With ``fused`` (``fused_step_constants``), the fused step's decoder in its
    tile: one (key, query) pair per program, its dense decoder where it has one, its warps."""
    batch, heads, d_k = q.shape
    constants = beam_search_constants(decoder_constants(d_k, spec.num_partitions, spec.topk, has_shift=True),
                                      spec.topk)
    if fused is not None:
        constants = dict(constants, BLOCK_N=2, num_warps=fused["num_warps"])
        dense = dict(DENSE=fused["DENSE"], MB=fused["MB"], TOP=fused["TOP"])
    else:
        dense = dict(DENSE=False, MB=1, TOP=1)
    k_out, block_n = constants["K_OUT"], constants["BLOCK_N"]
    pairs = batch * heads
    # One tensor for both slot lists: a store's cache plans the 2K slots of a row together.
    slots = torch.empty(pairs, 2 * k_out, dtype=torch.int64, device=q.device)
    write_w, decay, read_w = (torch.empty(pairs, k_out, dtype=torch.float32, device=q.device) for _ in range(3))
    names = ("U", "DP", "DP_PAD", "K", "KP", "KPB", "KB", "K_OUT", "M", "INDEX_64", "UNROLL", "num_warps")
    kernels.decode_pairs_kernel[(triton.cdiv(2 * pairs, block_n),)](
        q, k, offset, spec.gamma, spec.cape, slots, write_w, decay, slots[:, k_out:], read_w,
        pairs, heads, float(spec.tau), 2 * k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        **{name: constants[name] for name in names}, **dense, BLOCK_N=block_n, **EXACT_ROUNDING,
    )
    return slots, write_w, decay, read_w


def step_addresses(q, k, v, offset, spec: RAMSpec) -> tuple[tuple[torch.Tensor, ...], tuple[int, int, int]]:
    """What ``ram_decode_step``'s default layout computes for one token, split in two for a step over
    gathered rows (a ``SlotStore``'s, ``ramnet/states``): the addresses ``slots [B * H, 2K]`` (the K
    write slots, then the K read slots) and ``write_w, decay, read_w [B * H, K]`` from the decoder that
    layout uses, and the ``launch`` of ``pdma_table_step`` whose tiles are that layout's. The step
    kernels share ``_write_then_read``, so a store that runs ``pdma_table_step`` with these on its
    gathered rows gets the dense state's bits (a different decoder or tile gives weights and sums that
    differ in the last bits, and the greedy tokens of a bf16 model then drift apart). ``q, k [B, H,
    d_k]``, ``v [B, H, d_v]``; offset is read, not advanced. Where Triton runs."""
    require_triton(q.device, "step_addresses")
    batch, heads, d_k = q.shape
    d_v = v.shape[-1]
    compute = compute_dtype(v.dtype)
    layout = default_layout(compute)
    if layout == "torch":  # the torch decoder in the state's dtype, then the step kernel's own launch
        write_idx, write_w, decay, read_idx, read_w = (
            a[:, 0].reshape(batch * heads, -1)
            for a in decode_tokens(q[:, None].to(compute), k[:, None].to(compute), spec, offset[:, None]))
        return (torch.cat([write_idx, read_idx], dim=1), write_w, decay, read_w), _launch_config(write_w.shape[1], d_v)
    if layout == "separate":
        addresses = _decode_pairs(q, k, offset, spec)
        return addresses, _launch_config(addresses[1].shape[1], d_v)
    # "fused", "dense" and "split": their decoder; the fused kernel's tiles (the split layout's are the
    # same per column block)
    fused = fused_step_constants(d_k, spec.num_partitions, spec.topk, d_v, layout in ("dense", "split"),
                                 warps=dense_warps(batch * heads) if layout == "dense" else None)
    return _decode_pairs(q, k, offset, spec, fused), (fused["KB"], fused["BLOCK_DV"], fused["num_warps"])


def pdma_table_step(table, slots, write_w, decay, v, read_w, eps: float, launch: tuple[int, int, int],
                    out_dtype: torch.dtype, offset: torch.Tensor | None = None, num_heads: int = 1) -> torch.Tensor:
    """A store's step on its token's table of rows, in one kernel (``table_step_kernel``): ``table [R, 2K,
    d_v + 1]`` (the rows of ``slots [R, 2K]``, the K written slots', then the K read slots'; R = B * H),
    updated in place on its K written rows; ``write_w, decay, read_w [R, K]`` and ``launch`` from
    ``step_addresses``; ``v [R, d_v]``. Returns ``o [R, d_v]`` in ``out_dtype``, rounded by the kernel's
    store. With ``offset`` (``[B]``, ``num_heads`` rows per sequence), the kernel also advances it by one:
    no launch of its own. No checks, no host synchronisation (capturable)."""
    rows, d_v = v.shape
    o = torch.empty(rows, d_v, dtype=out_dtype, device=v.device)
    if rows == 0 or d_v == 0:
        if offset is not None:
            offset.add_(1)
        return o
    k_pad, block_dv, num_warps = launch
    kernels.table_step_kernel[(rows,)](
        table, slots, write_w, decay, v, read_w, o, slots if offset is None else offset, num_heads, float(eps),
        K=write_w.shape[1], K_PAD=k_pad, D_V=d_v, BLOCK_DV=block_dv, BUMP_OFFSET=offset is not None,
        num_warps=num_warps, **EXACT_ROUNDING,
    )
    return o


def _separate_step(q, k, v, state: RAMState, spec: RAMSpec, o) -> torch.Tensor:
    """The "separate" layout: ``decode_pairs_kernel`` (the beam decoder's rows per program), then
    ``pdma_step_kernel`` advancing ``offset``."""
    batch, heads, _ = q.shape
    d_v = v.shape[-1]
    S, z = state.S, state.z
    slots, write_w, decay, read_w = _decode_pairs(q, k, state.offset, spec)
    pairs, k_out = write_w.shape
    k_pad, block_dv, num_warps = _launch_config(k_out, d_v)
    v_flat = v.reshape(pairs, d_v)
    if v_flat.stride(0) != d_v:
        v_flat = v_flat.contiguous()
    o = o if o.is_contiguous() else torch.empty(batch, heads, d_v, dtype=o.dtype, device=o.device)
    kernels.pdma_step_kernel[(pairs,)](  # stores o in v's dtype, as the fused step does
        S, z, slots, write_w, decay, v_flat, slots[:, k_out:], read_w, o, state.offset,
        heads, float(spec.eps), 2 * k_out, *S.stride(), *z.stride(),
        K=k_out, K_PAD=k_pad, D_V=d_v, BLOCK_DV=block_dv, BUMP_OFFSET=True, num_warps=num_warps, **EXACT_ROUNDING,
    )
    return o


def decode_spec(num_heads: int, head_k_dim: int, *, num_partitions: int, topk: int, gamma=1.0, tau: float = 1.0,
                eps: float = 1e-6, proxy_eps: float = DEFAULT_PROXY_EPS, cape=False, device=None,
                dtype: torch.dtype = torch.float32) -> RAMSpec:
    """The ``RAMSpec`` of ``ram_decode_step``, checked once (as ``ram_attention`` checks its
    arguments) so that the steps need not. ``dtype`` is the state's (fp32, or fp64)."""
    return build_spec(num_heads, head_k_dim, num_partitions=num_partitions, topk=topk, gamma=gamma, tau=tau, eps=eps,
                      proxy_eps=proxy_eps, cape=cape, dtype=compute_dtype(dtype), device=device, inplace_state=True)


__all__ = ["LAYOUTS", "decode_spec", "default_layout", "pdma_step_triton", "pdma_table_step", "ram_decode_step",
           "step_addresses"]
