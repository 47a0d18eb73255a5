"""WikiText-2: AWD-LSTM / AWD-QRNN with Adam(W) + 1cycle, scored with the neural cache pointer.

The post's runs (Gugger & Howard 2018, "AdamW and super-convergence"): ``paper-lstm`` (Adam
with L2), ``paper-lstm-adamw`` (decoupled weight decay) and ``paper-qrnn``, 90 epochs of a
4-phase cycle, for a GPU; not run here. They are the post's code, sgugger/Adam-experiments
``train_rnn.py`` on fastai 0.7: ``train_rnn.py 5e-3 --wd=1.2e-6 --alpha=3 --beta=1.5`` and
``train_rnn.py 5e-3 --wd=1e-6 --qrnn=True`` (the QRNN's AR/TAR are ``train_lm``'s defaults,
2 and 1), with fastai 0.7's batching (first batch bptt+25 rows, an epoch of
``rows // bptt - 1`` = 297 batches), no ``seq_len/bptt`` lr scaling, and AR on the last
layer's output before the output dropout (``seq2seq_reg`` reads ``RNN_Encoder``'s
``outputs[-1]``; ``LinearDecoder`` drops its own copy).

``cpu`` (the default) trains a small AWD-LSTM with an adaptive softmax on the real data on 2
CPU cores with Muon at 2e-2 (AdamW on the embedding, biases and softmax;
``docs/contenders.md`` found it the fastest): measured 2026-12-07 on 2 idle AMD EPYC cores
(torch 2.14.1, 2 threads, fresh clone), valid perplexity **124.4** (110.2 with the cache
pointer; test 116.2 / 103.0) in 6 min 37 s from start to exit (2 epochs). ``cpu-adam``, the
preset before it (the post's Adam at 5e-3; the one for ZeRO and FSDP2, which refuse Muon):
146.1 (115.7 with the cache; test 135.6 / 107.6) in 10.3 minutes on 2026-11-26, where a plain
2-layer 256-unit LSTM reached 200.3 in 7.5 minutes. Under 2 processes with ZeRO-2: see
``docs/benchmarks.md``.

    accelerate launch recipes/wt2.py --preset cpu --data-dir ../shared/data/wikitext-2
    accelerate launch --config_file launch/cpu-2proc.yaml recipes/wt2.py --preset cpu \\
        --data-dir ../shared/data/wikitext-2
    accelerate launch --config_file launch/cpu-zero2.yaml recipes/wt2.py --preset cpu-adam \\
        --data-dir ../shared/data/wikitext-2
    accelerate launch --config_file launch/single-gpu.yaml recipes/wt2.py --preset paper-lstm
    python recipes/wt2.py --preset cpu --lr-find --data-dir ../shared/data/wikitext-2

What still differs from the post's code:

* The post's vocabulary has ``_pad_`` at id 0 (33,279 words, here 33,278).
* The lengths are drawn from torch generators seeded by (seed, epoch), so that a resumed run
  cuts the same batches; the post drew them from numpy's global stream.
* The cosine anneal runs half a step ahead of fastai's ``TrainingPhase`` (whose last phase
  starts at batch 24,503 where the boundary is 24,502.5): lr within 4e-5 x max lr.
* Validation each epoch: ``eval_batch_size`` columns at bptt 70; the post's is a
  ``LanguageModelLoader`` of batch size 100. Its final ``my_validate``/``my_cache_pointer``
  score only the ``n // 2000`` full batches (216,000 of 217,645 valid targets); here all.
* ``paper-lstm-adamw``: the post's repository gives no AdamW language-model command (its
  code would be ``--wd_loss=False``: fastai's ``p -= lr * wd * p`` before the step, as here).

Without ``--data-dir`` the data come from Hugging Face ``Salesforce/wikitext``.
``results.json`` holds ``valid_ppl`` (``eval_batch_size`` columns, bptt 70) and, at batch
size 1 and bptt 2000, ``valid_ppl_bs1``, ``test_ppl`` and ``{valid,test}_cache_ppl``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from toolkit import recipe
from toolkit.config import OptimConfig, ScheduleConfig, Train, TrainConfig, to_dict
from toolkit.lm.data import Batching, Corpus, load_wikitext2
from toolkit.lm.cache_pointer import check_cache_pointer
from toolkit.errors import UserError
from toolkit.lm import LanguageModel, LMTrainer
from toolkit.lm.trainer import Scoring
from toolkit.recipe import Run
from toolkit.lm.awd_lstm import AROn, AWDLSTM
from toolkit.lm.qrnn import AWDQRNN


@dataclass
class Config:
    train: Train = field(default_factory=lambda: TrainConfig(
        output_dir="runs/wt2", epochs=90, batch_size=100, clip=0.12, log_every=50))
    # The post's Adam: beta1 cycled by `moms`, beta2 0.99; L2 weight decay on every weight.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="adam", lr=5e-3, betas=(0.8, 0.99), wd=1.2e-6, no_decay_bias_norm=False))
    # 4 phases of (7.5, 37.5, 37.5, 7.5) epochs, the last a cosine to 0.
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        div=10, phases=(7.5, 37.5, 37.5, 7.5), moms=(0.8, 0.7), lin_end=False, final_frac=0.0))
    model: Literal["lstm", "qrnn"] = "lstm"
    """AWD-LSTM or AWD-QRNN."""
    emb_size: int = 400
    """Embedding size (the last layer's output size too: weights are tied)."""
    hidden_size: int = 1150
    """Hidden size of the inner layers."""
    num_layers: int = 3
    """Recurrent layers."""
    dropouts: tuple[float, float, float, float, float] = (0.6, 0.4, 0.5, 0.1, 0.2)
    """fastai's order: input, output, weight (DropConnect), embedding, hidden (between layers),
    i.e. the model's dropouti, dropout, wdrop, dropoute, dropouth."""
    alpha: float = 3.0
    """AR: alpha * mean(h^2) on the last layer's output h (see ar_on)."""
    beta: float = 1.5
    """TAR: beta * mean((h_t - h_{t-1})^2) on the last layer's output before its dropout."""
    ar_on: AROn = "raw"
    """dropped: salesforce AWD-LSTM (AR after the output dropout); raw: fastai 0.7's
    seq2seq_reg, the post's code (before it, 1 - dropout times the dropped AR on average)."""
    cutoffs: tuple[int, ...] | None = None
    """Adaptive softmax cutoffs, e.g. (2000, 10000); None = full softmax tied to the embedding."""
    bptt: int = 70
    """Mean BPTT length of a training batch (AWD's variable length)."""
    batching: Batching = "fastai"
    """Where an epoch starts and ends. fastai: fastai 0.7's LanguageModelLoader (the post's
    code), first batch bptt+25 rows, rows // bptt - 1 batches (297 here); salesforce:
    AWD-LSTM's main.py, every length drawn, to the end of the data (~309)."""
    lr_scale_seq_len: bool = False
    """salesforce AWD-LSTM: scale each batch's lr by seq_len/bptt (fastai 0.7 does not)."""
    eval_batch_size: int = 10
    """Validation columns (AWD: 10), split over processes."""
    cache: bool = True
    """Score valid and test at batch size 1 with and without the cache pointer at the end."""
    cache_bptt: int = 2000
    """Rows per batch of those batch-size-1 passes (the post's 2000)."""
    cache_theta: float = 0.662
    """Cache pointer: inverse temperature of the attention over past hidden states."""
    cache_lambda: float = 0.1279
    """Cache pointer: weight of the cache distribution in the mixture."""
    cache_window: int = 3785
    """Cache pointer: past positions attended to."""
    eval_tokens: int = 0
    """Score only the first N tokens of valid and test (quick checks); 0 = all."""
    threads: int = 0
    """torch.set_num_threads per process (0: torch's default)."""
    data_dir: str | None = None
    """Folder with WikiText-2 (wiki.*.tokens or *.txt); default: Hugging Face Salesforce/wikitext."""

    def validate(self) -> None:
        if not self.cache_theta > 0:  # 0 attends to the whole window alike; < 0 to the unlike
            raise ValueError(f"--cache-theta={self.cache_theta} must be > 0 (the cache's "
                             "inverse temperature; pointer.py's is 0.662)")
        check_cache_pointer(self.cache_theta, self.cache_lambda, self.cache_window)
        for name in ("emb_size", "hidden_size", "num_layers", "bptt", "eval_batch_size",
                     "cache_bptt"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        for name in ("eval_tokens", "threads", "alpha", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")
        if not all(0 <= p < 1 for p in self.dropouts):
            raise ValueError(f"--dropouts={self.dropouts} must each be in [0, 1)")
        if self.cutoffs is not None and not (
                self.cutoffs and all(a < b for a, b in zip((0, *self.cutoffs), self.cutoffs))):
            raise ValueError(f"--cutoffs={self.cutoffs} must be increasing and > 0")


def qrnn() -> Config:
    # AWD-QRNN: dropouts (0.4, 0.4, 0.1, 0.1, 0.2) are dropouti, dropout, wdrop (on the gate
    # projection), dropoute, dropouth, train_rnn.py's QRNN defaults. Its command passes no
    # --alpha/--beta, so train_lm's defaults 2 and 1 applied.
    return dataclasses.replace(Config(), model="qrnn", hidden_size=1550, num_layers=4,
                               dropouts=(0.4, 0.4, 0.1, 0.1, 0.2), alpha=2.0, beta=1.0,
                               optim=dataclasses.replace(Config().optim, wd=1e-6))


def adamw() -> Config:
    # Decoupled decay p -= lr * wd * p is not on L2's scale (Adam divides the L2 gradient by
    # sqrt(v)); 0.1 is the value the post used for its AdamW runs, per the issue.
    return dataclasses.replace(Config(), optim=dataclasses.replace(Config().optim, name="adamw",
                                                                   wd=0.1))


def cpu_adam() -> Config:
    # 2 cores: two passes over the data, so capacity and dropout matter less than tokens per
    # second. A 2-layer 256-unit AWD-LSTM with an adaptive softmax costs ~1.7M multiply-adds
    # per token where a full softmax alone would cost 8.5M; light dropouts. Threads: torch's
    # default (all cores) for one process; torchrun and accelerate launch set one per
    # process when they start several. Measured with salesforce's batching, lr scaling and
    # AR after the output dropout, so it keeps them. The post's Adam (L2) at 5e-3: valid
    # 146.1 in 10.3 minutes (docs/reproducing.md); the preset for ZeRO and FSDP2, which
    # refuse Muon.
    return dataclasses.replace(
        Config(), emb_size=256, hidden_size=256, num_layers=2, cutoffs=(2000, 10000),
        dropouts=(0.1, 0.1, 0.1, 0.0, 0.1), alpha=2.0, beta=1.0, bptt=50, eval_batch_size=40,
        batching="salesforce", lr_scale_seq_len=True, ar_on="dropped",
        train=TrainConfig(output_dir="runs/wt2-cpu", epochs=2, batch_size=64, clip=0.25,
                          log_every=20),
        optim=dataclasses.replace(Config().optim, lr=5e-3),
        schedule=dataclasses.replace(Config().schedule, phases=(0.15, 0.35, 0.4, 0.1)))


def cpu() -> Config:
    # cpu_adam's model, data and schedule with Muon at 2e-2 (AdamW on the embedding, the
    # biases and the softmax), what docs/contenders.md found fastest: valid perplexity 124.4
    # without the cache in the same two epochs (146.1 with cpu_adam).
    cfg = cpu_adam()
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name="muon", lr=2e-2))


PRESETS = {"cpu": cpu, "cpu-adam": cpu_adam, "paper-lstm": Config, "paper-lstm-adamw": adamw,
           "paper-qrnn": qrnn}


def model_args(cfg: Config, vocab_size: int) -> dict:
    return {"vocab_size": vocab_size, "kind": cfg.model, "emb_size": cfg.emb_size,
            "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
            "dropouts": list(cfg.dropouts), "alpha": cfg.alpha, "beta": cfg.beta,
            "ar_on": cfg.ar_on, "cutoffs": list(cfg.cutoffs) if cfg.cutoffs else None}


def build_model(cfg: Config, vocab_size: int) -> LanguageModel:
    return language_model(**model_args(cfg, vocab_size))


def language_model(vocab_size: int, kind: str, emb_size: int, hidden_size: int, num_layers: int,
                dropouts: list[float], alpha: float, beta: float, ar_on: str,
                cutoffs: list[int] | None) -> LanguageModel:
    dropouti, dropout, wdrop, dropoute, dropouth = dropouts
    net = AWDLSTM if kind == "lstm" else AWDQRNN
    body = net(vocab_size, emb_size, hidden_size, num_layers, dropouti=dropouti,
               dropout=dropout, wdrop=wdrop, dropoute=dropoute, dropouth=dropouth,
               alpha=alpha, beta=beta, ar_on=ar_on)
    return LanguageModel(body, tuple(cutoffs) if cutoffs else None)


def build_trainer(cfg: Config, model: LanguageModel, train_ids: torch.Tensor,
                  valid_ids: torch.Tensor | None, scoring: Scoring | None = None) -> LMTrainer:
    return LMTrainer(model, train_ids, valid_ids, bptt=cfg.bptt, batching=cfg.batching,
                     scoring=scoring,
                     lr_scale_seq_len=cfg.lr_scale_seq_len, eval_batch_size=cfg.eval_batch_size,
                     train=cfg.train, optim=cfg.optim, schedule=cfg.schedule,
                     recipe_config=to_dict(cfg))


def build(cfg: Config) -> Run:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return build_on(cfg, load_wikitext2(cfg.data_dir))  # no folder: a one-line UserError


def build_on(cfg: Config, corpus: Corpus, builder=None) -> Run:
    """The run of ``cfg`` on a tokenized ``corpus`` (recipes/text.py's too); ``builder``, the
    model function ``model.json`` names (its module is the recipe ``toolkit evaluate``
    rebuilds), defaults to :func:`language_model`."""
    n = cfg.eval_tokens or None
    valid, test = corpus.valid[:n], corpus.test[:n]
    try:
        model = build_model(cfg, corpus.vocab_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    # Batch size 1 on every rank, the same numbers everywhere (see LMTrainer.score_stream).
    scoring = Scoring(valid, test, cfg.cache_theta, cfg.cache_lambda, cfg.cache_window,
                      cfg.cache_bptt, vocab=corpus)
    trainer = build_trainer(cfg, model, corpus.train, valid, scoring)
    trainer.print(f"{cfg.model} language model, {n_params / 1e6:.2f}M parameters, "
                  f"vocabulary {corpus.vocab_size}")

    return Run(trainer, final_evaluation=trainer.cache_scores if cfg.cache else None,
               model=(builder or language_model, model_args(cfg, corpus.vocab_size)),
               summary=lambda r: "final: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()
                                                       if "ppl" in k))


if __name__ == "__main__":
    recipe.main(PRESETS, build, __doc__)
