"""The on-chip token PDMA (``ops/pdma/onchip.py``: the forward and the backward in CUDA C over tables in
shared memory; the Triton token backward where the backward's tables do not fit, or when asked).

On a GPU (marker ``cuda``): outputs, final states and every gradient against the torch reference
``chunk_pdma`` and against ``token_pdma_triton`` (K 1, 3, 4, 8; M 6 to 1024; d_v 4 to 64, over slices
and not a multiple of the width; packed sequences with an empty one; initial states and final-state
gradients, each with or without the other; reads of the slots a token writes, all or half of them;
fp32 and bf16 v), with the on-chip backward and with the Triton one, the backward's widths and
prefetch depths, the fallback where its tables do not fit, the backward run twice, and the op through
``pdma_kernels("onchip")``.

Without a GPU: the generated sources, forward and backward, compile with nvcc for sm_90 in every
configuration the launcher builds (and ptxas spills nothing at the paper's); the same source texts run
on the CPU under an emulation of a warp in place of the kernels, against the reference (the forward
with the Triton backward under the interpreter, and with the emulated backward); the shared-memory
rules, which backward runs, and the clear errors where the kernels cannot run.

The emulation runs a block's lanes one at a time as coroutines, each up to its next ``__syncwarp`` or
shuffle, in an order that changes at every such barrier; it checks that every lane stops at the same
barrier with the mask of the block's lanes, and, through a checked pointer for shared memory, that no
index leaves the block's words, no word is loaded before it was stored, and no two lanes touch a word
between the same two ``__syncwarp`` with a store among them (a shuffle orders no memory). A missing
``__syncwarp`` fails there whatever the lanes' order; shared memory is filled with NaN first, and so is
every output the kernels write.
"""

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ramnet.ops import RAMState, ram_attention
from ramnet.ops.pdma import proxy_decay
from ramnet.ops.pdma.chunk import chunk_pdma
from ramnet.ops.ram import triton as triton_path
from test_chunk_pdma import _tokens
from test_token_pdma_triton import _assert_outputs_close
from triton_skip import SKIP_REASON, needs_triton

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_gpu(fn):
    return pytest.mark.cuda(GPU(needs_triton(fn)))


CONFIGS = {
    # batch, T, heads, K, M, d_v, gamma per head, cu_seqlens
    "zero-decays": (2, 29, 3, 3, 6, 4, [0.0, 2.0, 300.0], None),  # decays of exactly 0, K odd, d_v 4: DS 16
    "k8-slices": (2, 40, 2, 8, 64, 37, [1.0, 4.0], None),  # d_v 37: two slices of 32, the second masked
    "k1-packed": (1, 21, 3, 1, 4, 20, [1.0, 0.5, 1.0], [0, 0, 5, 21]),  # packed with an empty sequence
    "k4-m1024-dv40": (2, 33, 2, 4, 1024, 40, [1.0, 4.0], None),
    "k8-m1024-packed": (1, 50, 2, 8, 1024, 64, [0.5, 2.0], [0, 17, 17, 50]),
    "short-packed": (1, 10, 2, 4, 16, 20, [1.0, 2.0], [0, 1, 3, 3, 10]),  # sequences shorter than the prefetch
}


def _args(config, with_state, final, device):
    batch, seq_len, heads, topk, slots, d_v, gamma, cu = config
    write_idx, write_w, read_idx, read_w, v, state, gamma = _tokens(1, batch, seq_len, heads, topk, slots, d_v, gamma,
                                                                   dtype=torch.float32)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=device)
    if cu is not None:
        state = tuple(x.expand(len(cu) - 1, *x.shape[1:]).contiguous() for x in state)
    return (write_idx, write_w, read_idx, read_w, v), gamma, state if with_state else None, final, cu_seqlens, slots


def _mixed_reads(write_idx, slots, seed=5):
    """Read slots, distinct a token, half of them (K // 2) among the token's write slots and in another
    position than the write's, the rest not written by the token."""
    gen = torch.Generator().manual_seed(seed)
    topk = write_idx.shape[-1]
    shared = topk // 2
    others = torch.rand(*write_idx.shape[:-1], slots, generator=gen)
    others.scatter_(-1, write_idx.long(), 2.0)  # the written slots sort last
    reads = torch.cat([write_idx[..., topk - shared:].long(), others.argsort(-1)[..., :topk - shared]], -1)
    order = torch.rand(reads.shape, generator=gen).argsort(-1)
    return reads.gather(-1, order).to(write_idx.dtype)


def _run(pdma, tokens, gamma, state, final, cu_seqlens, slots, device, v_dtype=torch.float32):
    """Output, final state and the gradients of a fixed loss w.r.t. every float input (v as
    ``v_dtype``; the torch reference gets it as fp32, its gradient flowing back to v's dtype)."""
    write_idx, write_w, read_idx, read_w, v = (x.detach().to(device) for x in tokens)
    leaves = [x.requires_grad_() for x in (write_w, read_w, v.to(v_dtype))]
    if state is not None:
        state = tuple(x.detach().to(device).requires_grad_() for x in state)
        leaves += list(state)
    decay = proxy_decay(leaves[0], gamma.to(device)[:, None], 1e-2)
    v = leaves[2].float() if pdma is chunk_pdma else leaves[2]
    o, fin = pdma(write_idx, leaves[0], decay, read_idx, leaves[1], v, memory_slots=slots, eps=1e-6,
                  initial_state=state, output_final_state=final, cu_seqlens=cu_seqlens)
    loss = (o * torch.linspace(-1, 1, o.shape[-1], device=device)).sum()
    outputs = [o]
    if final:
        loss = loss + (fin[0] * 0.3).sum() + fin[1].sum()
        outputs += list(fin)
    return [x.detach().float().cpu() for x in (*outputs, *torch.autograd.grad(loss, leaves))]


def _assert_close(got, want, with_state, final, v_dtype):
    if v_dtype == torch.float32:
        _assert_outputs_close(got, want, with_state, final)
        return
    # bf16 v: v's gradient is rounded to bf16 on both sides, from fp32 sums taken in another order.
    for i, (a, b) in enumerate(zip(got, want)):
        atol = max(1e-5, 4e-3 * b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-2, atol=atol, msg=lambda m: f"output {i}: {m}")


