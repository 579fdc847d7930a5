"""CUDA C source of the on-chip token-by-token PDMA forward and backward (launched by ``onchip.py``
beside it), compiled at run time with NVRTC. The same recurrences and the same results as
``token_fwd_kernel`` and ``token_bwd_kernel`` in ``token_triton_kernels.py``, so that either backward
runs on what the forward saves.

Why CUDA C. The Triton token kernels keep the state as tables in global memory, which at the paper's
shape stay in L2, and every token of a program's chain waits on one round trip to L2: about 1 us a
token forward on an H100 (``benchmarks/results/README.md``, ``pdma_kernels_h100``), whatever the
batch. Shared memory answers in tens of cycles, but Triton cannot index it by a data-dependent row
(a token's slots), so this kernel holds each program's slice of the tables in shared memory, in CUDA.

Forward (``onchip_token_fwd``): one thread block per (sequence * H + head, d_v slice), one warp:
``DS`` (32 or 16) threads, thread ``c`` owning column ``slice * DS + c`` (columns past d_v are masked
at every global load and store). Shared memory holds the slice's ``S [M, DS]`` and its own copy of
``z [M]``: ``M * (DS + 1) * 4`` bytes (135,168 at M 1024, DS 32: one block an SM on an H100). The
block loads its slice of the tables once (or fills it with zeros and 1/M without an initial state:
``HAS_H0`` 0), walks its tokens, and stores the slice back, so the tables end as the Triton forward
leaves them: ``S [N*H*M, D]`` and ``z [slices, N*H*M]``, one z copy per slice.

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

Backward (``onchip_token_bwd``): one block per (sequence * H + head, slice of ``DS`` = 16 columns; 8
and 32 allowed), one thread a column as above. Shared memory holds the state, ``S [M, DS]`` and
``z [M]``, and its adjoint, ``dS [M, DS]`` and this slice's share of z's, ``dz [M]``: ``2 * M * (DS
+ 1) * 4`` bytes (139,264 at M 1024, DS 16). The block loads its slice of the final ``S``, slice 0's
copy of the final ``z`` and (``GRAD_FINAL``) the final state's gradients (``dS`` its columns, ``dz``
its slice's row: the caller puts z's gradient in slice 0 only), walks its tokens from the last, and
(``HAS_H0``) stores ``dS`` and its ``dz`` share back: the initial state's gradients. It never writes
``S`` or ``z``, so the backward can run again. Per token, the tables holding the state after it and
its adjoint:

- the read: thread c multiplies its column of the K read rows of S by the output's gradient, and a
  reduce-scatter of K values over the lanes (``reduce_scatter``: halving steps of warp shuffles, 8 at
  K 8 and 16 columns where K whole reductions would take 32) leaves ``u_j`` (this slice's share) on lane
  j, which divides by ``z_j + eps`` (its own z load): read j's weight gradient share and factor
  ``f_j = r_j / den_j``, shuffled to every lane. Every lane adds ``f_j go`` to its column of read row
  j of dS; lane j adds ``-r_j u_j / den_j^2`` to dz at read j's slot. A ``__syncwarp``.
- the write: the adjoint of written row i is read from the table after those adds, so a read of the
  same slot is counted without the Triton kernel's ``[K, K]`` slot match (a thread's own column, and
  dz after the barrier). v's gradient is ``sum_i w_i G_i`` (its column, no slice share); the rows are
  rolled back (S to the saved pre-write entries, dS to ``a_i G_i``; lane i z and dz); a
  reduce-scatter of 2K values leaves write i's weight and decay column sums on lane i, which adds its
  dz terms (``gz_i`` and ``gz_i z_old_i``) and stores this slice's shares. A ``__syncwarp``.

A token's read slots are distinct and so are its write slots; a read may share a slot with a write.
Its inputs, with its pre-write entries and the output's gradient, are loaded ``PF`` tokens ahead (a
ring, from the last token down to the sequence's first, never before it).

Templates are ``#define`` lines before the body (``source``, ``backward_source``): K, DS, VARLEN,
SAVE, HAS_H0, PF (and the backward's KP, GRAD_FINAL), the slot dtype (int32 or int64; slots are ints
inside, < M), v's dtype (fp32, bf16, fp16, fp64; the halves converted by bit moves and ``cvt``, so the
source includes no header and compiles alike under NVRTC and nvcc). Weights, decays, the saved rows
and the output's gradient are fp32 (the launcher converts others), ``cu_seqlens`` int32. Sizes arrive
as 32-bit ints; every offset into a global array is computed in 64 bits.
"""

