"""AWD-LSTM language model (Merity, Keskar & Socher, 2017, "Regularizing and Optimizing LSTM
Language Models"; salesforce/awd-lstm-lm), the model of the post's WikiText-2 runs.

Five dropouts and two activation penalties, each a few lines here:

* embedding dropout (``dropoute``): whole words, i.e. rows of the embedding matrix, are
  dropped for a batch and the kept rows scaled by ``1/(1-p)``;
* locked (variational) dropout: one mask per sequence, shared by every time step, on the
  embedded input (``dropouti``), between layers (``dropouth``) and on the last layer's output
  (``dropout``);
* weight drop (DropConnect, ``wdrop``) on the hidden-to-hidden matrices: the raw matrix is a
  parameter and each forward builds the dropped one and hands it to the fused LSTM kernel
  (oneDNN on CPU, cuDNN on CUDA), so the recurrence never runs as a Python loop;
* AR, ``alpha * mean(h**2)``, and TAR, ``beta * mean((h_t - h_{t-1})**2)``, on the last
  layer's output, returned by ``forward`` for the training step to add to its loss. TAR reads
  the undropped output; AR reads the dropped one as in salesforce's code, or (``ar_on="raw"``)
  the undropped one as fastai 0.7's ``seq2seq_reg``, the post's code.

The forward returns the last layer's hidden states rather than logits: a recipe chooses a
full tied softmax (:meth:`AWDLanguageModel.logits`) or an adaptive one, and the neural cache
pointer reads the hidden states themselves.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, _VF, nn

# Hidden state of one layer: (h, c) for an LSTM, (c, previous inputs) for a QRNN.
LayerState = tuple[Tensor, Tensor]

# Which last-layer output AR penalizes. dropped: salesforce AWD-LSTM's dropped_rnn_hs[-1],
# after the output dropout; raw: fastai 0.7's seq2seq_reg, whose dropped_hs[-1] is
# RNN_Encoder's outputs[-1], before LinearDecoder's output dropout.
AROn = Literal["dropped", "raw"]


def embedding_dropout(weight: Tensor, tokens: Tensor, p: float, training: bool = True) -> Tensor:
    """Look up ``tokens`` in ``weight`` with whole rows (words) dropped with probability ``p``.

    A dropped word is zero at every position of the batch; kept rows are scaled by
    ``1/(1-p)``. AWD-LSTM uses ``p=0.1``. Only the looked-up rows are masked, which gives the
    same result as masking the whole matrix without copying it every batch.
    """
    emb = F.embedding(tokens, weight)
    if not training or p == 0:
        return emb
    keep = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return emb * keep[tokens]


def locked_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Dropout on ``x [seq, batch, features]`` with one mask per sequence for all time steps.

    Variational dropout (Gal & Ghahramani, 2016): resampling the mask at every step would let
    the recurrence average the noise away. AWD-LSTM's values: 0.6 on the input, 0.2 between
    layers, 0.4 on the output (0.4, 0.2, 0.4 for the QRNN).
    """
    if not training or p == 0:
        return x
    mask = x.new_empty(1, *x.shape[1:]).bernoulli_(1 - p) / (1 - p)
    return x * mask


def activation_reg(output: Tensor, alpha: float = 2.0) -> Tensor:
    """AR: ``alpha * mean(h**2)`` on the last layer's output (AWD: alpha=2).

    Salesforce's AWD-LSTM passes the output after its dropout, fastai 0.7 the one before.
    """
    return alpha * output.pow(2).mean()


def temporal_activation_reg(raw_output: Tensor, beta: float = 1.0) -> Tensor:
    """TAR: ``beta * mean((h_t - h_{t-1})**2)`` on the last layer's output before dropout.

    Differences are taken inside the batch only, as in AWD-LSTM (beta=1): the first step is
    not compared with the state carried from the previous batch.
    """
    return beta * (raw_output[1:] - raw_output[:-1]).pow(2).mean()


class ActivationPenalty(NamedTuple):
    """What :meth:`AWDLanguageModel.forward` returns beside the output, for the loss."""

    ar: Tensor
    """``alpha * mean(output**2)``, on the dropped or the raw output (``ar_on``)."""
    tar: Tensor
    """``beta * mean((raw_t - raw_{t-1})**2)``."""


