import math

import pytest
import torch

from ramnet.mqar import generate


def _queries(inputs, labels, N):
    """Query positions [n, N] (ascending) of each row; asserts there are exactly N."""
    mask = labels != -100
    assert (mask.sum(1) == N).all()
    return mask.nonzero()[:, 1].view(-1, N)


def _gap_of_pair(inputs, labels, N, pair):
    """Gap of the query of kv pair `pair` in every row."""
    pos = _queries(inputs, labels, N)
    hit = inputs.gather(1, pos) == inputs[:, 2 * pair, None]
    assert (hit.sum(1) == 1).all()
    return (pos[hit] - 2 * N) // 2


def _power_law(S, a):
    p = a * torch.arange(1, S + 1, dtype=torch.float64) ** (a - 1)
    return p / p.sum()


def _assert_freq(observed, n, p, sigmas=5.0):
    """Binomial check: |count - n p| <= sigmas * sqrt(n p (1 - p))."""
    sd = math.sqrt(n * p * (1 - p))
    assert abs(observed - n * p) <= sigmas * sd, (observed, n * p, sd)


@pytest.mark.parametrize("n,L,N,V", [
    (500, 64, 8, 100),     # sparse key sampling path
    (500, 64, 16, 66),     # dense path (few keys to choose from)
    (500, 32, 8, 8192),    # L == 4N: every query slot is used
    (200, 4, 1, 5),        # smallest vocab for one pair (V > L = 4): key 1, value 2, 3 or 4
])
def test_layout_ranges_and_labels(n, L, N, V):
    x, y = generate(n, L, N, vocab_size=V, random_non_queries=False, seed=3)
    assert x.shape == y.shape == (n, L)
    assert x.dtype == y.dtype == torch.long
    keys, values = x[:, 0:2 * N:2], x[:, 1:2 * N:2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    # distinct keys and distinct values within each example
    assert (keys.sort(1).values.diff(dim=1) > 0).all()
    assert (values.sort(1).values.diff(dim=1) > 0).all()
    # no labels in the kv prefix; queries sit at 2N + 2*gap
    pos = _queries(x, y, N)
    assert (pos >= 2 * N).all() and ((pos - 2 * N) % 2 == 0).all()
    assert (pos <= L - 2).all()
    # each key is queried exactly once, and the label is its paired value
    q, lab = x.gather(1, pos), y.gather(1, pos)
    assert torch.equal(q.sort(1).values, keys.sort(1).values)
    pair = (q[:, :, None] == keys[:, None, :]).int().argmax(2)
    assert torch.equal(lab, values.gather(1, pair))
    # everything else is filler 0
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[:, :2 * N] = False
    rest.scatter_(1, pos, False)
    assert (x[rest] == 0).all()
    if L == 4 * N:
        assert torch.equal(pos[0], torch.arange(2 * N, L, 2))


def test_zoology_docstring_example_shape():
    # Zoology's docstring has V=12, N=2, L=16, which its own `assert vocab_size > input_seq_len`
    # refuses; V=18: keys in [1, 9), values in [9, 18).
    x, y = generate(1, 16, 2, vocab_size=18, random_non_queries=False, seed=0)
    k0, v0, k1, v1 = x[0, :4].tolist()
    pos = (y[0] != -100).nonzero().flatten().tolist()
    assert len(pos) == 2
    assert {(x[0, t].item(), y[0, t].item()) for t in pos} == {(k0, v0), (k1, v1)}


def test_random_non_queries_only_replaces_filler():
    kw = dict(num_examples=2000, seq_len=128, num_kv_pairs=16, vocab_size=512, seed=7)
    x0, y0 = generate(random_non_queries=False, **kw)
    x1, y1 = generate(random_non_queries=True, **kw)
    assert torch.equal(y0, y1)
    keep = x0 != 0
    assert torch.equal(x1[keep], x0[keep])
    noise = x1[~keep]
    assert ((noise >= 0) & (noise < 512)).all()
    # filler is uniform over the whole vocab, not left at 0
    counts = torch.bincount(noise, minlength=512).double()
    e = noise.numel() / 512
    chi2 = ((counts - e) ** 2 / e).sum().item()
    assert chi2 < 511 + 5 * math.sqrt(2 * 511)
    assert (noise == 0).double().mean() < 0.01


@pytest.mark.parametrize("V,N", [(1000, 8), (34, 8)])  # sparse / dense sampler
def test_keys_and_values_uniform(V, N):
    n = 20000
    x, _ = generate(n, 4 * N, N, vocab_size=V, random_non_queries=False, seed=11)
    half = V // 2
    # per slot (catches sorted or position-biased sampling) and pooled
    for name, col, lo, m in [("key slot 0", x[:, 0], 1, half - 1),
                             ("value slot 0", x[:, 1], half, V - half),
                             ("last key slot", x[:, 2 * N - 2], 1, half - 1),
                             ("all keys", x[:, 0:2 * N:2].flatten(), 1, half - 1)]:
        counts = torch.bincount(col - lo, minlength=m).double()
        assert counts.numel() == m
        e = col.numel() / m
        chi2 = ((counts - e) ** 2 / e).sum().item()
        assert chi2 < (m - 1) + 5 * math.sqrt(2 * (m - 1)), name


def test_gap_power_law():
    n, L, N, a = 40000, 64, 4, 0.01
    S = (L - 2 * N) // 2
    x, y = generate(n, L, N, vocab_size=128, power_a=a, random_non_queries=False, seed=5)
    p = _power_law(S, a)
    # Pair 0's gap is the first draw, so it follows p exactly (Zoology's order).
    g0 = _gap_of_pair(x, y, N, 0)
    for g in range(3):
        _assert_freq((g0 == g).sum().item(), n, p[g].item())
    _assert_freq((g0 >= S // 2).sum().item(), n, p[S // 2:].sum().item())
    # Pair 1's gap is the second draw: P(g) = sum_{h != g} p_h p_g / (1 - p_h).
    g1 = _gap_of_pair(x, y, N, 1)
    for g in range(2):
        q = (p * p[g] / (1 - p)).sum() - p[g] * p[g] / (1 - p[g])
        _assert_freq((g1 == g).sum().item(), n, q.item())
    # Short gaps are most likely: frequencies over all queries decrease.
    allg = torch.cat([_gap_of_pair(x, y, N, i) for i in range(N)])
    freq = torch.bincount(allg, minlength=S)
    assert freq[0] > freq[1] > freq[2] > freq[S // 2] > freq[S - 1]


def test_gap_uniform_when_power_a_is_one():
    n, L, N = 20000, 48, 2
    S = (L - 2 * N) // 2
    x, y = generate(n, L, N, vocab_size=64, power_a=1.0, random_non_queries=False, seed=9)
    g0 = _gap_of_pair(x, y, N, 0)
    for g in (0, S // 2, S - 1):
        _assert_freq((g0 == g).sum().item(), n, 1 / S)


def test_determinism():
    a = generate(300, 64, 8, seed=1)
    b = generate(300, 64, 8, seed=1)
    c = generate(300, 64, 8, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][:, :16], c[0][:, :16])
    assert not torch.equal(a[1], c[1])


def test_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    generate(10, 32, 4)
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(num_examples=0), "num_examples"),
    (dict(num_examples=2.0), "num_examples"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
    (dict(seq_len=31), "seq_len"),            # odd
    (dict(seq_len=30, num_kv_pairs=8), "seq_len"),  # 4N > L
    (dict(vocab_size=17, num_kv_pairs=8), "vocab_size"),  # needs V > L = 32
    (dict(power_a=0.0), "power_a"),
    (dict(power_a=-1.0), "power_a"),
    (dict(power_a=float("nan")), "power_a"),
    (dict(seed=1.5), "seed"),
])
def test_bad_arguments(kwargs, arg):
    args = dict(num_examples=4, seq_len=32, num_kv_pairs=4, vocab_size=64) | kwargs
    with pytest.raises(ValueError, match=arg):
        generate(**args)


def test_vocab_size_boundary_is_accepted():
    x, _ = generate(50, 32, 8, vocab_size=33, random_non_queries=False)
    assert ((x[:, 0:16:2] >= 1) & (x[:, 0:16:2] < 16)).all()


@pytest.mark.parametrize("V", [32, 16, 8])
def test_vocab_no_larger_than_the_sequence_is_refused(V):
    # Zoology asserts vocab_size > input_seq_len; at V = 32, L = 32 the keys [1, 16) would still hold
    # N = 4 distinct keys, so only this condition refuses it.
    with pytest.raises(ValueError, match=r"vocab_size must be larger than seq_len .* got vocab_size "
                                         rf"{V} for seq_len 32: use a vocab_size of at least 33"):
        generate(4, 32, 4, vocab_size=V)


# --- the forgetting variant (reassign) -----------------------------------------------------------

from ramnet.mqar.data import IGNORE, check_setting, num_reassigned  # noqa: E402


def _recall_oracle(x, y, base, which):
    """Accuracy (mean over examples of per-example means) of a model that answers each query with the
    value after the ``which`` ("first" or "latest") occurrence of its key in the write region
    ``x[:, :base]``."""
    accs = []
    for xi, yi in zip(x.tolist(), y.tolist()):
        hits = []
        for t, label in enumerate(yi):
            if label == IGNORE:
                continue
            writes = [s for s in range(0, base, 2) if xi[s] == xi[t]]
            s = writes[0] if which == "first" else writes[-1]
            hits.append(xi[s + 1] == label)
        accs.append(sum(hits) / len(hits))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("n,L,N,V,reassign", [
    (300, 64, 8, 100, 0.5),   # R = 4
    (300, 64, 5, 100, 0.5),   # R = round(2.5) = 3: half up
    (300, 48, 8, 200, 1.0),   # every key re-assigned, L == 4N + 2R: every query slot used
    (300, 256, 16, 8192, 0.25),
])
def test_forgetting_layout_and_latest_value_labels(n, L, N, V, reassign):
    R = num_reassigned(N, reassign)
    base = 2 * (N + R)
    x, y = generate(n, L, N, vocab_size=V, random_non_queries=False, seed=11, reassign=reassign)
    keys, values = x[:, 0:2 * N:2], x[:, 1:2 * N:2]
    new_keys, new_values = x[:, 2 * N:base:2], x[:, 2 * N + 1:base:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert (keys.sort(1).values.diff(dim=1) > 0).all()
    # the re-assigned keys: R distinct keys of the example; their new values: distinct from every other value
    assert (new_keys[:, :, None] == keys[:, None, :]).sum(2).eq(1).all()
    assert R < 2 or (new_keys.sort(1).values.diff(dim=1) > 0).all()
    all_values = torch.cat([values, new_values], 1)
    assert ((new_values >= V // 2) & (new_values < V)).all()
    assert (all_values.sort(1).values.diff(dim=1) > 0).all()
    # queries after both blocks, at even offsets, every key once; no label before them
    pos = _queries(x, y, N)
    assert (pos >= base).all() and ((pos - base) % 2 == 0).all() and (pos <= L - 2).all()
    q, lab = x.gather(1, pos), y.gather(1, pos)
    assert torch.equal(q.sort(1).values, keys.sort(1).values)
    # the label is the latest value: the new one for a re-assigned key, the first one otherwise
    latest = {}
    for b in range(n):
        latest = dict(zip(keys[b].tolist(), values[b].tolist()))
        latest.update(zip(new_keys[b].tolist(), new_values[b].tolist()))
        assert [latest[k] for k in q[b].tolist()] == lab[b].tolist()
    if L == 4 * N + 2 * R:
        assert torch.equal(pos[0], torch.arange(base, L, 2))
    # the task tests the latest value: recalling it scores 1, recalling the first value 1 - R / N
    assert _recall_oracle(x, y, base, "latest") == 1.0
    assert _recall_oracle(x, y, base, "first") == pytest.approx(1 - R / N)


def test_forgetting_with_random_filler_and_its_oracles():
    x, y = generate(200, 128, 8, vocab_size=256, seed=3, reassign=1.0)  # filler: random tokens
    base = 2 * (8 + 8)
    assert _recall_oracle(x, y, base, "latest") == 1.0
    assert _recall_oracle(x, y, base, "first") == 0.0  # every key re-assigned: the first value is always wrong
    clean, _ = generate(200, 128, 8, vocab_size=256, seed=3, reassign=1.0, random_non_queries=False)
    assert torch.equal(x[clean != 0], clean[clean != 0])  # only filler was replaced


def test_forgetting_is_deterministic_and_reassign_0_is_plain_mqar():
    a = generate(50, 64, 8, vocab_size=128, seed=5, reassign=0.5)
    b = generate(50, 64, 8, vocab_size=128, seed=5, reassign=0.5)
    c = generate(50, 64, 8, vocab_size=128, seed=6, reassign=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    plain, zero = generate(50, 64, 8, vocab_size=128, seed=5), generate(50, 64, 8, vocab_size=128, seed=5, reassign=0)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])


def test_forgetting_settings_are_checked():
    assert [num_reassigned(N, f) for N, f in ((8, 0.5), (5, 0.5), (3, 0.5), (4, 0.0), (4, 1.0), (256, 0.1))] == [
        4, 3, 2, 0, 4, 26]
    check_setting(64, 8, 100, 1.0)  # 4N + 2R = 48 <= 64
    with pytest.raises(ValueError, match=r"seq_len must be >= 4 \* num_kv_pairs \+ 2 \* reassigned = 80"):
        check_setting(64, 16, 100, 0.5)
    for bad in (-0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="reassign must be a number in"):
            generate(1, 64, 4, vocab_size=100, reassign=bad)
