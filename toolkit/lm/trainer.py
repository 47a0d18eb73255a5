"""Language modelling with truncated BPTT: a loss head over an AWD body, and its trainer.

:class:`LanguageModel` puts a softmax on :class:`~toolkit.lm.awd_lstm.AWDLanguageModel`
(AWD-LSTM or AWD-QRNN): the full tied one, or torch's ``nn.AdaptiveLogSoftmaxWithLoss``
(Grave et al., 2017) over a vocabulary sorted by frequency, whose head holds the frequent
words and whose smaller tail clusters the rare ones. Its one ``forward`` returns the
log-probability of each target and the hidden states the cache pointer reads, so training,
evaluation and the cache all go through the prepared model (a sharded model gathers its
parameters in its own forward).

:class:`LMTrainer` trains it on a :class:`~toolkit.lm.data.BPTTStream`, AWD-LSTM's way:
one batch of variable length is one optimizer step, the hidden state is carried from batch to
batch (detached) and zeroed at the start of each epoch. Two habits of salesforce's AWD-LSTM
that fastai 0.7 (the post's code) does not share are options: the lr of a batch scaled by
``seq_len / bptt`` (``lr_scale_seq_len``), and epochs that run to the end of the data rather
than stop after ``rows // bptt - 1`` batches (``batching``). The hidden state is part of each
rank's checkpoint, so a run resumed mid-epoch equals the uninterrupted one bitwise.
:meth:`LMTrainer.score_stream` gives the perplexity of a stream at batch size 1 with and without the
neural cache pointer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.lm.data import Batching, BPTTData, BPTTStream
from toolkit.errors import UserError
from toolkit.lm.cache_pointer import CachePointer
from toolkit.lm.cache_pointer import grid as cache_grid
from toolkit.lm.awd_lstm import AWDLanguageModel, repackage_hidden
from toolkit.trainer import Trainer


class LanguageModel(nn.Module):
    """An AWD body and its softmax: tied full (``cutoffs=None``) or adaptive.

    ``cutoffs`` e.g. ``(2000, 10000)``: the 2,000 most frequent ids in the head, the next
    8,000 and the rest in two tail clusters projected down by ``div_value`` (4) each time;
    ids must be sorted by frequency (:func:`toolkit.lm.data.word_vocab` is). The adaptive
    softmax has its own output matrices, so the body's decoder is removed (an unused
    parameter would also stall DDP's gradient reduction).
    """

    def __init__(self, body: AWDLanguageModel, cutoffs: tuple[int, ...] | None = None,
                 div_value: float = 4.0) -> None:
        super().__init__()
        self.body = body
        self.adaptive = None
        if cutoffs:
            vocab, dim = body.encoder.num_embeddings, body.layers[-1].hidden_size
            if list(cutoffs) != sorted(set(cutoffs)) or not 0 < cutoffs[-1] < vocab:
                raise UserError(f"cutoffs={tuple(cutoffs)} must increase and lie in (0, {vocab})")
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(dim, vocab, list(cutoffs),
                                                          div_value=div_value)
            body.decoder = None

    def init_hidden(self, batch_size: int):
        return self.body.init_hidden(batch_size)

    def forward(self, tokens: Tensor, targets: Tensor, hidden):
        """``(log p(targets) [seq, batch], last-layer output [seq, batch, dim], new hidden,
        AR/TAR penalty)``."""
        output, hidden, penalty = self.body(tokens, hidden)
        flat, y = output.reshape(-1, output.size(-1)), targets.reshape(-1)
        if self.adaptive is not None:
            logp = self.adaptive(flat.float(), y).output
        else:
            logp = -F.cross_entropy(self.body.logits(flat).float(), y, reduction="none")
        return logp.view_as(targets), output, hidden, penalty

    def log_probs(self, output: Tensor) -> Tensor:
        """Log-probabilities over the vocabulary [n, vocab] of last-layer outputs [n, dim]."""
        if self.adaptive is not None:
            return self.adaptive.log_prob(output.float())
        return torch.log_softmax(self.body.logits(output).float(), -1)

    @torch.no_grad()
    def sample(self, first: int, n: int, temperature: float = 1.0, seed: int = 0) -> list[int]:
        """``n`` token ids sampled one at a time after the id ``first`` (e.g. ``<eos>``,
        the start of a line), each from the softmax at ``temperature``, dropout off."""
        if not temperature > 0:
            raise UserError(f"--temperature={temperature} must be > 0")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        gen = torch.Generator(device).manual_seed(seed)
        hidden, token, out = self.init_hidden(1), torch.tensor([[first]], device=device), []
        for _ in range(n):
            output, hidden, _ = self.body(token, hidden)
            probs = (self.log_probs(output[-1]) / temperature).softmax(-1)
            token = torch.multinomial(probs, 1, generator=gen)
            out.append(int(token))
        self.train(was_training)
        return out


@dataclass(frozen=True)
class Scoring:
    """What a language model is scored on after training, besides its validation loss: the
    ``valid`` and ``test`` streams at batch size 1 in ``bptt`` rows, with and without the
    neural cache pointer of ``theta``, ``lam`` and ``window`` (the post's: 0.662, 0.1279,
    3785, bptt 2000), and the ``vocab`` that decodes sampled text (``decode``, ``eos_id``)."""

    valid: Tensor
    test: Tensor
    theta: float = 0.662
    lam: float = 0.1279
    window: int = 3785
    bptt: int = 2000
    vocab: Any = None


class LMTrainer(Trainer):
    """:class:`~toolkit.trainer.Trainer` for BPTT language modelling.

    ``train_ids`` / ``valid_ids``: token streams, as :class:`~toolkit.lm.data.BPTTData`.
    Each rank trains on its ``batch_size // world`` columns of the ``batch_size``-column
    stream (AWD's ``batchify``), cut into AWD's variable lengths around ``bptt`` (70), and
    carries one hidden state per accumulation part; validation cuts ``eval_batch_size`` (10)
    columns, also sharded, into fixed ``eval_bptt`` rows.

    ``batching``: where an epoch starts and ends, ``"salesforce"`` (AWD-LSTM's ``main.py``:
    to the end of the data) or ``"fastai"`` (fastai 0.7's ``LanguageModelLoader``: first
    batch ``bptt + 25``, ``rows // bptt - 1`` batches); see
    :class:`~toolkit.lm.data.BPTTStream`. ``lr_scale_seq_len``: salesforce AWD-LSTM
    scales each batch's lr by ``seq_len / bptt``; fastai 0.7's ``Stepper.step`` does not.
    The defaults are salesforce's; the post's runs used ``"fastai"`` and ``False``.

    ``scoring``: what :meth:`cache_scores`, :meth:`tune_cache` and :meth:`generate` score
    a trained model on (``toolkit evaluate --tune-cache`` and ``--generate``).
    """

    def __init__(self, model: LanguageModel, train_ids: Tensor, valid_ids: Tensor | None = None,
                 *, bptt: int = 70, eval_batch_size: int = 10, eval_bptt: int = 70,
                 batching: Batching = "salesforce", lr_scale_seq_len: bool = True,
                 scoring: Scoring | None = None, **kwargs):
        train = BPTTData(train_ids, bptt, seed=kwargs["train"].seed, batching=batching)
        valid = None if valid_ids is None else BPTTData(
            valid_ids, eval_bptt, variable=False, batch_size=eval_batch_size)
        super().__init__(model, train, valid, **kwargs)
        self.lr_scale_seq_len, self.scoring = lr_scale_seq_len, scoring
        self.hidden: dict[int, list] = {}  # per accumulation part
        self.eval_hidden = None

    # ---- the hidden states are per-rank state: checkpointed with the rank --------------
    def extra_state(self) -> dict:
        return {"hidden": {a: [[t.cpu() for t in layer] for layer in h]
                           for a, h in self.hidden.items()}}

    def load_extra_state(self, state: dict) -> None:
        saved = state.get("hidden") or {}
        if not isinstance(saved, dict):  # a checkpoint of one hidden state (no accumulation)
            saved = {0: saved}
        device, hidden = self.accelerator.device, {}
        for a, h in saved.items():
            cols = h[0][0].size(1)
            if cols != self.micro_batch:
                raise UserError(f"the checkpoint's hidden state has {cols} columns per "
                                f"micro-batch, this run has {self.micro_batch}: resume with "
                                "the same --batch-size, --grad-accum and number of processes")
            hidden[a] = [tuple(t.to(device) for t in layer) for layer in h]
        self.hidden = hidden

    # ---- one step ---------------------------------------------------------------------
    def train_step(self, batch) -> Tensor:
        x, y, seq_len, first, part = batch
        if first or part not in self.hidden:  # AWD zeroes the state at each epoch's start
            self.hidden[part] = self.unwrapped().init_hidden(x.size(1))
        if self.lr_scale_seq_len and part == 0:
            # AWD's rescaling: a short batch gets a proportionally smaller step.
            self.scheduler.scale_current(self.train_data.lr_factor(seq_len))
        logp, _, hidden, penalty = self.model(x, y, self.hidden[part])
        self.hidden[part] = repackage_hidden(hidden)
        return -logp.mean() + penalty.ar + penalty.tar

    def eval_step(self, batch) -> dict[str, Tensor]:
        """Summed negative log-likelihood; the hidden state runs on through the pass."""
        x, y, _, first, _ = batch
        if first:
            self.eval_hidden = self.unwrapped().init_hidden(x.size(1))
        logp, _, self.eval_hidden, _ = self.model(x, y, self.eval_hidden)
        return {"loss": -logp.double().sum(), "count": torch.tensor(y.numel())}

    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token) and perplexity."""
        out = super().evaluate()
        if out:
            out["valid_ppl"] = math.exp(out["valid_loss"])
        return out

    @torch.no_grad()
    def score_stream(self, ids: Tensor, bptt: int = 2000, *,
                     cache: CachePointer | None = None) -> dict[str, float]:
        """Perplexity of the stream ``ids`` at batch size 1 in ``bptt`` rows, hidden state
        carried; with ``cache``, also under the neural cache pointer (post: theta 0.662,
        lambda 0.1279, window 3785, bptt 2000).

        Batch size 1 cannot be split over processes, so every rank computes the whole stream
        and the same numbers: no collective of its own, hence no rank waits for another that
        skipped it, and under a sharding strategy each forward is the sharded model's (whose
        gathers every rank joins): the strategy's scoring model.
        """
        model = self.parallel.scoring_model()
        device = self.accelerator.device
        model.eval()
        hidden = self.unwrapped().init_hidden(1)
        if cache is not None:
            cache.reset()
        nll, cache_ll, count = 0.0, 0.0, 0
        for x, y, _ in BPTTStream(ids, 1, bptt, variable=False).batches():
            x, y = x.to(device), y.to(device)
            logp, output, hidden, _ = model(x, y, hidden)
            nll -= logp.double().sum().item()
            count += y.numel()
            if cache is not None:
                cache_ll += cache.score(logp[:, 0], output[:, 0], y[:, 0])[0]
        model.train()
        out = {"ppl": math.exp(nll / count)}
        if cache is not None:
            out["cache_ppl"] = math.exp(-cache_ll / count)
        return out

    @torch.no_grad()
    def record_stream(self, ids: Tensor, bptt: int = 2000) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The forward pass of :meth:`score_stream` once, kept: per batch the targets' log
        p_vocab (float64), the last layer's outputs and the targets, for scoring many cache
        pointers without running the model again (:func:`~toolkit.lm.cache_pointer.grid`)."""
        model = self.parallel.scoring_model()
        device = self.accelerator.device
        model.eval()
        hidden = self.unwrapped().init_hidden(1)
        kept = []
        for x, y, _ in BPTTStream(ids, 1, bptt, variable=False).batches():
            x, y = x.to(device), y.to(device)
            logp, output, hidden, _ = model(x, y, hidden)
            kept.append((logp[:, 0].double(), output[:, 0].detach(), y[:, 0]))
        model.train()
        return kept

    # ---- scoring a trained model (needs ``scoring``) ------------------------------------
    def _scoring(self) -> Scoring:
        if self.scoring is None:
            raise UserError("this language model was built without its test stream and cache "
                            "settings (LMTrainer(scoring=...))")
        return self.scoring

    def cache_scores(self) -> dict[str, float]:
        """Perplexity at batch size 1 of the validation and test streams, without and with
        the cache pointer; every rank computes the same numbers (see :meth:`score_stream`)."""
        s = self._scoring()
        pointer = CachePointer(s.theta, s.lam, s.window)
        started, results = time.time(), {}
        for split, ids in (("valid", s.valid), ("test", s.test)):
            scores = self.score_stream(ids, s.bptt, cache=pointer)
            results["test_ppl" if split == "test" else "valid_ppl_bs1"] = scores["ppl"]
            results[f"{split}_cache_ppl"] = scores["cache_ppl"]
        results["cache_eval_wall_time_s"] = round(time.time() - started, 2)
        return results

    def tune_cache(self, thetas: list[float], lambdas: list[float]) -> dict:
        """The cache pointer's theta and lambda searched on the validation stream from one
        recorded forward pass (:func:`~toolkit.lm.cache_pointer.grid`); the run's own pair
        is always in the grid, so the best is never worse than it; the test perplexity of
        the best and of the run's own pair."""
        s = self._scoring()
        thetas, lambdas = sorted({*thetas, s.theta}), sorted({*lambdas, s.lam})
        started = time.time()
        recorded = self.record_stream(s.valid, s.bptt)
        forward_s, started = time.time() - started, time.time()
        scores = cache_grid(recorded, thetas, lambdas, s.window)
        grid_s = time.time() - started
        best, default = min(scores, key=scores.get), (s.theta, s.lam)
        on_test = self.record_stream(s.test, s.bptt)
        test_of = {pair: cache_grid(on_test, [pair[0]], [pair[1]], s.window)[pair]
                   for pair in {best, default}}

        def row(pair: tuple[float, float]) -> dict:
            return {"theta": pair[0], "lambda": pair[1], "valid_cache_ppl": scores.get(pair),
                    "test_cache_ppl": test_of.get(pair)}

        return {"tune_cache": {
            "best": row(best), "default": row(default),
            "grid": [row(p) for p in sorted(scores)], "pairs": len(scores),
            "forward_pass_s": round(forward_s, 2), "grid_s": round(grid_s, 2),
            "grid_over_forward": round(grid_s / forward_s, 2) if forward_s else None}}

    def generate(self, n: int, temperature: float = 1.0, seed: int = 0) -> str:
        """``n`` tokens sampled from the model after ``<eos>`` (:meth:`LanguageModel.sample`),
        decoded to text."""
        vocab = self._scoring().vocab
        return vocab.decode(self.unwrapped().sample(vocab.eos_id, n, temperature, seed))
