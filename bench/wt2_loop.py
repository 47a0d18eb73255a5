"""WikiText-2 training throughput: the toolkit's loop against a plain PyTorch loop, and the
AWD-QRNN against the AWD-LSTM, at the ``cpu`` preset's sizes (2 layers, 256 units, adaptive
softmax, batch 64, bptt 50).

Both loops train the same model from the same seed on the same batches (``BPTTStream``, AWD's
variable lengths) with the same optimizer and 1cycle schedule, the lr scaled by
``seq_len/bptt``, clipping, hidden state carried and detached. The plain loop is what one
writes by hand: forward, backward, clip, step, zero_grad, schedule. The toolkit's is
``LMTrainer.fit`` (Accelerate, the per-step all-reduce of loss/non-finite/stop flags, progress
bar, metrics every 20 steps). Tokens/s are counted from the ``--warmup``-th optimizer step to
the last; each round runs every (model, loop) once; the table gives the median run and the
sum over steps of each step's fastest time across rounds.

    python bench/wt2_loop.py --data-dir ../shared/data/wikitext-2
    python bench/wt2_loop.py --data-dir ../shared/data/wikitext-2 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch

from recipes import wt2  # its presets and model builder
from report import device_name, emit
from toolkit.lm.data import BPTTStream, load_wikitext2
from toolkit.lm import LMTrainer
from toolkit.lm.awd_lstm import repackage_hidden
from toolkit.schedule import set_lr

ROOT = Path(__file__).resolve().parents[1]


def plain(cfg: wt2.Config, ids: torch.Tensor, vocab: int, steps: int) -> list[float]:
    """A hand-written loop; the time after each optimizer step."""
    torch.manual_seed(cfg.train.seed)
    model = wt2.build_model(cfg, vocab)
    opt = cfg.optim.build(model)
    sched = cfg.schedule.build(opt, steps)
    stream = BPTTStream(ids, cfg.train.batch_size, cfg.bptt, seed=cfg.train.seed)
    hidden, times = model.init_hidden(cfg.train.batch_size), []
    for x, y, seq_len in stream.batches(0):
        for group in opt.param_groups:
            set_lr(group, float(group["lr"]) * stream.lr_factor(seq_len))
        logp, _, hidden, penalty = model(x, y, hidden)
        hidden = repackage_hidden(hidden)
        loss = -logp.mean() + penalty.ar + penalty.tar
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter())
        if len(times) == steps:
            return times
    raise ValueError(f"--steps {steps} is more than an epoch")


class TimedTrainer(LMTrainer):
    def optimizer_step(self, it, step_schedule=True):
        loss = super().optimizer_step(it, step_schedule)
        self.times.append(time.perf_counter())
        return loss


def toolkit(cfg: wt2.Config, ids: torch.Tensor, vocab: int, steps: int) -> list[float]:
    """``LMTrainer.fit`` for ``steps`` steps; the time after each optimizer step."""
    torch.manual_seed(cfg.train.seed)
    model = wt2.build_model(cfg, vocab)
    with tempfile.TemporaryDirectory() as out:
        train = dataclasses.replace(cfg.train, output_dir=out, max_steps=steps)
        trainer = TimedTrainer(model, ids, None, bptt=cfg.bptt, train=train, optim=cfg.optim,
                               schedule=cfg.schedule)
        trainer.times = []
        trainer.fit()
        trainer.close()
    return trainer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/wikitext-2"))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="also append the markdown to this file")
    args = parser.parse_args()
    corpus = load_wikitext2(args.data_dir)
    configs = {"lstm": wt2.cpu(), "qrnn": dataclasses.replace(wt2.cpu(), model="qrnn")}
    loops = {"plain PyTorch": plain, "toolkit LMTrainer": toolkit}
    # Per run, the seconds of each timed step; every run sees the same batches in the same
    # order, so step i has the same shape in every run.
    durations: dict[tuple[str, str], list[list[float]]] = {
        (m, l): [] for m in configs for l in loops}
    # Variable lengths: count the tokens of the timed batches themselves.
    tokens: dict[str, list[int]] = {}
    for model, cfg in configs.items():
        stream = BPTTStream(corpus.train, cfg.train.batch_size, cfg.bptt, seed=cfg.train.seed)
        tokens[model] = [n * cfg.train.batch_size for _, (_, _, n) in
                         zip(range(args.steps), stream.batches(0))][args.warmup:]
    for r in range(args.rounds):
        for (model, loop), got in durations.items():
            times = loops[loop](configs[model], corpus.train, corpus.vocab_size, args.steps)
            got.append([b - a for a, b in zip(times[args.warmup - 1:], times[args.warmup:])])
            print(f"round {r}: {model}, {loop}: {sum(tokens[model]) / sum(got[-1]):,.0f} "
                  "tokens/s", flush=True)

    # On a shared machine a neighbour's burst slows a run by several percent, more than the
    # loop costs. Two summaries: the median run, and each step's fastest time over the
    # rounds (the toolkit's periodic work, metrics every 20 steps, sits on the same steps in
    # every round, so it stays in).
    run = {k: statistics.median(sum(tokens[k[0]]) / sum(d) for d in v)
           for k, v in durations.items()}
    best = {k: sum(tokens[k[0]]) / sum(map(min, zip(*v))) for k, v in durations.items()}
    lines = [f"{datetime.date.today()}, {device_name()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; `cpu` preset sizes, {args.steps} steps per run "
             f"(first {args.warmup} untimed), {args.rounds} rounds.",
             f"Command: `python bench/wt2_loop.py --steps {args.steps} --rounds {args.rounds}`", "",
             "| model | loop | tokens/s, fastest per step | vs plain | tokens/s, median run "
             "| vs plain | vs LSTM (same loop, fastest) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, loop in durations:
        base = (model, "plain PyTorch")
        lines.append(f"| {model} | {loop} | {best[model, loop]:,.0f} "
                     f"| {best[model, loop] / best[base]:.3f} | {run[model, loop]:,.0f} "
                     f"| {run[model, loop] / run[base]:.3f} "
                     f"| {best[model, loop] / best['lstm', loop]:.2f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
