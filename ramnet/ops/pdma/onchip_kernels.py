"""CUDA C source of the on-chip token-by-token PDMA forward (launched by ``onchip.py`` beside it),
compiled at run time with NVRTC. The same recurrence and the same results as ``token_fwd_kernel`` in
``token_triton_kernels.py``, so that the Triton token backward runs unchanged on what it saves.

Why CUDA C. The Triton token kernels keep the state as tables in global memory, which at the paper's
shape stay in L2, and every token of a program's chain waits on one round trip to L2: about 1 us a
token forward on an H100 (``benchmarks/results/README.md``, ``pdma_kernels_h100``), whatever the
batch. Shared memory answers in tens of cycles, but Triton cannot index it by a data-dependent row
(a token's slots), so this kernel holds each program's slice of the tables in shared memory, in CUDA.

One thread block per (sequence * H + head, d_v slice), one warp: ``DS`` (32 or 16) threads, thread
``c`` owning column ``slice * DS + c`` (columns past d_v are masked at every global load and store).
Shared memory holds the slice's ``S [M, DS]`` and its own copy of ``z [M]``: ``M * (DS + 1) * 4``
bytes (135,168 at M 1024, DS 32: one block an SM on an H100). The block loads its slice of the
tables once (or fills it with zeros and 1/M without an initial state: ``HAS_H0`` 0), walks its
tokens, and stores the slice back, so the tables end as the Triton forward leaves them: ``S [N*H*M,
D]`` and ``z [slices, N*H*M]``, one z copy per slice.

Per token (its K write slots distinct, its K read slots distinct):

- S, this thread's column only: the K pre-write entries are loaded, then the new ones stored
  (``S = decay S + w v``), then the K read entries loaded. A thread writes and reads only its own
  column, so program order alone makes a read of a slot the token writes see the new entry: no
  barrier and no slot match for S.
- z, shared by the columns: lane ``i < K`` moves write ``i``'s z (load, ``z = decay z + w``, store),
  lane ``j < K`` computes read ``j``'s factor ``r_j / (z_j + eps)`` from shared memory after the
  stores, and ``K`` warp shuffles hand the factors to every lane: ``o = sum_j f_j S_j``. Two
  ``__syncwarp``: one before the z stores (every lane's z loads of the previous token's reads and of
  this token's writes are done) and one after them (the reads see them). Rather than every lane
  computing all K new z and matching read slots to write slots (the Triton kernel's ``[K, K]``
  match), the z work is spread over the lanes: no match and one division a lane instead of K, since
  one warp issues one instruction a cycle and each token's chain of instructions is the cost.
- With ``SAVE`` the pre-write entries go to ``saved_S [B*T*H*K, D]`` (this slice's columns) and the
  pre-write z to ``saved_z`` (slice 0's lanes) at event ``((b*T + t)*H + h)*K + i``; o is fp32.

A token's inputs (slots, weights, decays, v's column) do not depend on the state, so they are
loaded ``PF`` tokens ahead into registers (a ring of ``PF`` token buffers, the loop unrolled by
``PF`` so that every buffer index is a constant).

Templates are ``#define`` lines before the body (``source``): K, DS, VARLEN, SAVE, HAS_H0, PF, the
slot dtype (int32 or int64; slots are ints inside, < M), v's dtype (fp32, bf16, fp16, fp64; the
halves converted by bit moves and ``cvt``, so the source includes no header and compiles alike under
NVRTC and nvcc). Weights and decays are fp32 (the launcher converts others), ``cu_seqlens`` int32.
Sizes arrive as 32-bit ints; every offset into a global array is computed in 64 bits.
"""

from __future__ import annotations

import torch

KERNEL_NAME = "onchip_token_fwd"

INDEX_TYPES = {torch.int32: "int", torch.int64: "long long"}
# v's dtype: the kernel's V_KIND (0 fp32, 1 bf16, 2 fp16, 3 fp64).
V_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

