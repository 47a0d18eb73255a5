"""Language modelling with truncated BPTT: a loss head over an AWD body, and its trainer.

:class:`LanguageModel` puts a softmax on :class:`~toolkit.models.awd_lstm.AWDLanguageModel`
(AWD-LSTM or AWD-QRNN): the full tied one, or torch's ``nn.AdaptiveLogSoftmaxWithLoss``
(Grave et al., 2017) over a vocabulary sorted by frequency, whose head holds the frequent
words and whose smaller tail clusters the rare ones. Its one ``forward`` returns the
log-probability of each target and the hidden states the cache pointer reads, so training,
evaluation and the cache all go through the prepared model (a DeepSpeed ZeRO-3 engine needs
its own forward to gather its partitioned parameters).

:class:`LMTrainer` trains it on a :class:`~toolkit.data.wikitext.BPTTStream`, AWD-LSTM's way:
one batch of variable length is one optimizer step, the hidden state is carried from batch to
batch (detached) and zeroed at the start of each epoch. Two habits of salesforce's AWD-LSTM
that fastai 0.7 (the post's code) does not share are options: the lr of a batch scaled by
``seq_len / bptt`` (``lr_scale_seq_len``), and epochs that run to the end of the data rather
than stop after ``rows // bptt - 1`` batches (``batching``). The hidden state is part of each
rank's checkpoint, so a run resumed mid-epoch equals the uninterrupted one bitwise.
:func:`evaluate_stream` gives the perplexity of a stream at batch size 1 with and without the
neural cache pointer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import Tensor, nn

from toolkit.data.wikitext import Batching, BPTTStream
from toolkit.distributed import all_reduce_sum
from toolkit.errors import UserError
from toolkit.eval.cache_pointer import CachePointer
from toolkit.models.awd_lstm import AWDLanguageModel, repackage_hidden
from toolkit.schedule import set_lr
from toolkit.trainer import Trainer


class LanguageModel(nn.Module):
    """An AWD body and its softmax: tied full (``cutoffs=None``) or adaptive.

    ``cutoffs`` e.g. ``(2000, 10000)``: the 2,000 most frequent ids in the head, the next
    8,000 and the rest in two tail clusters projected down by ``div_value`` (4) each time;
    ids must be sorted by frequency (:func:`toolkit.data.wikitext.word_vocab` is). The adaptive
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


