"""AWD-QRNN: the AWD language model on quasi-recurrent layers (Bradbury et al., 2016).

A QRNN layer computes its gates for all time steps at once, with a convolution over a
window of inputs (window 2 on the first layer, 1 above, as in AWD-QRNN), then runs only an
elementwise recurrence, fo-pooling::

    z, f, o = tanh, sigmoid, sigmoid of W [x_t, x_{t-1}, ...] + b
    c_t = f_t * c_{t-1} + (1 - f_t) * z_t
    h_t = o_t * c_t

(salesforce/pytorch-qrnn writes ``f * z + (1 - f) * c`` instead, the same model with the
forget gate's sign flipped.) Weight drop is on the whole gate projection, since a QRNN has no
hidden-to-hidden matrix.

The recurrence, ``ForgetMult``, comes three ways: :func:`forget_mult_reference`, a plain
autograd loop that tests trust; :func:`forget_mult_loop`, one fused multiply-add per time
step over all batch rows and channels with a hand-written backward (any device); and on CUDA
:func:`forget_mult_triton`, one Triton kernel that walks the time steps of a block of
channels in registers, forward and backward. :func:`forget_mult` picks the fastest
available; without CUDA or Triton it is the loop. Under Triton's interpreter
(``TRITON_INTERPRET=1``) the kernel runs on CPU tensors too, slowly: how the tests check it
without a GPU.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from toolkit.lm.awd_lstm import AROn, AWDLanguageModel, LayerState

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the loop serves
    triton = None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit at import too


def forget_mult_reference(f: Tensor, z: Tensor, c0: Tensor | None = None) -> Tensor:
    """``c_t = f_t * c_{t-1} + (1 - f_t) * z_t`` step by step, differentiated by autograd.

    ``f, z [seq, batch, hidden]``, ``c0 [batch, hidden]`` (zeros if None); returns all ``c_t``.
    """
    c = torch.zeros_like(z[0]) if c0 is None else c0
    out = []
    for t in range(f.size(0)):
        c = f[t] * c + (1 - f[t]) * z[t]
        out.append(c)
    return torch.stack(out)


class _ForgetMultLoop(torch.autograd.Function):
    """A time loop of one ``addcmul`` each way; autograd would record ~4 nodes per step."""

    @staticmethod
    def forward(ctx, f: Tensor, z: Tensor, c0: Tensor) -> Tensor:
        c = torch.empty_like(z)
        u = (1 - f) * z
        prev = c0
        for t in range(f.size(0)):
            prev = torch.addcmul(u[t], f[t], prev, out=c[t])
        ctx.save_for_backward(f, z, c0, c)
        return c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f, z, c0, c = ctx.saved_tensors
        # dc[t]: gradient of the loss through c_t, including what flows back from c_{t+1}.
        dc = torch.empty_like(c)
        dc[-1] = grad_c[-1]
        for t in range(f.size(0) - 2, -1, -1):
            torch.addcmul(grad_c[t], f[t + 1], dc[t + 1], out=dc[t])
        c_prev = torch.cat([c0.unsqueeze(0), c[:-1]])
        return dc * (c_prev - z), dc * (1 - f), dc[0] * f[0]


def _check(f: Tensor, z: Tensor, c0: Tensor | None) -> Tensor:
    if f.dim() != 3 or f.shape != z.shape:
        raise ValueError(f"f and z must both be [seq, batch, hidden], got {tuple(f.shape)} "
                         f"and {tuple(z.shape)}")
    c0 = z.new_zeros(z.shape[1:]) if c0 is None else c0.to(z.dtype)
    if c0.shape != z.shape[1:]:
        raise ValueError(f"c0 must be {tuple(z.shape[1:])}, got {tuple(c0.shape)}")
    return c0


def forget_mult_loop(f: Tensor, z: Tensor, c0: Tensor | None = None) -> Tensor:
    """:func:`forget_mult_reference`'s values, a loop over time steps only (CPU path)."""
    c0 = _check(f, z, c0)
    return _ForgetMultLoop.apply(f.to(z.dtype).contiguous(), z.contiguous(), c0.contiguous())