from __future__ import annotations

import torch

from .. import nvrtc

KERNEL_NAME = "onchip_token_fwd"

INDEX_TYPES = {torch.int32: "int", torch.int64: "long long"}
# v's dtype: the kernel's V_KIND (0 fp32, 1 bf16, 2 fp16, 3 fp64).
V_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

# What both kernels share: the slot and v dtypes, the lane mask of the block's DS threads and a
# token's row in [B, T, H, ...] arrays.
COMMON = r"""
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

__device__ __forceinline__ long long token_row(int b, int t, int T, int H, int h) {
    return ((long long)b * T + t) * H + h;
}

// What a block owns (as the Triton kernels' _program): block (sequence * H + head, slice), its batch row b,
// head h and token range [start, end), and the thread's lane.
struct Program {
    int pid, part, lane, b, h, start, end;
};

__device__ __forceinline__ Program block_program(const int *__restrict__ cu, int T, int H) {
    Program p;
    p.pid = blockIdx.x;
    p.part = blockIdx.y;
    p.lane = threadIdx.x;
    const int n = p.pid / H;
    p.h = p.pid % H;
#if VARLEN
    p.b = 0;
    p.start = cu[n];
    p.end = cu[n + 1];
#else
    p.b = n;
    p.start = 0;
    p.end = T;
#endif
    return p;
}
"""

BODY = r"""
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
    const Program p = block_program(cu, T, H);
    const int pid = p.pid, part = p.part, lane = p.lane, b = p.b, h = p.h, start = p.start, end = p.end;
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


BACKWARD_KERNEL_NAME = "onchip_token_bwd"

BACKWARD_BODY = r"""
// Sum N values (x[0..N)) over the block's DS lanes and scatter the sums, leaving KEEP a lane. A halving
// step at lane offset O (1, 2, 4, ...) keeps half of a lane's values, the even-indexed where the lane's
// bit O is clear and the odd-indexed where it is set, and adds its partner's partials of that half (the
// partner sends the half it drops); once KEEP are left, whole reductions over the remaining offsets.
// After it, x[r] (r < KEEP) on lane L is the sum of value (L mod N/KEEP) + r * N/KEEP over every lane:
// N - KEEP + KEEP * log2(DS * KEEP / N) shuffles (K 8 at 16 columns: 8 for u, 16 for the 2K weight and
// decay sums), against N * log2(DS) for N whole reductions (32 and 64).
template <int N, int KEEP, int O>
__device__ __forceinline__ void reduce_scatter(float *x, int lane) {
    static_assert(N / KEEP <= DS, "more values than lanes to scatter them over");
    if constexpr (O < DS) {
        if constexpr (N > KEEP) {
            const bool odd = (lane & O) != 0;
#pragma unroll
            for (int k = 0; k < N / 2; ++k) {
                const float keep = odd ? x[2 * k + 1] : x[2 * k];
                const float send = odd ? x[2 * k] : x[2 * k + 1];
                x[k] = keep + __shfl_xor_sync(LANES, send, O);  // x[2k], x[2k + 1] are read before x[k] changes
            }
            reduce_scatter<N / 2, KEEP, 2 * O>(x, lane);
        } else {
#pragma unroll
            for (int r = 0; r < KEEP; ++r) x[r] += __shfl_xor_sync(LANES, x[r], O);
            reduce_scatter<N, KEEP, 2 * O>(x, lane);
        }
    }
}

// One token's inputs for the backward, in registers: what every lane needs for its column (all K write
// slots, read slots, decays, write weights, and the K pre-write entries saved by the forward) and what
// lane i < K needs for the z work (write i's slot, decay and pre-write z; read i's slot and weight).
struct BwdToken {
    int ws[K];
    int rs[K];
    float a[K];
    float ww[K];
    float S_old[K];
    int my_ws, my_rs;
    float my_a, my_rw, my_z_old;
    float v, go;  // v and the output's gradient, this thread's column (0 past d_v)
};

