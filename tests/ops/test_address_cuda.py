"""The address decoder's CUDA C forward (``ops/address/cuda.py``, source in ``cuda_kernels.py``).

Without a GPU: the source text, compiled by g++ as host C++ (a shim for ``__global__`` and the thread
indices, a loop over the rows calling the kernel), against ``beam_topk`` in fp32 (+ ``cape_shift``) and
against the Triton forward under the interpreter: the same slots in the same order, weights to a few 1e-6
relative, on random rows, rows of exact ties (entries on a coarse grid, constant rows, rows whose
partitions are alike), fp32, bf16 and fp16 input, with and without a CAPE shift, tau 1 and 1.7; the
gradient through ``_BeamTopK`` (the Triton backward) on what it saves; fp16 and bf16 conversions over
every bit pattern; and nvcc: every configuration compiles for sm_90, and ptxas spills nothing at the
paper's shape.

On a GPU (marker ``cuda``): the CUDA C forward against the Triton forward, exact slots and order and
weights to ``RTOL_TRITON``, and the gradient through ``_BeamTopK`` on either forward's saved tensors.
"""

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ramnet.ops.address import beam_topk, cape_shift
from ramnet.ops.address import cuda as cuda_decoder
from ramnet.ops.address import cuda_kernels
from triton_skip import SKIP_REASON, needs_triton

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_gpu(fn):
    return pytest.mark.cuda(GPU(needs_triton(fn)))