if triton is not None:
    @triton.jit
    def _forget_mult_fwd(f_ptr, z_ptr, c0_ptr, c_ptr, T, N, BLOCK: tl.constexpr):
        # One program owns BLOCK of the N = batch*hidden channels for all T steps; c stays in
        # float32 registers. Pointers advance by N per step, so no int32 index overflows.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        f_ptrs, z_ptrs, c_ptrs = f_ptr + offs, z_ptr + offs, c_ptr + offs
        c = tl.load(c0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        for _ in range(T):
            f = tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
            c = f * c + (1.0 - f) * z
            tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=mask)
            f_ptrs += N
            z_ptrs += N
            c_ptrs += N

    @triton.jit
    def _forget_mult_bwd(f_ptr, z_ptr, c_ptr, gc_ptr, gf_ptr, gz_ptr, c0_ptr, gc0_ptr, T, N,
                         BLOCK: tl.constexpr):
        # f, z, c, gc, gf, gz point at the LAST time step; we walk back to t = 1, then do
        # t = 0, whose previous state is c0.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        f_ptrs, z_ptrs, c_ptrs = f_ptr + offs, z_ptr + offs, c_ptr + offs
        gc_ptrs, gf_ptrs, gz_ptrs = gc_ptr + offs, gf_ptr + offs, gz_ptr + offs
        g = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(T - 1):
            g += tl.load(gc_ptrs, mask=mask, other=0.0).to(tl.float32)
            f = tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
            c_prev = tl.load(c_ptrs - N, mask=mask, other=0.0).to(tl.float32)
            tl.store(gf_ptrs, (g * (c_prev - z)).to(gf_ptr.dtype.element_ty), mask=mask)
            tl.store(gz_ptrs, (g * (1.0 - f)).to(gz_ptr.dtype.element_ty), mask=mask)
            g = g * f
            f_ptrs -= N
            z_ptrs -= N
            c_ptrs -= N
            gc_ptrs -= N
            gf_ptrs -= N
            gz_ptrs -= N
        g += tl.load(gc_ptrs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        c_prev = tl.load(c0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gf_ptrs, (g * (c_prev - z)).to(gf_ptr.dtype.element_ty), mask=mask)
        tl.store(gz_ptrs, (g * (1.0 - f)).to(gz_ptr.dtype.element_ty), mask=mask)
        tl.store(gc0_ptr + offs, (g * f).to(gc0_ptr.dtype.element_ty), mask=mask)


_BLOCK = 128  # small blocks: batch*hidden is ~3e4 channels, enough programs to fill the SMs


class _ForgetMultTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Tensor, z: Tensor, c0: Tensor) -> Tensor:
        T, N = f.size(0), f[0].numel()
        c = torch.empty_like(z)
        grid = (triton.cdiv(N, _BLOCK),)
        _forget_mult_fwd[grid](f, z, c0, c, T, N, BLOCK=_BLOCK)
        ctx.save_for_backward(f, z, c0, c)
        return c

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f, z, c0, c = ctx.saved_tensors
        grad_c = grad_c.contiguous()
        gf, gz, gc0 = torch.empty_like(f), torch.empty_like(z), torch.empty_like(c0)
        T, N = f.size(0), f[0].numel()
        grid = (triton.cdiv(N, _BLOCK),)
        _forget_mult_bwd[grid](f[-1], z[-1], c[-1], grad_c[-1], gf[-1], gz[-1], c0, gc0, T, N,
                               BLOCK=_BLOCK)
        return gf, gz, gc0


def triton_available(x: Tensor) -> bool:
    """Whether :func:`forget_mult_triton` can run on ``x``: Triton, a float32/16 dtype, on
    CUDA (or any device under Triton's interpreter)."""
    return (triton is not None and (x.is_cuda or _INTERPRETED)
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16))


def forget_mult_triton(f: Tensor, z: Tensor, c0: Tensor | None = None) -> Tensor:
    """:func:`forget_mult_reference`'s values from one fused kernel per direction (CUDA).

    Accumulates in float32 whatever the storage dtype.
    """
    c0 = _check(f, z, c0)
    if not triton_available(z):
        raise RuntimeError(f"forget_mult_triton needs Triton and a CUDA float tensor, got "
                           f"{z.dtype} on {z.device} (triton imported: {triton is not None})")
    return _ForgetMultTriton.apply(f.to(z.dtype).contiguous(), z.contiguous(), c0.contiguous())