__device__ __forceinline__ void load_bwd_token(BwdToken &tk, long long row, int lane, int col, int D,
                                               const idx_t *__restrict__ write_idx,
                                               const float *__restrict__ write_w,
                                               const float *__restrict__ decay,
                                               const idx_t *__restrict__ read_idx,
                                               const float *__restrict__ read_w,
                                               const v_t *__restrict__ v,
                                               const float *__restrict__ saved_S,
                                               const float *__restrict__ saved_z,
                                               const float *__restrict__ grad_o) {
    const long long ev = row * K;
    const bool here = col < D;
#pragma unroll
    for (int i = 0; i < K; ++i) {
        tk.ws[i] = (int)write_idx[ev + i];
        tk.rs[i] = (int)read_idx[ev + i];
        tk.a[i] = decay[ev + i];
        tk.ww[i] = write_w[ev + i];
        tk.S_old[i] = here ? saved_S[(ev + i) * D + col] : 0.0f;
    }
    // Lanes past K take event 0's slots (in range; they store nothing) and a read weight of 0.
    const int l = lane < K ? lane : 0;
    tk.my_ws = (int)write_idx[ev + l];
    tk.my_rs = (int)read_idx[ev + l];
    tk.my_a = decay[ev + l];
    tk.my_rw = lane < K ? read_w[ev + l] : 0.0f;
    tk.my_z_old = saved_z[ev + l];
    tk.v = here ? v_to_f32(v[row * D + col]) : 0.0f;
    tk.go = here ? grad_o[row * D + col] : 0.0f;
}

// One token of the backward. On entry the tables hold the state after the token (S_sh, z_sh) and its
// adjoint (dS_sh, dz_sh: this slice's share of z's); on exit the state before it and its adjoint.
__device__ __forceinline__ void bwd_step(const BwdToken &tk, long long row, long long grads, int lane, int col,
                                         int D, float eps, float *S_sh, float *z_sh, float *dS_sh, float *dz_sh,
                                         float *__restrict__ grad_write_w, float *__restrict__ grad_decay,
                                         float *__restrict__ grad_read_w, float *__restrict__ grad_v) {
    const long long ev = row * K;
    // The read, o = sum_j r_j S_j / (z_j + eps) with S_j, z_j the state after the token: u_j = sum_c S_j[c] go[c]
    // over this slice's columns, scattered onto lane j (the sums' shares add up over the slices: den_j is the
    // same in every slice).
    float x[KP];
#pragma unroll
    for (int j = 0; j < KP; ++j) x[j] = j < K ? S_sh[tk.rs[j] * DS + lane] * tk.go : 0.0f;
    const float den = z_sh[tk.my_rs] + eps;  // lane j < K: read j's
    reduce_scatter<KP, 1, 1>(x, lane);
    const float u = x[0];
    const float f = tk.my_rw / den;
    if (lane < K) grad_read_w[grads + ev + lane] = u / den;
    // The reads' shares of the adjoint, added at their rows: (r_j / den_j) go to dS (this thread's column;
    // a token's read slots are distinct) and -r_j u_j / den_j^2 to dz (lane j).
#pragma unroll
    for (int j = 0; j < K; ++j) dS_sh[tk.rs[j] * DS + lane] += __shfl_sync(LANES, f, j) * tk.go;
    if (lane < K) dz_sh[tk.my_rs] += -tk.my_rw * u / (den * den);
    __syncwarp(LANES);  // the dz loads below see every lane's read shares (and every z load above is done)
    // The write, S = a S_old + w v and z = a z_old + w: its adjoint is the table's row, which already holds the
    // share of a read of the same slot (Triton's [K, K] slot match). Every load comes before every store, and
    // the K write slots are distinct.
    float G[K];
#pragma unroll
    for (int i = 0; i < K; ++i) G[i] = dS_sh[tk.ws[i] * DS + lane];
    const float gz = lane < K ? dz_sh[tk.my_ws] : 0.0f;
    float gv = 0.0f;
#pragma unroll
    for (int i = 0; i < K; ++i) gv += tk.ww[i] * G[i];
    if (col < D) grad_v[row * D + col] = gv;
    // Roll back: the state to the saved pre-write rows, the adjoint to a * adjoint.
#pragma unroll
    for (int i = 0; i < K; ++i) {
        S_sh[tk.ws[i] * DS + lane] = tk.S_old[i];
        dS_sh[tk.ws[i] * DS + lane] = tk.a[i] * G[i];
    }
    if (lane < K) {
        z_sh[tk.my_ws] = tk.my_z_old;
        dz_sh[tk.my_ws] = tk.my_a * gz;
    }
    // This slice's shares of write i's weight and decay gradients, sum_c G_i[c] v[c] + gz_i and
    // sum_c G_i[c] S_old_i[c] + gz_i z_old_i: the column sums scattered two a lane (lane i: write i's).
    float y[2 * KP];
#pragma unroll
    for (int i = 0; i < KP; ++i) {
        y[i] = i < K ? G[i] * tk.v : 0.0f;
        y[KP + i] = i < K ? G[i] * tk.S_old[i] : 0.0f;
    }
    reduce_scatter<2 * KP, 2, 1>(y, lane);
    if (lane < K) {
        grad_write_w[grads + ev + lane] = y[0] + gz;
        grad_decay[grads + ev + lane] = y[1] + gz * tk.my_z_old;
    }
    __syncwarp(LANES);  // the token before reads the z and dz rows just stored
}

