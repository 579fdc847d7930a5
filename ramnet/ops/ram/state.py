"""The recurrent state of RAM attention, passed between chunks and decoding steps."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RAMState(NamedTuple):
    """PDMA memory of N sequences: values ``S [N, H, M, d_v]``, normaliser ``z [N, H, M]`` (fp32,
    or fp64 for fp64 inputs) and ``offset [N]`` (int64): the tokens already consumed, i.e. the
    absolute position CAPE continues from."""

    S: torch.Tensor
    z: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def empty(cls, num_seqs: int, num_heads: int, memory_slots: int, head_v_dim: int, *, dtype, device) -> "RAMState":
        """The state before any token: S = 0, z = 1/M, offset 0."""
        return cls(
            torch.zeros(num_seqs, num_heads, memory_slots, head_v_dim, dtype=dtype, device=device),
            torch.full((num_seqs, num_heads, memory_slots), 1.0 / memory_slots, dtype=dtype, device=device),
            torch.zeros(num_seqs, dtype=torch.long, device=device),
        )

    def select(self, index) -> "RAMState":
        """The states of the sequences picked by ``index`` (an int, slice or LongTensor along N)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return RAMState(self.S[index], self.z[index], self.offset[index])