@pytest.fixture
def onchip_backwards(monkeypatch):
    """Counts the on-chip backward's runs (``onchip._backward``)."""
    from ramnet.ops.pdma import onchip

    calls = []
    backward = onchip._backward
    monkeypatch.setattr(onchip, "_backward", lambda *args: calls.append(1) or backward(*args))
    return calls


# On the GPU ---------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("backward", ["auto", "triton"])
@pytest.mark.parametrize("reference", ["chunk", "token"])
@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("with_state,final", [(False, False), (True, True), (True, False), (False, True)])
def test_matches_reference_and_token_kernels(monkeypatch, onchip_backwards, config, with_state, final, v_dtype,
                                             reference, backward):
    """Against the torch reference, and against the Triton token kernels: with the on-chip backward
    (``"auto"``: every configuration fits) and with the Triton token backward."""
    from ramnet.ops.pdma import onchip
    from ramnet.ops.pdma.token_triton import token_pdma_triton

    monkeypatch.setattr(onchip, "BACKWARD", backward)
    args = _args(CONFIGS[config], with_state, final, "cuda")
    got = _run(onchip.onchip_pdma, *args, "cuda", v_dtype)
    assert onchip_backwards == ([1] if backward == "auto" else [])
    want = _run(chunk_pdma if reference == "chunk" else token_pdma_triton, *args, "cuda", v_dtype)
    assert got[0].dtype == torch.float32 and len(got) == len(want)
    _assert_close(got, want, with_state, final, v_dtype)


@on_gpu
@pytest.mark.parametrize("backward", ["onchip", "triton"])
@pytest.mark.parametrize("reads", ["own-writes", "mixed"])
@pytest.mark.parametrize("config", ["zero-decays", "k8-slices", "k8-m1024-packed"])
def test_reads_of_the_slots_a_token_writes_see_the_write(monkeypatch, config, reads, backward):
    """Every read at the token's own write slots (reversed), or half of them: in the forward a read's
    z comes from another lane's store of this token and its S entry from this thread's own store; in
    the on-chip backward a read's adjoint share reaches the written row before that row's adjoint is
    taken, and z's through another lane's dz."""
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "BACKWARD", backward)
    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(CONFIGS[config], True, True, "cuda")
    read_idx = write_idx.flip(-1) if reads == "own-writes" else _mixed_reads(write_idx, slots)
    args = ((write_idx, write_w, read_idx, read_w, v), gamma, state, final, cu, slots)
    _assert_outputs_close(_run(onchip.onchip_pdma, *args, "cuda"), _run(chunk_pdma, *args, "cuda"), True, True)


@on_gpu
@pytest.mark.parametrize("v_dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_v_dtypes_and_int32_slots(v_dtype):
    """fp16 and fp64 v, int32 slots and int64 cu_seqlens: the same numbers as the Triton token kernels."""
    from ramnet.ops.pdma.onchip import onchip_pdma
    from ramnet.ops.pdma.token_triton import token_pdma_triton

    (write_idx, write_w, read_idx, read_w, v), gamma, state, final, cu, slots = _args(
        CONFIGS["k8-m1024-packed"], True, True, "cuda")
    args = ((write_idx.int(), write_w, read_idx.int(), read_w, v), gamma, state, final, cu.long(), slots)
    got = _run(onchip_pdma, *args, "cuda", v_dtype)
    want = _run(token_pdma_triton, *args, "cuda", v_dtype)
    _assert_close(got, want, True, True, torch.float32 if v_dtype == torch.float64 else v_dtype)


@on_gpu
@pytest.mark.parametrize("width", [16, 32])
def test_width_16(monkeypatch, width):
    """Blocks of 16 columns (d_v 37: three slices, against the backward's two of 32)."""
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "WIDTH", width)
    args = _args(CONFIGS["k8-slices"], True, True, "cuda")
    _assert_outputs_close(_run(onchip.onchip_pdma, *args, "cuda"), _run(chunk_pdma, *args, "cuda"), True, True)


@on_gpu
@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_depths(monkeypatch, prefetch):
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "PREFETCH", prefetch)
    args = _args(CONFIGS["k8-m1024-packed"], True, True, "cuda")
    _assert_outputs_close(_run(onchip.onchip_pdma, *args, "cuda"), _run(chunk_pdma, *args, "cuda"), True, True)


@on_gpu
@pytest.mark.parametrize("width,prefetch", [(8, 2), (32, 2), (16, 1), (16, 3)])
@pytest.mark.parametrize("config", ["k8-slices", "k4-m1024-dv40"])
def test_backward_widths_and_prefetch_depths(monkeypatch, onchip_backwards, config, width, prefetch):
    """The on-chip backward at 8 columns a block (d_v 37: five slices, K 8 fills the lanes) and 32
    (M 64 fits, M 1024 does not: the Triton backward then), and prefetch depths 1 and 3."""
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "BACKWARD_WIDTH", width)
    monkeypatch.setattr(onchip, "BACKWARD_PREFETCH", prefetch)
    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(CONFIGS[config], True, True, "cuda")
    args = ((write_idx, write_w, _mixed_reads(write_idx, slots), read_w, v), gamma, state, final, cu, slots)
    _assert_outputs_close(_run(onchip.onchip_pdma, *args, "cuda"), _run(chunk_pdma, *args, "cuda"), True, True)
    assert onchip_backwards == [1] * onchip.onchip_backward_fits(slots, v.shape[-1], "cuda")


@on_gpu
def test_auto_takes_the_triton_backward_where_the_tables_do_not_fit(onchip_backwards):
    """M 1760 at d_v 64: the forward's 32 columns fit an H100's or H200's block (232,320 bytes), the
    backward's two tables at 16 columns (239,360) do not: the Triton backward, right."""
    from ramnet.ops.pdma import onchip

    config = (1, 20, 2, 8, 1760, 64, [1.0, 4.0], None)
    if not onchip.onchip_fits(1760, 64, "cuda"):
        pytest.skip("this GPU's blocks do not hold the forward's table slice at M 1760")
    assert not onchip.onchip_backward_fits(1760, 64, "cuda")
    args = _args(config, True, True, "cuda")
    _assert_outputs_close(_run(onchip.onchip_pdma, *args, "cuda"), _run(chunk_pdma, *args, "cuda"), True, True)
    assert onchip_backwards == []


