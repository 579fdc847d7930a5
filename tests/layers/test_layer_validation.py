"""The token mixers check what they are built with and the masks they are given (issue 15, item 7):
the op's checks (``ramnet.ops.checks``, ``build_spec``), reused, raise at construction."""

import pytest
import torch

from ramnet.layers import HybridRAMAttention, RAMAttention, SlidingWindowAttention

ARGS = dict(hidden_size=16, num_heads=2, head_v_dim=4, num_partitions=2, partition_dim=3, topk=2)
MIXERS = [RAMAttention, HybridRAMAttention]


@pytest.mark.parametrize("cls", MIXERS)
@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(gamma=-1, tau=0, mode="paralel", num_heads=0, head_v_dim=0), ValueError, "num_heads must be an int >= 1"),
        (dict(gamma=-1), ValueError, "gamma must be finite and >= 0"),
        (dict(tau=0), ValueError, "tau must be a finite number > 0"),
        (dict(mode="paralel"), ValueError, r"mode must be one of \[None, 'naive', 'parallel', 'recurrent', 'triton'\]"),
        (dict(num_heads=0), ValueError, "num_heads must be an int >= 1, got 0"),
        (dict(head_v_dim=0), ValueError, "head_v_dim must be an int >= 1, got 0"),
        (dict(head_v_dim=-1), ValueError, "head_v_dim must be an int >= 1, got -1"),
        (dict(hidden_size=0), ValueError, "hidden_size must be an int >= 1, got 0"),
        (dict(partition_dim=0), ValueError, "partition_dim must be an int >= 1, got 0"),
        (dict(gamma="1"), TypeError, "gamma must be a real number"),
        (dict(gamma=None), TypeError, "gamma must be a real number"),
        (dict(cape="yes"), TypeError, "cape must be a bool, one bool per head"),
        (dict(cape=2), TypeError, "cape must be a bool, one bool per head"),
        (dict(cape=[True]), ValueError, r"cape must be a bool or one bool per head \(2\), got 1 entries"),
    ],
)
def test_bad_hyper_parameters_raise_at_construction(cls, kw, error, message):
    with pytest.raises(error, match=message):
        cls(**(ARGS | kw))


@pytest.mark.parametrize("cls", MIXERS)
def test_cape_is_kept_as_one_bool_per_head(cls):
    assert cls(**ARGS, cape=True).cape == (True, True)
    assert cls(**ARGS, cape=[False, True]).cape == (False, True)
    assert cls(**ARGS, cape=torch.tensor([True, False])).cape == (True, False)


def _mixers():
    torch.manual_seed(0)
    return [RAMAttention(**ARGS), HybridRAMAttention(**ARGS),
            SlidingWindowAttention(hidden_size=16, num_heads=2, head_dim=4, window_size=3)]


@pytest.mark.parametrize("layer", _mixers(), ids=lambda layer: type(layer).__name__)
def test_attention_mask_values_are_checked(layer):
    x = torch.randn(2, 4, 16)
    additive = torch.tensor([[0.0, 0, 0, 0], [float("-inf"), 0, 0, 0]])
    with pytest.raises(ValueError, match="looks like an additive mask.*pass 1 for real tokens and 0 for padding"):
        layer(x, attention_mask=additive)
    with pytest.raises(ValueError, match="looks like an additive mask"):
        layer(x, attention_mask=torch.tensor([[0, 0, 0, 0], [-10000, 0, 0, 0]]))
    with pytest.raises(ValueError, match="must be bool or hold only 0 and 1.*got the value 0.5"):
        layer(x, attention_mask=torch.tensor([[1, 1, 1, 1], [0.5, 1, 1, 1]]))
    with pytest.raises(ValueError, match="got the value 2"):
        layer(x, attention_mask=torch.tensor([[1, 2, 1, 1], [1, 1, 1, 1]]))
    for mask in (torch.ones(3, 4), torch.ones(2, 3), torch.ones(2, 4, 1), torch.ones(4)):  # all ones, wrong shape
        with pytest.raises(ValueError, match=r"attention_mask must be \[B, T_total\] with B=2 and T_total >= T=4"):
            layer(x, attention_mask=mask)
    padded = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    o = layer(x, attention_mask=padded)[0]
    for same in (padded.bool(), padded.float(), padded.to(torch.int32)):
        torch.testing.assert_close(layer(x, attention_mask=same)[0], o)
