"""MQAR (multi-query associative recall) data, following Zoology's ``multiquery_ar``.

Reference: Arora, Eyuboglu et al., "Zoology: Measuring and improving recall in
efficient language models" (HazyResearch/zoology,
``zoology/data/associative_recall.py``). The distribution of the data is the
same as Zoology's; the random streams are not (we use a local torch.Generator,
Zoology seeds numpy's global RNG), so the same seed gives different tokens.
"""

import math
from numbers import Real

import torch

from ..ops.checks import check_int, check_positive

IGNORE = -100  # label ignored by cross-entropy (its default ignore_index)
MIN_SEED = -(2**63)  # the lowest seed torch.Generator.manual_seed takes


def generate(num_examples, seq_len, num_kv_pairs, vocab_size=8192, power_a=0.01,
             random_non_queries=True, seed=0, reassign=0.0):
    """Generate ``num_examples`` MQAR sequences; returns ``(inputs, labels)``.

    Both are LongTensors of shape ``[num_examples, seq_len]``. With ``N`` pairs,
    ``L = seq_len``, ``V = vocab_size`` and ``S = (L - 2N) / 2``:

    * keys are drawn from ``[1, V // 2)`` and values from ``[V // 2, V)``, each
      without replacement within an example (N distinct keys, N distinct
      values); token 0 is filler;
    * ``inputs[:, :2N]`` is ``k0 v0 k1 v1 ...``;
    * N distinct gaps are drawn from ``{0, .., S-1}`` by successive weighted
      sampling without replacement, weight ``a * (g + 1) ** (a - 1)`` with
      ``a = power_a`` (``a < 1``: short gaps most likely, ``a = 1``: uniform);
      the i-th draw is the gap of pair i, exactly like Zoology's
      ``np.random.choice(..., replace=False, p=p)``. Every key is queried once;
    * input/label alignment (Zoology's): Zoology builds a length ``L+1``
      sequence ``seq`` with key i at ``2N + 2*gap_i`` and label row ``lab``
      with value i at ``2N + 2*gap_i + 1`` (the slot right after the query),
      then returns ``inputs = seq[:-1]``, ``labels = lab[1:]``. Hence here
      ``inputs[b, t] == k_i`` and ``labels[b, t] == v_i`` at the same index
      ``t = 2N + 2*gap_i``: ``labels[t]`` is the next-token target after
      reading ``inputs[t]``. The value is *not* written into the inputs after
      the query (that slot is filler). All other labels are -100;
    * if ``random_non_queries``, every filler 0 of the inputs is replaced by a
      uniform token from ``[0, V)`` (so filler may be 0 or may repeat a key),
      as Zoology does. Otherwise filler stays 0.

    The forgetting variant (``reassign > 0``, not in Zoology): ``R = num_reassigned(N, reassign)``
    of the N keys, a uniformly random subset in random order, are written again with new values
    right after the pairs: ``inputs[:, 2N:2N + 2R]`` is ``k_j w_j ...``, where every ``w_j`` is a
    value of ``[V/2, V)`` that no other pair of the example uses (N + R distinct values). The
    queries follow both blocks: ``S = (L - 2N - 2R) / 2`` gaps as above, query of key i at
    ``2N + 2R + 2*gap_i``, and its label is the key's *latest* value: ``w_j`` for a re-assigned key,
    ``v_i`` for the others. So a model that recalls the first value a key was given scores
    ``1 - R / N``. With ``reassign = 0`` the output is plain MQAR, token for token.

    Deterministic for a given ``seed`` (uses a local ``torch.Generator``).
    """
    check_int("num_examples", num_examples, 1)
    check_setting(seq_len, num_kv_pairs, vocab_size, reassign)
    check_int("seed", seed, MIN_SEED)
    check_positive("power_a", power_a)
    n, N, L, V = num_examples, num_kv_pairs, seq_len, vocab_size

    R = num_reassigned(N, reassign)
    g = torch.Generator().manual_seed(seed)
    half = V // 2
    keys = 1 + _distinct(n, N, half - 1, g)       # [n, N] in [1, V/2)
    values = half + _distinct(n, N + R, V - half, g)  # [n, N + R] in [V/2, V)
    values, new_values = values[:, :N], values[:, N:]
    latest = values
    if R:  # no draw at all without re-assignment: plain MQAR's stream is unchanged
        which = _distinct(n, R, N, g)  # [n, R]: the re-assigned pairs, in the order they are re-written
        latest = values.scatter(1, which, new_values)

    # Successive weighted sampling without replacement == sort exponential
    # clocks E_g / p_g ascending (Efraimidis-Spirakis); the first N in order
    # are the draws. float64 so ties (which would bias the order) don't occur.
    base = 2 * (N + R)  # where the query region starts
    S = (L - base) // 2
    gap = torch.arange(1, S + 1, dtype=torch.float64)
    p = power_a * gap ** (power_a - 1)
    clocks = torch.empty(n, S, dtype=torch.float64).exponential_(generator=g) / p
    gaps = clocks.topk(N, dim=1, largest=False, sorted=True).indices  # [n, N]
    query_pos = base + 2 * gaps

    inputs = torch.zeros(n, L, dtype=torch.long)
    inputs[:, 0:2 * N:2] = keys
    inputs[:, 1:2 * N:2] = values
    if R:
        inputs[:, 2 * N:base:2] = keys.gather(1, which)
        inputs[:, 2 * N + 1:base:2] = new_values
    inputs.scatter_(1, query_pos, keys)
    labels = torch.full((n, L), IGNORE, dtype=torch.long)
    labels.scatter_(1, query_pos, latest)

    if random_non_queries:
        noise = torch.randint(V, (n, L), generator=g)
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, labels


