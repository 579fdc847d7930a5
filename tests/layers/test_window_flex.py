"""FlexAttention's block-mask window attention equals the dense-mask reference: cached tokens, padding,
per-query lower bounds (sliding windows and delayed chunks), and through the attention layer."""

import warnings

import pytest
import torch

from ramnet.layers import kv_window
from ramnet.layers.kv_window import Band, KVWindow, window_attention


def _case(batch=2, cached=5, seq_len=7, heads=3, dim=8, window=4, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    width = cached + seq_len
    keep = torch.ones(batch, seq_len, dtype=torch.bool)
    valid = torch.ones(batch, width, dtype=torch.bool)
    if pad:
        keep[1, :2] = False  # row 1: two left-padding tokens in the new chunk
        valid[1, :2] = False  # and two empty cache slots
    valid[:, cached:] = keep
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    q_pos = positions[:, cached:]
    ctx = KVWindow(torch.randn(batch, width, heads, dim, generator=g), torch.randn(batch, width, heads, dim, generator=g),
                   None, positions, valid, valid.sum(1))
    q = torch.randn(batch, seq_len, heads, dim, generator=g)
    return q, q_pos, keep, ctx, q_pos - window + 1


def _both(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it is not compiled (the CPU reference)
        return window_attention(*args, kernel="flex"), window_attention(*args, kernel="sdpa")


def test_flex_matches_the_dense_mask_with_cache_padding_and_windows():
    q, q_pos, keep, ctx, lower = _case()
    flex, dense = _both(q, q_pos, keep, ctx, lower, 10000.0)
    torch.testing.assert_close(flex[keep], dense[keep], atol=1e-5, rtol=1e-5)


def test_flex_matches_with_chunk_lower_bounds_and_a_long_sequence():
    # 300 queries (three FlexAttention blocks), no cache, lower bounds at chunk starts of 50
    q, q_pos, keep, ctx, _ = _case(batch=1, cached=0, seq_len=300, heads=2, dim=8, seed=1, pad=False)
    lower = q_pos - q_pos % 50
    flex, dense = _both(q, q_pos, keep, ctx, lower, 10000.0)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("band, lower_of", [
    (Band(None), lambda p: p * 0), (Band(40), lambda p: p - 39), (Band(50, chunked=True), lambda p: p - p % 50)])
def test_band_masks_by_token_index_match_the_positions_mask_and_are_built_once(band, lower_of):
    # 300 queries, no cache, no padding: the Band's mask (by index) equals the mask from positions.
    q, q_pos, keep, ctx, _ = _case(batch=2, cached=0, seq_len=300, heads=2, dim=8, seed=3, pad=False)
    kv_window._band_block_mask.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_index = [window_attention(q, q_pos, keep, ctx, lower_of(q_pos), 10000.0, kernel="flex", band=band)
                    for _ in range(2)]
    dense = window_attention(q, q_pos, keep, ctx, lower_of(q_pos), 10000.0, kernel="sdpa")
    torch.testing.assert_close(by_index[0], dense, atol=1e-5, rtol=1e-5)
    info = kv_window._band_block_mask.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_a_band_refuses_a_window_with_cached_tokens():
    q, q_pos, keep, ctx, lower = _case(pad=False)
    with pytest.raises(ValueError, match="band"):
        window_attention(q, q_pos, keep, ctx, lower, 10000.0, kernel="flex", band=Band(4))


def test_layers_pass_a_band_only_without_cache_or_padding(monkeypatch):
    from ramnet.layers.attention import SlidingWindowAttention

    seen = []
    real = kv_window.window_attention

    def spy(*args, band=None, **kwargs):
        seen.append(band)
        return real(*args, band=band, **kwargs)

    monkeypatch.setattr("ramnet.layers.attention.window_attention", spy)
    layer = SlidingWindowAttention(hidden_size=16, num_heads=2, head_dim=8, window_size=4)
    x = torch.randn(2, 6, 16)
    layer(x)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 0] = 0
    layer(x, attention_mask=mask)
    assert seen == [Band(4), None]


def test_window_kernel_choice_is_checked():
    q, q_pos, keep, ctx, lower = _case()
    with pytest.raises(ValueError, match="kernel"):
        window_attention(q, q_pos, keep, ctx, lower, 10000.0, kernel="dense")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_layers_take_compiled_flex_and_match_the_reference():
    q, q_pos, keep, ctx, _ = _case(batch=2, cached=0, seq_len=512, heads=4, dim=64, seed=2, pad=False)
    cuda = [x.cuda() for x in (q, q_pos, keep)] + [KVWindow(*(None if t is None else t.cuda() for t in ctx))]
    q, q_pos, keep, ctx = cuda
    lower = q_pos - 63
    auto = window_attention(q, q_pos, keep, ctx, lower, 10000.0)  # flex, compiled
    dense = window_attention(q, q_pos, keep, ctx, lower, 10000.0, kernel="sdpa")
    torch.testing.assert_close(auto, dense, atol=2e-3, rtol=2e-3)
    banded = window_attention(q, q_pos, keep, ctx, lower, 10000.0, band=Band(64))  # the training layers' mask
    torch.testing.assert_close(banded, dense, atol=2e-3, rtol=2e-3)
