"""The interface of RAM-Net's non-dense states, and the PDMA step they share.

A RAM layer's state is the PDMA memory ``S [B, H, M, d_v]``, ``z [B, H, M]`` and ``offset [B]``. The
dense state (``RAMState``, ``ramnet.ops``) holds all of it on the device. A ``SlotStore`` holds the same
memory some other way and serves a token's step from the rows ``[S, z]`` of the slots it touches only:

- ``gather(rows, slots)``: the rows ``[R, K, d_v + 1]`` of ``slots [R, K]`` (``R = B * H``), where a slot
  never written reads as the empty row ``[0, 1/M]``;
- ``scatter(rows, slots, values)``: store them back.

``SlotStore.run`` is then the op's recurrent path on those rows, with the same arithmetic as
``pdma_step`` (``ramnet/ops/ram/recurrent.py``), so that a store and the dense state give the same outputs:
per token the K written rows ``decay * old + w * [v, 1]``, stored, then ``o = sum_k r_k S / (z + eps)``
over the K read rows after the write. A decoding step (``step``) where the dense state's step runs
the Triton kernels (``RAMMemory.step``) runs them too, on a table of the token's gathered rows with the
decoder and tiles of the dense state's layout (``step_addresses``), meant to give the dense state's bits,
so that a bf16 model's greedy tokens do not drift apart (they did with the torch arithmetic on the GPU:
``benchmarks/results/offload_h100_partial.md``). Tested bit for bit under the interpreter; on an H100 the
greedy tokens matched at B=1 and B=16 at 1b13f1f and 75643be (with ``EXACT_ROUNDING``,
``ramnet/ops/ram/step.py``; at 19f676d, without it, not at B=16), and a GPU test of the bits at M 7776 with
the beam decoder still fails (docs/trace.md). Stores are created empty and unallocated by a ``RAMNetCache``
with ``ram_state="sparse"`` or ``"offload"`` (``make_store``), and allocate on the layer's first call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..ops.checks import compute_dtype
from ..ops.ram.common import decode_tokens
from ..ops.ram.state import RAMState
from ..ops.triton_support import kernels_apply


class SlotStore(ABC):
    """Base class of the non-dense states (``SparseState``, ``OffloadState``). After ``allocate``:
    ``batch, heads, memory_slots, d_v, dtype, device`` and ``offset [B]`` (int64, on the device)."""

    kind = "?"

    def __init__(self):
        self.allocated = False
        self.tokens = 0  # tokens consumed per sequence (every call advances all sequences alike)

    # -- set up -------------------------------------------------------------------------------------
    def allocate(self, batch: int, heads: int, memory_slots: int, d_v: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.batch, self.heads, self.memory_slots, self.d_v = batch, heads, memory_slots, d_v
        self.dtype, self.device = dtype, torch.device(device)
        self.offset = torch.zeros(batch, dtype=torch.long, device=device)
        self.empty_z = 1.0 / memory_slots
        self._allocate()
        self.allocated = True

    @abstractmethod
    def _allocate(self) -> None:
        """Allocate the store's tensors for the shapes ``allocate`` set."""

    @abstractmethod
    def load_dense(self, state: RAMState) -> None:
        """Take the contents of a dense state (allocating from its shapes if needed)."""

    # -- the rows -------------------------------------------------------------------------------------
    @abstractmethod
    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The rows ``[R, K, d_v + 1]`` of ``slots [R, K]`` (never-written slots read ``[0, 1/M]``)."""

    @abstractmethod
    def scatter(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``values [R, K, d_v + 1]`` as the rows of ``slots [R, K]``."""

    def begin_token(self, write_idx: torch.Tensor, read_idx: torch.Tensor) -> None:
        """Called before each token's gathers with its slots ``[R, K]`` (a cache makes them resident)."""

    # -- what it holds ----------------------------------------------------------------------------------
    @abstractmethod
    def to_dense(self) -> RAMState:
        """The dense ``RAMState`` this store stands for (M-sized: for tests and small M)."""

    @abstractmethod
    def device_bytes(self) -> int:
        """Bytes of state on the compute device (the cache for ``OffloadState``)."""

    def host_bytes(self) -> int:
        return 0

    @abstractmethod
    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a selection or reordering of the sequences, on dim 0) to every per-sequence tensor."""

    # -- the op ---------------------------------------------------------------------------------------
    def run(self, memory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens=None):
        """Write every (k_t, v_t) of ``[B, T, H, *]`` and read with q_t after the write, from this store:
        ``(o [B, T, H, d_v] in v's dtype, self)``. ``memory`` is the layer's ``RAMMemory``."""
        if cu_seqlens is not None:
            raise ValueError(f"the {self.kind} state reads unpadded sequences only (no attention_mask padding)")
        out_dtype, compute = v.dtype, compute_dtype(v.dtype)
        if not self.allocated:
            self.allocate(q.shape[0], q.shape[2], memory.memory_slots, v.shape[-1], compute, q.device)
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        spec = memory.spec(q)
        seq_len = q.shape[1]
        positions = self.offset[:, None] + torch.arange(seq_len, device=q.device)
        write_idx, write_w, decay, read_idx, read_w = decode_tokens(q, k, spec, positions,
                                                                    use_triton=kernels_apply(q))
        outputs = [self._step(write_idx[:, t], write_w[:, t], decay[:, t], v[:, t], read_idx[:, t], read_w[:, t],
                              spec.eps) for t in range(seq_len)]
        self.offset.add_(seq_len)
        self.tokens += seq_len
        o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
        return o.to(out_dtype), self

    def step(self, memory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One decoding token, ``q, k [B, H, d_k]``, ``v [B, H, d_v]``: ``o [B, H, d_v]`` in v's dtype.
        On the step kernels where the dense state's step runs on them (``RAMMemory.steps_on_kernels``), else
        the torch arithmetic of ``run``."""
        if memory.steps_on_kernels(q.device):
            return self._kernel_step(memory, q, k, v)
        o, _ = self.run(memory, q[:, None], k[:, None], v[:, None])
        return o[:, 0].to(v.dtype)

    def _kernel_step(self, memory, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``step`` on the Triton kernels: the addresses from the dense step's decoder, then the step on a
        table of the 2K gathered rows (``_step_table``: the K written first, then the K read; a read of a
        slot written this token takes the written row, from the kernel's registers, as on the dense state),
        which also advances ``offset`` and stores the K written rows back."""
        from ..ops.ram.step import step_addresses  # imports triton

        batch, heads, _ = q.shape
        d_v = v.shape[-1]
        if not self.allocated:
            self.allocate(batch, heads, memory.memory_slots, d_v, compute_dtype(v.dtype), q.device)
        spec = memory.spec(q, inplace_state=True)
        (slots, write_w, decay, read_w), launch = step_addresses(q, k, v, self.offset, spec)
        table = self._table(slots)  # [R, 2K, d_v + 1]
        o = self._step_table(table, slots, write_w, decay, v.reshape(batch * heads, d_v), read_w, spec.eps, launch,
                             v.dtype)
        self.tokens += 1
        return o.view(batch, heads, d_v)

    def _table(self, slots: torch.Tensor) -> torch.Tensor:
        """The kernel step's rows ``[R, 2K, d_v + 1]`` of ``slots [R, 2K]`` (the K write slots, then the K
        read slots; a read slot also written this token: any row, the kernel takes the written one)."""
        topk = slots.shape[1] // 2
        w_slots, r_slots = slots[:, :topk], slots[:, topk:]
        self.begin_token(w_slots, r_slots)
        return torch.cat([self.gather(w_slots), self.gather(r_slots)], dim=1)

    def _step_table(self, table, slots, write_w, decay, v, read_w, eps: float, launch, out_dtype) -> torch.Tensor:
        """The kernel step on the token's ``table`` (``pdma_table_step``, ``offset`` advanced), then its first K
        rows, the written ones, stored; returns ``o [R, d_v]``."""
        from ..ops.ram.step import pdma_table_step

        o = pdma_table_step(table, slots, write_w, decay, v, read_w, eps, launch, out_dtype=out_dtype,
                            offset=self.offset, num_heads=self.heads)
        topk = slots.shape[1] // 2
        self.scatter(slots[:, :topk], table[:, :topk])
        return o

    def _step(self, write_idx, write_w, decay, v, read_idx, read_w, eps):
        """``pdma_step``'s arithmetic on the gathered rows; addresses ``[B, H, K]``, ``v [B, H, d_v]``."""
        batch, heads, topk = write_idx.shape
        rows = batch * heads
        w_slots, r_slots = write_idx.reshape(rows, topk), read_idx.reshape(rows, topk)
        self.begin_token(w_slots, r_slots)
        d_v = self.d_v
        old = self.gather(w_slots).view(batch, heads, topk, d_v + 1)
        new_S = decay[..., None] * old[..., :d_v] + write_w[..., None] * v[:, :, None, :]
        new_z = decay * old[..., d_v] + write_w
        self.scatter(w_slots, torch.cat([new_S, new_z[..., None]], dim=-1).view(rows, topk, d_v + 1))
        read = self.gather(r_slots).view(batch, heads, topk, d_v + 1)
        read_rows, read_z = read[..., :d_v], read[..., d_v]
        return (read_w[..., None] * read_rows / (read_z[..., None] + eps)).sum(2)

    def empty_rows(self, n: int, k: int) -> torch.Tensor:
        rows = torch.zeros(n, k, self.d_v + 1, dtype=self.dtype, device=self.device)
        rows[..., self.d_v] = self.empty_z
        return rows


def make_store(kind: str, **options) -> SlotStore:
    """An empty store: ``"sparse"`` (``SparseState``) or ``"offload"`` (``OffloadState(**options)``)."""
    from .offload import OffloadState
    from .sparse import SparseState

    if kind == "sparse":
        if options:
            raise ValueError(f"the sparse state takes no options, got {sorted(options)}")
        return SparseState()
    if kind == "offload":
        return OffloadState(**options)
    raise ValueError(f"ram_state must be 'dense', 'sparse' or 'offload', got {kind!r}")


__all__ = ["SlotStore", "make_store"]
