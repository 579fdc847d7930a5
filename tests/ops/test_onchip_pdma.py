"""The on-chip token PDMA (``ops/pdma/onchip.py``: the forward in CUDA C over tables in shared memory,
the backward the Triton token backward).

On a GPU (marker ``cuda``): outputs, final states and every gradient against the torch reference
``chunk_pdma`` and against ``token_pdma_triton`` (K 1, 3, 4, 8; M 6 to 1024; d_v 4 to 64, over slices
and not a multiple of 32; packed sequences with an empty one; initial states; reads of the slots a
token writes; fp32 and bf16 v), the backward run twice, and the op through ``pdma_kernels("onchip")``.

Without a GPU: the generated source compiles with nvcc for sm_90 in every configuration the launcher
builds; the same source text runs on the CPU under an emulation of a warp (one thread a lane,
``__syncwarp`` and ``__shfl_sync`` as barriers, shared memory filled with NaN first) in place of the
kernel, with the Triton backward under the interpreter, against the reference; the shared-memory
rule of ``onchip_fits``; and the clear errors where the kernel cannot run.
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
}


def _args(config, with_state, final, device):
    batch, seq_len, heads, topk, slots, d_v, gamma, cu = config
    write_idx, write_w, read_idx, read_w, v, state, gamma = _tokens(1, batch, seq_len, heads, topk, slots, d_v, gamma,
                                                                   dtype=torch.float32)
    cu_seqlens = None if cu is None else torch.tensor(cu, device=device)
    if cu is not None:
        state = tuple(x.expand(len(cu) - 1, *x.shape[1:]).contiguous() for x in state)
    return (write_idx, write_w, read_idx, read_w, v), gamma, state if with_state else None, final, cu_seqlens, slots


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


# On the GPU ---------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("reference", ["chunk", "token"])
@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("with_state,final", [(False, False), (True, True), (True, False)])
def test_matches_reference_and_token_kernels(config, with_state, final, v_dtype, reference):
    """Against the torch reference, and against the Triton token kernels (whose backward it shares)."""
    from ramnet.ops.pdma.onchip import onchip_pdma
    from ramnet.ops.pdma.token_triton import token_pdma_triton

    args = _args(CONFIGS[config], with_state, final, "cuda")
    got = _run(onchip_pdma, *args, "cuda", v_dtype)
    want = _run(chunk_pdma if reference == "chunk" else token_pdma_triton, *args, "cuda", v_dtype)
    assert got[0].dtype == torch.float32 and len(got) == len(want)
    _assert_close(got, want, with_state, final, v_dtype)


@on_gpu
@pytest.mark.parametrize("config", ["zero-decays", "k8-m1024-packed"])
def test_reads_of_the_slots_a_token_writes_see_the_write(config):
    """Every read at the token's own write slots (reversed): every read's z comes from another
    lane's store of this token and every S entry from this thread's own store."""
    from ramnet.ops.pdma.onchip import onchip_pdma

    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(CONFIGS[config], True, True, "cuda")
    args = ((write_idx, write_w, write_idx.flip(-1), read_w, v), gamma, state, final, cu, slots)
    _assert_outputs_close(_run(onchip_pdma, *args, "cuda"), _run(chunk_pdma, *args, "cuda"), True, True)


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
def test_backward_runs_twice():
    from ramnet.ops.pdma.onchip import onchip_pdma

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
NVCC = shutil.which("nvcc")


def _nvcc(tmp_path, index, case, cubin=False):
    from ramnet.ops.pdma import onchip_kernels

    path = tmp_path / f"onchip_{index}.cu"
    path.write_text(onchip_kernels.source(**case))
    out = ["-cubin", "-Xptxas", "-v"] if cubin else ["--ptx"]
    return subprocess.run([NVCC, "-arch=sm_90", *out, "-o", str(path.with_suffix(".out")), str(path)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_source_compiles_for_sm90_with_nvcc(tmp_path):
    """The text NVRTC compiles at run time, through nvcc to PTX for sm_90, in every configuration."""
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        done = list(pool.map(lambda ic: _nvcc(tmp_path, *ic), enumerate(COMPILE_CASES)))
    failed = [(case, d.stderr[-2000:]) for case, d in zip(COMPILE_CASES, done) if d.returncode]
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
    from ramnet.ops.pdma import onchip_kernels

    monkeypatch.delattr(torch.cuda, "_compile_kernel", raising=False)
    with pytest.raises(RuntimeError, match=re.escape(torch.__version__)):
        onchip_kernels._compile("extern \"C\" __global__ void onchip_token_fwd() {}")


# The source on the CPU: one thread a lane ----------------------------------------------------------------

EMULATION = r"""
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

