"""Language modelling, all of it in one package: the WikiText-2 data and its BPTT batching
(:mod:`~toolkit.lm.data`), the AWD-LSTM and AWD-QRNN bodies (:mod:`~toolkit.lm.awd_lstm`,
:mod:`~toolkit.lm.qrnn`, one interface), their softmax and trainer
(:mod:`~toolkit.lm.trainer`), and the neural cache pointer (:mod:`~toolkit.lm.cache_pointer`).
It builds on the engine (:mod:`toolkit.trainer`) and nothing below it knows it exists."""

from toolkit.lm.awd_lstm import (
    AROn,
    ActivationPenalty,
    AWDLanguageModel,
    AWDLSTM,
    WeightDropLSTM,
    activation_reg,
    embedding_dropout,
    locked_dropout,
    repackage_hidden,
    temporal_activation_reg,
)
from toolkit.lm.cache_pointer import CachePointer, cache_pointer_reference
from toolkit.lm.qrnn import (
    AWDQRNN,
    QRNNLayer,
    forget_mult,
    forget_mult_loop,
    forget_mult_reference,
    forget_mult_triton,
)
from toolkit.lm.trainer import LanguageModel, LMTrainer

__all__ = [
    "AROn", "AWDLSTM", "AWDQRNN", "AWDLanguageModel", "ActivationPenalty", "CachePointer",
    "LMTrainer", "LanguageModel", "QRNNLayer", "WeightDropLSTM", "activation_reg",
    "cache_pointer_reference", "embedding_dropout", "forget_mult", "forget_mult_loop",
    "forget_mult_reference", "forget_mult_triton", "locked_dropout", "repackage_hidden",
    "temporal_activation_reg",
]