@on_gpu
def test_a_forced_onchip_backward_that_does_not_fit_is_refused(monkeypatch):
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "BACKWARD", "onchip")
    slots = 2048  # 2 * 2048 * 17 * 4 = 278,528 bytes
    tokens = _tokens(0, 1, 3, 1, 2, slots, 16, [1.0], dtype=torch.float32)
    write_w, v = (x.cuda().requires_grad_() for x in (tokens[1], tokens[4]))
    o, _ = onchip.onchip_pdma(tokens[0].cuda(), write_w, write_w, tokens[2].cuda(), tokens[3].cuda(), v,
                              memory_slots=slots, eps=1e-6)
    with pytest.raises(ValueError, match="shared memory"):
        o.sum().backward()


@on_gpu
@pytest.mark.parametrize("backward", ["onchip", "triton"])
def test_backward_runs_twice(monkeypatch, backward):
    from ramnet.ops.pdma import onchip
    from ramnet.ops.pdma.onchip import onchip_pdma

    monkeypatch.setattr(onchip, "BACKWARD", backward)
    (write_idx, write_w, read_idx, read_w, v), gamma, state, _, _, slots = _args(CONFIGS["k8-slices"], True, True,
                                                                                "cuda")
    leaves = [x.detach().cuda().requires_grad_() for x in (write_w, read_w, v, *state)]
    write_w, read_w, v, S0, z0 = leaves
    decay = proxy_decay(write_w, gamma.cuda()[:, None], 1e-2)
    o, (S, z) = onchip_pdma(write_idx.cuda(), write_w, decay, read_idx.cuda(), read_w, v, memory_slots=slots, eps=1e-6,
                            initial_state=(S0, z0), output_final_state=True)
    loss = o.sum() + S.sum() + z.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _op(q, k, v, kw, mode, kernels="auto", state=None, cu_seqlens=None):
    q, k, v = (x.detach().cuda().requires_grad_() for x in (q, k, v))
    leaves = [q, k, v]
    if state is not None:
        state = RAMState(*(x.detach().cuda().requires_grad_() for x in state[:2]), state.offset.cuda())
        leaves += [state.S, state.z]
    with triton_path.pdma_kernels(kernels):
        o, fin = ram_attention(q, k, v, mode=mode, initial_state=state, output_final_state=True,
                               cu_seqlens=cu_seqlens, **kw)
    loss = (o.float() * torch.linspace(-1, 1, o.shape[-1], device="cuda")).sum() + (fin.S.float() * 0.3).sum()
    loss = loss + fin.z.float().sum()
    return [x.detach().float().cpu() for x in (o, fin.S, fin.z, *torch.autograd.grad(loss, leaves))]


@on_gpu
@pytest.mark.parametrize("shape", ["small", "paper-m1024", "packed", "bf16"])
def test_op_under_pdma_kernels_onchip(monkeypatch, shape):
    """``ram_attention(mode="triton")`` under ``pdma_kernels("onchip")`` takes ``onchip_pdma`` and
    agrees with the parallel path: outputs, final state, gradients of q, k, v (and the state)."""
    from ramnet.ops.pdma import onchip

    calls = []
    kernel = onchip.onchip_pdma
    monkeypatch.setattr(onchip, "onchip_pdma", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    gen = torch.Generator().manual_seed(3)
    d_p, parts, d_v, batch, seq_len, heads, topk = {
        "small": (3, 2, 5, 2, 21, 3, 3), "paper-m1024": (4, 5, 64, 2, 64, 2, 8), "packed": (3, 2, 40, 1, 23, 3, 3),
        "bf16": (4, 5, 64, 1, 40, 2, 8)}[shape]
    dtype = torch.bfloat16 if shape == "bf16" else torch.float32
    q, k = (torch.randn(batch, seq_len, heads, d_p * parts, generator=gen).to(dtype) * 1.5 for _ in "qk")
    v = torch.randn(batch, seq_len, heads, d_v, generator=gen).to(dtype)
    kw = dict(num_partitions=parts, topk=topk, gamma=torch.linspace(0.0, 2.0, heads),
              cape=torch.tensor([h % 2 == 0 for h in range(heads)]))
    cu = state = None
    if shape == "packed":
        cu = torch.tensor([0, 6, 6, 23], device="cuda")
        state = RAMState(torch.randn(3, heads, d_p**parts, d_v, generator=gen),
                         torch.rand(3, heads, d_p**parts, generator=gen) + 0.05, torch.tensor([0, 5, 11]))
    got = _op(q, k, v, kw, "triton", "onchip", state, cu)
    want = _op(q, k, v, kw, "parallel", state=state, cu_seqlens=cu)
    assert calls == [1]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 0.1 if tol < 1e-3 else tol,
                                   msg=lambda m: f"output {i}: {m}")


@on_gpu
def test_a_table_slice_too_large_for_shared_memory_is_refused():
    from ramnet.ops.pdma.onchip import onchip_fits, onchip_pdma

    slots = 4096  # 4096 * 33 * 4 = 540,672 bytes: no GPU's block has that much
    assert not onchip_fits(slots, 64, "cuda")
    tokens = _tokens(0, 1, 3, 1, 2, slots, 64, [1.0], dtype=torch.float32)
    with pytest.raises(ValueError, match="shared memory"):
        onchip_pdma(*(x.cuda() for x in tokens[:2]), tokens[1].cuda(), *(x.cuda() for x in tokens[2:5]),
                    memory_slots=slots, eps=1e-6)


# Without a GPU ------------------------------------------------------------------------------------------

# Every configuration the launcher builds for the op: K 4 and 8, 32 columns, packed or not, saving or
# not, int32 or int64 slots, v in bf16, fp16 or fp32, with an initial state or not.
COMPILE_CASES = [dict(K=k, DS=32, VARLEN=varlen, SAVE=save, idx_type=idx, v_type=v, HAS_H0=h0)
                 for k, varlen, save, idx, v, h0 in itertools.product(
                     (4, 8), (False, True), (False, True), (torch.int32, torch.int64),
                     (torch.bfloat16, torch.float16, torch.float32), (False, True))]
