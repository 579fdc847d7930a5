"""Every bad input gets a ValueError that names the argument."""

import pytest
import torch

from ramnet.ops import RAMState, address_decode, ram_attention

B, T, H, U, D_P, D_V = 1, 5, 2, 2, 3, 4


def _qkv(dtype=torch.float32):
    q = torch.randn(B, T, H, U * D_P, dtype=dtype)
    return q, torch.randn_like(q), torch.randn(B, T, H, D_V, dtype=dtype)


def _call(q=None, k=None, v=None, **kw):
    dq, dk, dv = _qkv()
    args = dict(num_partitions=U, topk=2)
    args.update(kw)
    return ram_attention(dq if q is None else q, dk if k is None else k, dv if v is None else v, **args)


def _expect(match, **kw):
    with pytest.raises(ValueError, match=match):
        _call(**kw)


def test_d_k_not_divisible_by_partitions():
    _expect("divisible by num_partitions", num_partitions=4)
    with pytest.raises(ValueError, match="divisible by num_partitions"):
        address_decode(torch.randn(3, 7), num_partitions=2, topk=1)


def test_num_partitions_must_be_positive_int():
    _expect("num_partitions", num_partitions=0)
    _expect("num_partitions", num_partitions=2.0)


@pytest.mark.parametrize("topk", [0, -1, 10, 2.5, True])
def test_topk_out_of_range(topk):
    _expect(r"topk must be an int in \[1, M=9\]", topk=topk)


def test_topk_of_address_decode():
    with pytest.raises(ValueError, match="topk"):
        address_decode(torch.randn(2, 6), num_partitions=2, topk=10)


def test_memory_too_large():
    with pytest.raises(ValueError, match="2\\*\\*62"):
        address_decode(torch.randn(2, 16 * 64), num_partitions=16, topk=1)


@pytest.mark.parametrize("gamma", [-0.5, float("nan"), torch.tensor([1.0, -1.0])])
def test_negative_gamma(gamma):
    _expect("gamma", gamma=gamma)


def test_gamma_shape_and_grad():
    _expect(r"gamma must be a scalar or have shape \[H\]", gamma=torch.ones(3))
    _expect("gamma is a fixed hyper-parameter", gamma=torch.ones(2, requires_grad=True))


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf")])
def test_bad_tau(tau):
    _expect("tau", tau=tau)
    with pytest.raises(ValueError, match="tau"):
        address_decode(torch.randn(2, 6), num_partitions=2, topk=1, tau=tau)


def test_bad_eps_and_proxy_eps():
    _expect("eps", eps=-1e-6)
    _expect("proxy_eps", proxy_eps=0.0)
    _expect("proxy_eps", proxy_eps=1.5)


def test_cape_shape_and_dtype():
    _expect("cape must have one entry per head|cape must be a scalar or have shape", cape=torch.tensor([True, False, True]))
    _expect("cape must be a bool", cape=torch.tensor([1.0, 0.0]))


def test_mismatched_shapes():
    q, k, v = _qkv()
    _expect("k must have the shape of q", k=k[:, :3])
    _expect("v must be", v=v[:, :3])
    _expect("v must be", v=torch.randn(B, T, H + 1, D_V))
    _expect("q must have 4 dimensions", q=q[0])


def test_mismatched_dtypes():
    q, k, v = _qkv()
    _expect("k has dtype", k=k.double())
    _expect("v has dtype", v=v.half())
    _expect("floating dtype", q=q.long(), k=k.long())


def test_mismatched_devices():
    q, k, v = _qkv()
    _expect("v is on meta", v=v.to("meta"))


def test_cu_seqlens_must_cover_t():
    _expect("cu_seqlens must start at 0", cu_seqlens=torch.tensor([0, 2, 4]))
    _expect("cu_seqlens must start at 0", cu_seqlens=torch.tensor([1, 5]))
    _expect("cu_seqlens must start at 0", cu_seqlens=torch.tensor([0, 4, 2, 5]))
    _expect("int32 or int64", cu_seqlens=torch.tensor([0.0, 5.0]))
    q, k, v = (torch.cat([x, x]) for x in _qkv())
    _expect("batch size must be 1", q=q, k=k, v=v, cu_seqlens=torch.tensor([0, 5]))


