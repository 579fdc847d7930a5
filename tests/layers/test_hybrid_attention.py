"""HybridRAMAttention and SlidingWindowAttention, against references written from the definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from ramnet.layers import HybridRAMAttention, SlidingWindowAttention
from ramnet.layers.kv_window import rotary
from ramnet.models import RAMNetCache
from ramnet.ops import RAMState, ram_attention
from ramnet.ops.address import cape_dense, dense_topk_address

HIDDEN, HEADS, D_V, U, D_P, TOPK = 16, 2, 4, 2, 3, 3  # d_k = 6, M = 9
CAPE = (True, False)
BLENDS = ("delayed_stream", "delayed_chunk", "synchronous")


def hybrid(**kw):
    torch.manual_seed(0)
    args = dict(hidden_size=HIDDEN, num_heads=HEADS, head_v_dim=D_V, num_partitions=U, partition_dim=D_P, topk=TOPK,
                cape=list(CAPE), window_size=3, layer_idx=0)
    return HybridRAMAttention(**(args | kw)).double()


def inputs(batch=2, seq_len=10, seed=1):
    return torch.randn(batch, seq_len, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def projections(layer, x):
    """q, k, v (and DeltaNet's beta) exactly as the layer makes them."""
    shape = (*x.shape[:2], HEADS, -1)
    q = layer.q_proj(x).view(shape) * layer.q_log_scale.exp()[:, None]
    k = layer.k_proj(x).view(shape) * layer.k_log_scale.exp()[:, None]
    beta = torch.sigmoid(layer.b_proj(x)) if layer.fast_weight == "deltanet" else None
    return q, k, layer.v_proj(x).view(shape), beta


def finish(layer, o):
    """Per-head RMSNorm and o_proj, the layer's last two steps."""
    return layer.o_proj(layer.o_norm(o).flatten(2))


def op(q, k, v, **kw):
    return ram_attention(q, k, v, num_partitions=U, topk=TOPK, cape=CAPE, **kw)


def reference_attention(q, k, v, lower, theta=10000.0):
    """Softmax attention of query t over keys lower(t)..t, RoPE as complex rotations, one dot product at a time."""
    batch, seq_len, heads, dim = q.shape
    half = dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) / half)

    def rope(x, t):
        turn = torch.polar(torch.ones(half, dtype=torch.float64), t * freq)
        z = torch.complex(x[..., :half], x[..., half : 2 * half]) * turn
        return torch.cat([z.real, z.imag, x[..., 2 * half :]], -1)

    o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for t in range(seq_len):
        keys = range(max(lower(t), 0), t + 1)
        scores = torch.stack([(rope(q[:, t], t) * rope(k[:, j], j)).sum(-1) for j in keys], -1) / math.sqrt(dim)
        o[:, t] = torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), v[:, list(keys)])
    return o


def reference_fast_weight(layer, q, k, v, beta, written, read_at, t, act=F.silu):
    """What query t reads from a fast-weight memory holding the pairs 0..written-1, read at CAPE
    position read_at: a dense read of the state for RAM-Net, an explicit delta rule for DeltaNet
    (the paper's: on normalize(act(q)), normalize(act(k)) and act(v), act SiLU)."""
    batch = q.shape[0]
    if layer.fast_weight == "ramnet":
        state = RAMState.empty(batch, HEADS, D_P**U, D_V, dtype=torch.float64, device="cpu")
        if written:
            _, state = op(k[:, :written], k[:, :written], v[:, :written], mode="naive", output_final_state=True)
        shift = torch.full((batch, HEADS), read_at) * torch.tensor(CAPE).long()
        read = cape_dense(dense_topk_address(q[:, t], U, TOPK, 1.0), shift)
        return torch.einsum("bhm,bhmd->bhd", read, state.S / (state.z[..., None] + 1e-6))
    S = torch.zeros(batch, HEADS, U * D_P, D_V, dtype=torch.float64)
    for j in range(written):
        kj = F.normalize(act(k[:, j]), dim=-1)
        error = act(v[:, j]) - torch.einsum("bhk,bhkv->bhv", kj, S)
        S = S + torch.einsum("bhk,bhv->bhkv", kj, beta[:, j, :, None] * error)
    return torch.einsum("bhk,bhkv->bhv", F.normalize(act(q[:, t]), dim=-1), S) / math.sqrt(U * D_P)