# ... and the other choices once each: 16 columns, fp64 v, K 1 and 3, prefetch depths 1 and 3.
COMPILE_CASES += [dict(K=8, DS=16, VARLEN=True, SAVE=True, idx_type=torch.int64, v_type=torch.bfloat16),
                  dict(K=3, DS=16, VARLEN=False, SAVE=True, idx_type=torch.int64, v_type=torch.float64),
                  dict(K=1, DS=32, VARLEN=True, SAVE=True, idx_type=torch.int64, v_type=torch.float32, PF=1),
                  dict(K=8, DS=32, VARLEN=True, SAVE=True, idx_type=torch.int64, v_type=torch.bfloat16, PF=3)]
# The backward's: K 4 and 8 at 16 columns, packed or not, int32 or int64 slots, v in bf16, fp16 or fp32, the
# final state's gradient in and the initial state's out or neither ...
BACKWARD_COMPILE_CASES = [dict(backward=True, K=k, DS=16, VARLEN=varlen, idx_type=idx, v_type=v, GRAD_FINAL=io,
                               HAS_H0=io)
                          for k, varlen, idx, v, io in itertools.product(
                              (4, 8), (False, True), (torch.int32, torch.int64),
                              (torch.bfloat16, torch.float16, torch.float32), (False, True))]
# ... and the other choices once each: one of the two, 8 and 32 columns, fp64 v, K 1, 3 and 6, prefetch 1 and 3.
BACKWARD_COMPILE_CASES += [
    dict(backward=True, K=8, DS=16, VARLEN=False, idx_type=torch.int64, v_type=torch.bfloat16, GRAD_FINAL=True,
         HAS_H0=False),
    dict(backward=True, K=8, DS=16, VARLEN=True, idx_type=torch.int64, v_type=torch.bfloat16, GRAD_FINAL=False,
         HAS_H0=True),
    dict(backward=True, K=8, DS=8, VARLEN=True, idx_type=torch.int64, v_type=torch.bfloat16),
    dict(backward=True, K=8, DS=32, VARLEN=False, idx_type=torch.int64, v_type=torch.bfloat16),
    dict(backward=True, K=3, DS=8, VARLEN=False, idx_type=torch.int64, v_type=torch.float64),
    dict(backward=True, K=1, DS=16, VARLEN=True, idx_type=torch.int32, v_type=torch.float32, PF=1),
    dict(backward=True, K=6, DS=32, VARLEN=True, idx_type=torch.int64, v_type=torch.float16, PF=3)]
NVCC = shutil.which("nvcc")


def _nvcc(tmp_path, index, case, cubin=False):
    from ramnet.ops.pdma import onchip_kernels

    path = tmp_path / f"onchip_{index}.cu"
    case = dict(case)
    path.write_text(onchip_kernels.backward_source(**case) if case.pop("backward", False)
                    else onchip_kernels.source(**case))
    out = ["-cubin", "-Xptxas", "-v"] if cubin else ["--ptx"]
    return subprocess.run([NVCC, "-arch=sm_90", *out, "-o", str(path.with_suffix(".out")), str(path)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_source_compiles_for_sm90_with_nvcc(tmp_path):
    """The text NVRTC compiles at run time, through nvcc to PTX for sm_90, in every configuration of
    the forward and of the backward."""
    cases = COMPILE_CASES + BACKWARD_COMPILE_CASES
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        done = list(pool.map(lambda ic: _nvcc(tmp_path, *ic), enumerate(cases)))
    failed = [(case, d.stderr[-2000:]) for case, d in zip(cases, done) if d.returncode]
    assert not failed, failed


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_the_default_configuration_does_not_spill(tmp_path):
    """ptxas on the paper's configuration (K 8, 32 columns, bf16 v, int64 slots, saving): no spills."""
    from ramnet.ops.pdma import onchip

    case = dict(K=8, DS=32, VARLEN=False, SAVE=True, idx_type=torch.int64, v_type=torch.bfloat16,
                HAS_H0=False, PF=onchip.PREFETCH)
    done = _nvcc(tmp_path, 0, case, cubin=True)
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stderr)
    assert " 0 bytes spill stores, 0 bytes spill loads" in done.stderr, done.stderr


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
@pytest.mark.parametrize("varlen,grad_io", [(False, False), (True, True)])
def test_the_default_backward_does_not_spill(tmp_path, varlen, grad_io):
    """ptxas on the backward at the paper's K 8, 16 columns, bf16 v, int64 slots (its registers do not
    depend on M): no spills. Without packed sequences it takes the 255 registers a thread may have."""
    from ramnet.ops.pdma import onchip

    case = dict(backward=True, K=8, DS=16, VARLEN=varlen, idx_type=torch.int64, v_type=torch.bfloat16,
                GRAD_FINAL=grad_io, HAS_H0=grad_io, PF=onchip.BACKWARD_PREFETCH)
    done = _nvcc(tmp_path, 0, case, cubin=True)
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stderr)
    assert " 0 bytes spill stores, 0 bytes spill loads" in done.stderr, done.stderr


def test_fits_is_the_shared_memory_rule(monkeypatch):
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "shared_memory_limit", lambda device: 232448)  # an H100's opt-in per block
    assert onchip.shared_bytes(1024, 32) == 135168
    assert onchip.onchip_fits(1024, 64, "cuda")
    assert onchip.onchip_fits(1760, 64, "cuda")  # 1760 * 33 * 4 = 232,320
    assert not onchip.onchip_fits(1761, 64, "cuda")
    assert onchip.onchip_fits(3418, 16, "cuda") and not onchip.onchip_fits(3419, 16, "cuda")  # d_v 16: 16 columns
    assert [onchip.onchip_shape(d_v) for d_v in (64, 40, 4)] == [(32, 2), (32, 2), (16, 1)]
    monkeypatch.setattr(onchip, "WIDTH", 16)
    assert onchip.onchip_shape(40) == (16, 3)