def repackage_hidden(hidden: Any) -> Any:
    """Detach a hidden state (tensors in nested lists/tuples) from the graph that made it.

    Truncated backpropagation through time: the next batch starts from these values but its
    gradient stops here.
    """
    if isinstance(hidden, Tensor):
        return hidden.detach()
    return type(hidden)(repackage_hidden(h) for h in hidden)


class WeightDropLSTM(nn.Module):
    """One LSTM layer with DropConnect on its hidden-to-hidden matrix, on the fused kernel.

    Parameters are named and initialized as ``nn.LSTM``'s (uniform in
    ``±1/sqrt(hidden_size)``), except that the recurrent matrix is ``weight_hh_raw``: each
    training forward uses ``dropout(weight_hh_raw, weight_drop)``, one mask for the whole
    batch and every time step. AWD-LSTM: ``weight_drop=0.5``.
    """

    def __init__(self, input_size: int, hidden_size: int, weight_drop: float = 0.5) -> None:
        super().__init__()
        if not 0 <= weight_drop < 1:
            raise ValueError(f"weight_drop={weight_drop} must be in [0, 1)")
        self.input_size, self.hidden_size, self.weight_drop = input_size, hidden_size, weight_drop
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh_raw = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def init_state(self, batch_size: int) -> LayerState:
        # A plain tensor even when the weight is a shard (an FSDP2 DTensor) between forwards.
        w = self.weight_ih
        h = torch.zeros(1, batch_size, self.hidden_size, dtype=w.dtype, device=w.device)
        return h, h.clone()

    def forward(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """``x [seq, batch, input_size]``, ``state (h, c)`` each ``[1, batch, hidden_size]``."""
        weight_hh = F.dropout(self.weight_hh_raw, self.weight_drop, self.training)
        weights = [self.weight_ih, weight_hh, self.bias_ih, self.bias_hh]
        with warnings.catch_warnings():
            # cuDNN wants the four tensors in one buffer and copies them there otherwise. The
            # dropped matrix is a new tensor every batch, so that copy is the price of
            # DropConnect; its warning would fire at every call.
            warnings.filterwarnings("ignore", "RNN module weights are not part of single")
            # nn.LSTM.forward makes the same call; a list of separate tensors is allowed.
            out, h, c = _VF.lstm(x, state, weights, True, 1, 0.0, self.training, False, False)
        return out, (h, c)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, weight_drop={self.weight_drop}"


class AWDLanguageModel(nn.Module):
    """Embedding, recurrent ``layers``, tied decoder, with AWD's dropouts and AR/TAR.

    ``layers`` are modules with ``forward(x, state) -> (output, state)``,
    ``init_state(batch_size)``, ``input_size`` and ``hidden_size`` (:class:`WeightDropLSTM`,
    :class:`toolkit.lm.qrnn.QRNNLayer`). :class:`AWDLSTM` and
    :class:`toolkit.lm.qrnn.AWDQRNN` build them; the recipe swaps one for the other.

    ``ar_on`` picks the output AR penalizes: ``"dropped"`` (salesforce AWD-LSTM, after the
    output dropout) or ``"raw"`` (fastai 0.7's ``seq2seq_reg``, before it: in expectation
    ``1 - dropout`` times the dropped one, since the dropout scales kept units by
    ``1/(1-dropout)``).
    """

    def __init__(
        self,
        vocab_size: int,
        layers: Sequence[nn.Module],
        emb_size: int,
        *,
        dropouti: float,
        dropouth: float,
        dropout: float,
        dropoute: float,
        tie_weights: bool = True,
        alpha: float = 2.0,
        beta: float = 1.0,
        ar_on: AROn = "dropped",
    ) -> None:
        super().__init__()
        if ar_on not in get_args(AROn):
            raise ValueError(f"ar_on={ar_on!r} must be one of {get_args(AROn)}")
        for name, p in [("dropouti", dropouti), ("dropouth", dropouth), ("dropout", dropout),
                        ("dropoute", dropoute)]:
            if not 0 <= p < 1:
                raise ValueError(f"{name}={p} must be in [0, 1)")
        out_size = layers[-1].hidden_size
        if layers[0].input_size != emb_size:
            raise ValueError(f"first layer takes {layers[0].input_size} features, "
                             f"the embedding gives {emb_size}")
        if tie_weights and out_size != emb_size:
            raise ValueError(f"tied weights need the last layer's hidden size ({out_size}) "
                             f"to equal emb_size ({emb_size})")
        self.dropouti, self.dropouth, self.dropout, self.dropoute = (
            dropouti, dropouth, dropout, dropoute)
        self.alpha, self.beta, self.ar_on = alpha, beta, ar_on
        self.encoder = nn.Embedding(vocab_size, emb_size)
        self.layers = nn.ModuleList(layers)
        self.decoder = nn.Linear(out_size, vocab_size)
        # AWD-LSTM's initialization of the embedding and decoder.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            # Press & Wolf (2017): one matrix for input and output words, a third fewer
            # parameters and a lower perplexity.
            self.decoder.weight = self.encoder.weight

    def init_hidden(self, batch_size: int) -> list[LayerState]:
        """Zero state of every layer for ``batch_size`` sequences."""
        return [layer.init_state(batch_size) for layer in self.layers]

    def forward(self, tokens: Tensor, hidden: list[LayerState]
                ) -> tuple[Tensor, list[LayerState], ActivationPenalty]:
        """``tokens [seq, batch]`` -> ``(output [seq, batch, emb], new hidden, AR/TAR)``.

        ``output`` is the last layer's hidden states after the output dropout; feed it to
        :meth:`logits` (or an adaptive softmax) and add ``penalty.ar + penalty.tar`` to the
        loss when training.
        """
        x = embedding_dropout(self.encoder.weight, tokens, self.dropoute, self.training)
        x = locked_dropout(x, self.dropouti, self.training)
        new_hidden = []
        for i, (layer, state) in enumerate(zip(self.layers, hidden, strict=True)):
            x, state = layer(x, state)
            new_hidden.append(state)
            if i < len(self.layers) - 1:
                x = locked_dropout(x, self.dropouth, self.training)
        output = locked_dropout(x, self.dropout, self.training)
        penalty = ActivationPenalty(
            activation_reg(output if self.ar_on == "dropped" else x, self.alpha),
            temporal_activation_reg(x, self.beta))
        return output, new_hidden, penalty

    def logits(self, output: Tensor) -> Tensor:
        """Full-softmax scores ``[..., vocab]`` of the hidden states from :meth:`forward`."""
        return self.decoder(output)


class AWDLSTM(AWDLanguageModel):
    """AWD-LSTM; the defaults are the post's WikiText-2 model (3 layers, 400/1150, tied).

    Dropouts are the post's (fastai order input, output, weight, embedding, hidden):
    ``dropouti=0.6, dropout=0.4, wdrop=0.5, dropoute=0.1, dropouth=0.2``; salesforce's
    WikiText-2 command differs only by ``dropouti=0.65``. ``alpha=2, beta=1``; AR on the
    dropped output (``ar_on``, :class:`AWDLanguageModel`), as salesforce's. With vocab
    33,278 (WikiText-2) it has 33.6M parameters, 24.2M with PTB's 10,000 (paper: 33M, 24M).
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 400,
        hidden_size: int = 1150,
        num_layers: int = 3,
        *,
        dropouti: float = 0.6,
        dropouth: float = 0.2,
        dropout: float = 0.4,
        dropoute: float = 0.1,
        wdrop: float = 0.5,
        tie_weights: bool = True,
        alpha: float = 2.0,
        beta: float = 1.0,
        ar_on: AROn = "dropped",
    ) -> None:
        sizes = [emb_size] + [hidden_size] * (num_layers - 1) + [
            emb_size if tie_weights else hidden_size]
        layers = [WeightDropLSTM(sizes[i], sizes[i + 1], wdrop) for i in range(num_layers)]
        super().__init__(vocab_size, layers, emb_size, dropouti=dropouti, dropouth=dropouth,
                         dropout=dropout, dropoute=dropoute, tie_weights=tie_weights,
                         alpha=alpha, beta=beta, ar_on=ar_on)
