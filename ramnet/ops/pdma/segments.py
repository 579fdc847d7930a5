"""PDMA over slot-sorted events, fused with the reads: the float core of the parallel path.

Writes arrive sorted by (sequence, slot, time); each slot's writes form a segment in which
``h_j = a_j * h_{j-1} + w_j * [v_j, 1]`` (S and z in one row, starting from the slot's initial
content ``h0``). Reads gather the state after their last write and output
``sum_k r_k * S_k / (z_k + eps)``. Written as one autograd Function with a hand-written backward
because autograd through the gathers and the scan keeps several copies of the [events, d_v + 1]
rows alive and makes about twice as many passes over them.
"""

from __future__ import annotations

import torch

from ..autograd_support import first_order_backward, without_autocast
from .scan import linear_scan


class _SegmentPDMA(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, decay, write_w, v_ext, h0, read_w, miss_rows, write_token, seg_start, read_src, hit, topk,
                eps, empty_z):
        # b = w * [v, 1] at each write, plus a * h0 where a segment starts; the chain is cut there.
        b = v_ext.index_select(0, write_token).mul_(write_w[:, None])
        start_decay = decay * seg_start
        if h0 is None:  # the empty state: S = 0, z = empty_z (= 1/M)
            b[:, -1].add_(start_decay, alpha=empty_z)
        else:
            b.addcmul_(start_decay[:, None], h0)
        a = decay.masked_fill(seg_start, 0.0)
        h = linear_scan(a, b)
        del b

        rows = _read_rows(h, read_src, hit, miss_rows)
        read_w_eff = read_w if miss_rows is not None else read_w * hit  # a miss on the empty state reads S = 0
        denom = rows[:, -1] + eps
        coef = read_w_eff / denom
        d_v = v_ext.shape[1] - 1
        # Small batched matrix products: on CPU several times faster than multiply-then-sum.
        o = torch.bmm(coef.view(-1, 1, topk), rows.view(-1, topk, d_v + 1)[..., :d_v]).squeeze(1)

        ctx.save_for_backward(a, h, decay, write_w, v_ext, h0, miss_rows, write_token, seg_start, read_src, hit,
                              denom, coef)
        ctx.topk, ctx.empty_z = topk, empty_z
        return o, h

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_o, grad_h_out):
        a, h, decay, write_w, v_ext, h0, miss_rows, write_token, seg_start, read_src, hit, denom, coef = ctx.saved_tensors
        topk = ctx.topk
        d_v = v_ext.shape[1] - 1
        grad_o = grad_o.contiguous()  # it arrives transposed; bmm would loop over the batch
        num_reads = read_src.shape[0]

        # Reads: o_t = sum_k coef_k * S_k with coef_k = r_k / (z_k + eps).
        rows = _read_rows(h, read_src, hit, miss_rows)
        grad_coef = torch.bmm(rows.view(-1, topk, d_v + 1)[..., :d_v], grad_o[:, :, None]).view(-1)
        grad_read_w = grad_coef / denom
        if miss_rows is None:
            grad_read_w = grad_read_w * hit
        grad_rows = torch.empty(num_reads, d_v + 1, dtype=h.dtype, device=h.device)
        grad_rows[:, :d_v] = (coef.view(-1, topk, 1) * grad_o[:, None, :]).view(num_reads, d_v)
        grad_rows[:, d_v] = -grad_coef * coef / denom
        grad_miss = None
        if miss_rows is not None:
            grad_miss = grad_rows * (~hit)[:, None]
            grad_rows = grad_rows * hit[:, None]
        # (on the empty state a miss has coef = 0, so its row gets no gradient)
        grad_h = torch.zeros_like(h) if grad_h_out is None else grad_h_out.clone()
        grad_h.index_add_(0, read_src, grad_rows)
        del rows, grad_rows

        # The scan run backwards: g_j = dL/dh_j + a_{j+1} g_{j+1} is dL/db_j.
        a_next = torch.cat([a[1:], a.new_zeros(1)])
        g = linear_scan(a_next, grad_h, reverse=True)
        del grad_h
        grad_a = torch.zeros_like(a)
        grad_a[1:] = _rowdot(g[1:], h[:-1])
        grad_h0 = None
        if h0 is None:
            grad_start = g[:, -1] * ctx.empty_z
        else:
            grad_start = _rowdot(g, h0)
            grad_h0 = g * (decay * seg_start)[:, None]
        grad_decay = torch.where(seg_start, grad_start, grad_a)

        grad_write_w = _rowdot(g, v_ext.index_select(0, write_token))
        grad_v_ext = torch.zeros_like(v_ext).index_add_(0, write_token, g.mul_(write_w[:, None]))
        return (grad_decay, grad_write_w, grad_v_ext, grad_h0, grad_read_w, grad_miss,
                None, None, None, None, None, None, None)


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product ``[N, D] x [N, D] -> [N]`` (einsum avoids the [N, D] temporary)."""
    return torch.einsum("nd,nd->n", x, y)


def _read_rows(h, read_src, hit, miss_rows):
    rows = h.index_select(0, read_src)
    return rows if miss_rows is None else torch.where(hit[:, None], rows, miss_rows)


def segment_pdma(decay, write_w, v_ext, read_w, *, write_token, seg_start, read_src, hit, topk, eps,
                 empty_z, h0=None, miss_rows=None):
    """Run PDMA over sorted writes and read it out.

    Writes (``[Nw]``, sorted by (sequence, slot, time)): ``decay`` = (1 - w)^gamma, ``write_w``,
    ``write_token`` (row of ``v_ext [tokens, d_v + 1]``, the values with a column of ones appended),
    ``seg_start`` (bool: first write of a slot's segment) and ``h0 [Nw, d_v + 1]``, the slot's
    initial [S, z] at segment starts (None: the empty state S = 0, z = ``empty_z``).
    Reads (``[Nr]`` in token order, K per token): ``read_w``, ``read_src`` (index of the last write
    at or before the read in its slot's segment), ``hit`` (False when there is none: the read
    sees the initial content, ``miss_rows [Nr, d_v + 1]``, or S = 0 when that is None).

    Returns ``o [Nr / K, d_v]`` and the scanned states ``h [Nw, d_v + 1]`` (both differentiable).
    """
    return _SegmentPDMA.apply(decay, write_w, v_ext, h0, read_w, miss_rows, write_token, seg_start, read_src, hit,
                              topk, eps, empty_z)