def test_the_backward_fits_by_its_shared_memory_rule(monkeypatch):
    """Two tables a block (the state and its adjoint) at the backward's own width."""
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "shared_memory_limit", lambda device: 232448)
    assert onchip.backward_shared_bytes(1024, 16) == 139264
    assert [onchip.backward_shape(d_v) for d_v in (64, 37, 16, 9, 8, 4)] == [(16, 4), (16, 3), (16, 1), (16, 1),
                                                                          (8, 1), (8, 1)]
    assert onchip.onchip_backward_fits(1709, 64, "cuda") and not onchip.onchip_backward_fits(1710, 64, "cuda")
    assert onchip.onchip_backward_fits(3228, 8, "cuda") and not onchip.onchip_backward_fits(3229, 8, "cuda")
    monkeypatch.setattr(onchip, "BACKWARD_WIDTH", 32)
    assert [onchip.backward_shape(d_v) for d_v in (64, 20, 4)] == [(32, 2), (32, 1), (8, 1)]
    assert onchip.onchip_backward_fits(880, 64, "cuda") and not onchip.onchip_backward_fits(881, 64, "cuda")
    monkeypatch.setattr(onchip, "BACKWARD_WIDTH", 8)
    assert onchip.backward_shape(64) == (8, 8)


def test_which_backward_runs(monkeypatch):
    """``BACKWARD``: "auto" on chip on CUDA where the tables fit, else Triton; "onchip" raises where it
    cannot run; "triton" always Triton."""
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "shared_memory_limit", lambda device: 232448 if torch.device(device).type == "cuda"
                        else 0)
    assert onchip.backward_on_chip("cuda", 1024, 64) and not onchip.backward_on_chip("cuda", 1710, 64)
    assert not onchip.backward_on_chip("cpu", 16, 64)
    monkeypatch.setattr(onchip, "BACKWARD", "triton")
    assert not onchip.backward_on_chip("cuda", 1024, 64)
    monkeypatch.setattr(onchip, "BACKWARD", "onchip")
    assert onchip.backward_on_chip("cuda", 1024, 64)
    with pytest.raises(ValueError, match="shared memory"):
        onchip.backward_on_chip("cuda", 1710, 64)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        onchip.backward_on_chip("cpu", 16, 64)
    monkeypatch.setattr(onchip, "BACKWARD", "fast")
    with pytest.raises(ValueError, match="BACKWARD"):
        onchip.backward_on_chip("cuda", 16, 64)


def test_fits_nowhere_but_cuda():
    from ramnet.ops.pdma.onchip import onchip_fits

    assert not onchip_fits(64, 64, "cpu")