def test_initial_state_shapes():
    good = RAMState.empty(B, H, D_P**U, D_V, dtype=torch.float32, device="cpu")
    _expect(r"initial_state.S must be \[N, H, M, d_v\]", initial_state=good._replace(S=good.S[..., :2]))
    _expect(r"initial_state.z must be \[N, H, M\]", initial_state=good._replace(z=good.z[:, :1]))
    _expect("initial_state.offset", initial_state=good._replace(offset=good.offset.float()))
    _expect("initial_state must be a RAMState", initial_state=(good.S, good.z))
    _expect("initial_state.S must be", initial_state=good, cu_seqlens=torch.tensor([0, 2, 5]))


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(name, bad):
    tensors = dict(zip("qkv", _qkv()))
    tensors[name][0, 1, 0, 0] = bad
    _expect(f"{name} contains NaN or Inf", **tensors)


def test_non_finite_state_and_address_input():
    state = RAMState.empty(B, H, D_P**U, D_V, dtype=torch.float32, device="cpu")
    state.S[0, 0, 0, 0] = float("nan")
    _expect("initial_state.S contains NaN", initial_state=state)
    with pytest.raises(ValueError, match="x contains NaN"):
        address_decode(torch.tensor([[0.0, float("inf"), 1.0, 2.0]]), num_partitions=2, topk=1)


def test_decoding_steps_do_not_scan_the_whole_state():
    """inplace_state trusts the state's values: a NaN in a slot the step neither writes nor reads
    is not searched for (that would cost O(M) per token), and the step's output stays finite."""
    q, k, v = (x[:, :1] for x in _qkv())
    state = RAMState.empty(B, H, D_P**U, D_V, dtype=torch.float32, device="cpu")
    index, _ = address_decode(torch.stack([k, q])[:, :, 0], num_partitions=U, topk=2)
    untouched = sorted(set(range(D_P**U)) - set(index.flatten().tolist()))[0]
    state.S[:, :, untouched] = float("nan")
    with torch.no_grad():
        o, _ = ram_attention(q, k, v, num_partitions=U, topk=2, initial_state=state, inplace_state=True)
    assert torch.isfinite(o).all() and torch.isnan(state.S[:, :, untouched]).all()


def test_unknown_mode():
    _expect("mode must be one of", mode="fast")


@pytest.mark.parametrize("gamma", ["1", None, [1.0, "a"], True, [True, False]])
def test_gamma_of_the_wrong_kind_is_a_type_error_naming_it(gamma):
    with pytest.raises(TypeError, match=r"gamma must be a real number, one per head \(2\) or a tensor \[H\]"):
        _call(gamma=gamma)


@pytest.mark.parametrize("cape", ["yes", 2, 1, None, [1, 0], [True, "no"], 0.5])
def test_cape_of_the_wrong_kind_is_a_type_error_naming_it(cape):
    # 2 or "yes" were taken as True before.
    with pytest.raises(TypeError, match=r"cape must be a bool, one bool per head \(2\) or a bool tensor \[H\]"):
        _call(cape=cape)


def test_gamma_and_cape_of_the_right_kinds_are_taken():
    for gamma, cape in ((0, False), (2, [True, False]), ([0.5, 1], (False, True)), (torch.tensor(0.5), torch.tensor(True))):
        _call(gamma=gamma, cape=cape)


def test_initial_state_whose_reads_would_divide_by_zero():
    q, k, v = _qkv()
    memory_slots = D_P**U
    zero_z = RAMState(torch.zeros(B, H, memory_slots, D_V), torch.zeros(B, H, memory_slots), torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match=r"initial_state.z must be > -eps = -0.0 .*got min 0.0"):
        ram_attention(q, k, v, num_partitions=U, topk=2, eps=0.0, initial_state=zero_z)
    negative = zero_z._replace(z=torch.full_like(zero_z.z, -1e-3))
    with pytest.raises(ValueError, match="initial_state.z must be > -eps"):
        ram_attention(q, k, v, num_partitions=U, topk=2, initial_state=negative)
    o, _ = ram_attention(q, k, v, num_partitions=U, topk=2, initial_state=zero_z)  # z = 0, eps > 0: finite reads
    assert bool(o.isfinite().all())