# (U, d_p, K): the paper's; d_p < K; U 1; K 1; K 16; fewer candidates than K at the early stages (2 and 4 of
# 8 at d_p 2, M = 8 = K); and eight partitions.
SHAPES = [(5, 4, 8), (3, 3, 4), (1, 16, 4), (4, 6, 1), (2, 4, 16), (3, 2, 8), (8, 2, 8)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rows(num_partitions, d_p, rows=300, seed=0, dtype=torch.float32, device=DEVICE):
    """Random rows, then rows of exact ties: entries on a grid of 0.25 (equal entries, and sums that tie
    across beams), constant rows (every slot ties: the lowest K win), and rows whose partitions are alike."""
    gen = torch.Generator().manual_seed(seed)
    d_k = num_partitions * d_p
    random = torch.randn(rows // 3, d_k, generator=gen) * 2
    grid = torch.randint(-3, 4, (rows // 3, d_k), generator=gen) * 0.25
    constant = torch.randint(-4, 5, (rows // 6, 1), generator=gen).expand(-1, d_k) * 0.5
    alike = (torch.randint(-2, 3, (rows - rows // 3 * 2 - rows // 6, 1, d_p), generator=gen) * 0.5)
    alike = alike.expand(-1, num_partitions, -1).reshape(-1, d_k)
    x = torch.cat([random, grid, constant, alike])
    return x[torch.randperm(rows, generator=gen)].to(device, dtype)


def _shift(rows, device=DEVICE):
    """Positions, negative and beyond M included."""
    return torch.randint(-10**6, 10**6, (rows,), generator=torch.Generator().manual_seed(7)).to(device)


def _reference(x, num_partitions, topk, tau, shift=None):
    index, weight = beam_topk(x.float(), num_partitions, topk, tau)
    if shift is not None:
        memory_slots = (x.shape[1] // num_partitions) ** num_partitions
        on = torch.tensor([True], device=x.device)
        index = cape_shift(index[:, None, None, :], shift[:, None], on, memory_slots)[:, 0, 0]
    return index, weight


# Weights: the CUDA C forward's differ from beam_topk's in fp32 by at most 1.0e-6 relative on these rows (g++,
# glibc's expf and logf), the interpreted Triton forward's by 1.7e-6 (numpy's exp and log): fp32 log weights
# of -5 to -20 carry a few 1e-7 to 1e-6 of rounding, whose exp is that much relative. On the GPU the Triton
# kernel's ex2.approx and lg2.approx are of the same order.
RTOL_TORCH = 2e-6
RTOL_TRITON = 4e-6


def _assert_same(got, want, rtol):
    """The same slots in the same order; weights to ``rtol`` relative (and 1e-30 absolute)."""
    (index, weight), (ref_index, ref_weight) = got, want
    assert index.dtype == torch.int64 and weight.dtype == torch.float32
    assert index.shape == ref_index.shape and weight.shape == ref_weight.shape
    assert index.is_contiguous() and weight.is_contiguous()
    wrong = (index != ref_index).any(-1)
    assert not bool(wrong.any()), f"{int(wrong.sum())} rows differ, first: {index[wrong][:3]} != {ref_index[wrong][:3]}"
    torch.testing.assert_close(weight, ref_weight, rtol=rtol, atol=1e-30)


def _decode(x, num_partitions, topk, tau, shift=None, decoder="cuda"):
    from ramnet.ops.address.triton import triton_beam_topk

    old = cuda_decoder.DECODER
    cuda_decoder.DECODER = decoder
    try:
        return triton_beam_topk(x, num_partitions, topk, tau, shift=shift)
    finally:
        cuda_decoder.DECODER = old


# The source on the CPU ------------------------------------------------------------------------------------

SHIM = r"""
#include <cmath>
#include <cstring>
#include <math.h>

struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 threadIdx, blockIdx, blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
static inline float __uint_as_float(unsigned int bits) { float f; std::memcpy(&f, &bits, 4); return f; }
"""

LAUNCH = r"""
// The grid, one row (thread) at a time.
extern "C" void emu_launch(int grid_x, int block_x, const x_t *x, const long long *shift, long long *index,
                           float *weight, int n_rows, int stride_x, double tau) {
    blockDim = {(unsigned)block_x, 1, 1};
    for (int b = 0; b < grid_x; ++b) {
        for (int t = 0; t < block_x; ++t) {
            blockIdx = {(unsigned)b, 0, 0};
            threadIdx = {(unsigned)t, 0, 0};
            beam_topk_fwd(x, shift, index, weight, n_rows, stride_x, tau);
        }
    }
}
extern "C" float emu_x_to_f32(x_t v) { return x_to_f32(v); }
"""

CXX = shutil.which("g++")
emulation = pytest.mark.skipif(CXX is None, reason="needs g++")
_libraries = {}


class _Emulated:
    """A compiled emulation with the call of torch's ``_CudaKernel``."""

    def __init__(self, library):
        self.library = library
        self.library.emu_x_to_f32.restype = ctypes.c_float

    def __call__(self, grid, block, args, shared_mem=0):
        def c(arg):
            if isinstance(arg, torch.Tensor):
                assert arg.device.type == "cpu"
                return ctypes.c_void_p(arg.data_ptr())
            return ctypes.c_double(arg) if isinstance(arg, float) else ctypes.c_int(arg)
        assert grid[1:] == (1, 1) and block[1:] == (1, 1)
        self.library.emu_launch(ctypes.c_int(grid[0]), ctypes.c_int(block[0]), *(c(a) for a in args))


def emulated_kernel(folder_factory, text):
    """The source ``text`` as host C++, compiled once per session."""
    if text not in _libraries:
        folder = folder_factory.mktemp("decoder")
        (folder / "kernel.cpp").write_text(SHIM + text + LAUNCH)
        done = subprocess.run([CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
                               "-o", str(folder / "kernel.so"), str(folder / "kernel.cpp")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        _libraries[text] = _Emulated(ctypes.CDLL(str(folder / "kernel.so")))
    return _libraries[text]


@pytest.fixture
def emulated(monkeypatch, tmp_path_factory):
    """``_BeamTopK`` on CPU tensors with its forward on the emulated CUDA C source (``DECODER`` "cuda" then
    takes CPU tensors); the Triton forward and backward under the interpreter."""
    monkeypatch.setattr(cuda_decoder, "cuda_decoder_fits",
                        lambda d_k, num_partitions, topk, device: cuda_kernels.in_domain(d_k, num_partitions, topk))
    monkeypatch.setattr(cuda_decoder, "compiled", lambda device, d_k, num_partitions, topk, x_type, has_shift:
                        emulated_kernel(tmp_path_factory, cuda_kernels.source(d_k, num_partitions, topk, x_type,
                                                                               has_shift)))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def _emulated_decode(x, num_partitions, topk, tau, shift=None):
    """The CUDA C forward alone (no Triton), as ``_BeamTopK.forward`` calls it."""
    d_k = x.shape[1]
    memory_slots = (d_k // num_partitions) ** num_partitions
    k_out = min(topk, memory_slots)
    index = torch.empty(x.shape[0], k_out, dtype=torch.int64)
    weight = torch.empty(x.shape[0], k_out, dtype=torch.float32)
    if shift is not None:
        shift = torch.remainder(shift, memory_slots)
    cuda_decoder.cuda_beam_topk_fwd(x.contiguous(), shift, index, weight, num_partitions, topk, tau)
    return index, weight


@emulation
@pytest.mark.parametrize("tau", [1.0, 1.7])
@pytest.mark.parametrize("with_shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "U{}-dp{}-K{}".format(*s))
def test_emulated_matches_beam_topk(emulated, shape, dtype, with_shift, tau):
    """Slots and order exactly ``beam_topk``'s in fp32 (+ ``cape_shift``), weights to ``RTOL_TORCH``."""
    num_partitions, d_p, topk = shape
    x = _rows(num_partitions, d_p, seed=num_partitions * 100 + d_p, dtype=DTYPES[dtype], device="cpu")
    shift = _shift(x.shape[0], "cpu") if with_shift else None
    _assert_same(_emulated_decode(x, num_partitions, topk, tau, shift), _reference(x, num_partitions, topk, tau, shift),
                 RTOL_TORCH)


@emulation
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
@pytest.mark.parametrize("with_shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "U{}-dp{}-K{}".format(*s))
def test_emulated_matches_the_triton_forward(emulated, shape, dtype, with_shift):
    """Through ``_BeamTopK`` (``DECODER`` "cuda", then "triton" under the interpreter): the same slots in
    the same order, weights to ``RTOL_TRITON``."""
    num_partitions, d_p, topk = shape
    tau = 1.7 if with_shift else 1.0
    x = _rows(num_partitions, d_p, seed=num_partitions * 100 + d_p + 1, dtype=DTYPES[dtype], device="cpu")
    shift = _shift(x.shape[0], "cpu") if with_shift else None
    _assert_same(_decode(x, num_partitions, topk, tau, shift, "cuda"),
                 _decode(x, num_partitions, topk, tau, shift, "triton"), RTOL_TRITON)


def _gradients(x, num_partitions, topk, shift, decoder):
    from ramnet.ops.address.triton import _BeamTopK

    leaf = x.detach().clone().requires_grad_()
    old = cuda_decoder.DECODER
    cuda_decoder.DECODER = decoder
    try:
        index, weight = _BeamTopK.apply(leaf, shift, num_partitions, topk, 1.3)
    finally:
        cuda_decoder.DECODER = old
    probe = torch.linspace(-1, 1, weight.numel(), device=x.device).view(weight.shape)
    (grad,) = torch.autograd.grad((weight * probe).sum(), leaf)
    return index, weight, grad


@emulation
@pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
@pytest.mark.parametrize("shape", [(5, 4, 8), (4, 6, 1), (3, 2, 8)], ids=lambda s: "U{}-dp{}-K{}".format(*s))
def test_emulated_gradient_through_beam_topk(emulated, shape):
    """The Triton backward on what the CUDA C forward saves gives the Triton forward's gradient."""
    num_partitions, d_p, topk = shape
    x = _rows(num_partitions, d_p, rows=90, seed=3, device="cpu")
    shift = torch.remainder(_shift(x.shape[0], "cpu"), d_p**num_partitions)
    index, weight, grad = _gradients(x, num_partitions, topk, shift, "cuda")
    ref_index, ref_weight, ref_grad = _gradients(x, num_partitions, topk, shift, "triton")
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@emulation
def test_emulated_rows_past_the_last_are_left_alone(tmp_path_factory):
    """A partial last block: rows past ``n_rows`` are neither read nor written."""
    text = cuda_kernels.source(20, 5, 8, torch.float32, True)
    kernel = emulated_kernel(tmp_path_factory, text)
    n = 130
    x = _rows(5, 4, rows=n, device="cpu")
    index = torch.full((cuda_kernels.BLOCK * 2, 8), -7, dtype=torch.int64)
    weight = torch.full((cuda_kernels.BLOCK * 2, 8), -7.0)
    shift = torch.remainder(_shift(n, "cpu"), 1024)
    kernel(grid=(2, 1, 1), block=(cuda_kernels.BLOCK, 1, 1), args=[x, shift, index, weight, n, 20, 1.0])
    assert bool((index[n:] == -7).all()) and bool((weight[n:] == -7.0).all())
    _assert_same((index[:n], weight[:n]), _reference(x, 5, 8, 1.0, shift), RTOL_TORCH)


@emulation
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_emulated_conversion_of_every_bit_pattern(tmp_path_factory, dtype):
    """``x_to_f32``, the hand-written conversion, on every bf16 and fp16 bit pattern (subnormals, zeros of
    both signs, infinities; NaNs stay NaN), and on some fp64 values, against torch's."""
    kernel = emulated_kernel(tmp_path_factory, cuda_kernels.source(4, 2, 2, dtype, False))
    if dtype == torch.float64:
        values = torch.tensor([0.0, -0.0, 1e-300, 1e300, -3.5, 1 / 3, 2.0**-140, float("inf")], dtype=dtype)
        got = torch.tensor([kernel.library.emu_x_to_f32(ctypes.c_double(v)) for v in values.tolist()])
        assert torch.equal(got, values.float())
        return
    bits = torch.arange(2**16, dtype=torch.int32)
    values = bits.to(torch.int16).view(dtype).float()
    convert = kernel.library.emu_x_to_f32
    convert.argtypes = [ctypes.c_ushort]
    got = torch.tensor([convert(b) for b in bits.tolist()], dtype=torch.float32)
    nan = values.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), values[~nan].view(torch.int32))  # bits: -0.0 included


# Which forward runs ---------------------------------------------------------------------------------------


def test_auto_takes_triton_off_nvidia_and_cuda_raises(monkeypatch):
    x = torch.randn(4, 20)
    monkeypatch.setattr(cuda_decoder, "DECODER", "auto")
    assert not cuda_decoder.use_cuda_decoder(x, 5, 8)
    monkeypatch.setattr(cuda_decoder, "DECODER", "triton")
    assert not cuda_decoder.use_cuda_decoder(x, 5, 8)
    monkeypatch.setattr(cuda_decoder, "DECODER", "cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors on an NVIDIA GPU"):
        cuda_decoder.use_cuda_decoder(x, 5, 8)
    monkeypatch.setattr(cuda_decoder, "DECODER", "fast")
    with pytest.raises(ValueError, match="DECODER must be one of"):
        cuda_decoder.use_cuda_decoder(x, 5, 8)


def test_cuda_raises_outside_the_domain_and_auto_falls_back(monkeypatch):
    """On an (alleged) NVIDIA device: "cuda" raises a clear error outside the kernel's domain, "auto"
    takes the Triton forward there and the CUDA C one inside it."""
    from ramnet.ops import nvrtc

    monkeypatch.setattr(nvrtc, "on_nvidia", lambda device: True)
    monkeypatch.setattr(nvrtc, "can_compile", lambda: True)
    monkeypatch.setattr(cuda_decoder, "traced", lambda x: False)
    monkeypatch.setattr(cuda_decoder, "DECODER", "auto")
    assert cuda_decoder.use_cuda_decoder(torch.randn(4, 20), 5, 8)
    assert cuda_decoder.use_cuda_decoder(torch.randn(4, 20, dtype=torch.bfloat16), 5, 8)
    for d_k, num_partitions, topk in [(20, 5, 17), (66, 1, 4), (34, 17, 2), (128, 8, 8), (32, 2, 16)]:
        # K > 16, d_p > 32, U > 16, M = 2**32, K * K * KP = 4096
        assert not cuda_decoder.use_cuda_decoder(torch.randn(2, d_k), num_partitions, topk)
        monkeypatch.setattr(cuda_decoder, "DECODER", "cuda")
        with pytest.raises(ValueError, match="the CUDA C decoder takes"):
            cuda_decoder.use_cuda_decoder(torch.randn(2, d_k), num_partitions, topk)
        monkeypatch.setattr(cuda_decoder, "DECODER", "auto")
    monkeypatch.setattr(nvrtc, "can_compile", lambda: False)
    assert not cuda_decoder.use_cuda_decoder(torch.randn(4, 20), 5, 8)
    monkeypatch.setattr(cuda_decoder, "DECODER", "cuda")
    with pytest.raises(RuntimeError, match=re.escape(torch.__version__)):
        cuda_decoder.use_cuda_decoder(torch.randn(4, 20), 5, 8)


def test_the_domain_is_what_source_takes():
    assert cuda_kernels.in_domain(20, 5, 8) and cuda_kernels.in_domain(8, 2, 16) and cuda_kernels.in_domain(64, 2, 8)
    assert not cuda_kernels.in_domain(32, 2, 16)  # K 16 at d_p 16: K * K * KP = 4096
    with pytest.raises(ValueError, match="K <= 16"):
        cuda_kernels.source(20, 5, 17, torch.float32, False)
    with pytest.raises(ValueError, match="fp32, bf16, fp16 or fp64"):
        cuda_kernels.source(20, 5, 8, torch.int32, False)


# nvcc for sm_90 -------------------------------------------------------------------------------------------

NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc", "/usr/local/cuda-13.0/bin/nvcc"]
                                     if os.path.exists(p)), None)
COMPILE_CASES = ([dict(shape=s, x_type=torch.bfloat16, has_shift=True) for s in SHAPES]
                 + [dict(shape=(5, 4, 8), x_type=t, has_shift=False) for t in (torch.float32, torch.float16,
                                                                               torch.float64)]
                 + [dict(shape=(16, 2, 8), x_type=torch.float32, has_shift=True),  # the stage loop not unrolled
                    dict(shape=(2, 32, 8), x_type=torch.bfloat16, has_shift=False)])  # d_p 32


def _nvcc(tmp_path, index, case):
    num_partitions, d_p, topk = case["shape"]
    path = tmp_path / f"decoder_{index}.cu"
    path.write_text(cuda_kernels.source(num_partitions * d_p, num_partitions, topk, case["x_type"],
                                        case["has_shift"]))
    return subprocess.run([NVCC, "-arch=sm_90", "--ptxas-options=-v", "-c", "-o", str(path.with_suffix(".o")),
                           str(path)], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_source_compiles_for_sm90_with_nvcc(tmp_path):
    """The text NVRTC compiles at run time, through nvcc and ptxas for sm_90, in every configuration of
    the tests (and with the stage loop rolled, and at d_p 32): no error, no spill."""
    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        done = list(pool.map(lambda ic: _nvcc(tmp_path, *ic), enumerate(COMPILE_CASES)))
    failed = [(case, d.stderr[-2000:]) for case, d in zip(COMPILE_CASES, done) if d.returncode]
    assert not failed, failed
    spilled = [(case, d.stderr) for case, d in zip(COMPILE_CASES, done)
               if " 0 bytes spill stores, 0 bytes spill loads" not in d.stderr]
    assert not spilled, spilled


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_the_paper_shape_does_not_spill(tmp_path):
    """ptxas on the paper's decoder (U 5, d_p 4, K 8, bf16, CAPE): no spills, no stack frame."""
    done = _nvcc(tmp_path, 0, dict(shape=(5, 4, 8), x_type=torch.bfloat16, has_shift=True))
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stderr)
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in done.stderr, done.stderr


# On the GPU -----------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("tau", [1.0, 1.7])
@pytest.mark.parametrize("with_shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "U{}-dp{}-K{}".format(*s))
def test_cuda_matches_the_triton_forward(shape, dtype, with_shift, tau):
    """5,000 rows (a partial last block): the same slots in the same order, weights to ``RTOL_TRITON``;
    and the slots ``beam_topk``'s."""
    num_partitions, d_p, topk = shape
    x = _rows(num_partitions, d_p, rows=5000, seed=num_partitions * 100 + d_p, dtype=DTYPES[dtype])
    shift = _shift(x.shape[0]) if with_shift else None
    got = _decode(x, num_partitions, topk, tau, shift, "cuda")
    _assert_same(got, _decode(x, num_partitions, topk, tau, shift, "triton"), RTOL_TRITON)
    assert torch.equal(got[0], _reference(x, num_partitions, topk, tau, shift)[0])


@on_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "U{}-dp{}-K{}".format(*s))
@pytest.mark.parametrize("with_shift", [False, True], ids=["noshift", "shift"])
def test_cuda_gradient_through_beam_topk(shape, with_shift):
    """The Triton backward on what either forward saves: the same gradient."""
    num_partitions, d_p, topk = shape
    x = _rows(num_partitions, d_p, rows=1000, seed=3, dtype=torch.bfloat16)
    shift = torch.remainder(_shift(x.shape[0]), d_p**num_partitions) if with_shift else None
    index, weight, grad = _gradients(x, num_partitions, topk, shift, "cuda")
    ref_index, ref_weight, ref_grad = _gradients(x, num_partitions, topk, shift, "triton")
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weight, ref_weight, rtol=RTOL_TRITON, atol=1e-30)
    assert grad.dtype == ref_grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-6)


@on_gpu
def test_auto_runs_the_cuda_forward_on_the_gpu(monkeypatch):
    """With ``DECODER`` "auto" the op's decoder is the CUDA C forward where it fits."""
    calls = []
    launch = cuda_decoder.cuda_beam_topk_fwd
    monkeypatch.setattr(cuda_decoder, "cuda_beam_topk_fwd", lambda *args: calls.append(1) or launch(*args))
    x = _rows(5, 4, rows=64, dtype=torch.bfloat16)
    _assert_same(_decode(x, 5, 8, 1.0, decoder="auto"), _decode(x, 5, 8, 1.0, decoder="triton"), RTOL_TRITON)
    assert calls == [1]
