"""``ram_attention``: validation in one place, then one of the execution paths."""

from __future__ import annotations

import torch

from ..checks import check_choice, check_finite, check_float_tensor, check_same, check_state_size, compute_dtype
from ..triton_support import kernels_apply
from .naive import naive_forward
from .parallel import parallel_forward
from .recurrent import recurrent_forward
from .segmented import segmented_forward
from .spec import DEFAULT_PROXY_EPS, RAMSpec, build_spec
from .state import RAMState
from .triton import triton_forward

PATHS = {"naive": naive_forward, "recurrent": recurrent_forward, "parallel": parallel_forward, "triton": triton_forward}


def ram_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_partitions: int,
    topk: int,
    gamma=1.0,
    tau: float = 1.0,
    eps: float = 1e-6,
    proxy_eps: float = DEFAULT_PROXY_EPS,
    cape=False,
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    mode: str | None = None,
    inplace_state: bool = False,
    time_segments: int | None = None,
):
    """RAM attention (RAM-Net: the address decoder, CAPE and PDMA of docs/ops.md).

    Args:
        q, k: ``[B, T, H, d_k]``; ``d_k`` splits into ``num_partitions`` (U) parts of ``d_p``, giving
            ``M = d_p ** U`` memory slots.
        v: ``[B, T, H, d_v]``.
        topk: slots read and written per token (K).
        gamma: PDMA decay power, a float or a ``[H]`` tensor, >= 0 (not trained).
        tau: product-softmax temperature. eps: added to the normaliser z before dividing.
        proxy_eps: smoothing of the decay's proxy gradient, in (0, 1].
        cape: CAPE on or off, a bool or a bool ``[H]`` tensor.
        initial_state: a ``RAMState`` (or ``(S, z, offset)``) with one entry per sequence.
        output_final_state: return the state after the last token.
        cu_seqlens: int ``[N+1]`` offsets of N packed sequences (needs B = 1).
        mode: ``"naive"``, ``"recurrent"``, ``"parallel"``, ``"triton"`` or None (best for the
            input, see ``default_mode``).
        inplace_state: decoding without autograd: update ``initial_state``'s tensors in place
            (K rows per token instead of a copy of the whole state) and return it as the final
            state. Runs the recurrent path; the state must be in the compute dtype (fp32, or
            fp64 for fp64 inputs).
        time_segments: cut each sequence into this many pieces of T / time_segments tokens that the path
            runs side by side (``segmented.py``: twice the work, ``time_segments`` times the parallelism,
            for few long sequences on a GPU). Must divide T; not with cu_seqlens or inplace_state.
            None or 1: one piece.

    Returns:
        ``(o, final_state)``: ``o [B, T, H, d_v]`` in v's dtype (fp32 accumulation, fp64 for fp64
        input) and a ``RAMState`` or None. Continuing from ``final_state`` gives exactly what one
        call on the whole sequence gives.
    """
    check_float_tensor("q", q, ndim=4)
    spec = build_spec(q.shape[2], q.shape[3], num_partitions=num_partitions, topk=topk, gamma=gamma, tau=tau, eps=eps,
                      proxy_eps=proxy_eps, cape=cape, dtype=compute_dtype(q.dtype), device=q.device,
                      inplace_state=inplace_state)
    return run_ram_attention(q, k, v, spec, initial_state=initial_state, output_final_state=output_final_state,
                             cu_seqlens=cu_seqlens, mode=mode, time_segments=time_segments)


