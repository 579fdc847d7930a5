"""The op, layer and model on CUDA agree with the CPU reference (skipped without a GPU).

Run on a GPU machine with: python -m pytest -q -m cuda
"""

import pytest
import torch

from ramnet import RAMNetConfig, RAMNetForCausalLM
from ramnet.ops import RAMState, ram_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _problem(dtype, device, seed=0):
    # Drawn in fp64 and then cast, so that every dtype sees the same numbers.
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 64, 4, 12, dtype=torch.float64, generator=gen) * 1.5
    k = torch.randn(2, 64, 4, 12, dtype=torch.float64, generator=gen) * 1.5
    v = torch.randn(2, 64, 4, 16, dtype=torch.float64, generator=gen)
    state = RAMState(torch.randn(2, 4, 64, 16, dtype=torch.float64, generator=gen),
                     torch.rand(2, 4, 64, dtype=torch.float64, generator=gen) + 0.1, torch.tensor([0, 9]))
    move = lambda x: (x.to(device, dtype) if x.is_floating_point() else x.to(device)).requires_grad_(x.is_floating_point())  # noqa: E731
    return [move(x) for x in (q, k, v)], RAMState(*(move(x) for x in state))


KW = dict(num_partitions=3, topk=5, gamma=torch.tensor([0.0, 0.5, 1.0, 2.0]),
          cape=torch.tensor([True, False, True, False]), output_final_state=True)


def _outputs(mode, device, dtype):
    (q, k, v), state = _problem(dtype, device)
    o, final = ram_attention(q, k, v, initial_state=state, mode=mode, **KW)
    loss = o.float().square().sum() + final.S.square().sum() + final.z.sum()
    grads = torch.autograd.grad(loss, [q, k, v, state.S, state.z])
    return [x.detach().cpu().double() for x in (o, final.S, final.z, *grads)]


@pytest.mark.parametrize("mode", ["naive", "recurrent", "parallel"])
def test_cuda_paths_match_cpu_reference(mode):
    ref = _outputs("naive", "cpu", torch.float64)
    for got, want in zip(_outputs(mode, "cuda", torch.float64), ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for got, want in zip(_outputs(mode, "cuda", torch.float32), ref):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_cuda_bf16_output_dtype_and_accuracy():
    (q, k, v), _ = _problem(torch.float32, "cuda")
    ref, _ = ram_attention(q, k, v, num_partitions=3, topk=5)
    o, _ = ram_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), num_partitions=3, topk=5)
    assert o.dtype == torch.bfloat16
    # bf16 rounding of q, k can flip near-tied slots; most outputs must still agree closely.
    close = ((o.float() - ref).abs() < 0.05 + 0.05 * ref.abs()).float().mean()
    assert close > 0.95


def test_cuda_model_generates_like_cpu():
    torch.manual_seed(0)
    config = RAMNetConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, head_v_dim=8,
                          num_partitions=2, partition_dim=4, topk=3, intermediate_size=64)
    model = RAMNetForCausalLM(config).double().eval()
    prompt = torch.randint(0, 97, (2, 7))
    cpu = model.generate(prompt, max_new_tokens=8, do_sample=False)
    gpu = model.cuda().generate(prompt.cuda(), max_new_tokens=8, do_sample=False)
    assert torch.equal(gpu.cpu(), cpu)
