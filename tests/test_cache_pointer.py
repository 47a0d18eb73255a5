"""toolkit.lm.cache_pointer: the per-token reference against values worked out by hand,
the vectorized CachePointer against that reference on streams of several batches (so the
cache carried across batches counts), and the limits lambda 0 and theta 0 against
formulas that use neither implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.lm.cache_pointer import CachePointer, cache_pointer_reference

BATCHES = (37, 64, 1, 80, 50, 68)  # 300 tokens, uneven so chunk and batch edges differ


def stream(vocab: int = 40, dim: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0):
    """Random log-probs, hidden states and Zipf-like targets (so words repeat in the window)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(BATCHES)
    log_probs = torch.log_softmax(2 * torch.randn(n, vocab, generator=g, dtype=dtype), dim=1)
    hidden = torch.randn(n, dim, generator=g, dtype=dtype)
    zipf = 1 / torch.arange(1, vocab + 1, dtype=torch.float64)
    targets = torch.multinomial(zipf, n, replacement=True, generator=g)
    return log_probs, hidden, targets


def batches(*tensors, sizes=BATCHES):
    return zip(*(t.split(list(sizes)) for t in tensors))


def vectorized_ll(log_probs, hidden, targets, sizes=BATCHES, **kw) -> float:
    cache = CachePointer(**kw)
    total, count = 0.0, 0
    for lp, h, y in batches(log_probs, hidden, targets, sizes=sizes):
        ll, n = cache.score(lp, h, y)
        total, count = total + ll, count + n
    assert count == len(targets)
    return total


def reference_ll(log_probs, hidden, targets, sizes=BATCHES, **kw) -> float:
    total, history = 0.0, None
    for lp, h, y in batches(log_probs, hidden, targets, sizes=sizes):
        ll, history = cache_pointer_reference(lp, h, y, history, **kw)
        total += ll
    return total


# --- the reference against a hand-computed example -----------------------------------------
# vocab 3 with p_vocab uniform (1/3), hidden states 1-d: h = 1, 1, 2, 1, targets 0, 1, 0, 0;
# theta = ln 2 so each weight exp(theta * h_t h_i) is 2 ** (h_t h_i); lambda 1/2, window 2.
#   t=0: nothing cached                   -> p = 1/3
#   t=1: cache {0: y=0}, target 1 absent  -> p = 1/2 * 1/3             = 1/6
#   t=2: cache {0, 1}, weights 4, 4       -> p_cache(0) = 1/2, p = 1/6 + 1/4 = 5/12
#   t=3: cache {1, 2} (window 2), 2, 4     -> p_cache(0) = 4/6, p = 1/6 + 1/3 = 1/2
HAND = dict(theta=math.log(2), lambda_=0.5, window=2)
HAND_POST = math.log(1 / 3) + math.log(1 / 6) + math.log(5 / 12) + math.log(1 / 2)
# AWD's pointer.py uses the cache only when start_idx + idx > window: t=3 alone in one batch
# (start_idx 0, idx 3), and also with batches [0, 1] | [2, 3] (start_idx 2, idx 1); with
# [0, 1, 2] | [3] the history holds 2 = window entries, so t=3 has idx 0 and 2 > 2 fails.
HAND_AWD = 3 * math.log(1 / 3) + math.log(1 / 2)
HAND_AWD_QUIRK = 4 * math.log(1 / 3)


def hand_stream():
    log_probs = torch.full((4, 3), math.log(1 / 3), dtype=torch.float64)
    hidden = torch.tensor([[1.0], [1.0], [2.0], [1.0]], dtype=torch.float64)
    return log_probs, hidden, torch.tensor([0, 1, 0, 0])


@pytest.mark.parametrize("impl", [reference_ll, vectorized_ll], ids=["reference", "vectorized"])
@pytest.mark.parametrize("awd_warmup, sizes, expected", [
    (False, (4,), HAND_POST), (False, (2, 2), HAND_POST), (False, (3, 1), HAND_POST),
    (False, (1, 1, 1, 1), HAND_POST),
    (True, (4,), HAND_AWD), (True, (2, 2), HAND_AWD), (True, (3, 1), HAND_AWD_QUIRK),
])
def test_hand_computed(impl, awd_warmup, sizes, expected):
    ll = impl(*hand_stream(), sizes=sizes, awd_warmup=awd_warmup, **HAND)
    assert math.isclose(ll, expected, rel_tol=1e-12), (ll, expected)


# --- vectorized against the reference ---------------------------------------------------------

@pytest.mark.parametrize("awd_warmup", [False, True], ids=["post", "awd"])
@pytest.mark.parametrize("window", [50, 1000], ids=["window<stream", "window>stream"])
@pytest.mark.parametrize("chunk_size", [7, 512])
def test_vectorized_matches_reference(window, awd_warmup, chunk_size):
    data = stream()
    kw = dict(theta=0.662, lambda_=0.1279, window=window, awd_warmup=awd_warmup)
    ref = reference_ll(*data, **kw)
    vec = vectorized_ll(*data, chunk_size=chunk_size, **kw)
    assert abs(vec - ref) < 1e-4, (vec, ref)
    plain = data[0].gather(1, data[2][:, None]).sum().item()
    if awd_warmup and window > len(data[2]):
        # pointer.py never fills a window longer than the stream: the model alone.
        assert abs(vec - plain) < 1e-9
    else:
        assert abs(vec - plain) > 1.0  # the cache did change the score