def test_refuses_to_run_off_cuda():
    """Forced on CPU tensors, the on-chip family says it needs CUDA: it never falls back."""
    from ramnet.ops.pdma.onchip import onchip_pdma

    tokens = _tokens(0, 1, 3, 1, 2, 16, 4, [1.0], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        onchip_pdma(tokens[0], tokens[1], tokens[1], tokens[2], tokens[3], tokens[4], memory_slots=16, eps=1e-6)
    q = k = torch.randn(1, 3, 1, 4)
    with triton_path.pdma_kernels("onchip"):
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            ram_attention(q, k, torch.randn(1, 3, 1, 4), mode="triton", num_partitions=2, topk=2)


def test_refuses_topk_beyond_the_backward():
    from ramnet.ops.pdma.onchip import onchip_pdma

    tokens = _tokens(0, 1, 3, 1, 9, 16, 2, [1.0], dtype=torch.float32)
    with pytest.raises(ValueError, match="K <= 8"):
        onchip_pdma(tokens[0], tokens[1], tokens[1], tokens[2], tokens[3], tokens[4], memory_slots=16, eps=1e-6)


def test_names_the_torch_without_compile_kernel(monkeypatch):
    from ramnet.ops import nvrtc

    monkeypatch.delattr(torch.cuda, "_compile_kernel", raising=False)
    with pytest.raises(RuntimeError, match=re.escape(torch.__version__)):
        nvrtc.compile_kernel("extern \"C\" __global__ void onchip_token_fwd() {}", "onchip_token_fwd")


# The source on the CPU: one lane at a time -----------------------------------------------------------------

EMULATION = r"""
#include <cstdio>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>

struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 threadIdx, blockIdx, gridDim;
static float *emu_smem;
// A block's lanes are coroutines on one thread. Each runs until its next __syncwarp or shuffle (or its end):
// a phase. Every lane ends a phase before any starts the next, and the lanes run a phase one after another in
// an order that changes from phase to phase (ascending, descending, shuffled), so a store of one lane that
// another loads without a __syncwarp between them is seen in some phases and missed in others. Every lane
// must end a phase at the same barrier (source line) with the mask of the block's lanes.
static int emu_threads, emu_lane;
static unsigned emu_mask;
static ucontext_t emu_main, emu_ctx[32];
static int emu_site[32];        // the line of the barrier each lane stopped at, 0 once it returned
static bool emu_synced;         // whether the last phase ended at a __syncwarp (not a shuffle)
static int emu_shuffles[32];    // shuffles each lane made: the values are double-buffered by their parity
static float emu_lanes[2][32];
static char emu_error[512];
static std::function<void()> *emu_kernel;
#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(threads, blocks)

static void emu_fail(const char *what, int line, unsigned value) {
    if (!emu_error[0]) std::snprintf(emu_error, sizeof emu_error, "line %d: %s (%#x)", line, what, value);
}
static void emu_barrier(unsigned mask, int line, bool sync) {
    if (mask != emu_mask) emu_fail("a mask other than the block's lanes", line, mask);
    emu_site[emu_lane] = line;
    emu_synced = sync;
    swapcontext(&emu_ctx[emu_lane], &emu_main);
}
static float emu_shfl(unsigned mask, float value, int src, int line) {
    if (src < 0 || src >= emu_threads) emu_fail("a shuffle from a lane outside the block", line, (unsigned)src);
    float *values = emu_lanes[emu_shuffles[emu_lane]++ & 1];
    values[emu_lane] = value;
    emu_barrier(mask, line, false);
    return values[src];
}
#define __syncwarp(mask) emu_barrier(mask, __LINE__, true)

// Shared memory through a checked pointer: an index past the block's words, a load of a word the block
// never stored, and two lanes touching a word between the same two __syncwarp with a store among them (a
// shuffle orders no memory: only __syncwarp does) fail the launch, whatever order the lanes ran in.
static long long emu_words;
static int emu_epoch;  // __syncwarp passed in this block
static std::vector<int> emu_stored_in, emu_stored_by, emu_loaded_in;
static std::vector<unsigned> emu_loaded_by;
static void emu_hazard(const char *what, long long word, unsigned lanes) {
    if (!emu_error[0])
        std::snprintf(emu_error, sizeof emu_error, "lane %d %s shared word %lld of %lld (other lanes: mask %#x)",
                      emu_lane, what, word, emu_words, lanes);
}
static bool emu_in_bounds(long long word) {
    if (word >= 0 && word < emu_words) return true;
    emu_hazard("indexes out of bounds", word, 0u);
    return false;
}
static float emu_load(long long word) {
    if (!emu_in_bounds(word)) return 0.0f;
    if (emu_stored_in[word] == 0) emu_hazard("loads a never stored", word, 0u);
    if (emu_stored_in[word] == emu_epoch && emu_stored_by[word] != emu_lane)
        emu_hazard("loads, without a __syncwarp since another lane stored it,", word, 1u << emu_stored_by[word]);
    if (emu_loaded_in[word] != emu_epoch) emu_loaded_by[word] = 0;
    emu_loaded_in[word] = emu_epoch;
    emu_loaded_by[word] |= 1u << emu_lane;
    return emu_smem[word];
}
static void emu_store(long long word, float value) {
    if (!emu_in_bounds(word)) return;
    if (emu_stored_in[word] == emu_epoch && emu_stored_by[word] != emu_lane)
        emu_hazard("stores, without a __syncwarp since another lane stored it,", word, 1u << emu_stored_by[word]);
    if (emu_loaded_in[word] == emu_epoch && (emu_loaded_by[word] & ~(1u << emu_lane)))
        emu_hazard("stores, without a __syncwarp since other lanes loaded it,", word,
                   emu_loaded_by[word] & ~(1u << emu_lane));
    emu_stored_in[word] = emu_epoch;
    emu_stored_by[word] = emu_lane;
    emu_smem[word] = value;
}
struct emu_ref {
    long long word;
    operator float() const { return emu_load(word); }
    emu_ref &operator=(float value) { emu_store(word, value); return *this; }
    emu_ref &operator=(const emu_ref &other) { return *this = (float)other; }
    emu_ref &operator+=(float value) { return *this = (float)*this + value; }
};
struct emu_ptr {
    long long offset;
    emu_ref operator[](long long i) const { return {offset + i}; }
    emu_ptr operator+(long long n) const { return {offset + n}; }
};
#define __shfl_sync(mask, value, src) emu_shfl(mask, value, src, __LINE__)
#define __shfl_xor_sync(mask, value, offset) emu_shfl(mask, value, (int)threadIdx.x ^ (offset), __LINE__)
static inline float __uint_as_float(unsigned int bits) { float f; std::memcpy(&f, &bits, 4); return f; }
static inline float emu_half(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }

static void emu_entry() {
    (*emu_kernel)();
    emu_site[emu_lane] = 0;
}

static int emu_run(int grid_x, int grid_y, int threads, int shared_bytes, std::function<void()> kernel) {
    emu_error[0] = 0;
    gridDim = {(unsigned)grid_x, (unsigned)grid_y, 1};
    emu_threads = threads;
    emu_mask = threads == 32 ? 0xffffffffu : (1u << threads) - 1u;
    emu_kernel = &kernel;
    std::vector<unsigned char> shared(shared_bytes);
    emu_words = shared_bytes / 4;
    std::vector<std::vector<char>> stacks(threads, std::vector<char>(1 << 18));
    unsigned seed = 12345u;
    long long phase = 0;
    for (int y = 0; y < grid_y; ++y) {
        for (int x = 0; x < grid_x; ++x) {
            std::memset(shared.data(), 0xff, shared.size());  // NaN: a read of what the block never wrote shows
            emu_smem = (float *)shared.data();
            emu_epoch = 1;
            emu_stored_in.assign(emu_words, 0);
            emu_stored_by.assign(emu_words, 0);
            emu_loaded_in.assign(emu_words, 0);
            emu_loaded_by.assign(emu_words, 0);
            blockIdx = {(unsigned)x, (unsigned)y, 0};
            for (int lane = 0; lane < threads; ++lane) {
                getcontext(&emu_ctx[lane]);
                emu_ctx[lane].uc_stack.ss_sp = stacks[lane].data();
                emu_ctx[lane].uc_stack.ss_size = stacks[lane].size();
                emu_ctx[lane].uc_link = &emu_main;
                makecontext(&emu_ctx[lane], emu_entry, 0);
                emu_shuffles[lane] = 0;
            }
            for (;; ++phase) {
                int order[32];
                for (int k = 0; k < threads; ++k) order[k] = phase % 3 == 1 ? threads - 1 - k : k;
                if (phase % 3 == 2) {
                    for (int k = threads - 1; k > 0; --k) {
                        seed = seed * 1664525u + 1013904223u;
                        const int other = (int)((seed >> 8) % (unsigned)(k + 1));
                        const int lane = order[k];
                        order[k] = order[other];
                        order[other] = lane;
                    }
                }
                for (int k = 0; k < threads; ++k) {
                    emu_lane = order[k];
                    threadIdx = {(unsigned)emu_lane, 0, 0};
                    swapcontext(&emu_main, &emu_ctx[emu_lane]);
                }
                for (int lane = 1; lane < threads; ++lane) {
                    if (emu_site[lane] != emu_site[0]) {
                        std::snprintf(emu_error, sizeof emu_error, "block (%d, %d): lane 0 at line %d, lane %d at "
                                      "line %d (0: returned)", x, y, emu_site[0], lane, emu_site[lane]);
                        return 1;
                    }
                }
                if (emu_error[0]) return 1;
                if (emu_site[0] == 0) break;
                if (emu_synced) ++emu_epoch;
            }
        }
    }
    return 0;
}

extern "C" const char *emu_last_error() { return emu_error; }
"""

# Each kernel's launch, and which of its arguments it only writes (filled with NaN first, so that an
# entry the kernel never writes shows).
LAUNCHES = {
    "onchip_token_fwd": (r"""
extern "C" int emu_launch(int grid_x, int grid_y, int threads, int shared_bytes, const idx_t *write_idx,
                          const float *write_w, const float *decay, const idx_t *read_idx, const float *read_w,
                          const v_t *v, const int *cu, float *S, float *z, float *saved_S, float *saved_z, float *o,
                          int T, int H, int M, int D, double eps) {
    return emu_run(grid_x, grid_y, threads, shared_bytes, [&] {
        onchip_token_fwd(write_idx, write_w, decay, read_idx, read_w, v, cu, S, z, saved_S, saved_z, o, T, H, M, D,
                         eps);
    });
}
""", (9, 10, 11)),
    "onchip_token_bwd": (r"""
extern "C" int emu_launch(int grid_x, int grid_y, int threads, int shared_bytes, const idx_t *write_idx,
                          const float *write_w, const float *decay, const idx_t *read_idx, const float *read_w,
                          const v_t *v, const int *cu, const float *S, const float *z, const float *saved_S,
                          const float *saved_z, float *dS, float *dz, const float *grad_o, float *grad_write_w,
                          float *grad_decay, float *grad_read_w, float *grad_v, int T, int H, int M, int D,
                          double eps) {
    return emu_run(grid_x, grid_y, threads, shared_bytes, [&] {
        onchip_token_bwd(write_idx, write_w, decay, read_idx, read_w, v, cu, S, z, saved_S, saved_z, dS, dz, grad_o,
                         grad_write_w, grad_decay, grad_read_w, grad_v, T, H, M, D, eps);
    });
}
""", (14, 15, 16, 17)),
}


def _kernel_name(text: str) -> str:
    return next(name for name in LAUNCHES if f"\n{name}(" in text)


def emulation_source(text: str) -> str:
    """A kernel's source as C++ for the CPU: the emulation's definitions after its ``#define`` lines,
    shared memory through the emulation's checked pointers, and its launcher at the end."""
    from ramnet.ops.pdma import onchip_kernels

    defines, body = text.split(onchip_kernels.COMMON)
    body = onchip_kernels.COMMON + body
    body = body.replace("extern __shared__ float smem[];", "emu_ptr smem = {0};")
    body = re.sub(r"float \*(smem|S_sh|z_sh|dS_sh|dz_sh)\b", r"emu_ptr \1", body)
    body = body.replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));', "f = emu_half(x);")
    return defines + EMULATION + body + LAUNCHES[_kernel_name(text)][0]