def check_reassign(reassign) -> float:
    """The forgetting variant's fraction of re-assigned keys: a number in [0, 1]."""
    if isinstance(reassign, bool) or not isinstance(reassign, Real) or not 0.0 <= reassign <= 1.0:
        raise ValueError(f"reassign must be a number in [0, 1] (the fraction of keys given a new value), "
                         f"got {reassign!r}")
    return float(reassign)


def num_reassigned(num_kv_pairs: int, reassign: float) -> int:
    """How many of ``num_kv_pairs`` keys the forgetting variant re-assigns: ``reassign * N`` rounded
    half up (0.5 of 5 keys: 3)."""
    return int(math.floor(check_reassign(reassign) * num_kv_pairs + 0.5))


def check_setting(seq_len, num_kv_pairs, vocab_size, reassign=0.0) -> None:
    """Raise ValueError, naming the argument, unless ``num_kv_pairs`` pairs (and the forgetting
    variant's re-assignments) and their queries fit in ``seq_len`` tokens and ``vocab_size > seq_len``
    (Zoology's condition, which also makes the key half of the vocabulary hold that many distinct keys,
    and the value half the N + R distinct values)."""
    check_int("num_kv_pairs", num_kv_pairs, 1)
    check_int("seq_len", seq_len, 1)
    check_int("vocab_size", vocab_size, 1)
    N, L, V = num_kv_pairs, seq_len, vocab_size
    R = num_reassigned(N, reassign)
    if L % 2:
        raise ValueError(f"seq_len must be even (as in Zoology), got {L}")
    if 4 * N + 2 * R > L:
        extra = f", {R} re-assignments" if R else ""
        raise ValueError(f"seq_len must be >= 4 * num_kv_pairs{' + 2 * reassigned' if R else ''} = {4 * N + 2 * R} "
                         f"to hold {N} pairs{extra} and {N} query slots, got {L}")
    if V <= L:
        # Zoology's `assert vocab_size > input_seq_len`. It also leaves room for the keys: V > L >= 4N
        # gives V // 2 - 1 >= N distinct keys in [1, V/2).
        raise ValueError(f"vocab_size must be larger than seq_len (Zoology requires vocab_size > "
                         f"input_seq_len), got vocab_size {V} for seq_len {L}: use a vocab_size of at least {L + 1}")


def _distinct(n, k, m, g):
    """[n, k] LongTensor: per row, k distinct values uniform from [0, m), in random order."""
    if 4 * k >= m:
        # Dense: a random permutation per row costs O(m) = O(k) per row.
        return torch.rand(n, m, generator=g).argsort(dim=1)[:, :k]
    # Sparse: draw with replacement, redraw entries that repeat an earlier
    # entry of their row until none do. The rule only compares values, so it
    # commutes with relabelling [0, m); hence every ordered k-tuple of distinct
    # values is equally likely. Expected repeats per row <= k^2 / 2m < k / 8.
    out = torch.randint(m, (n, k), generator=g)
    rows = torch.arange(n)
    while rows.numel():
        sub = out[rows]
        srt, order = sub.sort(dim=1, stable=True)
        dup_sorted = torch.zeros_like(sub, dtype=torch.bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        dup = torch.zeros_like(dup_sorted).scatter_(1, order, dup_sorted)
        r, c = dup.nonzero(as_tuple=True)
        out[rows[r], c] = torch.randint(m, (r.numel(),), generator=g)
        rows = rows[dup.any(dim=1)]
    return out