def run_ram_attention(q, k, v, spec: RAMSpec, *, initial_state=None, output_final_state: bool = False,
                      cu_seqlens: torch.Tensor | None = None, mode: str | None = None,
                      time_segments: int | None = None, check_values: bool = True):
    """``ram_attention`` with the hyper-parameters already checked into ``spec`` (``build_spec``, for
    q's heads, d_k, compute dtype and device): the inputs are validated as ``ram_attention``
    validates them, then the path runs. For callers that hold a spec per layer, so that each call
    does not build it again (building checks gamma on the device, a host synchronisation).
    ``check_values=False`` skips what reads tensor values on the host (q, k, v finite; the initial
    state's z > 0, finite, offsets >= 0), each a synchronisation with the GPU: for a layer calling the
    op on its own projections and its own cached state, where the shapes, dtypes and devices are still
    checked."""
    q, k, v = (check_float_tensor(name, x, ndim=4) for name, x in (("q", q), ("k", k), ("v", v)))
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)} = [B, T, H, d_k], got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, d_v] with B, T, H = {tuple(q.shape[:3])} as in q, got {tuple(v.shape)}")
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    batch, seq_len, heads, d_k = q.shape
    if seq_len < 1 or heads < 1 or v.shape[-1] < 1:
        raise ValueError(f"q and v need at least one token, head and value channel, got {tuple(q.shape)}, {tuple(v.shape)}")
    compute = compute_dtype(q.dtype)
    _check_spec(spec, heads, d_k, compute, q.device)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, q)
    num_seqs = batch if cu_seqlens is None else len(cu_seqlens) - 1
    state = None
    if initial_state is not None:
        # A decoding step (inplace_state) trusts the values of the state it updates: they come from
        # earlier checked steps, and scanning all M slots for NaN on every token would make the
        # step's cost grow with the memory size and synchronise with the GPU.
        state = _check_state(initial_state, num_seqs, heads, spec.memory_slots, v, compute, spec.eps,
                             scan=check_values and not spec.inplace_state, check_offsets=check_values)
    if check_values:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_finite(name, x)
    if spec.inplace_state:
        mode = _check_inplace(initial_state, mode, compute, (q, k, v))
    if mode is None:
        mode = default_mode(q, seq_len, stateful=initial_state is not None or bool(output_final_state))
    check_choice("mode", mode, (None, *sorted(PATHS)))
    segments = _check_time_segments(time_segments, seq_len, cu_seqlens, spec.inplace_state)
    # The time-split path builds the pieces' states (M-sized) whatever output_final_state says.
    _check_state_size(mode, spec, num_seqs, q, v.shape[-1], compute, bool(output_final_state) or segments > 1)

    q, k, v_in = q.to(compute), k.to(compute), v.to(compute)
    if segments > 1:
        o, final = segmented_forward(PATHS[mode], q, k, v_in, spec, state, bool(output_final_state), segments)
    else:
        o, final = PATHS[mode](q, k, v_in, spec, state, bool(output_final_state or spec.inplace_state), cu_seqlens)
    return o.to(v.dtype), final


def _check_time_segments(time_segments, seq_len: int, cu_seqlens, inplace_state: bool) -> int:
    """The number of pieces ``time_segments`` asks for (1: the path runs as it is)."""
    if time_segments is None:
        return 1
    if isinstance(time_segments, bool) or not isinstance(time_segments, int) or time_segments < 1:
        raise ValueError(f"time_segments must be None or an int >= 1, got {time_segments!r}")
    if time_segments > 1 and seq_len % time_segments:
        raise ValueError(f"time_segments must divide the sequence length T={seq_len}, got {time_segments}")
    if time_segments > 1 and (cu_seqlens is not None or inplace_state):
        raise ValueError("time_segments > 1 takes neither cu_seqlens (packed sequences) nor inplace_state (decoding)")
    return time_segments


def _check_spec(spec: RAMSpec, heads: int, d_k: int, compute: torch.dtype, device: torch.device) -> None:
    if not isinstance(spec, RAMSpec):
        raise TypeError(f"spec must be a RAMSpec (build_spec), got {type(spec).__name__}")
    if spec.num_partitions * spec.partition_dim != d_k or spec.gamma.shape != (heads,):
        raise ValueError(f"spec is for H={spec.gamma.shape[0]} heads of d_k={spec.num_partitions * spec.partition_dim}, "
                         f"but q has H={heads}, d_k={d_k}")
    if spec.gamma.dtype != compute or spec.gamma.device != device or spec.cape.device != device:
        raise ValueError(f"spec must be built for the compute dtype {compute} on {device} (as q), got gamma in "
                         f"{spec.gamma.dtype} on {spec.gamma.device}")


