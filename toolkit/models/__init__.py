"""Models of the post: AWD-LSTM and AWD-QRNN for WikiText-2 (one interface), WRN-22 for
CIFAR-10, ResNet50 with fastai 0.7's head for Stanford Cars."""

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
from toolkit.models.resnet import (
    AdaptiveConcatPool2d,
    FreezableSequential,
    cached_weights,
    imagenet_state_dict,
    resnet50,
)
from toolkit.models.wrn import WideResNet, wrn_22

__all__ = [
    "AROn", "AWDLSTM", "AWDQRNN", "AWDLanguageModel", "ActivationPenalty", "AdaptiveConcatPool2d",
    "FreezableSequential", "QRNNLayer", "WeightDropLSTM", "cached_weights", "imagenet_state_dict",
    "resnet50", "activation_reg", "embedding_dropout", "forget_mult", "forget_mult_loop",
    "forget_mult_reference", "forget_mult_triton", "locked_dropout", "repackage_hidden",
    "temporal_activation_reg", "WideResNet", "wrn_22",
]