class _Emulated:
    """A compiled emulation with the call of torch's ``_CudaKernel``; ``launched`` names the kernels it
    ran, in order."""

    launched: list[str] = []

    def __init__(self, library, name):
        self.library, self.name = library, name
        self.library.emu_launch.restype = ctypes.c_int
        self.library.emu_last_error.restype = ctypes.c_char_p

    def set_shared_memory_config(self, nbytes):
        pass

    def __call__(self, grid, block, args, shared_mem=0):
        def c(arg):
            if isinstance(arg, torch.Tensor):
                return ctypes.c_void_p(arg.data_ptr())
            return ctypes.c_double(arg) if isinstance(arg, float) else ctypes.c_int(arg)
        for i in LAUNCHES[self.name][1]:
            args[i].fill_(float("nan"))
        _Emulated.launched.append(self.name)
        failed = self.library.emu_launch(ctypes.c_int(grid[0]), ctypes.c_int(grid[1]), ctypes.c_int(block[0]),
                                         ctypes.c_int(shared_mem), *(c(a) for a in args))
        assert not failed, self.library.emu_last_error().decode()


CXX = shutil.which("g++")
EMULATION_SKIP = ("needs g++ (C++20) and Triton's interpreter for the backward" if CXX is None or SKIP_REASON
                  or torch.cuda.is_available() else None)
emulation = pytest.mark.skipif(EMULATION_SKIP is not None, reason=EMULATION_SKIP or "")
_libraries = {}


