"""H3 ("Hungry Hungry Hippos", Fu, Dao et al., ICLR 2023) as an MQAR token mixer, Zoology's baseline.

Per head of ``head_dim`` channels, ``o = q . SSM_diag(SSM_shift(k) v^T)``: the keys pass through a
shift SSM (its state matrix a shift register, so it is a learned causal filter over the last
``d_state`` inputs of each channel), their outer product with the values goes through a diagonal SSM
(S4D-Lin: ``d_state / 2`` complex modes per channel, zero-order hold, a skip ``D``), and the query
reads the result. Both SSMs run as causal convolutions by FFT over the whole sequence, which is how
H3 trains. With ``head_dim`` 1 (the H3 paper's and Zoology's MQAR setting) the outer product is the
elementwise ``k * v``.

State of one sequence, as Zoology counts it for H3: the shift SSM holds ``d_state`` values per key
channel and the diagonal SSM ``d_state`` real numbers (``d_state / 2`` complex) per channel of the
outer product: ``hidden_size * d_state + heads * head_dim^2 * d_state``, which is
``2 * hidden_size * d_state`` at ``head_dim`` 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.checks import check_int, check_positive
from .mixers import _check_whole_sequence


def causal_fft_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``y[:, t, c] = sum_{s <= t} kernel[c, t - s] u[:, s, c]`` for ``u [B, T, C]`` and ``kernel [C, L]``
    (taps beyond T unused, missing ones zero), by FFT of length 2T, in fp32 (fp64 for fp64 input)."""
    seq_len = u.shape[1]
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    n = 2 * seq_len
    u_f = torch.fft.rfft(u.to(compute), n=n, dim=1)
    k_f = torch.fft.rfft(kernel[:, :seq_len].to(compute), n=n, dim=-1)  # [C, n // 2 + 1]
    return torch.fft.irfft(u_f * k_f.transpose(0, 1), n=n, dim=1)[:, :seq_len]


class H3(nn.Module):
    """H3's mixer with fla's layer signature (whole sequences only, as the other Zoology mixers)."""

    def __init__(self, hidden_size: int, d_state: int = 64, head_dim: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, layer_idx: int | None = None):
        super().__init__()
        check_int("d_state", d_state, 2)
        if d_state % 2:
            raise ValueError(f"d_state must be even (d_state / 2 complex modes per channel), got {d_state}")
        check_int("hidden_size", hidden_size, 1)
        check_int("head_dim", head_dim, 1)
        if hidden_size % head_dim:
            raise ValueError(f"head_dim must divide hidden_size {hidden_size}, got {head_dim}")
        check_positive("dt_min", dt_min)
        if not dt_min <= check_positive("dt_max", dt_max):
            raise ValueError(f"dt_min ({dt_min}) must be at most dt_max ({dt_max})")
        self.hidden_size, self.d_state, self.head_dim, self.layer_idx = hidden_size, d_state, head_dim, layer_idx
        self.num_heads = hidden_size // head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden_size, hidden_size) for _ in range(4))
        # Shift SSM: A the shift matrix, B = e_1, so the kernel is C itself, one tap per state entry.
        self.shift_kernel = nn.Parameter(torch.randn(hidden_size, d_state) / math.sqrt(d_state))
        # Diagonal SSM, S4D-Lin initialisation: A_n = -1/2 + i pi n, dt log-uniform in [dt_min, dt_max].
        channels, modes = self.num_heads * head_dim * head_dim, d_state // 2
        self.log_dt = nn.Parameter(torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_neg_a_real = nn.Parameter(torch.full((channels, modes), math.log(0.5)))
        self.a_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).expand(channels, modes).clone())
        self.c = nn.Parameter(torch.randn(channels, modes, 2) * math.sqrt(0.5))  # complex C as (re, im)
        self.d = nn.Parameter(torch.randn(channels))
        for p in (self.log_dt, self.log_neg_a_real, self.a_imag):
            p._no_weight_decay = True

    def diag_modes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel and mode, the discrete transition ``exp(dt A)`` and input gain ``(exp(dt A) - 1) / A``
        (zero-order hold) times C: complex ``[channels, modes]`` each."""
        a = torch.complex(-self.log_neg_a_real.float().exp(), self.a_imag.float())
        dt_a = self.log_dt.float().exp()[:, None] * a
        transition = dt_a.exp()
        gain = torch.view_as_complex(self.c.float().contiguous()) * (transition - 1) / a
        return transition, gain

    def diag_kernel(self, length: int) -> torch.Tensor:
        """The diagonal SSM's convolution kernel ``[channels, length]``: ``2 Re(sum_n gain_n transition_n^l)``."""
        transition, gain = self.diag_modes()
        powers = transition[..., None] ** torch.arange(length, device=transition.device)
        return 2 * (gain[..., None] * powers).sum(1).real

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        _check_whole_sequence(attention_mask, use_cache)
        batch, seq_len, _ = hidden_states.shape
        heads, dh = self.num_heads, self.head_dim
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        k = causal_fft_conv(k, self.shift_kernel)  # fp32
        kv = (k.view(batch, seq_len, heads, dh, 1) * v.float().view(batch, seq_len, heads, 1, dh))
        kv = kv.reshape(batch, seq_len, -1)
        y = causal_fft_conv(kv, self.diag_kernel(seq_len)) + self.d.float() * kv
        o = (q.float().view(batch, seq_len, heads, dh, 1) * y.view(batch, seq_len, heads, dh, dh)).sum(-2)
        o = o.reshape(batch, seq_len, self.hidden_size).to(hidden_states.dtype)
        return self.out_proj(o), None, past_key_values

    def state_size(self, seq_len: int) -> int:
        """Floats of state per sequence: the shift register and the diagonal SSM's modes."""
        return self.hidden_size * self.d_state + self.num_heads * self.head_dim ** 2 * self.d_state
