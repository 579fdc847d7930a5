"""The PDMA decay ``(1 - w) ** gamma`` with the paper's proxy gradient (docs/ops.md).

The forward value is the exact power. The backward uses the derivative of the smoothed
``(pe + (1 - pe)(1 - w)) ** gamma``, which stays finite as w -> 1 when gamma < 1 (the exact
derivative blows up there) and non-zero when gamma >= 1 (the exact one vanishes).
"""

from __future__ import annotations

import torch


class _ProxyDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, gamma: torch.Tensor, proxy_eps: float) -> torch.Tensor:
        ctx.save_for_backward(w, gamma)
        ctx.proxy_eps = proxy_eps
        return (1 - w).pow(gamma)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, gamma = ctx.saved_tensors
        return grad * proxy_decay_slope(w, gamma, ctx.proxy_eps), None, None


def proxy_decay(w: torch.Tensor, gamma: torch.Tensor, proxy_eps: float) -> torch.Tensor:
    """``(1 - w) ** gamma`` elementwise; ``gamma`` broadcasts against ``w`` and gets no gradient."""
    return _ProxyDecay.apply(w, gamma, proxy_eps)


def proxy_decay_slope(w: torch.Tensor, gamma: torch.Tensor, proxy_eps: float) -> torch.Tensor:
    """The proxy derivative d/dw that ``proxy_decay``'s backward uses."""
    return -gamma * (1 - proxy_eps) * (proxy_eps + (1 - proxy_eps) * (1 - w)).pow(gamma - 1)
