"""CUDA C source of the address decoder's forward (launched by ``cuda.py`` beside it), compiled at run
time with NVRTC (``ops/nvrtc.py``): the same beam top-K, tie rule, log weights and CAPE shift as
``beam_topk_fwd_kernel`` in ``triton_kernels.py``, whose backward (``beam_topk_bwd_kernel``) runs on
what this forward leaves.

Why CUDA C. Per row the work is small (at the paper's U 5, d_p 4, K 8: 20 logits, 5 log-softmaxes of 4
values, then 4 beam stages keeping 8 of 32 candidates), but the Triton kernel spends it on tiles,
one-hot takes and layout conversions: 1.57 ms for 524,288 rows on an H100 (B8 T2048 H16, bf16;
torch 2.11, Triton 3.6), a quarter of the whole op's forward and backward (measured while the Triton
forward spilled; since 412912c it does not: docs/kernels.md). Here one thread decodes one row, everything
in registers: fixed-size arrays sized by the constants, every loop over them unrolled.

Per row (``beam_topk_fwd``): partition u's d_p entries ``x`` are loaded (fp32, bf16, fp16 or fp64,
converted to fp32 by hand: the source includes no header), and its log-softmax at temperature tau is
computed as ``_partition`` does: ``z = x / tau``, ``z -= max``, ``e = expf(z)``, the total summed column
after column from column 0, ``logp = z - logf(total)``. Its ``KP = min(K, d_p)`` best entries by the tie
rule (``beam.py``: decreasing entry, then the lower entry) are kept with their logp. Partition 0's are
the first beams; each later partition extends every live beam by each of its KP entries (score
``beam score + entry``, slot ``beam slot * d_p + entry``, log weight ``beam log weight + logp``, fp32
adds in the Triton kernel's order) and keeps the K best candidates by the rule: decreasing score, then
the lower slot. The candidates are inserted one by one into a list sorted by the rule (each swaps its
way down past the entries it beats, the last entry dropping out), so the list is the rule's top K
whatever the insertion order: the rule is a total order on a row's candidates (their slots are
distinct). Before K beams exist (``KP**(u+1) < K``) only the live ones are extended, which is what the
Triton kernel's -inf beams amount to. The output is the K_OUT = min(K, M) beams in the rule's order:
``index`` int64 (minus the CAPE shift with ``HAS_SHIFT``, already in [0, M) from the host: ``+ M`` where
negative) and ``weight = expf(log weight)`` fp32.

Exactness. Scores are fp32 adds only (no product for the compiler to contract into an FMA), in the
Triton kernel's order, so the slots and their order match the Triton kernel and ``beam_topk`` bit for
bit. The weights go through ``/ tau`` (IEEE division here), ``expf`` and ``logf``, which are not the
Triton kernel's instructions (its approximate division, ``ex2.approx`` and ``lg2.approx``): they match
it to a few 1e-6 relative, not bitwise (fp32 log weights of -5 to -20 carry that much rounding; on the
CPU tests this source's weights are within 1.0e-6 of ``beam_topk``'s in fp32, the interpreted Triton
kernel's within 1.7e-6). Above d_p 16 the Triton kernel sums the softmax by ``tl.sum``
in its own order, this one still column after column (again the last bits of the weights only).

Domain (``cuda.py``'s ``cuda_decoder_fits``): M < 2**31 (slots are int32 inside), K <= ``MAX_TOPK``,
d_p <= ``MAX_DP``, U <= ``MAX_PARTITIONS`` and K * K * KP <= ``MAX_STAGE_WORK``. A thread holds 3 K
beam values, 3 K new ones, 3 KP picks and a partition's 2 d_p values in registers (ptxas for sm_90: 64
registers at the paper's shape, 127 at d_p 32 and K 8, no spills; at K 32 a stack frame), and one
stage's code is K * KP insertions of up to K compare-swaps each (K 16 at d_p 16 would take 168
registers and a minute of compile). The stage loop is unrolled up to ``UNROLL_PARTITIONS`` stages, a
loop beyond. Elsewhere the Triton kernel runs.
"""

from __future__ import annotations

import torch