@pytest.mark.parametrize("fast_weight", ["ramnet", "deltanet"])
@pytest.mark.parametrize("blend", BLENDS)
def test_each_memory_matches_its_definition(blend, fast_weight):
    window, seq_len = 3, 10
    layer = hybrid(blend=blend, fast_weight=fast_weight, window_size=window)
    x = inputs(seq_len=seq_len)
    q, k, v, beta = projections(layer, x)
    o_fw, o_kv = layer.memories(x)
    for t in range(seq_len):
        chunk_start = t // window * window
        written, read_at = {  # FW pairs written before the read at t, and the read's CAPE position
            "delayed_stream": (max(t - window + 1, 0), t - window),
            "delayed_chunk": (chunk_start, t),
            "synchronous": (t + 1, t),
        }[blend]
        torch.testing.assert_close(o_fw[:, t], reference_fast_weight(layer, q, k, v, beta, written, read_at, t))
    lower = (lambda t: t // window * window) if blend == "delayed_chunk" else (lambda t: t - window + 1)
    torch.testing.assert_close(o_kv, reference_attention(q, k, v, lower))


@pytest.mark.parametrize("blend", BLENDS)
def test_deltanet_identity_activation_reads_the_raw_projections(blend):
    """``deltanet_activation="identity"``: the DeltaNet memory as it was before the paper's SiLU
    (what older checkpoints were trained with); the KV memory is the same under either map."""
    window, seq_len = 3, 8
    layer = hybrid(blend=blend, fast_weight="deltanet", deltanet_activation="identity", window_size=window)
    x = inputs(seq_len=seq_len)
    q, k, v, beta = projections(layer, x)
    o_fw, o_kv = layer.memories(x)
    written = {"delayed_stream": lambda t: max(t - window + 1, 0), "delayed_chunk": lambda t: t // window * window,
               "synchronous": lambda t: t + 1}[blend]
    for t in range(seq_len):
        expected = reference_fast_weight(layer, q, k, v, beta, written(t), t, t, act=lambda x: x)
        torch.testing.assert_close(o_fw[:, t], expected)
    silu_fw, silu_kv = hybrid(blend=blend, fast_weight="deltanet", window_size=window).memories(x)
    assert torch.equal(silu_kv, o_kv) and not torch.allclose(silu_fw, o_fw)


def test_delayed_stream_without_window_is_ramnet():
    layer = hybrid(blend="delayed_stream", window_size=0, mix="sum")
    x = inputs()
    q, k, v, _ = projections(layer, x)
    o_fw, o_kv = layer.memories(x)
    assert torch.equal(o_kv, torch.zeros_like(o_kv))
    torch.testing.assert_close(layer(x)[0], finish(layer, op(q, k, v)[0]))


@pytest.mark.parametrize("fast_weight", ["ramnet", "deltanet"])
@pytest.mark.parametrize("window", [10, 13])
def test_delayed_stream_with_window_covering_the_sequence_is_sliding_attention(window, fast_weight):
    layer = hybrid(blend="delayed_stream", window_size=window, mix="sum", fast_weight=fast_weight)
    x = inputs(seq_len=10)
    q, k, v, _ = projections(layer, x)
    o_fw, _ = layer.memories(x)
    assert torch.equal(o_fw, torch.zeros_like(o_fw))
    torch.testing.assert_close(layer(x)[0], finish(layer, reference_attention(q, k, v, lambda t: 0)))


def pin_gate(layer, value):
    """Weight 1 on the FW memory and 0 on the KV memory (value 1), or the reverse (value 0)."""
    with torch.no_grad():
        if layer.mix == "scalar":
            layer.mix_proj.weight.zero_()
            layer.mix_proj.bias[:HEADS] = 1e4 if value else -1e4  # s_fw
            layer.mix_proj.bias[HEADS:] = -1e4 if value else 1e4  # s_kv
        else:
            layer.g_proj.weight.zero_()
            layer.g_proj.bias.fill_(1e4 if value else -1e4)


@pytest.mark.parametrize("mix", ["scalar", "vector"])
def test_synchronous_with_the_gate_pinned_is_one_branch(mix):
    layer = hybrid(blend="synchronous", mix=mix, window_size=3)
    x = inputs()
    q, k, v, _ = projections(layer, x)
    pin_gate(layer, 1)
    torch.testing.assert_close(layer(x)[0], finish(layer, op(q, k, v)[0]))
    pin_gate(layer, 0)
    torch.testing.assert_close(layer(x)[0], finish(layer, reference_attention(q, k, v, lambda t: t - 2)))


def test_vector_mix_is_a_gate_per_channel_from_the_input():
    layer = hybrid(mix="vector")
    x = inputs()
    o_fw, o_kv = layer.memories(x)
    gate = torch.sigmoid(layer.g_proj(x)).view_as(o_fw)
    torch.testing.assert_close(layer(x)[0], finish(layer, gate * o_fw + (1 - gate) * o_kv))


@pytest.mark.parametrize("fast_weight", ["ramnet", "deltanet"])
def test_scalar_mix_is_two_sigmoids_per_head_from_the_input(fast_weight):
    """The paper's dynamic scalar mix: o = s_fw(x) * o_fw + s_kv(x) * o_kv, with
    [s_fw, s_kv] = sigmoid(W x + b) per token and head, written out from the weights."""
    layer = hybrid(mix="scalar", fast_weight=fast_weight)
    with torch.no_grad():  # biases away from the init's zero, so that a dropped bias would show
        layer.mix_proj.bias.copy_(torch.tensor([-1.0, 2.0, 0.5, -0.3]))
    x = inputs()
    o_fw, o_kv = layer.memories(x)
    W, b = layer.mix_proj.weight, layer.mix_proj.bias
    assert W.shape == (2 * HEADS, HIDDEN)
    s_fw = torch.sigmoid(torch.einsum("btc,hc->bth", x, W[:HEADS]) + b[:HEADS])[..., None]
    s_kv = torch.sigmoid(torch.einsum("btc,hc->bth", x, W[HEADS:]) + b[HEADS:])[..., None]
    torch.testing.assert_close(layer(x)[0], finish(layer, s_fw * o_fw + s_kv * o_kv))
    assert s_fw.std(dim=(0, 1)).min() > 1e-3  # the weights change from token to token


def test_scalar_mix_weights_are_independent():
    """Both sigmoids at 1 give the sum of the memories, which a gate g, 1 - g cannot."""
    scalar, summed = hybrid(mix="scalar"), hybrid(mix="sum")  # the same seed: the same q, k, v, o projections
    with torch.no_grad():
        scalar.mix_proj.weight.zero_()
        scalar.mix_proj.bias.fill_(1e4)
    x = inputs()
    torch.testing.assert_close(scalar(x)[0], summed(x)[0])


def test_the_former_static_gate_is_the_scalar_mix_with_zero_weights():
    """What the refusal of old scalar-mix checkpoints tells users: a logit l per head (the former
    sigmoid(l) * o_fw + (1 - sigmoid(l)) * o_kv) is mix_proj.weight = 0, mix_proj.bias = [l, -l]."""
    layer = hybrid(mix="scalar")
    logit = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        layer.mix_proj.weight.zero_()
        layer.mix_proj.bias.copy_(torch.cat([logit, -logit]))
    x = inputs()
    o_fw, o_kv = layer.memories(x)
    gate = torch.sigmoid(logit)[:, None]
    torch.testing.assert_close(layer(x)[0], finish(layer, gate * o_fw + (1 - gate) * o_kv))


def test_static_scalar_mix_weights_are_refused():
    """The scalar mix's former parameters (one logit per head, `mix_logit`) do not load silently."""
    layer = hybrid(mix="scalar")
    old = {k: v for k, v in layer.state_dict().items() if not k.startswith("mix_proj.")}
    old["mix_logit"] = torch.zeros(HEADS, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*mix_proj\.weight.*Unexpected key.*mix_logit"):
        layer.load_state_dict(old)


def run_in_pieces(layer, x, sizes, mask=None):
    cache, outputs, start = RAMNetCache(), [], 0
    for size in sizes:
        # Hugging Face passes the mask of the whole context so far
        context_mask = None if mask is None else mask[:, : start + size]
        piece = x[:, start : start + size]
        outputs.append(layer(piece, attention_mask=context_mask, past_key_values=cache, use_cache=True)[0])
        start += size
    return torch.cat(outputs, 1), cache


@pytest.mark.parametrize("fast_weight", ["ramnet", "deltanet"])
@pytest.mark.parametrize("blend", BLENDS)
def test_cached_generation_matches_the_full_forward(blend, fast_weight):
    layer = hybrid(blend=blend, fast_weight=fast_weight, window_size=3)
    x = inputs(seq_len=12)
    pieces, cache = run_in_pieces(layer, x, [4, 1, 1, 3, 1, 2])  # prefill, decoding steps, chunks across windows
    torch.testing.assert_close(pieces, layer(x)[0])
    window = cache.get_window(0)
    assert cache.get_seq_length() == 12 and window.seen.tolist() == [12, 12]
    # delayed_chunk keeps the chunk in progress (12 % 3 = 0 tokens); the others the last S
    assert window.keys.shape[1] == (0 if blend == "delayed_chunk" else 3)


@pytest.mark.parametrize("blend", BLENDS)
def test_padding_is_skipped_and_decoding_continues(blend):
    layer = hybrid(blend=blend, window_size=3)
    x = inputs(seq_len=11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[0, 4] = 0  # a hole
    prefill = 8
    out, _ = run_in_pieces(layer, x, [prefill, 1, 1, 1], mask)
    for row in range(2):
        real = mask[row].bool()
        alone = layer(x[row : row + 1, real])[0][0]
        torch.testing.assert_close(out[row, real], alone)
        assert torch.equal(out[row, ~real], torch.zeros_like(out[row, ~real]))


@pytest.mark.parametrize(
    "blend, mix, fast_weight",
    [("synchronous", "vector", "ramnet"), ("delayed_stream", "scalar", "deltanet"), ("delayed_chunk", "sum", "ramnet")],
)
def test_gradients_reach_every_parameter(blend, mix, fast_weight):
    layer = hybrid(blend=blend, mix=mix, fast_weight=fast_weight)
    x = inputs(seq_len=9).requires_grad_()
    layer(x)[0].square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_output_keeps_the_input_dtype():
    layer = hybrid().float()
    assert layer(inputs().float())[0].dtype == torch.float32


def test_rotary_depends_on_relative_position_only():
    q, k = torch.randn(2, 1, 1, 1, 7, dtype=torch.float64).unbind(0)

    def score(p):
        return (rotary(q, torch.tensor([[p + 5]]), 100.0) * rotary(k, torch.tensor([[p]]), 100.0)).sum()

    torch.testing.assert_close(score(0), score(9))
    assert torch.equal(rotary(q, torch.tensor([[3]]), 100.0)[..., -1], q[..., -1])  # odd width: last channel kept


@pytest.mark.parametrize("window", [None, 3])
def test_sliding_window_attention(window):
    torch.manual_seed(0)
    layer = SlidingWindowAttention(hidden_size=HIDDEN, num_heads=HEADS, head_dim=4, window_size=window, layer_idx=0)
    layer = layer.double()
    x = inputs(seq_len=9)
    shape = (2, 9, HEADS, 4)
    q, k, v = (proj(x).view(shape) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    lower = (lambda t: 0) if window is None else (lambda t: t - window + 1)
    expected = layer.o_proj(reference_attention(q, k, v, lower).flatten(2))
    torch.testing.assert_close(layer(x)[0], expected)
    pieces, cache = run_in_pieces(layer, x, [4, 1, 4])
    torch.testing.assert_close(pieces, expected)
    assert cache.get_window(0).keys.shape[1] == (9 if window is None else window - 1)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(blend="delayed"), r"blend must be one of \['delayed_stream', 'delayed_chunk', 'synchronous'\]"),
        (dict(mix="gate"), r"mix must be one of \['sum', 'scalar', 'vector'\]"),
        (dict(fast_weight="gla"), r"fast_weight must be one of \['ramnet', 'deltanet'\]"),
        (dict(deltanet_activation="relu"), r"deltanet_activation must be one of \['silu', 'identity'\]"),
        (dict(window_size=-1), "window_size must be an int >= 0"),
        (dict(window_size=2.5), "window_size must be an int >= 0"),
        (dict(blend="delayed_chunk", window_size=0), "window_size must be an int >= 1"),
        (dict(rope_theta=0.0), "rope_theta must be a finite number > 0"),
        (dict(cape=[True]), "cape must be a bool or one bool per head"),
        (dict(topk=10), "topk"),  # M = 9
    ],
)
def test_bad_configurations_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        hybrid(**kw)


def test_bad_inputs_are_refused():
    layer = hybrid()
    with pytest.raises(ValueError, match="hidden_states must be"):
        layer(torch.randn(1, 3, HIDDEN + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="attention_mask must be"):
        layer(inputs(seq_len=3), attention_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="window_size must be an int >= 1"):
        SlidingWindowAttention(hidden_size=HIDDEN, num_heads=HEADS, head_dim=4, window_size=0)