def test_float32_inputs_close_to_float64_reference():
    data = stream(dtype=torch.float32)
    kw = dict(window=100)
    ref = reference_ll(*data, **kw)  # upcasts to float64
    vec = vectorized_ll(*data, **kw)
    assert abs(vec - ref) < 1e-3 * 1e-3 * abs(ref), (vec, ref)  # 1e-6 relative


def test_window_longer_than_stream_is_whole_past():
    data = stream()
    assert abs(vectorized_ll(*data, window=1000) - vectorized_ll(*data, window=300)) < 1e-9
    assert abs(vectorized_ll(*data, window=1000) - vectorized_ll(*data, window=100)) > 1e-3


@pytest.mark.parametrize("form", ["callable", "targets only"])
def test_log_prob_forms(form):
    log_probs, hidden, targets = stream()
    g = torch.Generator().manual_seed(1)
    head = torch.randn(hidden.shape[1], 40, dtype=torch.float64, generator=g)
    full = torch.log_softmax(hidden @ head, dim=1)
    given = {"callable": lambda rows: torch.log_softmax(rows @ head, dim=1),
             "targets only": full.gather(1, targets[:, None]).squeeze(1)}[form]
    expected = vectorized_ll(full, hidden, targets, window=60, chunk_size=16)
    cache, ll = CachePointer(window=60, chunk_size=16), 0.0
    for (h, y), lp in zip(batches(hidden, targets), _split_or_repeat(given)):
        ll += cache.score(lp, h, y)[0]
    assert abs(ll - expected) < 1e-9


def _split_or_repeat(given):
    return given.split(list(BATCHES)) if isinstance(given, torch.Tensor) else [given] * len(BATCHES)


# --- limits checked against formulas that use neither implementation --------------------------

@pytest.mark.parametrize("awd_warmup", [False, True])
def test_lambda_zero_is_the_model_exactly(awd_warmup):
    log_probs, hidden, targets = stream()
    cache = CachePointer(lambda_=0.0, window=50, awd_warmup=awd_warmup)
    for lp, h, y in batches(log_probs, hidden, targets):
        ll, _ = cache.score(lp, h, y)
        assert ll == lp.gather(1, y[:, None]).squeeze(1).sum().item()


def test_theta_zero_weighs_the_window_uniformly():
    log_probs, hidden, targets = stream()
    lam, window = 0.3, 50
    y = targets.tolist()
    expected = 0.0
    for t in range(len(y)):
        past = y[max(0, t - window):t]
        p = math.exp(log_probs[t, y[t]].item())
        if past:  # the post's rule: every position after the first uses what is cached
            p = (1 - lam) * p + lam * past.count(y[t]) / len(past)
        expected += math.log(p)
    ll = vectorized_ll(log_probs, hidden, targets, theta=0.0, lambda_=lam, window=window)
    assert abs(ll - expected) < 1e-9, (ll, expected)


def test_reset_empties_the_cache():
    log_probs, hidden, targets = stream()
    cache = CachePointer(window=100)
    first = cache.score(log_probs, hidden, targets)[0]
    again = cache.score(log_probs, hidden, targets)[0]
    assert abs(again - first) > 1.0  # the first pass is cached: the second scores better
    cache.reset()
    assert cache.score(log_probs, hidden, targets)[0] == first


def test_rejects_bad_values():
    with pytest.raises(ValueError, match="lambda_"):
        CachePointer(lambda_=1.5)
    with pytest.raises(ValueError, match="window"):
        CachePointer(window=0)
    with pytest.raises(ValueError, match="batch size 1"):
        CachePointer().score(torch.zeros(4, 1, 3), torch.zeros(4, 1, 8), torch.zeros(4, 1).long())


def test_the_grid_scores_each_pair_as_the_pointer_does():
    """grid() reuses one cache pass per theta for every lambda: each pair's perplexity is
    exactly what CachePointer.score over the same batches gives."""
    from toolkit.lm.cache_pointer import grid

    gen = torch.Generator().manual_seed(5)
    batches = []
    for n in (7, 12, 5):  # three batches of a stream, the cache carried across them
        log_probs = torch.log_softmax(torch.randn(n, 9, generator=gen), -1)
        targets = torch.randint(0, 9, (n,), generator=gen)
        hidden = torch.randn(n, 4, generator=gen)
        lv = log_probs.gather(1, targets[:, None]).squeeze(1).double()
        batches.append((lv, hidden, targets))
    scores = grid(batches, [0.3, 1.1], [0.0, 0.2, 0.7], window=6)
    assert len(scores) == 6
    count = sum(len(t) for _, _, t in batches)
    for (theta, lam), ppl in scores.items():
        pointer, ll = CachePointer(theta, lam, 6), 0.0
        for lv, hidden, targets in batches:
            ll += pointer.score(lv, hidden, targets)[0]
        assert ppl == math.exp(-ll / count), (theta, lam)
    no_cache = math.exp(-sum(lv.sum().item() for lv, _, _ in batches) / count)
    assert scores[(0.3, 0.0)] == pytest.approx(no_cache, rel=1e-12)