BODY = r"""
typedef IDX_T idx_t;
#if V_KIND == 0
typedef float v_t;
__device__ __forceinline__ float v_to_f32(float x) { return x; }
#elif V_KIND == 1
typedef unsigned short v_t;
__device__ __forceinline__ float v_to_f32(unsigned short x) { return __uint_as_float(((unsigned int)x) << 16); }
#elif V_KIND == 2
typedef unsigned short v_t;
__device__ __forceinline__ float v_to_f32(unsigned short x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
#else
typedef double v_t;
__device__ __forceinline__ float v_to_f32(double x) { return (float)x; }
#endif

#if DS == 32
#define LANES 0xffffffffu
#else
#define LANES ((1u << DS) - 1u)
#endif

// One token's inputs, in registers: every lane holds all K write slots, read slots, decays and
// write weights (the S work of its column), and lane i < K write i's and read i's own (the z work).
struct Token {
    int ws[K];
    int rs[K];
    float a[K];
    float ww[K];
    int my_ws, my_rs;
    float my_a, my_ww, my_rw;
    float v;
};

__device__ __forceinline__ long long token_row(int b, int t, int T, int H, int h) {
    return ((long long)b * T + t) * H + h;
}

__device__ __forceinline__ void load_token(Token &tk, long long row, int lane, int col, int D,
                                           const idx_t *__restrict__ write_idx,
                                           const float *__restrict__ write_w,
                                           const float *__restrict__ decay,
                                           const idx_t *__restrict__ read_idx,
                                           const float *__restrict__ read_w,
                                           const v_t *__restrict__ v) {
    const long long ev = row * K;
#pragma unroll
    for (int i = 0; i < K; ++i) {
        tk.ws[i] = (int)write_idx[ev + i];
        tk.rs[i] = (int)read_idx[ev + i];
        tk.a[i] = decay[ev + i];
        tk.ww[i] = write_w[ev + i];
    }
    // Lanes past K take event 0's slots (in range; they store nothing) and a read weight of 0.
    const int l = lane < K ? lane : 0;
    tk.my_ws = (int)write_idx[ev + l];
    tk.my_rs = (int)read_idx[ev + l];
    tk.my_a = decay[ev + l];
    tk.my_ww = write_w[ev + l];
    tk.my_rw = lane < K ? read_w[ev + l] : 0.0f;
    tk.v = col < D ? v_to_f32(v[row * D + col]) : 0.0f;
}

__device__ __forceinline__ void step(const Token &tk, long long row, int lane, int col, int D, int part, float eps,
                                     float *S_sh, float *z_sh, float *__restrict__ o,
                                     float *__restrict__ saved_S, float *__restrict__ saved_z) {
    // Pre-write z of write `lane` (lane < K) and pre-write S of every write, this thread's column.
    const float z_old = z_sh[tk.my_ws];
    float S_old[K];
#pragma unroll
    for (int i = 0; i < K; ++i) S_old[i] = S_sh[tk.ws[i] * DS + lane];
    __syncwarp(LANES);  // every lane's z loads (this token's writes, the last token's reads) are done
    if (lane < K) z_sh[tk.my_ws] = tk.my_a * z_old + tk.my_ww;
#pragma unroll
    for (int i = 0; i < K; ++i) S_sh[tk.ws[i] * DS + lane] = tk.a[i] * S_old[i] + tk.ww[i] * tk.v;
    __syncwarp(LANES);  // the reads below see every lane's z stores
    // Read `lane`'s factor (0 on lanes past K); S of the reads after this thread's own stores.
    const float f = tk.my_rw / (z_sh[tk.my_rs] + eps);
    float out = 0.0f;
#pragma unroll
    for (int j = 0; j < K; ++j) out += __shfl_sync(LANES, f, j) * S_sh[tk.rs[j] * DS + lane];
    if (col < D) o[row * D + col] = out;
#if SAVE
    const long long ev = row * K;
    if (col < D) {
#pragma unroll
        for (int i = 0; i < K; ++i) saved_S[(ev + i) * D + col] = S_old[i];
    }
    if (part == 0 && lane < K) saved_z[ev + lane] = z_old;
#endif
}

extern "C" __global__ void __launch_bounds__(DS, 1)
onchip_token_fwd(const idx_t *__restrict__ write_idx, const float *__restrict__ write_w,
                 const float *__restrict__ decay, const idx_t *__restrict__ read_idx,
                 const float *__restrict__ read_w, const v_t *__restrict__ v, const int *__restrict__ cu,
                 float *__restrict__ S, float *__restrict__ z, float *__restrict__ saved_S,
                 float *__restrict__ saved_z, float *__restrict__ o, int T, int H, int M, int D, double eps_arg) {
    extern __shared__ float smem[];
    float *S_sh = smem;                       // [M, DS]: entry (slot, c) at slot * DS + c
    float *z_sh = smem + (long long)M * DS;   // [M]
    const int pid = blockIdx.x;
    const int part = blockIdx.y;
    const int lane = threadIdx.x;
    const int n = pid / H;
    const int h = pid % H;
#if VARLEN
    const int b = 0;
    const int start = cu[n];
    const int end = cu[n + 1];
#else
    const int b = n;
    const int start = 0;
    const int end = T;
#endif
    if (start >= end) return;  // no token: the global tables already hold this row's state
    const float eps = (float)eps_arg;
    const int col = part * DS + lane;
    const bool here = col < D;
    const long long row0 = (long long)pid * M;
    const long long table_rows = (long long)gridDim.x * M;  // N * H * M
    float *z_g = z + part * table_rows + row0;

#if HAS_H0
#pragma unroll 16
    for (int m = 0; m < M; ++m) S_sh[m * DS + lane] = here ? S[(row0 + m) * D + col] : 0.0f;
    for (int m = lane; m < M; m += DS) z_sh[m] = z_g[m];
#else
    const float z_empty = (float)(1.0 / (double)M);
#pragma unroll 16
    for (int m = 0; m < M; ++m) S_sh[m * DS + lane] = 0.0f;
    for (int m = lane; m < M; m += DS) z_sh[m] = z_empty;
#endif
    __syncwarp(LANES);

    Token buf[PF];
#pragma unroll
    for (int p = 0; p < PF; ++p) {
        if (start + p < end)
            load_token(buf[p], token_row(b, start + p, T, H, h), lane, col, D, write_idx, write_w, decay, read_idx,
                       read_w, v);
    }
    for (int t0 = start; t0 < end; t0 += PF) {
#pragma unroll
        for (int p = 0; p < PF; ++p) {
            const int t = t0 + p;
            if (t < end) {
                const Token cur = buf[p];
                if (t + PF < end)  // the token PF ahead, in flight while this one runs
                    load_token(buf[p], token_row(b, t + PF, T, H, h), lane, col, D, write_idx, write_w, decay,
                               read_idx, read_w, v);
                step(cur, token_row(b, t, T, H, h), lane, col, D, part, eps, S_sh, z_sh, o, saved_S, saved_z);
            }
        }
    }

    __syncwarp(LANES);
    if (here) {
#pragma unroll 16
        for (int m = 0; m < M; ++m) S[(row0 + m) * D + col] = S_sh[m * DS + lane];
    }
    for (int m = lane; m < M; m += DS) z_g[m] = z_sh[m];
}
"""


