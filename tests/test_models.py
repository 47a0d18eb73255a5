"""AWD-LSTM and AWD-QRNN: each regularizer against its definition, the weight-dropped LSTM
against ``nn.LSTM``, the QRNN recurrence against a step-by-step reference, hidden-state
carrying against one uninterrupted run, the paper's parameter counts, and a few training
steps. The ``gpu`` tests check the cuDNN and Triton paths on a CUDA device."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.lm import (
    AWDLSTM,
    AWDQRNN,
    QRNNLayer,
    WeightDropLSTM,
    activation_reg,
    embedding_dropout,
    forget_mult_loop,
    forget_mult_reference,
    forget_mult_triton,
    locked_dropout,
    repackage_hidden,
    temporal_activation_reg,
)
from conftest import ROOT, env
from toolkit.lm import qrnn as qrnn_module

MODELS = [AWDLSTM, AWDQRNN]


def tiny(cls, vocab=50, **kw):
    """A 2-layer model small enough for exact float64 checks."""
    return cls(vocab, emb_size=6, hidden_size=10, num_layers=2, **kw)


NO_DROPOUT = dict(dropouti=0.0, dropouth=0.0, dropout=0.0, dropoute=0.0, wdrop=0.0)


# --- regularizers ------------------------------------------------------------------------

def test_embedding_dropout_drops_whole_words_and_scales():
    torch.manual_seed(0)
    weight, p = torch.randn(20, 8), 0.5
    tokens = torch.randint(0, 20, (30, 4))
    out = embedding_dropout(weight, tokens, p, training=True)
    kept = out.abs().sum(-1) > 0
    assert torch.allclose(out[kept], weight[tokens][kept] / (1 - p))
    assert (out[~kept] == 0).all()
    for word in tokens.unique():  # a word is kept everywhere or nowhere in the batch
        assert kept[tokens == word].all() or not kept[tokens == word].any()
    assert 0 < kept.float().mean() < 1
    assert torch.equal(embedding_dropout(weight, tokens, p, training=False), weight[tokens])


def test_locked_dropout_one_mask_for_all_time_steps():
    torch.manual_seed(0)
    x, p = torch.randn(25, 3, 40), 0.4
    y = locked_dropout(x, p, training=True)
    ratio = torch.where(x != 0, y / x, torch.zeros_like(x))
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio))  # same mask at every step
    values = ratio[0].flatten()
    assert torch.allclose(values[values != 0], torch.full_like(values[values != 0], 1 / (1 - p)))
    assert 0 < (values == 0).float().mean() < 1
    assert locked_dropout(x, p, training=False) is x


def test_activation_penalties_by_hand():
    h = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]], [[3.0, 4.0]]])  # [seq=3, batch=1, 2]
    # AR: alpha * mean of squares = 2 * (1+4+9+25+9+16)/6
    assert activation_reg(h, alpha=2.0).item() == pytest.approx(2 * 64 / 6)
    # TAR: beta * mean of squared steps: diffs (2, 3), (0, -1) -> (4+9+0+1)/4
    assert temporal_activation_reg(h, beta=0.5).item() == pytest.approx(0.5 * 14 / 4)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("ar_on", ["dropped", "raw", None])
def test_model_penalties_ar_on_the_chosen_output_and_tar_on_the_raw_output(cls, ar_on):
    """dropped (the default): salesforce's AR after the output dropout; raw: fastai 0.7's
    seq2seq_reg, on RNN_Encoder's outputs[-1], before LinearDecoder's dropout."""
    torch.manual_seed(0)
    kw = {} if ar_on is None else {"ar_on": ar_on}
    model = tiny(cls, **{**NO_DROPOUT, "dropout": 0.5}, alpha=3.0, beta=0.7, **kw).double()
    tokens = torch.randint(0, 50, (9, 4))
    raw, _, _ = model.eval()(tokens, model.init_hidden(4))  # output dropout is the only noise
    out, _, pen = model.train()(tokens, model.init_hidden(4))
    dropped_ar, raw_ar = 3.0 * out.pow(2).mean().item(), 3.0 * raw.pow(2).mean().item()
    assert dropped_ar != pytest.approx(raw_ar, rel=1e-3)  # the two choices are told apart
    assert pen.ar.item() == pytest.approx(raw_ar if ar_on == "raw" else dropped_ar, rel=1e-12)
    assert pen.tar.item() == pytest.approx(0.7 * (raw[1:] - raw[:-1]).pow(2).mean().item(),
                                           rel=1e-12)


def test_unknown_ar_on_is_refused():
    with pytest.raises(ValueError, match="ar_on='decoder'"):
        tiny(AWDLSTM, ar_on="decoder")


# --- weight drop on the fused LSTM -------------------------------------------------------

def lstm_like(layer: WeightDropLSTM, weight_hh: torch.Tensor) -> nn.LSTM:
    ref = nn.LSTM(layer.input_size, layer.hidden_size).to(weight_hh.dtype)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(layer.weight_ih)
        ref.weight_hh_l0.copy_(weight_hh)
        ref.bias_ih_l0.copy_(layer.bias_ih)
        ref.bias_hh_l0.copy_(layer.bias_hh)
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_weight_drop_lstm_without_drop_is_nn_lstm(dtype, mode):
    torch.manual_seed(0)
    layer = WeightDropLSTM(5, 7, weight_drop=0.0).to(dtype).train(mode == "train")
    ref = lstm_like(layer, layer.weight_hh_raw.detach()).train(mode == "train")
    x = torch.randn(11, 3, 5, dtype=dtype)
    state = (torch.randn(1, 3, 7, dtype=dtype), torch.randn(1, 3, 7, dtype=dtype))
    out, (h, c) = layer(x, state)
    ref_out, (ref_h, ref_c) = ref(x, state)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in [(out, ref_out), (h, ref_h), (c, ref_c)]:
        assert torch.allclose(a, b, atol=tol, rtol=0)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref_out * g).sum().backward()
    assert torch.allclose(layer.weight_hh_raw.grad, ref.weight_hh_l0.grad, atol=tol * 10)
    assert torch.allclose(layer.weight_ih.grad, ref.weight_ih_l0.grad, atol=tol * 10)


def test_weight_drop_applies_one_dropconnect_mask_in_training():
    torch.manual_seed(0)
    p = 0.5
    layer = WeightDropLSTM(5, 7, weight_drop=p).double().train()
    x, state = torch.randn(11, 3, 5, dtype=torch.float64), layer.init_state(3)
    # The dropout of weight_hh_raw is the forward's first random draw: replay it.
    torch.manual_seed(1)
    dropped = F.dropout(layer.weight_hh_raw.detach(), p, training=True)
    torch.manual_seed(1)
    out, _ = layer(x, state)
    ref = lstm_like(layer, dropped)
    ref_out, _ = ref(x, state)
    assert torch.allclose(out, ref_out, atol=1e-12)

    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref_out * g).sum().backward()
    mask = (dropped != 0).double()
    assert 0.3 < 1 - mask.mean() < 0.7
    grad = layer.weight_hh_raw.grad
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] != 0).all()
    assert torch.allclose(grad, ref.weight_hh_l0.grad * mask / (1 - p), atol=1e-12)

    assert not torch.allclose(layer(x, state)[0], layer(x, state)[0])  # a new mask per call
    layer.eval()
    out1, out2 = layer(x, state)[0], layer(x, state)[0]
    assert torch.equal(out1, out2)
    assert torch.allclose(out1, lstm_like(layer, layer.weight_hh_raw.detach())(x, state)[0],
                          atol=1e-12)


# --- QRNN --------------------------------------------------------------------------------

def qrnn_inputs(T=7, B=3, H=5, dtype=torch.float64, device="cpu"):
    f = torch.rand(T, B, H, dtype=dtype, device=device).requires_grad_()
    z = torch.randn(T, B, H, dtype=dtype, device=device).requires_grad_()
    c0 = torch.randn(B, H, dtype=dtype, device=device).requires_grad_()
    return f, z, c0


def test_forget_mult_loop_matches_reference_values_and_gradients():
    torch.manual_seed(0)
    f, z, c0 = qrnn_inputs(T=13, B=4, H=6)
    out, ref = forget_mult_loop(f, z, c0), forget_mult_reference(f, z, c0)
    assert torch.allclose(out, ref, atol=1e-14)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (f, z, c0))
    want = torch.autograd.grad((ref * g).sum(), (f, z, c0))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-13)
    assert torch.autograd.gradcheck(forget_mult_loop, qrnn_inputs(T=5, B=2, H=3))
    assert torch.allclose(forget_mult_loop(f, z), forget_mult_reference(f, z))  # c0 = 0


def test_qrnn_layer_is_fo_pooling_over_a_window_of_two():
    torch.manual_seed(0)
    layer = QRNNLayer(3, 4, window=2, weight_drop=0.0).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    c0, x_prev = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 2, 3, dtype=torch.float64)
    h, (c_last, x_last) = layer(x, (c0, x_prev))
    c, prev, hs = c0[0], x_prev[0], []
    for t in range(6):  # gates z, f, o from [x_t, x_{t-1}]
        gates = torch.cat([x[t], prev], dim=1) @ layer.weight_raw.T + layer.bias
        z, f, o = gates.chunk(3, dim=1)
        f = torch.sigmoid(f)
        c = f * c + (1 - f) * torch.tanh(z)
        hs.append(torch.sigmoid(o) * c)
        prev = x[t]
    assert torch.allclose(h, torch.stack(hs), atol=1e-12)
    assert torch.allclose(c_last[0], c) and torch.equal(x_last, x[-1:])


# --- whole models ------------------------------------------------------------------------

@pytest.mark.parametrize("cls", MODELS)
def test_shapes_and_tied_weights(cls):
    model = tiny(cls, vocab=50)
    assert model.decoder.weight is model.encoder.weight
    assert model.layers[-1].hidden_size == 6
    n_unique = sum(p.numel() for p in model.parameters())
    assert n_unique == sum(p.numel() for p in model.state_dict().values()) - 50 * 6
    out, hidden, pen = model(torch.randint(0, 50, (8, 3)), model.init_hidden(3))
    assert out.shape == (8, 3, 6) and model.logits(out).shape == (8, 3, 50)
    assert len(hidden) == 2 and pen.ar.dim() == 0 and pen.tar.dim() == 0
    assert hidden[0][0].shape == (1, 3, 10) and hidden[1][0].shape == (1, 3, 6)

    untied = tiny(cls, vocab=50, tie_weights=False)
    assert untied.decoder.weight is not untied.encoder.weight
    assert untied.layers[-1].hidden_size == 10 and untied.decoder.in_features == 10
    with pytest.raises(ValueError, match="dropout"):
        tiny(cls, dropout=1.0)


@pytest.mark.parametrize("cls", MODELS)
def test_carried_hidden_state_equals_one_uninterrupted_run(cls):
    torch.manual_seed(0)
    model = tiny(cls).double().eval()
    tokens = torch.randint(0, 50, (16, 3))
    whole, h_whole, _ = model(tokens, model.init_hidden(3))
    first, h, _ = model(tokens[:7], model.init_hidden(3))
    second, h, _ = model(tokens[7:], repackage_hidden(h))
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-12)
    for a, b in zip(h, h_whole):
        for x, y in zip(a, b):
            assert torch.allclose(x, y, atol=1e-12)
    # ... and a fresh state at the cut is not the same run: the test can see a lost carry.
    restarted, _, _ = model(tokens[7:], model.init_hidden(3))
    assert not torch.allclose(restarted, second, atol=1e-6)


def test_repackage_hidden_detaches_and_keeps_structure():
    model = tiny(AWDLSTM)
    _, hidden, _ = model(torch.randint(0, 50, (4, 2)), model.init_hidden(2))
    assert hidden[0][0].grad_fn is not None
    detached = repackage_hidden(hidden)
    assert isinstance(detached, list) and isinstance(detached[0], tuple)
    for a, b in zip(detached, hidden):
        for x, y in zip(a, b):
            assert x.grad_fn is None and not x.requires_grad and torch.equal(x, y)


@pytest.mark.parametrize("cls,vocab,expected,paper_millions", [
    # embedding 400V, decoder bias V, LSTMs 400->1150->1150->400 (4 gates, two biases each)
    (AWDLSTM, 10_000, 24_221_600, 24),   # PTB, paper: 24M
    (AWDLSTM, 33_278, 33_556_078, 33),   # WikiText-2, paper: 33M
    # QRNNs 400->1550 (window 2) ->1550->1550->400, 3 gates, one bias
    (AWDQRNN, 10_000, 24_020_150, 24),
    (AWDQRNN, 33_278, 33_354_628, 33),
])
def test_paper_parameter_counts(cls, vocab, expected, paper_millions):
    model = cls(vocab)
    n = sum(p.numel() for p in model.parameters())
    rnn = sum(p.numel() for p in model.layers.parameters())
    assert n == rnn + 400 * vocab + vocab
    if cls is AWDLSTM:
        assert rnn == sum(4 * o * (i + o) + 8 * o for i, o in [(400, 1150), (1150, 1150), (1150, 400)])
    else:
        assert rnn == sum(3 * o * i + 3 * o for i, o in [(800, 1550), (1550, 1550), (1550, 1550), (1550, 400)])
    assert n == expected and int(n / 1e6) == paper_millions  # the paper truncates


@pytest.mark.parametrize("cls", MODELS)
def test_a_few_adam_steps_learn_a_toy_sequence(cls):
    torch.manual_seed(0)
    vocab, bs, bptt = 12, 4, 10
    model = cls(vocab, emb_size=16, hidden_size=32, num_layers=2, dropouti=0.1, dropouth=0.1,
                dropout=0.1, dropoute=0.1, wdrop=0.1)
    stream = torch.arange(400) % vocab  # each token predicts the next
    data = stream[: len(stream) // bs * bs].view(bs, -1).T  # [time, batch]

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            out, _, _ = model(data[:-1], model.init_hidden(bs))
            return F.cross_entropy(model.logits(out).flatten(0, 1), data[1:].flatten()).item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    hidden = model.init_hidden(bs)
    for step in range(50):
        i = step * bptt % (len(data) - bptt - 1)
        x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt]
        hidden = repackage_hidden(hidden)
        out, hidden, pen = model(x, hidden)
        loss = F.cross_entropy(model.logits(out).flatten(0, 1), y.flatten()) + pen.ar + pen.tar
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before > 0.8 * math.log(vocab) and after < 0.3 * before, (before, after)


# The fused kernel without a GPU: Triton's interpreter runs it on CPU tensors. It reads
# TRITON_INTERPRET when triton.jit decorates the kernel, so it runs in a fresh process.
INTERPRETED = """
import json, torch
from toolkit.lm.qrnn import forget_mult_reference, forget_mult_triton, triton_available
rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
torch.manual_seed(0)
out = {}
for T, B, H, strided in [(1, 1, 1, False), (9, 3, 50, False), (5, 2, 300, False),
                         (6, 4, 33, True)]:
    f, z = torch.rand(T, B, H, dtype=torch.float64), torch.randn(T, B, H, dtype=torch.float64)
    if strided:  # non-contiguous views, as a transposed gate tensor would be
        f = torch.rand(T, H, B, dtype=torch.float64).transpose(1, 2)
        z = torch.randn(T, H, B, dtype=torch.float64).transpose(1, 2)
    c0 = torch.randn(B, H, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (f, z, c0)]
    low_in = [t.float().requires_grad_() for t in (f, z, c0)]
    assert triton_available(low_in[1]) and not low_in[1].is_cuda
    ref, got = forget_mult_reference(*ref_in), forget_mult_triton(*low_in)
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), ref_in)
    have = torch.autograd.grad((got * g.float()).sum(), low_in)
    out[f"{T}x{B}x{H}" + "-strided" * strided] = [rel(got, ref)] + [
        rel(a, b) for a, b in zip(have, want)]
