"""What every hand-written autograd Function of the ops shares: it computes in the dtype its inputs
arrive in, whatever autocast region it is called from, and says plainly that it has no second
derivative.

Under ``torch.autocast`` the ``bmm``/``matmul`` calls inside a forward or backward would run in bf16
(the ops promise fp32 accumulation) and the backward would meet bf16 products where it saved fp32
tensors. The hand-written backwards are first-order only: ``once_differentiable`` makes a double
backward (a gradient penalty, ``gradgradcheck``) raise instead of returning a wrong number.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable


def _device_type(args) -> str:
    return next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")


def without_autocast(fn):
    """A Function's ``forward(ctx, ...)`` or ``backward(ctx, ...)`` run with autocast off on the
    device of its first tensor argument."""

    @functools.wraps(fn)
    def run(ctx, *args):
        with torch.autocast(device_type=_device_type(args), enabled=False):
            return fn(ctx, *args)

    return run


def first_order_backward(fn):
    """``backward`` without autocast, and refusing to be differentiated again."""
    return once_differentiable(without_autocast(fn))
