"""LR finder suggestion rules on loss curves whose answer is known: analytically (a sigmoid's
inflection, a grid minimum) or by hand from fastai v2's ``valley`` rule (fastai/callback/
schedule.py): the longest strictly falling subsequence of ``run`` points ending at ``end``
(the first such end) gives ``start = end - run`` and the index
``max(start + int(run / 3) + int(run / 6), 0)``."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from toolkit.lr_finder import suggestions

RAW = {"skip_start": 0, "skip_end": 0}  # the rules on the whole curve, no fastai trim


def sigmoid_curve(noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """61 lrs, 10 per decade from 1e-6 to 1: the loss falls from 2 to 1 as a sigmoid in
    log10 lr centred on 1e-3, and diverges quadratically past 1e-2."""
    lrs = np.logspace(-6, 0, 61)
    x = np.log10(lrs)
    loss = 2 - 1 / (1 + np.exp(-4 * (x + 3))) + np.where(x > -2 + 1e-9, 5 * (x + 2) ** 2, 0)
    return lrs, loss + noise * np.random.default_rng(seed).standard_normal(len(lrs))


def test_valley_is_the_first_suggestion():
    lrs, loss = sigmoid_curve()
    assert list(suggestions(list(lrs), list(loss))) == ["valley", "min_div10", "steepest"]


def test_valley_on_flat_falling_diverging_curve_by_hand():
    # Points 0-9 flat at 2.0, 10-21 falling by 0.1 to 0.8, 22-29 rising to 4.4.
    loss = [2.0] * 10 + [1.9 - 0.1 * k for k in range(12)] + [0.9, 1.1, 1.4, 1.8, 2.3, 2.9,
                                                              3.6, 4.4]
    lrs = list(np.logspace(-5, -2, 30))
    # Runs: each flat point 1 (ties do not fall); falling point 10 + k: k + 2 (one flat
    # point, then all falling ones); the longest, 13, ends at the minimum (21); a rising
    # point is lower than fewer points (0.9 at 22: one flat and 10 falling, 12). So
    # start = 21 - 13 = 8, run / 3 = 4.33: index 8 + 4 + int(2.17) = 14.
    assert suggestions(lrs, loss, **RAW)["valley"] == lrs[14]
    # fastai's trim (first 30 // 10 = 3, last 5) keeps a flat point, the descent, the minimum.
    s = suggestions(lrs, loss)
    assert s["valley"] == lrs[14]
    assert s["min_div10"] == lrs[21] / 10


def test_rules_on_a_smooth_curve_with_known_answers():
    lrs, loss = sigmoid_curve()
    s = suggestions(list(lrs), list(loss))
    # Steepest fall per log lr: the sigmoid's inflection, 1e-3 (point 30), exactly: a central
    # difference is the integral of the symmetric slope over [x - h, x + h].
    assert s["steepest"] == lrs[30]
    # Grid minimum: 1e-2 (point 40), loss 2 - sigmoid(4) = 1.018 against 1.027 at point 39
    # and 2 - sigmoid(4.4) + 0.05 = 1.062 at point 41.
    assert s["min_div10"] == lrs[40] / 10
    # Valley: the curve falls strictly from its first point to the minimum. Trimmed to points
    # 6-55 (61 // 10 = 6 and 5 dropped), the run is points 6-40, 35 long, from trimmed index
    # -1: -1 + 11 + 5 = 15, point 21. On the whole curve: run 41, -1 + 13 + 6 = 18.
    assert s["valley"] == lrs[21]
    assert suggestions(list(lrs), list(loss), **RAW)["valley"] == lrs[18]


@pytest.mark.parametrize("seed", range(10))
def test_small_noise_keeps_steepest_and_minimum(seed):
    # Noise of 1e-3 moves a central slope by ~0.003 per unit log lr; the inflection beats its
    # neighbours by 0.016 and the minimum its neighbours by 0.009 in loss.
    lrs, loss = sigmoid_curve(noise=1e-3, seed=seed)
    s = suggestions(list(lrs), list(loss))
    assert s["min_div10"] == lrs[40] / 10
    assert s["steepest"] in (lrs[29], lrs[30], lrs[31])


@pytest.mark.parametrize("seed", range(20))
def test_valley_stays_in_the_descent_under_noise(seed):
    # Digits-like: 40 noisy flat points at 2.3, 25 falling by 0.05 each (far above the noise),
    # 15 rising. Noise lengthens the falling run through the flat part (by ~2 sqrt(40) for
    # iid noise), which pulls valley earlier but, with 25 falling points, not out of them.
    rng = np.random.default_rng(seed)
    flat, fall, rise = 40, 25, 15
    loss = np.concatenate([2.3 + 0.005 * rng.standard_normal(flat),
                           2.25 - 0.05 * np.arange(fall),
                           1.05 + 0.1 * np.arange(1, rise + 1) ** 2])
    lrs = np.logspace(-7, 1, len(loss))
    s = suggestions(list(lrs), list(loss), **RAW)
    assert lrs[flat] <= s["valley"] < lrs[flat + fall - 1]
    assert s["min_div10"] == lrs[flat + fall - 1] / 10


def test_steepest_ignores_falls_after_the_minimum():
    # A descent centred on point 20, minimum at 30, then a spike the smoothed loss decays
    # from (steeper than the descent) inside the divergence; fastai's whole-curve `steep`
    # would pick that decay.
    x = np.arange(50.0)
    loss = 2 - 1 / (1 + np.exp(-(x - 20) / 2)) + np.where(x > 30, 0.02 * (x - 30), 0)
    loss[36:41] = [3.5, 3.0, 2.5, 2.0, 1.6]
    lrs = np.logspace(-6, -1, 50)
    whole = np.gradient(loss, np.log(lrs))
    assert np.argmin(whole) in range(36, 41)  # the decay is the steepest fall overall
    assert suggestions(list(lrs), list(loss), **RAW)["steepest"] == lrs[20]


def test_monotone_decreasing_curve():
    # Falls ever faster (3 - 100 lr): steepest and lowest at the last point; valley over a
    # run of all 21 points from -1: -1 + 7 + 3 = 9.
    lrs = np.logspace(-4, -2, 21)
    loss = 3 - 100 * lrs
    s = suggestions(list(lrs), list(loss), **RAW)
    assert (s["valley"], s["steepest"], s["min_div10"]) == (lrs[9], lrs[20], lrs[20] / 10)
    # fastai's trim keeps points 2-15 (21 // 10 = 2, 5 dropped): run 14 from -1: -1 + 4 + 2.
    s = suggestions(list(lrs), list(loss))
    assert (s["valley"], s["steepest"], s["min_div10"]) == (lrs[7], lrs[15], lrs[15] / 10)


def test_short_curves():
    assert suggestions([], []) == {}
    assert suggestions([1e-3], [2.0]) == {"min_div10": 1e-4}
    assert suggestions([1e-3, 1e-2], [2.0, 1.0]) == {"min_div10": 1e-3}
    # 3 falling points: run 3 from -1: -1 + 1 + 0 = 0.
    assert suggestions([1e-3, 1e-2, 1e-1], [3.0, 2.0, 1.0])["valley"] == 1e-3
    # 7 points: fastai's trim (0 and 5) would leave 2, so the whole curve is used.
    lrs, loss = list(np.logspace(-4, -1, 7)), [3.0, 2.9, 2.5, 2.0, 1.8, 2.2, 3.0]
    assert suggestions(lrs, loss) == suggestions(lrs, loss, **RAW)
    assert len(suggestions(lrs, loss)) == 3


def test_valley_on_curves_that_never_fall_twice():
    # Longest run 2 starting at point 0 (or 1 on a rising curve): fastai's index is -1,
    # which Python reads as the last, highest lr; the rule's answer is the first lr.
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    assert suggestions(lrs, [2.0, 1.0, 1.5, 1.5], **RAW)["valley"] == 1e-4
    assert suggestions(lrs, [1.0, 2.0, 4.0, 8.0], **RAW)["valley"] == 1e-4


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_cuts_the_curve(bad):
    lrs, loss = sigmoid_curve()
    cut = 50  # keeps the minimum (point 40) inside fastai's trim of the last 5
    broken = loss.copy()
    broken[cut] = bad
    broken[cut + 1:] = 0.0  # finite and lowest, but after the loss diverged
    s = suggestions(list(lrs), list(broken))
    assert s == suggestions(list(lrs[:cut]), list(loss[:cut]))
    assert s["min_div10"] == lrs[40] / 10


def longest_falling_run_brute_force(loss: list[float], end: int) -> int:
    """Longest strictly falling subsequence ending at ``end``, by trying every subset."""
    for size in range(end + 1, 0, -1):
        for chosen in itertools.combinations(range(end), size - 1):
            seq = [loss[i] for i in chosen] + [loss[end]]
            if all(a > b for a, b in zip(seq, seq[1:])):
                return size
    raise AssertionError("unreachable")


def test_valley_matches_fastai_rule_by_brute_force():
    rng = np.random.default_rng(0)
    lrs = list(np.logspace(-5, -1, 9))
    for _ in range(300):
        n = int(rng.integers(3, 10))
        loss = [float(v) for v in rng.integers(0, 5, n)]  # few values: many ties
        runs = [longest_falling_run_brute_force(loss, e) for e in range(n)]
        end = runs.index(max(runs))
        start = end - runs[end]
        third = (end - start) / 3
        idx = max(start + int(third) + int(third / 2), 0)
        assert suggestions(lrs[:n], loss, **RAW)["valley"] == lrs[idx], loss


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="one loss per lr"):
        suggestions([1e-3, 1e-2], [1.0])