def _emulated_kernel(folder_factory, text):
    """The emulation of one kernel source, compiled once per session."""
    if text not in _libraries:
        folder = folder_factory.mktemp("emulation")
        (folder / "kernel.cpp").write_text(emulation_source(text))
        done = subprocess.run([CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-o", str(folder / "kernel.so"),
                               str(folder / "kernel.cpp")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        _libraries[text] = _Emulated(ctypes.CDLL(str(folder / "kernel.so")), _kernel_name(text))
    return _libraries[text]


@pytest.fixture
def emulated(monkeypatch, tmp_path_factory):
    """``onchip_pdma`` on CPU tensors, the kernels' sources run by the emulation; the backward the
    Triton one under the interpreter (``BACKWARD = "auto"`` off CUDA) unless a test forces the on-chip
    one (``emulated_backward``)."""
    from ramnet.ops.pdma import onchip, onchip_kernels

    def compiled(device, K, DS, VARLEN, SAVE, idx_type, v_type, HAS_H0, PF):
        return _emulated_kernel(tmp_path_factory, onchip_kernels.source(K, DS, VARLEN, SAVE, idx_type, v_type,
                                                                        HAS_H0=HAS_H0, PF=PF))

    def compiled_backward(device, K, DS, VARLEN, idx_type, v_type, GRAD_FINAL, HAS_H0, PF):
        return _emulated_kernel(tmp_path_factory, onchip_kernels.backward_source(
            K, DS, VARLEN, idx_type, v_type, GRAD_FINAL=GRAD_FINAL, HAS_H0=HAS_H0, PF=PF))

    monkeypatch.setattr(onchip_kernels, "compiled", compiled)
    monkeypatch.setattr(onchip_kernels, "compiled_backward", compiled_backward)
    monkeypatch.setattr(onchip, "require_onchip", lambda *args: None)
    monkeypatch.setattr(onchip, "require_onchip_backward", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    _Emulated.launched = []
    return onchip.onchip_pdma


@pytest.fixture
def emulated_backward(emulated, monkeypatch):
    """``emulated`` with the backward on chip too (``BACKWARD = "onchip"``)."""
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "BACKWARD", "onchip")
    return emulated


@emulation
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("with_state,final", [(False, False), (True, True)])
def test_emulated_source_matches_reference(emulated, config, with_state, final):
    """The forward emulated, the Triton backward interpreted."""
    args = _args(CONFIGS[config], with_state, final, "cpu")
    _assert_outputs_close(_run(emulated, *args, "cpu"), _run(chunk_pdma, *args, "cpu"), with_state, final)
    assert _Emulated.launched == ["onchip_token_fwd"]


@emulation
@pytest.mark.parametrize("v_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_emulated_source_reads_own_writes_and_v_dtypes(emulated, v_dtype):
    """Reads at the token's own write slots, int32 slots, v in each other dtype."""
    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(CONFIGS["k8-slices"], True, True, "cpu")
    args = ((write_idx.int(), write_w, write_idx.flip(-1).int(), read_w, v), gamma, state, final, cu, slots)
    got = _run(emulated, *args, "cpu", v_dtype)
    want = _run(chunk_pdma, *args, "cpu", v_dtype)
    _assert_close(got, want, True, True, torch.float32 if v_dtype == torch.float64 else torch.bfloat16)



@emulation
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("with_state,final", [(False, False), (True, True), (True, False), (False, True)])
def test_emulated_backward_matches_reference(emulated_backward, config, with_state, final):
    """Forward and backward emulated, against the reference: every gradient, with and without an
    initial state (the adjoint tables stored back or not) and the final state's gradients, S's and
    z's (the adjoint tables loaded or zeros)."""
    args = _args(CONFIGS[config], with_state, final, "cpu")
    _assert_outputs_close(_run(emulated_backward, *args, "cpu"), _run(chunk_pdma, *args, "cpu"), with_state, final)
    assert _Emulated.launched == ["onchip_token_fwd", "onchip_token_bwd"]


@emulation
@pytest.mark.parametrize("config", ["zero-decays", "k8-slices", "k8-m1024-packed"])
@pytest.mark.parametrize("reads", ["own-writes", "mixed"])
def test_emulated_backward_reads_of_the_slots_a_token_writes(emulated_backward, config, reads):
    """Every read at the token's own write slots (reversed), or half of them (in other positions) and
    the rest elsewhere: a read's adjoint share reaches the written row it reads before that row's
    adjoint is taken and rolled back, and z's share through another lane's dz."""
    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(CONFIGS[config], True, True, "cpu")
    read_idx = write_idx.flip(-1) if reads == "own-writes" else _mixed_reads(write_idx, slots)
    assert bool((read_idx[..., :, None] == write_idx[..., None, :]).any(-1).any())
    args = ((write_idx, write_w, read_idx, read_w, v), gamma, state, final, cu, slots)
    _assert_outputs_close(_run(emulated_backward, *args, "cpu"), _run(chunk_pdma, *args, "cpu"), True, True)


@emulation
@pytest.mark.parametrize("v_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_emulated_backward_v_dtypes_and_int32_slots(emulated_backward, v_dtype):
    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(CONFIGS["k8-slices"], True, True, "cpu")
    args = ((write_idx.int(), write_w, _mixed_reads(write_idx, slots).int(), read_w, v), gamma, state, final, cu,
            slots)
    got = _run(emulated_backward, *args, "cpu", v_dtype)
    want = _run(chunk_pdma, *args, "cpu", v_dtype)
    _assert_close(got, want, True, True, torch.float32 if v_dtype == torch.float64 else torch.bfloat16)


@emulation
@pytest.mark.parametrize("width,prefetch", [(8, 1), (32, 3), (16, 1), (16, 3)])
@pytest.mark.parametrize("config", ["zero-decays", "k8-slices", "short-packed"])
def test_emulated_backward_widths_and_prefetch(emulated_backward, monkeypatch, width, prefetch, config):
    """8 columns a block (d_v 37: five slices; K 8 fills the eight lanes, and its weight and decay sums
    scatter two a lane over all of them) and 32, prefetch depths 1 and 3 (sequences of 1 and 2 tokens:
    fewer than the ring)."""
    from ramnet.ops.pdma import onchip

    monkeypatch.setattr(onchip, "BACKWARD_WIDTH", width)
    monkeypatch.setattr(onchip, "BACKWARD_PREFETCH", prefetch)
    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(CONFIGS[config], True, True, "cpu")
    args = ((write_idx, write_w, _mixed_reads(write_idx, slots), read_w, v), gamma, state, final, cu, slots)
    _assert_outputs_close(_run(emulated_backward, *args, "cpu"), _run(chunk_pdma, *args, "cpu"), True, True)


@emulation
def test_emulated_backward_runs_twice(emulated_backward):
    """The on-chip backward reads the saved tables and writes none of them: run again (the graph
    retained), the same gradients to the bit."""
    (write_idx, write_w, read_idx, read_w, v), gamma, state, _, cu, slots = _args(CONFIGS["k8-m1024-packed"], True,
                                                                                  True, "cpu")
    leaves = [x.detach().requires_grad_() for x in (write_w, read_w, v, *state)]
    write_w, read_w, v, S0, z0 = leaves
    decay = proxy_decay(write_w, gamma[:, None], 1e-2)
    o, (S, z) = emulated_backward(write_idx, write_w, decay, read_idx, read_w, v, memory_slots=slots, eps=1e-6,
                                  initial_state=(S0, z0), output_final_state=True, cu_seqlens=cu)
    loss = (o * torch.linspace(-1, 1, o.shape[-1])).sum() + (S * 0.3).sum() + z.sum()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _Emulated.launched == ["onchip_token_fwd", "onchip_token_bwd", "onchip_token_bwd"]


@emulation
def test_emulated_backward_matches_the_triton_backward(emulated, monkeypatch):
    """The on-chip backward (emulated) against the Triton token backward (interpreted) on the same
    forward: the slices differ (16 columns against 32), the gradients agree."""
    from ramnet.ops.pdma import onchip

    args = _args(CONFIGS["k8-slices"], True, True, "cpu")
    monkeypatch.setattr(onchip, "BACKWARD", "triton")
    want = _run(emulated, *args, "cpu")
    monkeypatch.setattr(onchip, "BACKWARD", "onchip")
    got = _run(emulated, *args, "cpu")
    _assert_outputs_close(got, want, True, True)
    assert _Emulated.launched == ["onchip_token_fwd", "onchip_token_fwd", "onchip_token_bwd"]