KERNEL_NAME = "beam_topk_fwd"
# Rows a block, one thread each.
BLOCK = 128
MAX_TOPK = 16
MAX_DP = 32
MAX_PARTITIONS = 16
# Compare-swaps of one stage's insertions, K * KP * K: the code (and NVRTC's compile time: about 8 s at the
# paper's 256, a minute at K 16, d_p 16's 4096) grows with it.
MAX_STAGE_WORK = 1024
UNROLL_PARTITIONS = 8
# x's dtype: the kernel's X_KIND.
X_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

BODY = r"""
#if X_KIND == 0
typedef float x_t;
__device__ __forceinline__ float x_to_f32(float v) { return v; }
#elif X_KIND == 1
typedef unsigned short x_t;
__device__ __forceinline__ float x_to_f32(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
#elif X_KIND == 2
typedef unsigned short x_t;
// fp16 to fp32 by bit moves (exact): subnormals are their mantissa times 2**-24.
__device__ __forceinline__ float x_to_f32(unsigned short v) {
    const unsigned int sign = ((unsigned int)v & 0x8000u) << 16;
    const unsigned int exponent = ((unsigned int)v >> 10) & 0x1fu;
    const unsigned int mantissa = (unsigned int)v & 0x3ffu;
    if (exponent == 0u) {
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    const unsigned int biased = exponent == 0x1fu ? 0xffu : exponent + 112u;  // inf and NaN stay so
    return __uint_as_float(sign | (biased << 23) | (mantissa << 13));
}
#else
typedef double x_t;
__device__ __forceinline__ float x_to_f32(double v) { return (float)v; }
#endif

#define EMPTY_SLOT 0x7fffffff

// The tie rule (beam.py): a candidate beats another with a higher score, or the same score and a lower slot.
__device__ __forceinline__ bool beats(float score, int slot, float other_score, int other_slot) {
    return score > other_score || (score == other_score && slot < other_slot);
}

// Puts the candidate (score, slot, log weight) into the list of N sorted by the rule, best first, the last
// entry dropping out: it swaps its way down past every entry it beats. `filled` entries are live (a constant
// after unrolling): the candidate takes place `filled` if it gets there, and the places after stay empty.
template <int N>
__device__ __forceinline__ void insert(float (&score)[N], int (&slot)[N], float (&log_w)[N], float s, int m,
                                       float w, int filled) {
#pragma unroll
    for (int p = 0; p < N; ++p) {
        if (p <= filled) {
            const bool take = p == filled || beats(s, m, score[p], slot[p]);
            const float s_out = take ? score[p] : s;
            const int m_out = take ? slot[p] : m;
            const float w_out = take ? log_w[p] : w;
            score[p] = take ? s : score[p];
            slot[p] = take ? m : slot[p];
            log_w[p] = take ? w : log_w[p];
            s = s_out;
            m = m_out;
            w = w_out;
        }
    }
}

template <int N>
__device__ __forceinline__ void clear(float (&score)[N], int (&slot)[N], float (&log_w)[N]) {
#pragma unroll
    for (int p = 0; p < N; ++p) {
        score[p] = __uint_as_float(0xff800000u);  // -inf
        slot[p] = EMPTY_SLOT;
        log_w[p] = 0.0f;
    }
}

// Partition u of a row: the KP best of its entries by the rule, best first, with their log-probabilities at
// temperature tau, computed as _partition in triton_kernels.py.
__device__ __forceinline__ void best_entries(const x_t *__restrict__ row, int u, float tau, float (&score)[KP],
                                             int (&entry)[KP], float (&log_p)[KP]) {
    float x[DP], z[DP];
#pragma unroll
    for (int e = 0; e < DP; ++e) {
        x[e] = x_to_f32(row[u * DP + e]);
        z[e] = x[e] / tau;
    }
    float top = z[0];
#pragma unroll
    for (int e = 1; e < DP; ++e) top = z[e] > top ? z[e] : top;
    float total = 0.0f;
#pragma unroll
    for (int e = 0; e < DP; ++e) {
        z[e] = z[e] - top;
        const float p = expf(z[e]);
        total = e == 0 ? p : total + p;  // column after column, from column 0
    }
    const float log_total = logf(total);
    clear(score, entry, log_p);
#pragma unroll
    for (int e = 0; e < DP; ++e) insert(score, entry, log_p, x[e], e, z[e] - log_total, e < KP ? e : KP);
}

extern "C" __global__ void __launch_bounds__(BLOCK)
beam_topk_fwd(const x_t *__restrict__ x, const long long *__restrict__ shift, long long *__restrict__ index,
              float *__restrict__ weight, int n_rows, int stride_x, double tau_arg) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n_rows) return;
    const float tau = (float)tau_arg;
    const x_t *row_x = x + row * stride_x;
    // The beams, best first by the rule: score, slot (int32: M < 2**31) and log weight.
    float score[K], log_w[K];
    int slot[K];
    clear(score, slot, log_w);
    {
        float part[KP], part_log_p[KP];
        int part_entry[KP];
        best_entries(row_x, 0, tau, part, part_entry, part_log_p);
#pragma unroll
        for (int j = 0; j < KP; ++j) {
            score[j] = part[j];
            slot[j] = part_entry[j];
            log_w[j] = part_log_p[j];
        }
    }
    int live = KP;  // beams that exist: min(K, KP**(u+1)) after partition u
#if UNROLL_STAGES
#pragma unroll
#else
#pragma unroll 1
#endif
    for (int u = 1; u < U; ++u) {
        float part[KP], part_log_p[KP];
        int part_entry[KP];
        best_entries(row_x, u, tau, part, part_entry, part_log_p);
        float next[K], next_log_w[K];
        int next_slot[K];
        clear(next, next_slot, next_log_w);
#pragma unroll
        for (int b = 0; b < K; ++b) {
            if (b < live) {
#pragma unroll
                for (int j = 0; j < KP; ++j) {
                    const int filled = b * KP + j < K ? b * KP + j : K;
                    insert(next, next_slot, next_log_w, score[b] + part[j], slot[b] * DP + part_entry[j],
                           log_w[b] + part_log_p[j], filled);
                }
            }
        }
#pragma unroll
        for (int b = 0; b < K; ++b) {
            score[b] = next[b];
            slot[b] = next_slot[b];
            log_w[b] = next_log_w[b];
        }
        live = live * KP < K ? live * KP : K;
    }

    const long long out = row * K_OUT;
#if HAS_SHIFT
    const long long s = shift[row];  // in [0, M)
#endif
#pragma unroll
    for (int k = 0; k < K_OUT; ++k) {
        long long m = slot[k];
#if HAS_SHIFT
        m -= s;
        if (m < 0) m += M_SLOTS;
#endif
        index[out + k] = m;
        weight[out + k] = expf(log_w[k]);
    }
}
"""


