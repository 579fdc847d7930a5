"""The short causal convolution over time that Gated DeltaNet, Mamba and GLA variants put on their
projections (fla's ``ShortConvolution``), as an optional part of RAM-Net's mixer.

A RAM-Net token reads and writes K slots chosen from its own key and query, so nothing in the mixer
sees the previous few tokens except through the memory, where they are averaged with every older
write to the same slots. A depthwise convolution of width ``size`` over the projected q, k and v
gives each token's address and value the exact last ``size - 1`` tokens (n-gram features, the key of
an induction head).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.checks import check_int


class ShortConvolution(nn.Module):
    """Causal depthwise convolution of ``x [B, T, C]`` over time, kernel ``size``, no bias, no activation.

    ``history [B, size - 1, C]`` holds the inputs before ``x`` (zeros at a sequence's start); ``forward``
    returns the output and the history after ``x``, so that a decoding step continues a prefill
    exactly. Starts as the identity (the current token's tap 1, the others 0), so that turning it on
    leaves a model's addresses and values as they were at initialisation.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.channels, self.size = check_int("channels", channels, 1), check_int("size", size, 2)
        self.weight = nn.Parameter(torch.empty(channels, 1, size))
        self.reset_parameters()

    def identity_weight(self) -> torch.Tensor:
        weight = torch.zeros_like(self.weight)
        weight[:, 0, -1] = 1.0
        return weight

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.identity_weight())

    def empty_history(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch, self.size - 1, self.channels)

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None, keep: torch.Tensor | None = None):
        """``keep [B, T]`` (bool, real tokens) zeroes padding first, so that it is not convolved into
        the real tokens: a left-padded row then sees the zeros a sequence starts with."""
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        if history is None:
            history = self.empty_history(x.shape[0], x)
        full = torch.cat([history.to(x.dtype), x], dim=1)  # [B, size - 1 + T, C]
        if x.shape[1] == 1:
            # One decoding step: a dot product per channel over the last `size` inputs, accumulated in fp32 (or
            # fp64) as conv1d accumulates. conv1d's setup costs far more than the sum at one token: on a 2-core
            # CPU 3.6 ms at 208 channels and 31 ms at 1,664 against 0.02-0.05 ms, and on the GPU a convolution
            # launch the host pays for every layer and token.
            acc = torch.promote_types(x.dtype, torch.float32)
            y = (full.to(acc) * self.weight[:, 0].t().to(acc)).sum(dim=1, keepdim=True).to(x.dtype)
        else:
            y = F.conv1d(full.transpose(1, 2), self.weight.to(x.dtype), groups=self.channels).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.size - 1):]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}"