def source(K: int, DS: int, VARLEN: bool, SAVE: bool, idx_type: torch.dtype, v_type: torch.dtype, *,
           HAS_H0: bool = True, PF: int = 2) -> str:
    """The kernel's source for one configuration: its ``#define`` lines, then ``BODY``."""
    if DS not in (16, 32):
        raise ValueError(f"DS must be 16 or 32, got {DS}")
    if not 1 <= K <= DS:
        raise ValueError(f"K must be in [1, DS={DS}] (lane i moves write i's z), got {K}")
    if PF < 1:
        raise ValueError(f"PF must be >= 1, got {PF}")
    if idx_type not in INDEX_TYPES:
        raise ValueError(f"slot indices must be int32 or int64, got {idx_type}")
    if v_type not in V_KINDS:
        raise ValueError(f"v must be fp32, bf16, fp16 or fp64, got {v_type}")
    defines = dict(K=K, DS=DS, VARLEN=int(VARLEN), SAVE=int(SAVE), HAS_H0=int(HAS_H0), PF=PF,
                   IDX_T=INDEX_TYPES[idx_type], V_KIND=V_KINDS[v_type])
    return "".join(f"#define {name} {value}\n" for name, value in defines.items()) + BODY


_compiled: dict[tuple, object] = {}


def _compile(text: str):
    """``torch.cuda._compile_kernel`` (NVRTC, torch >= 2.8) on the current device. It puts
    ``CUDA_HOME/include`` on NVRTC's include path and raises where no CUDA toolkit is found (a pip
    torch with no toolkit): the source includes no header, so any directory serves then."""
    compile_kernel = getattr(torch.cuda, "_compile_kernel", None)
    if compile_kernel is None:
        raise RuntimeError(f"the on-chip PDMA kernel is compiled by torch.cuda._compile_kernel (NVRTC, torch >= 2.8); "
                           f"torch {torch.__version__} has none")
    from torch.utils import cpp_extension

    if getattr(cpp_extension, "CUDA_HOME", "") is not None:
        return compile_kernel(text, KERNEL_NAME)
    import os

    cpp_extension.CUDA_HOME = os.path.dirname(torch.__file__)
    try:
        return compile_kernel(text, KERNEL_NAME)
    finally:
        cpp_extension.CUDA_HOME = None


def compiled(device: torch.device, K: int, DS: int, VARLEN: bool, SAVE: bool, idx_type: torch.dtype,
             v_type: torch.dtype, HAS_H0: bool, PF: int):
    """The kernel for one configuration on ``device`` (a CUDA device), compiled once per process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, K, DS, bool(VARLEN), bool(SAVE), idx_type, v_type, bool(HAS_H0), PF)
    if key not in _compiled:
        with torch.cuda.device(index):
            _compiled[key] = _compile(source(K, DS, VARLEN, SAVE, idx_type, v_type, HAS_H0=HAS_H0, PF=PF))
    return _compiled[key]
