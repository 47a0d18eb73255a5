"""Neural cache pointer (Grave et al., 2017, "Improving neural language models with a
continuous cache"): at evaluation, mix the model's next-word distribution with one that
points back at the words that followed similar hidden states in the recent past.

For position t with last-layer hidden state h_t and target y_t (the next word),

    a_i(t)     = exp(theta * h_t . h_i) / sum_{k in W(t)} exp(theta * h_t . h_k),  i in W(t)
    p_cache(w) = sum_{i in W(t), y_i = w} a_i(t)
    p(w)       = (1 - lambda) * p_vocab(w) + lambda * p_cache(w)

where W(t) is the last ``window`` positions before t, across batch boundaries, and y_i,
the word that followed h_i, is already known when y_t is predicted. The defaults are the
post's (Gugger & Howard 2018, "AdamW and super-convergence": theta 0.662, lambda 0.1279,
window 3785, AWD-LSTM's values for WikiText-2), used with bptt 2000 and batch size 1.

Which positions use the cache (the two originals differ; ``awd_warmup`` picks):

* ``awd_warmup=False`` (default), the post's code (sgugger/Adam-experiments,
  ``lm_val_fns.my_cache_pointer``, ``if start + i > 0``): every position with at least one
  earlier position uses the cache, over its last ``min(window, available)`` predecessors.
  Only the first token after :meth:`CachePointer.reset` has an empty cache and scores
  with p_vocab alone.
* ``awd_warmup=True``, AWD-LSTM's ``pointer.py`` (``if start_idx + idx > window``): a
  position uses the cache only when more than ``window`` earlier positions are retained,
  so always over exactly ``window`` of them. The first ``window + 1`` tokens of the stream
  score with p_vocab alone, and so, once the retained history is full
  (``start_idx == window``), does the first token of every later batch: the strict ``>``
  skips it although a full window is there. Mirrored here so its numbers can be matched.

The post's loop also drops the stream's last partial batch (its ``TextReader.__len__`` is
``n // bptt``); that is the data loop's business, not the cache's: score every batch.

Only the target's probability is needed to score, so p_cache is never built over the
vocabulary: the weights of the cached positions whose word equals the target are summed
(an equality mask, no one-hot and no scatter).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Full log-probabilities [seq, vocab], or those of the targets [seq], or a function from
# hidden rows [n, dim] to full log-probabilities [n, vocab] (e.g. an adaptive softmax's
# ``log_prob``), called chunk by chunk so the [seq, vocab] matrix never exists at once.
LogProbs = Tensor | Callable[[Tensor], Tensor]


def check_cache_pointer(theta: float, lambda_: float, window: int) -> None:
    """Raise a one-line ``ValueError`` naming the first bad value and what is allowed."""
    if not math.isfinite(theta):
        raise ValueError(f"theta={theta} must be finite")
    if not 0 <= lambda_ <= 1:
        raise ValueError(f"lambda_={lambda_} must be in [0, 1]")
    # pointer.py keeps history[-window:]; with window 0 that slice is the whole history.
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window={window} must be an int >= 1")


class CachePointer:
    """Scores a token stream batch by batch with the cache pointer, keeping the last
    ``window`` hidden states and targets between batches (call :meth:`reset` between
    streams). Vectorized over the window: per chunk of queries, one matmul against the
    cached and current keys, a band mask for causality and the window, a softmax, and
    a sum of the weights of the positions whose word is the target. Memory is
    O(chunk_size * (window + chunk_size)) on top of the inputs: ~9 MB per chunk of 512
    against a window of 3785 in float32, where a whole 2000-token batch would take ~46 MB.

    The dot products run in float32 (float64 if ``hidden`` is float64): in half precision
    scores of size theta * h.h (up to theta * dim) would lose whole units.
    """

    def __init__(self, theta: float = 0.662, lambda_: float = 0.1279, window: int = 3785,
                 *, awd_warmup: bool = False, chunk_size: int = 512) -> None:
        check_cache_pointer(theta, lambda_, window)
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        self.theta, self.lambda_, self.window = theta, lambda_, window
        self.awd_warmup, self.chunk_size = awd_warmup, chunk_size
        self.reset()

    def reset(self) -> None:
        """Empty the cache, e.g. before the test set after the validation set."""
        self._keys: Tensor | None = None  # [m, dim] hidden states of the last m <= window positions
        self._words: Tensor | None = None  # [m] their targets

    @torch.no_grad()
    def score(self, log_probs: LogProbs, hidden: Tensor, targets: Tensor) -> tuple[float, int]:
        """Log-likelihood (float64, natural log) of ``targets`` [seq] under the mixture,
        and the number of tokens, for one batch of a stream with batch size 1.

        ``hidden`` [seq, dim]: the last layer's outputs, the ones the decoder reads.
        ``log_probs``: normalized log-probabilities, see :data:`LogProbs`.
        Perplexity over a stream: ``exp(-sum(ll) / sum(count))``.
        """
        if hidden.dim() != 2 or targets.dim() != 1 or len(hidden) != len(targets):
            raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} "
                             "must be [seq, dim] and [seq]: batch size 1, squeeze it")
        n = len(targets)
        if n == 0:
            return 0.0, 0
        lv = torch.cat([self._target_log_probs(log_probs, hidden, targets, a,
                                               min(a + self.chunk_size, n)).double()
                        for a in range(0, n, self.chunk_size)])
        p_cache, uses_cache = self.cache_probs(hidden, targets)
        return mix(lv, p_cache, uses_cache, self.lambda_), n

    @torch.no_grad()
    def cache_probs(self, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """For one batch of the stream: p_cache of each target (float64 [seq]) and whether
        its position uses the cache ([seq] bool); the history moves on. Independent of
        lambda, so a grid over lambda needs one pass per theta (:func:`mix`)."""
        n = len(targets)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        h = hidden.detach().to(dtype)
        keys = h if self._keys is None else torch.cat([self._keys, h])
        words = targets if self._words is None else torch.cat([self._words, targets])
        m = len(keys) - n  # retained history: pointer.py's start_idx
        probs, uses = [], []
        for a in range(0, n, self.chunk_size):
            b = min(a + self.chunk_size, n)
            g = torch.arange(m + a, m + b, device=keys.device)  # each query's index in keys
            lo, hi = max(0, m + a - self.window), m + b - 1  # the keys any query here may see
            s = (self.theta * h[a:b]) @ keys[lo:hi].T  # [chunk, keys]
            # Query g sees keys g - window <= j < g: never itself, whose target is the answer.
            # Only the chunk's first and last columns can fall outside (a band of width
            # window), so mask just those instead of building a [chunk, keys] mask.
            r = max(lo, m + a)
            j = torch.arange(r, hi, device=keys.device)
            s[:, r - lo:].masked_fill_(j >= g[:, None], -math.inf)
            r = min(hi, max(lo, m + b - 1 - self.window))
            j = torch.arange(lo, r, device=keys.device)
            s[:, :r - lo].masked_fill_(j < g[:, None] - self.window, -math.inf)
            # softmax subtracts the row max, so nothing overflows (theta * h.h reaches
            # theta * dim = 265 for 400-dim LSTM outputs). Matches more than ~87 nats
            # (float32) below the row's best key underflow to 0; they would add under
            # lambda * window * e^-87 (~1e-35) to p, nothing next to p_vocab, and sharing
            # the max saves a second logsumexp over [chunk, keys].
            attn = torch.softmax(s, dim=1)
            probs.append(attn.masked_fill_(words[lo:hi] != targets[a:b, None], 0)
                         .sum(dim=1).double())
            uses.append(g > self.window if self.awd_warmup else g > 0)
        # Keep the tail as its own tensor so the batch's full keys can be freed.
        self._keys = keys[-self.window:].clone()
        self._words = words[-self.window:].clone()
        return torch.cat(probs), torch.cat(uses)

    @staticmethod
    def _target_log_probs(log_probs: LogProbs, hidden: Tensor, targets: Tensor,
                          a: int, b: int) -> Tensor:
        if not isinstance(log_probs, Tensor):
            rows = log_probs(hidden[a:b])
            return rows.gather(1, targets[a:b, None]).squeeze(1)
        if log_probs.dim() == 1:
            return log_probs[a:b]
        return log_probs[a:b].gather(1, targets[a:b, None]).squeeze(1)


def mix(lv: Tensor, p_cache: Tensor, uses_cache: Tensor, lambda_: float) -> float:
    """Log-likelihood of a batch under ``(1 - lambda) * p_vocab + lambda * p_cache``, from
    the targets' log p_vocab ``lv`` and :meth:`CachePointer.cache_probs` (float64)."""
    log_keep = math.log1p(-lambda_)
    log_lam = math.log(lambda_) if lambda_ > 0 else -math.inf
    # No match gives log 0 = -inf, so p = (1 - lambda) * p_vocab, as it should.
    mixed = torch.logaddexp(log_keep + lv, log_lam + p_cache.log())
    # torch.where, not arithmetic: rows without a cache hold NaN (a softmax over no keys).
    # One float64 sum over all tokens: with lambda 0 it equals the model's sum exactly.
    return torch.where(uses_cache, mixed, lv).sum().item()