class LMTrainer(Trainer):
    """:class:`~toolkit.trainer.Trainer` for BPTT language modelling.

    ``train_ids`` / ``valid_ids``: token streams. Each rank trains on its
    ``batch_size // world`` columns of the ``batch_size``-column stream (AWD's ``batchify``),
    cut into AWD's variable lengths around ``bptt`` (70); validation cuts
    ``eval_batch_size`` (10) columns, also sharded, into fixed ``eval_bptt`` rows.

    ``batching``: where an epoch starts and ends, ``"salesforce"`` (AWD-LSTM's ``main.py``:
    to the end of the data) or ``"fastai"`` (fastai 0.7's ``LanguageModelLoader``: first
    batch ``bptt + 25``, ``rows // bptt - 1`` batches); see
    :class:`~toolkit.data.wikitext.BPTTStream`. ``lr_scale_seq_len``: salesforce AWD-LSTM
    scales each batch's lr by ``seq_len / bptt``; fastai 0.7's ``Stepper.step`` does not.
    The defaults are salesforce's; the post's runs used ``"fastai"`` and ``False``.
    """

    def __init__(self, model: LanguageModel, train_ids: Tensor, valid_ids: Tensor | None = None,
                 *, bptt: int = 70, eval_batch_size: int = 10, eval_bptt: int = 70,
                 batching: Batching = "salesforce", lr_scale_seq_len: bool = True, **kwargs):
        if kwargs["train"].grad_accum != 1:
            raise UserError(f"grad_accum={kwargs['train'].grad_accum}: a language model steps "
                            "once per BPTT batch (its hidden state runs on); use grad_accum 1")
        self.train_ids, self.valid_ids = train_ids, valid_ids
        self.bptt, self.eval_batch_size, self.eval_bptt = bptt, eval_batch_size, eval_bptt
        self.batching, self.lr_scale_seq_len = batching, lr_scale_seq_len
        self.stream: BPTTStream | None = None
        self.hidden = None
        super().__init__(model, train_ids, valid_ids, **kwargs)

    # ---- data: this rank's columns, built once the accelerator knows the rank ----------
    def _streams(self) -> BPTTStream:
        if self.stream is None:
            acc, cfg = self.accelerator, self.cfg
            world, rank = acc.num_processes, acc.process_index
            self.stream = BPTTStream(self.train_ids, cfg.batch_size, self.bptt, world=world,
                                     rank=rank, seed=cfg.seed, batching=self.batching)
            self.valid_stream = None if self.valid_ids is None else BPTTStream(
                self.valid_ids, self.eval_batch_size, self.eval_bptt, variable=False,
                world=world, rank=rank)
        return self.stream

    def count_steps(self) -> int:
        return self._streams().total_batches(self.cfg.epochs)

    def epoch_at(self, step: int) -> float:
        epoch, k = self.stream.locate(step)
        return epoch + k / self.stream.num_batches(epoch)

    def train_batches(self):
        """``(inputs, targets, seq_len, first_of_epoch)`` from ``self.step`` on, forever."""
        epoch, k = self.stream.locate(self.step)
        while True:
            for i, (x, y, seq_len) in enumerate(self.stream.batches(epoch, k), start=k):
                yield x, y, seq_len, i == 0
            epoch, k = epoch + 1, 0

    def unwrapped(self) -> LanguageModel:
        return self.accelerator.unwrap_model(self.model)

    # ---- the hidden state is per-rank state: checkpointed with the rank ----------------
    def extra_state(self) -> dict:
        return {"hidden": None if self.hidden is None else
                [[t.cpu() for t in layer] for layer in self.hidden]}

    def load_extra_state(self, state: dict) -> None:
        hidden = state.get("hidden")
        if hidden is not None:
            cols = hidden[0][0].size(1)
            if cols != self.micro_batch:
                raise UserError(f"the checkpoint's hidden state has {cols} columns per process, "
                                f"this run has {self.micro_batch}: resume with the same "
                                "--batch-size and number of processes")
            device = self.accelerator.device
            hidden = [tuple(t.to(device) for t in layer) for layer in hidden]
        self.hidden = hidden

    # ---- one step ---------------------------------------------------------------------
    def train_step(self, batch) -> Tensor:
        x, y, seq_len, first = batch
        if first or self.hidden is None:  # AWD zeroes the state at each epoch's start
            self.hidden = self.unwrapped().init_hidden(x.size(1))
        if self.lr_scale_seq_len:
            # AWD's rescaling: a short batch gets a proportionally smaller step. The optimizer
            # steps after this returns; the scheduler's next step() rewrites every group's lr.
            factor = self.stream.lr_factor(seq_len)
            for group in self.scheduler.optimizer.param_groups:
                set_lr(group, float(group["lr"]) * factor)
        logp, _, hidden, penalty = self.model(x, y, self.hidden)
        self.hidden = repackage_hidden(hidden)
        return -logp.mean() + penalty.ar + penalty.tar

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token) and perplexity: this rank's columns, all-reduced."""
        if self.valid_ids is None:
            return {}
        self.model.eval()
        hidden = self.unwrapped().init_hidden(self.valid_stream.data.size(1))
        nll = torch.zeros((), dtype=torch.float64)
        count = 0
        for x, y, _ in self.valid_stream.batches():
            x, y = send_to_device((x, y), self.accelerator.device)
            logp, _, hidden, _ = self.model(x, y, hidden)
            nll -= logp.double().sum().cpu()
            count += y.numel()
        self.model.train()
        nll, count = all_reduce_sum(torch.stack([nll, torch.tensor(count, dtype=torch.float64)]))
        loss = (nll / count).item()
        return {"valid_loss": loss, "valid_ppl": math.exp(loss)}


@torch.no_grad()
def evaluate_stream(trainer: LMTrainer, ids: Tensor, bptt: int = 2000, *,
                    cache: CachePointer | None = None) -> dict[str, float]:
    """Perplexity of the stream ``ids`` at batch size 1 in ``bptt`` rows, hidden state carried;
    with ``cache``, also under the neural cache pointer (post: theta 0.662, lambda 0.1279,
    window 3785, bptt 2000).

    Batch size 1 cannot be split over processes, so every rank computes the whole stream
    and the same numbers: no collective of its own, hence no rank waits for another that
    skipped it, and under ZeRO-3 each forward is the engine's (whose gathers every rank
    joins). Without DeepSpeed the unwrapped model is used (no DDP bookkeeping).
    """
    model = trainer.model if trainer.deepspeed else trainer.unwrapped()
    device = trainer.accelerator.device
    model.eval()
    hidden = trainer.unwrapped().init_hidden(1)
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