print(json.dumps(out))
"""


def test_forget_mult_triton_kernel_under_the_interpreter_matches_float64_reference():
    """Forward, and the gradients of f, z and c0, of the fused kernel (float32) against the
    float64 autograd reference: a length-1 sequence, several 128-channel blocks with a
    partial one, non-contiguous inputs."""
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, capture_output=True,
                          text=True, env=env(TRITON_INTERPRET="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"1x1x1", "9x3x50", "5x2x300", "6x4x33-strided"}
    for case, (out, gf, gz, gc0) in errors.items():
        assert max(out, gf, gz, gc0) < 1e-6, (case, out, gf, gz, gc0)  # float32 rounding


# --- CUDA: cuDNN and Triton paths ------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 3, 50), (70, 20, 155)], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forget_mult_triton_matches_reference(shape, dtype, tol):
    torch.manual_seed(0)
    f, z, c0 = (t.detach() for t in qrnn_inputs(*shape, dtype=torch.float64, device="cuda"))
    ref_in = [t.clone().requires_grad_() for t in (f, z, c0)]
    low_in = [t.to(dtype).requires_grad_() for t in (f, z, c0)]
    ref, out = forget_mult_reference(*ref_in), forget_mult_triton(*low_in)
    assert out.dtype == dtype and rel_err(out, ref) < tol
    g = torch.randn_like(ref)
    want = torch.autograd.grad((ref * g).sum(), ref_in)
    got = torch.autograd.grad((out * g.to(dtype)).sum(), low_in)
    for a, b in zip(got, want):
        assert a.dtype == dtype and rel_err(a, b) < tol
    assert qrnn_module.triton_available(low_in[0])


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_models_on_cuda_match_cpu(cls):
    """cuDNN with a dropped recurrent matrix and the Triton recurrence give the CPU values."""
    torch.manual_seed(0)
    model = cls(100, emb_size=32, hidden_size=64, num_layers=3).eval()
    tokens = torch.randint(0, 100, (20, 4))
    cpu_out, _, _ = model(tokens, model.init_hidden(4))
    model.cuda()
    with warnings.catch_warnings():
        # cuDNN's "weights are not part of single contiguous chunk" would fire at every call
        warnings.filterwarnings("error", message=".*contiguous chunk")
        out, hidden, pen = model.train()(tokens.cuda(), model.init_hidden(4))
        (F.cross_entropy(model.logits(out).flatten(0, 1), tokens.cuda().flatten())
         + pen.ar + pen.tar).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.no_grad():
        out, _, _ = model.eval()(tokens.cuda(), model.init_hidden(4))
    assert rel_err(out.cpu(), cpu_out) < 1e-4
