"""A linear recurrence ``h_j = a_j * h_{j-1} + b_j`` over a long sequence, without a Python loop
over its length.

The sequence is cut into chunks of ``CHUNK`` steps. One pass steps through the chunk positions,
all chunks at once (``CHUNK`` vectorised steps); each chunk then is an affine map
``h_out = A * h_in + h_local``, and the chunk maps form a sequence ``CHUNK`` times shorter that is
scanned the same way, recursively. Work is O(N * D), the loop count O(CHUNK * log_CHUNK N). A step
with ``a_j = 0`` cuts the chain: that is how independent segments share one scan.
"""

from __future__ import annotations

import torch

CHUNK = 32  # measured on CPU: 16-256 perform alike, the scan being memory bound


def linear_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """``a [N]``, ``b [N, D]`` -> ``h [N, D]`` with ``h_{-1} = 0`` (with ``reverse``:
    ``h_j = a_j * h_{j+1} + b_j``, ``h_N = 0``). Autograd through it works but is slow; the fused
    segment op writes its own backward with the reverse scan."""
    n, d = b.shape
    num_chunks = -(-n // CHUNK)
    pad = num_chunks * CHUNK - n
    if pad:
        a = torch.cat([a, a.new_ones(pad)])
        b = torch.cat([b, b.new_zeros(pad, d)])
    a_c, b_c = a.view(num_chunks, CHUNK), b.view(num_chunks, CHUNK, d)
    h_c = torch.empty_like(b_c)
    decay_c = torch.empty_like(a_c)  # product of a within the chunk, from its entry up to each step
    h = b.new_zeros(num_chunks, d)
    decay = a.new_ones(num_chunks)
    for j in range(CHUNK - 1, -1, -1) if reverse else range(CHUNK):
        h = torch.addcmul(b_c[:, j], a_c[:, j, None], h)
        decay = decay * a_c[:, j]
        h_c[:, j] = h
        decay_c[:, j] = decay
    if num_chunks > 1:
        # True state at the exit of each chunk, then carried into the following one.
        exit_ = 0 if reverse else -1
        ends = linear_scan(decay_c[:, exit_].contiguous(), h_c[:, exit_].contiguous(), reverse)
        none = ends.new_zeros(1, d)
        carry = torch.cat([ends[1:], none]) if reverse else torch.cat([none, ends[:-1]])
        h_c.addcmul_(decay_c[:, :, None], carry[:, None])
    return h_c.view(num_chunks * CHUNK, d)[:n]