extern "C" __global__ void __launch_bounds__(DS, 1)
onchip_token_bwd(const idx_t *__restrict__ write_idx, const float *__restrict__ write_w,
                 const float *__restrict__ decay, const idx_t *__restrict__ read_idx,
                 const float *__restrict__ read_w, const v_t *__restrict__ v, const int *__restrict__ cu,
                 const float *__restrict__ S, const float *__restrict__ z, const float *__restrict__ saved_S,
                 const float *__restrict__ saved_z, float *__restrict__ dS, float *__restrict__ dz,
                 const float *__restrict__ grad_o, float *__restrict__ grad_write_w, float *__restrict__ grad_decay,
                 float *__restrict__ grad_read_w, float *__restrict__ grad_v, int T, int H, int M, int D,
                 double eps_arg) {
    extern __shared__ float smem[];
    float *S_sh = smem;                            // [M, DS]: entry (slot, c) at slot * DS + c
    float *dS_sh = smem + (long long)M * DS;       // [M, DS]
    float *z_sh = smem + 2 * (long long)M * DS;    // [M]
    float *dz_sh = z_sh + M;                       // [M]
    const Program p = block_program(cu, T, H);
    const int pid = p.pid, part = p.part, lane = p.lane, b = p.b, h = p.h, start = p.start, end = p.end;
    const long long events = (long long)(VARLEN ? 1 : gridDim.x / H) * T * H * K;  // B * T * H * K
    if (start >= end) return;  // no token: dS and dz already hold this row's adjoint of the initial state
    const float eps = (float)eps_arg;
    const int col = part * DS + lane;
    const bool here = col < D;
    const long long row0 = (long long)pid * M;
    const long long table_rows = (long long)gridDim.x * M;  // N * H * M
    const long long grads = part * events;                  // this slice's shares in [slices, B*T*H*K]
    const float *z_g = z + row0;                              // the final z (slice 0's copy)
    float *dz_g = dz + part * table_rows + row0;              // this slice's share of z's adjoint

#pragma unroll 16
    for (int m = 0; m < M; ++m) S_sh[m * DS + lane] = here ? S[(row0 + m) * D + col] : 0.0f;
    for (int m = lane; m < M; m += DS) z_sh[m] = z_g[m];
#if GRAD_FINAL
#pragma unroll 16
    for (int m = 0; m < M; ++m) dS_sh[m * DS + lane] = here ? dS[(row0 + m) * D + col] : 0.0f;
    for (int m = lane; m < M; m += DS) dz_sh[m] = dz_g[m];
#else
#pragma unroll 16
    for (int m = 0; m < M; ++m) dS_sh[m * DS + lane] = 0.0f;
    for (int m = lane; m < M; m += DS) dz_sh[m] = 0.0f;
#endif
    __syncwarp(LANES);

    // The tokens from the last, the inputs of PF tokens before the running one in flight.
    BwdToken buf[PF];
#pragma unroll
    for (int p = 0; p < PF; ++p) {
        if (end - 1 - p >= start)
            load_bwd_token(buf[p], token_row(b, end - 1 - p, T, H, h), lane, col, D, write_idx, write_w, decay,
                           read_idx, read_w, v, saved_S, saved_z, grad_o);
    }
    for (int t0 = end - 1; t0 >= start; t0 -= PF) {
#pragma unroll
        for (int p = 0; p < PF; ++p) {
            const int t = t0 - p;
            if (t >= start) {
                const BwdToken cur = buf[p];
                if (t - PF >= start)
                    load_bwd_token(buf[p], token_row(b, t - PF, T, H, h), lane, col, D, write_idx, write_w,
                                   decay, read_idx, read_w, v, saved_S, saved_z, grad_o);
                bwd_step(cur, token_row(b, t, T, H, h), grads, lane, col, D, eps, S_sh, z_sh, dS_sh, dz_sh,
                         grad_write_w, grad_decay, grad_read_w, grad_v);
            }
        }
    }

#if HAS_H0
    __syncwarp(LANES);
    if (here) {
#pragma unroll 16
        for (int m = 0; m < M; ++m) dS[(row0 + m) * D + col] = dS_sh[m * DS + lane];
    }
    for (int m = lane; m < M; m += DS) dz_g[m] = dz_sh[m];
#endif
}
"""


def _check(K: int, DS: int, PF: int, idx_type: torch.dtype, v_type: torch.dtype) -> None:
    if not 1 <= K <= DS:
        raise ValueError(f"K must be in [1, DS={DS}] (lane i moves write i's z), got {K}")
    if PF < 1:
        raise ValueError(f"PF must be >= 1, got {PF}")
    if idx_type not in INDEX_TYPES:
        raise ValueError(f"slot indices must be int32 or int64, got {idx_type}")
    if v_type not in V_KINDS:
        raise ValueError(f"v must be fp32, bf16, fp16 or fp64, got {v_type}")


def _defines(**defines) -> str:
    return "".join(f"#define {name} {value}\n" for name, value in defines.items())


def source(K: int, DS: int, VARLEN: bool, SAVE: bool, idx_type: torch.dtype, v_type: torch.dtype, *,
           HAS_H0: bool = True, PF: int = 2) -> str:
    """The forward's source for one configuration: its ``#define`` lines, then ``COMMON`` and ``BODY``."""
    if DS not in (16, 32):
        raise ValueError(f"DS must be 16 or 32, got {DS}")
    _check(K, DS, PF, idx_type, v_type)
    return _defines(K=K, DS=DS, VARLEN=int(VARLEN), SAVE=int(SAVE), HAS_H0=int(HAS_H0), PF=PF,
                    IDX_T=INDEX_TYPES[idx_type], V_KIND=V_KINDS[v_type]) + COMMON + BODY


