"""Cache pointer scoring speed: the vectorized ``CachePointer`` against per-token loops.

Sizes of the post's WikiText-2 evaluation: hidden 400, vocab 33,278, window 3785, bptt 2000,
batch size 1, with the cache already full (the steady state of a 245k-token test set).
Rows, all on the same data and timed in the same rounds:

* toolkit ``CachePointer`` on float32 inputs (the model's dtype) and on float64 inputs;
* ``cache_pointer_reference``, the tests' per-token loop, in float64 (what the issue
  measures against) and in float32 (the fastest per-token loop here);
* the per-token step of AWD-LSTM's ``pointer.py`` / the post's ``my_cache_pointer`` as
  written: the history of targets held as dense one-hot rows, window x vocab per token.

The per-token loops are timed on fewer tokens (``--ref-tokens``, ``--dense-tokens``) and
reported per token. Each round runs every row once in a rotating order, so a neighbour on a
shared machine slows them all alike; the table holds medians over the rounds.

    python bench/cache_pointer.py                           # CPU, 20-60 s on 2 cores
    python bench/cache_pointer.py --out docs/benchmarks.md  # also append the table there
    python bench/cache_pointer.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from collections.abc import Callable

import torch

from report import device_name, emit
from toolkit.lm.cache_pointer import CachePointer, cache_pointer_reference

THETA, LAMBDA, WINDOW = 0.662, 0.1279, 3785  # the post's values


def dense_one_hot_loop(p_vocab: torch.Tensor, hidden: torch.Tensor, one_hot: torch.Tensor,
                       targets: torch.Tensor, start: int) -> float:
    """pointer.py's inner loop for tokens ``start..`` of ``hidden``, each with a full window
    of history: p_cache is the attention-weighted sum of dense one-hot rows."""
    total = 0.0
    for idx in range(len(p_vocab)):
        g = start + idx
        attn = torch.softmax(THETA * (hidden[g - WINDOW:g] @ hidden[g]), dim=0).view(-1, 1)
        rows = one_hot[g - WINDOW:g]
        p_cache = (attn.expand_as(rows) * rows).sum(0)
        p = LAMBDA * p_cache + (1 - LAMBDA) * p_vocab[idx]
        total += torch.log(p[targets[g]]).item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=33278, help="WikiText-2's vocabulary")
    parser.add_argument("--dim", type=int, default=400, help="last-layer hidden size")
    parser.add_argument("--bptt", type=int, default=2000, help="tokens per scored batch")
    parser.add_argument("--ref-tokens", type=int, default=100, help="tokens per round, reference")
    parser.add_argument("--dense-tokens", type=int, default=2, help="tokens per round, one-hot")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="also append the markdown to this file")
    args = parser.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    torch.manual_seed(0)
    n = WINDOW + args.bptt  # a full window of history, then one batch to score
    hidden = torch.tanh(torch.randn(n, args.dim, device=dev))  # LSTM outputs lie in (-1, 1)
    zipf = 1 / torch.arange(1, args.vocab + 1, dtype=torch.float64, device=dev)
    targets = torch.multinomial(zipf, n, replacement=True)  # words repeat as in text
    log_probs = torch.log_softmax(torch.randn(args.bptt, args.vocab, device=dev), dim=1)
    log_probs64 = log_probs.double()
    h, y = hidden[WINDOW:], targets[WINDOW:]
    h64 = h.double()
    r, d = args.ref_tokens, args.dense_tokens

    def prefilled(dtype: torch.dtype) -> CachePointer:
        cache = CachePointer(THETA, LAMBDA, WINDOW)
        cache.score(torch.zeros(WINDOW, device=dev), hidden[:WINDOW].to(dtype), targets[:WINDOW])
        return cache

    caches = {torch.float32: prefilled(torch.float32), torch.float64: prefilled(torch.float64)}
    history = {dt: (hidden[:WINDOW].to(dt), targets[:WINDOW]) for dt in caches}
    one_hot = torch.nn.functional.one_hot(targets[:WINDOW + d], args.vocab).float()
    p_vocab = log_probs[:d].exp()

    def reference(k: int, dtype: torch.dtype) -> float:
        lp = (log_probs64 if dtype == torch.float64 else log_probs)[:k]
        return cache_pointer_reference(lp, h[:k], y[:k], history[dtype], theta=THETA,
                                       lambda_=LAMBDA, window=WINDOW, dtype=dtype)[0]

    # name -> (tokens per call, cache it needs, call); the cache is copied outside the timer.
    rows: dict[str, tuple[int, torch.dtype | None, Callable[[CachePointer], object]]] = {
        "toolkit CachePointer, float32": (
            args.bptt, torch.float32, lambda c: c.score(log_probs, h, y)),
        "toolkit CachePointer, float64": (
            args.bptt, torch.float64, lambda c: c.score(log_probs64, h64, y)),
        "reference per-token loop, float64": (r, None, lambda _: reference(r, torch.float64)),
        "reference per-token loop, float32": (r, None, lambda _: reference(r, torch.float32)),
        "pointer.py step (dense one-hot), float32": (
            d, None, lambda _: dense_one_hot_loop(p_vocab, hidden, one_hot, targets, WINDOW)),
    }

    # The same tokens scored two ways must agree before their speeds are compared.
    check = copy.deepcopy(caches[torch.float64]).score(log_probs64[:r], h64[:r], y[:r])[0]
    ref = reference(r, torch.float64)
    assert abs(check - ref) < 1e-6, (check, ref)
    dense = dense_one_hot_loop(p_vocab, hidden, one_hot, targets, WINDOW)
    ref32 = reference(d, torch.float32)
    assert abs(dense - ref32) < 1e-3, (dense, ref32)

    names = list(rows)
    for name in names:  # warm-up
        rows[name][2](copy.deepcopy(caches.get(rows[name][1])))
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(args.rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            tokens, dtype, call = rows[name]
            cache = copy.deepcopy(caches.get(dtype))
            sync()
            start = time.perf_counter()
            call(cache)
            sync()
            times[name].append((time.perf_counter() - start) / tokens)
    per_token = {name: statistics.median(t) for name, t in times.items()}

    ref64 = per_token["reference per-token loop, float64"]
    best_loop = min(t for name, t in per_token.items() if "toolkit" not in name)
    lines = [
        f"{datetime.date.today()}, {device_name(dev)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; hidden {args.dim}, vocab {args.vocab}, window "
        f"{WINDOW}, batches of {args.bptt} with a full cache; median of {args.rounds} rounds "
        f"after 1, each round every row once (per-token loops on {r} and {d} tokens).",
        f"Command: `python {' '.join(sys.argv)}`",
        f"Agreement: on {r} tokens toolkit float64 {check:.6f} vs reference {ref:.6f} nats; "
        f"on {d}, pointer.py's step {dense:.4f} vs reference float32 {ref32:.4f}.",
        "",
        "| impl | tokens/s | ms/token | speedup vs float64 reference "
        "| speedup vs fastest per-token loop |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in per_token.items():
        rate = f"{1 / t:,.0f}" if t < 0.01 else f"{1 / t:.3g}"
        lines.append(f"| {name} | {rate} | {t * 1e3:.3g} | {ref64 / t:.3g} | "
                     f"{best_loop / t:.3g} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