def in_domain(d_k: int, num_partitions: int, topk: int) -> bool:
    """Whether the kernel takes this geometry (module docstring)."""
    d_p = d_k // num_partitions
    return (1 <= num_partitions <= MAX_PARTITIONS and 1 <= d_p <= MAX_DP and 1 <= topk <= MAX_TOPK
            and topk * topk * min(topk, d_p) <= MAX_STAGE_WORK and d_p**num_partitions < 2**31)


def source(d_k: int, num_partitions: int, topk: int, x_type: torch.dtype, has_shift: bool) -> str:
    """The kernel's source for one configuration: its ``#define`` lines, then ``BODY``."""
    if not in_domain(d_k, num_partitions, topk):
        raise ValueError(f"the CUDA C decoder takes U <= {MAX_PARTITIONS}, d_p <= {MAX_DP}, K <= {MAX_TOPK}, "
                         f"K * K * min(K, d_p) <= {MAX_STAGE_WORK} and M < 2**31, got U={num_partitions}, "
                         f"d_k={d_k}, K={topk}")
    if x_type not in X_KINDS:
        raise ValueError(f"x must be fp32, bf16, fp16 or fp64, got {x_type}")
    d_p = d_k // num_partitions
    memory_slots = d_p**num_partitions
    defines = dict(U=num_partitions, DP=d_p, K=topk, KP=min(topk, d_p), K_OUT=min(topk, memory_slots),
                   M_SLOTS=f"{memory_slots}LL", X_KIND=X_KINDS[x_type], HAS_SHIFT=int(has_shift),
                   UNROLL_STAGES=int(num_partitions <= UNROLL_PARTITIONS), BLOCK=BLOCK)
    return "".join(f"#define {name} {value}\n" for name, value in defines.items()) + BODY