def backward_source(K: int, DS: int, VARLEN: bool, idx_type: torch.dtype, v_type: torch.dtype, *,
                    GRAD_FINAL: bool = True, HAS_H0: bool = True, PF: int = 2) -> str:
    """The backward's source for one configuration: its ``#define`` lines, then ``COMMON`` and
    ``BACKWARD_BODY``. ``GRAD_FINAL``: the adjoint tables start from the given ``dS, dz`` (else zeros);
    ``HAS_H0``: the block stores them back at the end (the initial state's gradients)."""
    if DS not in (8, 16, 32):
        raise ValueError(f"DS must be 8, 16 or 32, got {DS}")
    _check(K, DS, PF, idx_type, v_type)
    return _defines(K=K, KP=1 << (K - 1).bit_length(), DS=DS, VARLEN=int(VARLEN), GRAD_FINAL=int(GRAD_FINAL),
                    HAS_H0=int(HAS_H0), PF=PF, IDX_T=INDEX_TYPES[idx_type], V_KIND=V_KINDS[v_type]) + COMMON + \
        BACKWARD_BODY


def compiled(device: torch.device, K: int, DS: int, VARLEN: bool, SAVE: bool, idx_type: torch.dtype,
             v_type: torch.dtype, HAS_H0: bool, PF: int):
    """The forward for one configuration on ``device`` (a CUDA device), compiled once per process."""
    key = ("onchip_fwd", K, DS, bool(VARLEN), bool(SAVE), idx_type, v_type, bool(HAS_H0), PF)
    return nvrtc.compiled(device, key, lambda: (source(K, DS, VARLEN, SAVE, idx_type, v_type, HAS_H0=HAS_H0, PF=PF),
                                                KERNEL_NAME))


def compiled_backward(device: torch.device, K: int, DS: int, VARLEN: bool, idx_type: torch.dtype,
                      v_type: torch.dtype, GRAD_FINAL: bool, HAS_H0: bool, PF: int):
    """The backward for one configuration on ``device`` (a CUDA device), compiled once per process."""
    key = ("onchip_bwd", K, DS, bool(VARLEN), idx_type, v_type, bool(GRAD_FINAL), bool(HAS_H0), PF)
    return nvrtc.compiled(device, key, lambda: (backward_source(K, DS, VARLEN, idx_type, v_type, GRAD_FINAL=GRAD_FINAL,
                                                                HAS_H0=HAS_H0, PF=PF), BACKWARD_KERNEL_NAME))