def grid(batches: list[tuple[Tensor, Tensor, Tensor]], thetas: list[float],
         lambdas: list[float], window: int = 3785, *, awd_warmup: bool = False
         ) -> dict[tuple[float, float], float]:
    """Perplexity of a recorded stream (:meth:`toolkit.lm.LMTrainer.record_stream`: per
    batch the targets' log p_vocab, hidden states, targets) for every (theta, lambda): one
    cache pass per theta, every lambda from the same p_cache; each pair scores exactly what
    :meth:`CachePointer.score` over the stream gives."""
    for lam in lambdas:
        check_cache_pointer(thetas[0] if thetas else 1.0, lam, window)
    count = sum(len(t) for _, _, t in batches)
    out = {}
    for theta in thetas:
        pointer = CachePointer(theta, 0.0, window, awd_warmup=awd_warmup)
        parts = [(lv, *pointer.cache_probs(h, t)) for lv, h, t in batches]
        for lam in lambdas:
            ll = 0.0
            for lv, p_cache, uses in parts:  # batch by batch, as score_stream adds them
                ll += mix(lv, p_cache, uses, lam)
            out[(theta, lam)] = math.exp(-ll / count)
    return out


def cache_pointer_reference(
    log_probs: Tensor,
    hidden: Tensor,
    targets: Tensor,
    history: tuple[Tensor, Tensor] | None = None,
    *,
    theta: float = 0.662,
    lambda_: float = 0.1279,
    window: int = 3785,
    awd_warmup: bool = False,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, tuple[Tensor, Tensor]]:
    """For tests and benchmarks: the cache pointer one token at a time, as the post's
    ``my_cache_pointer`` and AWD-LSTM's ``pointer.py`` write it (same history bookkeeping:
    the batch is appended before its loop, the tail of ``window`` is kept after it), in
    ``dtype``. p_cache is built over the whole vocabulary like theirs, with ``index_add_``
    instead of their dense one-hot history (which would be window x vocab per token).

    ``log_probs`` [seq, vocab], ``hidden`` [seq, dim], ``targets`` [seq]; ``history`` is
    what the previous batch returned (None at the start of a stream). Returns the batch's
    log-likelihood and the history for the next batch.
    """
    check_cache_pointer(theta, lambda_, window)
    p_vocab = log_probs.to(dtype).exp()
    h = hidden.to(dtype)
    start = 0 if history is None else len(history[0])
    hist_h = h if history is None else torch.cat([history[0], h])
    hist_y = targets if history is None else torch.cat([history[1], targets])
    total = 0.0
    for idx in range(len(targets)):
        p = p_vocab[idx]
        if (start + idx > window) if awd_warmup else (start + idx > 0):
            lo, hi = max(0, start + idx - window), start + idx
            attn = torch.softmax(theta * (hist_h[lo:hi] @ h[idx]), dim=0)
            p_cache = torch.zeros_like(p).index_add_(0, hist_y[lo:hi], attn)
            p = (1 - lambda_) * p + lambda_ * p_cache
        total += math.log(p[targets[idx]].item())
    return total, (hist_h[-window:], hist_y[-window:])