struct emu_dim3 { unsigned x, y, z; };
static thread_local emu_dim3 threadIdx, blockIdx;
static emu_dim3 gridDim;
static std::barrier<> *emu_warp;
static float emu_lanes[32];
static float *emu_smem;
#define __device__
#define __forceinline__ inline
#define __global__
#define __launch_bounds__(threads, blocks)
static inline void __syncwarp(unsigned) { emu_warp->arrive_and_wait(); }
static inline float __shfl_sync(unsigned, float value, int lane) {
    emu_warp->arrive_and_wait();  // every lane has read the last shuffle's values
    emu_lanes[threadIdx.x] = value;
    emu_warp->arrive_and_wait();
    return emu_lanes[lane];
}
static inline float __uint_as_float(unsigned int bits) { float f; std::memcpy(&f, &bits, 4); return f; }
static inline float emu_half(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
"""

LAUNCH = r"""
extern "C" void emu_launch(int grid_x, int grid_y, int threads, int shared_bytes, const idx_t *write_idx,
                           const float *write_w, const float *decay, const idx_t *read_idx, const float *read_w,
                           const v_t *v, const int *cu, float *S, float *z, float *saved_S, float *saved_z, float *o,
                           int T, int H, int M, int D, double eps) {
    gridDim = {(unsigned)grid_x, (unsigned)grid_y, 1};
    std::vector<unsigned char> shared(shared_bytes);
    for (int y = 0; y < grid_y; ++y) {
        for (int x = 0; x < grid_x; ++x) {
            std::memset(shared.data(), 0xff, shared.size());  // NaN: a read of what the block never wrote shows
            std::barrier<> warp(threads);
            emu_warp = &warp;
            emu_smem = (float *)shared.data();
            std::vector<std::thread> lanes;
            for (int lane = 0; lane < threads; ++lane)
                lanes.emplace_back([&, lane] {
                    threadIdx = {(unsigned)lane, 0, 0};
                    blockIdx = {(unsigned)x, (unsigned)y, 0};
                    onchip_token_fwd(write_idx, write_w, decay, read_idx, read_w, v, cu, S, z, saved_S, saved_z, o,
                                     T, H, M, D, eps);
                });
            for (auto &t : lanes) t.join();
        }
    }
}
"""


def emulation_source(text: str) -> str:
    """The kernel's source as C++ for the CPU: the emulation's definitions after its ``#define``
    lines, shared memory from the emulation, and its launcher at the end."""
    from ramnet.ops.pdma import onchip_kernels

    defines, body = text.split(onchip_kernels.COMMON)
    body = onchip_kernels.COMMON + body
    body = body.replace("extern __shared__ float smem[];", "float *smem = emu_smem;")
    body = body.replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));', "f = emu_half(x);")
    return defines + EMULATION + body + LAUNCH


class _Emulated:
    """A compiled emulation with the call of torch's ``_CudaKernel``."""

    def __init__(self, library):
        self.library = library

    def set_shared_memory_config(self, nbytes):
        pass

    def __call__(self, grid, block, args, shared_mem=0):
        def c(arg):
            if isinstance(arg, torch.Tensor):
                return ctypes.c_void_p(arg.data_ptr())
            return ctypes.c_double(arg) if isinstance(arg, float) else ctypes.c_int(arg)
        self.library.emu_launch(ctypes.c_int(grid[0]), ctypes.c_int(grid[1]), ctypes.c_int(block[0]),
                                ctypes.c_int(shared_mem), *(c(a) for a in args))


CXX = shutil.which("g++")
EMULATION_SKIP = ("needs g++ (C++20) and Triton's interpreter for the backward" if CXX is None or SKIP_REASON
                  or torch.cuda.is_available() else None)
_libraries = {}


@pytest.fixture
def emulated(monkeypatch, tmp_path_factory):
    """``onchip_pdma`` on CPU tensors, the kernel's source run by the emulation."""
    from ramnet.ops.pdma import onchip, onchip_kernels

    def compiled(device, *config):
        if config not in _libraries:
            folder = tmp_path_factory.mktemp("emulation")
            (folder / "kernel.cpp").write_text(emulation_source(onchip_kernels.source(*config[:6], HAS_H0=config[6],
                                                                                      PF=config[7])))
            done = subprocess.run([CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-o",
                                   str(folder / "kernel.so"), str(folder / "kernel.cpp")],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            _libraries[config] = _Emulated(ctypes.CDLL(str(folder / "kernel.so")))
        return _libraries[config]

    monkeypatch.setattr(onchip_kernels, "compiled", compiled)
    monkeypatch.setattr(onchip, "require_onchip", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return onchip.onchip_pdma


@pytest.mark.skipif(EMULATION_SKIP is not None, reason=EMULATION_SKIP or "")
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("with_state,final", [(False, False), (True, True)])
def test_emulated_source_matches_reference(emulated, config, with_state, final):
    args = _args(CONFIGS[config], with_state, final, "cpu")
    _assert_outputs_close(_run(emulated, *args, "cpu"), _run(chunk_pdma, *args, "cpu"), with_state, final)


@pytest.mark.skipif(EMULATION_SKIP is not None, reason=EMULATION_SKIP or "")
@pytest.mark.parametrize("v_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_emulated_source_reads_own_writes_and_v_dtypes(emulated, v_dtype):
    """Reads at the token's own write slots, int32 slots, v in each other dtype."""
    (write_idx, write_w, _, read_w, v), gamma, state, final, cu, slots = _args(CONFIGS["k8-slices"], True, True, "cpu")
    args = ((write_idx.int(), write_w, write_idx.flip(-1).int(), read_w, v), gamma, state, final, cu, slots)
    got = _run(emulated, *args, "cpu", v_dtype)
    want = _run(chunk_pdma, *args, "cpu", v_dtype)
    _assert_close(got, want, True, True, torch.float32 if v_dtype == torch.float64 else torch.bfloat16)