def forget_mult(f: Tensor, z: Tensor, c0: Tensor | None = None) -> Tensor:
    """fo-pooling ``c_t = f_t * c_{t-1} + (1 - f_t) * z_t`` on the fastest path for ``z``."""
    if triton_available(z):
        return forget_mult_triton(f, z, c0)
    return forget_mult_loop(f, z, c0)


class QRNNLayer(nn.Module):
    """One QRNN layer with fo-pooling and weight drop on its gate projection.

    The projection maps ``window`` consecutive inputs (newest first, as in pytorch-qrnn) to
    the ``z, f, o`` pre-activations; it is initialized as ``nn.Linear``. The state carries the
    last cell ``c [1, batch, hidden]`` and the last ``window - 1`` inputs, so a sequence cut
    into batches gives the same output as in one piece. AWD-QRNN: ``weight_drop=0.1``.
    """

    def __init__(self, input_size: int, hidden_size: int, window: int = 1,
                 weight_drop: float = 0.1) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        if not 0 <= weight_drop < 1:
            raise ValueError(f"weight_drop={weight_drop} must be in [0, 1)")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.window, self.weight_drop = window, weight_drop
        self.weight_raw = nn.Parameter(torch.empty(3 * hidden_size, window * input_size))
        self.bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.window * self.input_size)  # nn.Linear's default
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def init_state(self, batch_size: int) -> LayerState:
        # Plain tensors even when the weight is a shard (an FSDP2 DTensor) between forwards.
        w = self.weight_raw
        like = {"dtype": w.dtype, "device": w.device}
        return (torch.zeros(1, batch_size, self.hidden_size, **like),
                torch.zeros(self.window - 1, batch_size, self.input_size, **like))

    def forward(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """``x [seq, batch, input_size]``, ``state (c [1, batch, hidden], x_prev)``."""
        c0, x_prev = state
        T, k = x.size(0), self.window
        xs = torch.cat([x_prev.to(x.dtype), x]) if k > 1 else x
        # Row t of the source is [x_t, x_{t-1}, ..., x_{t-k+1}].
        source = torch.cat([xs[k - 1 - j:k - 1 - j + T] for j in range(k)], dim=2)
        weight = F.dropout(self.weight_raw, self.weight_drop, self.training)
        z, f, o = F.linear(source, weight, self.bias).chunk(3, dim=2)
        c = forget_mult(torch.sigmoid(f), torch.tanh(z), c0[0])
        h = torch.sigmoid(o) * c
        return h, (c[-1:], xs[T:])

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, window={self.window}, "
                f"weight_drop={self.weight_drop}")


class AWDQRNN(AWDLanguageModel):
    """AWD-QRNN; the defaults are the post's WikiText-2 QRNN (4 layers, 400/1550, tied).

    Dropouts (fastai order input, output, weight, embedding, hidden): ``dropouti=0.4,
    dropout=0.4, wdrop=0.1, dropoute=0.1, dropouth=0.2``, salesforce's WikiText-2 QRNN
    command. Window 2 on the first layer, 1 above. ``alpha=2, beta=1``, AR on the dropped
    output (``ar_on``, see :class:`~toolkit.lm.awd_lstm.AWDLanguageModel`). With vocab
    33,278 it has 33.4M parameters (24.0M with PTB's 10,000).
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 400,
        hidden_size: int = 1550,
        num_layers: int = 4,
        *,
        dropouti: float = 0.4,
        dropouth: float = 0.2,
        dropout: float = 0.4,
        dropoute: float = 0.1,
        wdrop: float = 0.1,
        first_window: int = 2,
        tie_weights: bool = True,
        alpha: float = 2.0,
        beta: float = 1.0,
        ar_on: AROn = "dropped",
    ) -> None:
        sizes = [emb_size] + [hidden_size] * (num_layers - 1) + [
            emb_size if tie_weights else hidden_size]
        layers = [QRNNLayer(sizes[i], sizes[i + 1], first_window if i == 0 else 1, wdrop)
                  for i in range(num_layers)]
        super().__init__(vocab_size, layers, emb_size, dropouti=dropouti, dropouth=dropouth,
                         dropout=dropout, dropoute=dropoute, tie_weights=tie_weights,
                         alpha=alpha, beta=beta, ar_on=ar_on)
