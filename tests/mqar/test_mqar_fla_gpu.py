"""Every fla baseline of the MQAR presets trains in the MQAR model on CUDA, in fp32 as the
trainer runs it (skipped without a GPU and flash-linear-attention). DeltaNet's chunked kernel
refusing fp32 was found only by a GPU sweep; this catches that kind of failure first.

Run on a GPU machine with: python -m pytest -q -m cuda tests/mqar
"""

import importlib.util

import pytest
import torch

from ramnet.mqar.model import MQARModel
from ramnet.mqar.presets import FLA_BASELINES, PAPER

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs flash-linear-attention"),
]


@pytest.mark.parametrize("name", sorted(FLA_BASELINES))
def test_fla_baseline_trains_causally_in_fp32(name):
    entry = FLA_BASELINES[name]
    torch.manual_seed(0)
    model = MQARModel(64, 64, entry["mixer"], **{**PAPER["model"], **entry.get("model", {})}).cuda()
    # 130 tokens: not a multiple of the chunk sizes, and past the 64 below which fla switches modes.
    x = torch.randint(1, 64, (2, 130), device="cuda")
    logits = model(x)
    assert logits.dtype == torch.float32 and logits.shape == (2, 130, 64)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.roll(-1, 1).flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert model.state_size(130) > 0
    # Causal: a change at position 100 leaves every earlier position's output as it was.
    model.eval()
    with torch.no_grad():
        before = model(x)
        y = x.clone()
        y[:, 100] = (y[:, 100] % 63) + 1
        after = model(y)
    torch.testing.assert_close(after[:, :100], before[:, :100], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after[:, 100:], before[:, 100:])