def _check_state_size(mode: str, spec: RAMSpec, num_seqs: int, q: torch.Tensor, d_v: int, compute,
                      output_final_state: bool) -> None:
    """The one size check of the paths that build an ``N x H x M`` state: the naive and recurrent
    paths (the naive one also builds dense ``[B, T, H, M]`` addresses) and any path asked for the
    final state. A decoding step updating its state in place allocates nothing M-sized."""
    if spec.inplace_state or (mode in ("parallel", "triton") and not output_final_state):
        return
    batch, seq_len, heads = q.shape[:3]
    shapes = {"S": (num_seqs, heads, spec.memory_slots, d_v), "z": (num_seqs, heads, spec.memory_slots)}
    if mode == "naive":
        shapes["dense addresses"] = (2, batch, seq_len, heads, spec.memory_slots)
    what = f"mode={mode!r}" + (" with output_final_state=True" if output_final_state else "")
    check_state_size(what, shapes, compute, q.device,
                     "with this many memory slots (M = {:,}) use mode='parallel' or 'triton' without "
                     "output_final_state (in a model, use_cache=False): their memory grows with T * K, not M"
                     .format(spec.memory_slots))


def default_mode(q: torch.Tensor, seq_len: int, stateful: bool = True) -> str:
    """One token continuing or returning a state (decoding): the recurrent step (a Triton kernel on
    CUDA without autograd). Otherwise the Triton kernels on CUDA when Triton is installed, else the
    torch parallel path; these are also what one token without a state gets (the recurrent path
    would build an M-sized state only to drop it). fp64 input stays on the torch paths, which
    compute in fp64 (the kernels compute in fp32)."""
    if seq_len == 1 and stateful:
        return "recurrent"
    return "triton" if kernels_apply(q) else "parallel"


def _check_cu_seqlens(cu_seqlens, q: torch.Tensor) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be an int32 or int64 tensor [N+1] of sequence offsets")
    if cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; they must match")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={q.shape[0]}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[1] or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T={q.shape[1]} to cover every token, got {bounds}"
        )


def _check_state(state, num_seqs: int, heads: int, memory_slots: int, v: torch.Tensor, compute, eps: float,
                 scan: bool = True, check_offsets: bool = True) -> RAMState:
    if not isinstance(state, tuple) or len(state) != 3:
        raise ValueError("initial_state must be a RAMState or a tuple (S, z, offset)")
    S, z, offset = state
    d_v = v.shape[-1]
    check_float_tensor("initial_state.S", S)
    check_float_tensor("initial_state.z", z)
    if S.shape != (num_seqs, heads, memory_slots, d_v):
        raise ValueError(
            f"initial_state.S must be [N, H, M, d_v] = {[num_seqs, heads, memory_slots, d_v]}, got {list(S.shape)}"
        )
    if z.shape != (num_seqs, heads, memory_slots):
        raise ValueError(f"initial_state.z must be [N, H, M] = {[num_seqs, heads, memory_slots]}, got {list(z.shape)}")
    if not isinstance(offset, torch.Tensor) or offset.dtype != torch.long or offset.shape != (num_seqs,):
        raise ValueError(f"initial_state.offset must be an int64 tensor of shape [N] = [{num_seqs}]")
    for name, x in (("initial_state.S", S), ("initial_state.z", z), ("initial_state.offset", offset)):
        if x.device != v.device:
            raise ValueError(f"{name} is on {x.device} but v is on {v.device}; they must match")
    if scan:
        check_finite("initial_state.S", S)
        check_finite("initial_state.z", z)
        # Reads divide by z + eps: every state the op returns has z > 0 (it starts at 1/M and each write adds
        # w > 0 to a decayed, still positive z), and a z + eps <= 0 would make the output non-finite.
        if bool((z + eps <= 0).any()):
            raise ValueError(f"initial_state.z must be > -eps = {-eps} (the reads divide by z + eps; the op's states "
                             f"have z > 0), got min {z.min().item()}")
    if check_offsets and bool((offset < 0).any()):
        raise ValueError("initial_state.offset must be >= 0")
    return RAMState(S.to(compute), z.to(compute), offset)


def _check_inplace(initial_state, mode, compute, inputs) -> str:
    if initial_state is None:
        raise ValueError("inplace_state=True needs an initial_state to update")
    if mode not in (None, "recurrent"):
        raise ValueError(f"inplace_state=True runs the recurrent path; got mode={mode!r}")
    tensors = (*inputs, initial_state[0], initial_state[1])
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        raise ValueError("inplace_state=True is for decoding without autograd: use torch.no_grad() or inputs "
                         "that do not require grad")
    if initial_state[0].dtype != compute or initial_state[1].dtype != compute:
        raise ValueError(f"inplace_state=True needs initial_state.S and .z in the compute dtype {compute}, got "
                         f"{initial_state[0].dtype} and {initial_state[1].dtype}")
    return "recurrent"
