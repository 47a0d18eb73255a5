"""Language models of the post's WikiText-2 runs: AWD-LSTM and AWD-QRNN, one interface."""

from toolkit.models.awd_lstm import (
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
from toolkit.models.qrnn import (
    AWDQRNN,
    QRNNLayer,
    forget_mult,
    forget_mult_loop,
    forget_mult_reference,
    forget_mult_triton,
)

__all__ = [
    "AROn", "AWDLSTM", "AWDQRNN", "AWDLanguageModel", "ActivationPenalty", "QRNNLayer",
    "WeightDropLSTM", "activation_reg", "embedding_dropout", "forget_mult", "forget_mult_loop",
    "forget_mult_reference", "forget_mult_triton", "locked_dropout", "repackage_hidden",
    "temporal_activation_reg",
]
