"""The short causal convolution: the formula, continuation through its history, padding, identity start."""

import torch

from ramnet.layers.short_conv import ShortConvolution


def _random_conv(channels=5, size=4, seed=0):
    conv = ShortConvolution(channels, size).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return conv


def test_output_is_the_causal_depthwise_sum_over_the_last_size_tokens():
    conv, x = _random_conv(), torch.randn(2, 9, 5, dtype=torch.float64)
    y, _ = conv(x)
    w = conv.weight[:, 0]  # [C, size]; tap size-1 is the current token
    expected = torch.zeros_like(x)
    for t in range(9):
        for j in range(4):
            if t - j >= 0:
                expected[:, t] += w[:, 3 - j] * x[:, t - j]
    torch.testing.assert_close(y, expected)


def test_history_continues_a_sequence_exactly_token_by_token():
    conv, x = _random_conv(), torch.randn(2, 10, 5, dtype=torch.float64)
    full, last = conv(x)
    y, history = conv(x[:, :3])
    outputs = [y]
    for t in range(3, 10):
        y, history = conv(x[:, t:t + 1], history)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), full)
    torch.testing.assert_close(history, last)
    assert torch.equal(last, x[:, -3:])


def test_padding_is_not_convolved_into_real_tokens():
    conv, x = _random_conv(), torch.randn(1, 6, 5, dtype=torch.float64)
    padded = torch.cat([torch.full((1, 3, 5), 7.0, dtype=torch.float64), x], 1)
    keep = torch.tensor([[False] * 3 + [True] * 6])
    y_padded, _ = conv(padded, keep=keep)
    y_alone, _ = conv(x)
    torch.testing.assert_close(y_padded[:, 3:], y_alone)


def test_starts_as_the_identity():
    x = torch.randn(2, 7, 6)
    y, _ = ShortConvolution(6, 4)(x)
    torch.testing.assert_close(y, x)


def test_a_one_token_step_gives_the_convolutions_output_in_low_precision_too():
    # The decoding step sums size products per channel instead of calling conv1d; in bf16 both accumulate in
    # fp32 and round once, so they agree to bf16's rounding of the same sum (and exactly where the sum is exact).
    conv = ShortConvolution(64, 4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 8, 64, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.bfloat16):
        step = conv.to(dtype)
        full, _ = step(x.to(dtype))
        _, history = step(x[:, :7].to(dtype))
        last, _ = step(x[:, 7:].to(dtype), history)
        assert last.dtype == dtype
        torch.testing.assert_close(last[:, 0], full[:, 7], rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    grid = (torch.randint(-8, 8, (3, 8, 64)) / 4).to(torch.bfloat16)  # products and sums exact in fp32
    with torch.no_grad():
        conv.weight.copy_((torch.randint(-4, 4, conv.weight.shape) / 2).to(torch.bfloat16))
    _, history = conv(grid[:, :7])
    assert torch.equal(conv(grid[:, 7:], history)[0][:, 0], conv(grid)[0][:, 7])
