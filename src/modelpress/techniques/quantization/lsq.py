"""Learned Step Size Quantization (Esser et al. 2020, "Learned Step Size Quantization").

A value ``v`` is quantized with a *trained* step size ``s``::

    v_q = round(clamp(v / s, -Qn, Qp)) * s

with the rounding straight-through. The gradient of ``s`` is the paper's (eq. 3)::

    d v_q / d s = -v/s + round(v/s)   if -Qn < v/s < Qp
                = -Qn                 if v/s <= -Qn
                =  Qp                 if v/s >= Qp

scaled by ``g = 1 / sqrt(N * Qp)``, ``N`` the number of values sharing ``s`` (the weights of
one group for a weight quantizer; the features of one sample for an activation). Initial
``s = 2 * mean|v| / sqrt(Qp)``. Signed data: ``Qn = 2^(b-1)``, ``Qp = 2^(b-1) - 1``;
unsigned (non-negative activations): ``Qn = 0``, ``Qp = 2^b - 1``.

:class:`LSQWeightFakeQuant` is an :class:`AffineFakeQuant` whose symmetric grid has a learned
scale: its ``scale`` buffer always holds the step size as the artifact stores it (rounded to
``scale_dtype``), so the :class:`AffineCodec` stores ``code = round(w / s) + 2^(b-1)`` and
loading reproduces the trained weights exactly. :class:`LSQInputQuantizer` is an
:class:`InputQuantizer` with ``scale`` as a parameter (same state-dict key), so a saved model
loads into a plain static input quantizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from modelpress.techniques.quantization.activation import InputQuantizer
from modelpress.techniques.quantization.affine import _DTYPES, Granularity, qmax
from modelpress.techniques.quantization.fake_quant import AffineCodec, AffineFakeQuant
from modelpress.techniques.quantization.ste import on_dtype_grid


def signed_range(bits: int) -> tuple[int, int]:
    """``(Qn, Qp) = (2^(b-1), 2^(b-1) - 1)``: LSQ's range for signed data."""
    return 1 << (bits - 1), (1 << (bits - 1)) - 1


def lsq_init_step(abs_sum: torch.Tensor, count: torch.Tensor | float, qp: int) -> torch.Tensor:
    """LSQ's initial step ``s = 2 * mean|v| / sqrt(Qp)``.

    Args:
        abs_sum: ``sum |v|`` per step size (any shape).
        count: how many values each sum holds (broadcasts against ``abs_sum``).
        qp: the largest positive code ``Qp``.

    Returns:
        The step sizes, float32, shaped like ``abs_sum``.
    """
    return (2.0 * abs_sum.float() / count / math.sqrt(qp)).float()


def lsq_grad_factor(n_values: int, qp: int) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(n_values, 1) * qp)


def lsq_quantize(
    v: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_factor: float, scale_dtype: str
) -> torch.Tensor:
    """``round(clamp(v / s, -Qn, Qp)) * s`` with LSQ's gradients (Esser et al. 2020, eq. 1-3).

    Args:
        v: the values, e.g. ``(G, width)`` weight groups or an activation batch.
        step: the learned step sizes, broadcastable against ``v`` (e.g. ``(G, 1)`` or ``()``).
        qn, qp: the code range ``[-Qn, Qp]``.
        grad_factor: ``g``, multiplies the gradient reaching ``step``.
        scale_dtype: the step is rounded to this storage dtype in the forward pass (and kept
            positive), so the output equals what the artifact decodes.

    Returns:
        The quantized values, shaped like ``v``; gradients reach ``v`` (inside the range,
        straight through the rounding) and ``step`` (eq. 3 times ``g``).
    """
    return _LSQRound.apply(v, on_dtype_grid(step, scale_dtype), qn, qp, grad_factor)


class _LSQRound(torch.autograd.Function):
    """``round(clamp(v / s, -Qn, Qp)) * s`` and LSQ's gradients in one function.

    Autograd through the composite expression keeps a node per operation and spends about a
    dozen elementwise passes on the backward of every activation; here the backward is
    ``inside = (v/s == clamp(v/s))``, ``grad_v = grad * inside`` and
    ``grad_s = g * sum(grad * round(clamp(v/s)) - grad_v * v/s)`` (eq. 3 summed over the
    values sharing ``s``), reduced to ``s``'s shape.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float
    ) -> torch.Tensor:
        ratio = v / s
        codes = ratio.clamp(-qn, qp).round_()
        ctx.save_for_backward(ratio, codes, s)
        ctx.bounds, ctx.g = (qn, qp), g
        return codes * s

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        ratio, codes, s = ctx.saved_tensors
        qn, qp = ctx.bounds
        inside = ratio.clamp(-qn, qp) == ratio
        grad_v = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            inner = grad * inside if grad_v is None else grad_v
            if s.numel() == 1:  # one step for the tensor: two dot products, no temporaries
                flat = grad.reshape(-1)
                total = flat.dot(codes.reshape(-1)) - inner.reshape(-1).dot(ratio.reshape(-1))
                grad_s = (total * ctx.g).reshape(s.shape)
            else:
                grad_s = (grad * codes - inner * ratio).sum_to_size(s.shape) * ctx.g
        return grad_v, grad_s, None, None, None


class LSQWeightFakeQuant(AffineFakeQuant):
    """A symmetric weight grid whose per-group step size ``step`` is trained (LSQ).

    Args:
        weight: the weight it will quantize (for the layout and the initial step).
        bits: code width, 2-8.
        granularity: one step per tensor, per output channel or per group.
        group_size: inputs per group (granularity ``group``).
        scale_dtype: storage dtype of the step sizes.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        *,
        granularity: Granularity,
        group_size: int | None,
        scale_dtype: str,
    ) -> None:
        super().__init__(
            weight,
            bits,
            symmetric=True,
            granularity=granularity,
            group_size=group_size,
            scale_dtype=scale_dtype,
        )
        self.qn, self.qp = signed_range(bits)
        groups = self.layout.to_groups(weight.detach().float())  # (G, width), zero-padded
        counts = self.layout.to_groups(torch.ones(weight.shape)).sum(dim=1)
        self.step = nn.Parameter(lsq_init_step(groups.abs().sum(dim=1), counts, self.qp))
        self.grad_factor = lsq_grad_factor(self.layout.width, self.qp)
        self.sync_scale()

    def sync_scale(self) -> None:
        """Copy the step sizes, as stored (rounded to ``scale_dtype``), into ``scale``."""
        with torch.no_grad():
            self.scale.copy_(on_dtype_grid(self.step.detach(), self.scale_dtype))

    def project_(self) -> None:
        """Keep the trained steps inside the storage dtype's positive range (after a step)."""
        info = torch.finfo(_DTYPES[self.scale_dtype])
        with torch.no_grad():
            self.step.clamp_(min=info.tiny, max=info.max)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The weight on the learned grid; gradients reach the weight and ``step``."""
        groups = self.layout.to_groups(w)  # (G, width)
        out = lsq_quantize(
            groups, self.step[:, None], self.qn, self.qp, self.grad_factor, self.scale_dtype
        )
        self.sync_scale()
        return self.layout.from_groups(out).to(w.dtype)

    def value_codec(self) -> AffineCodec:
        """The :class:`AffineCodec` of the grid with the current learned step sizes."""
        self.sync_scale()
        return super().value_codec()


class LSQInputQuantizer(InputQuantizer):
    """A static per-tensor input quantizer whose ``scale`` is a trained parameter (LSQ).

    Signed (``zero_point = 2^(b-1)``: codes ``-Qn .. Qp``) or unsigned (``zero_point = 0``:
    codes ``0 .. 2^b - 1``). The arithmetic equals :class:`InputQuantizer`'s for the same
    ``scale`` and ``zero_point``, so the ``input_quant`` edit replays it as a static one.

    Args:
        bits: code width, 2-8.
        dynamic: must be False (LSQ learns a fixed grid).
        symmetric: start signed (changed by :meth:`init_step`).
    """

    def __init__(self, bits: int = 8, *, dynamic: bool = False, symmetric: bool = True) -> None:
        if dynamic:
            raise ValueError("LSQInputQuantizer is static: its scale is trained")
        super().__init__(bits, dynamic=False, symmetric=symmetric)
        scale = self.scale
        del self._buffers["scale"]
        self.scale = nn.Parameter(scale.clone())  # same state-dict key as the buffer

    def init_step(self, abs_mean: float, non_negative: bool) -> None:
        """Unsigned when the calibration inputs are non-negative, else signed; LSQ's init.

        Args:
            abs_mean: ``mean|x|`` over the calibration inputs.
            non_negative: every calibration input was ``>= 0``.
        """
        self.symmetric = not non_negative
        zero = 0 if non_negative else 1 << (self.bits - 1)
        step = lsq_init_step(torch.tensor(abs_mean), 1.0, qmax(self.bits) - zero)
        with torch.no_grad():
            self.zero_point.fill_(float(zero))
            self.scale.copy_(on_dtype_grid(step, "float32"))

    def project_(self) -> None:
        """Keep the trained scale positive, so the stored scale is the one used."""
        with torch.no_grad():
            self.scale.clamp_(min=torch.finfo(torch.float32).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the learned grid; gradients reach ``x`` and ``scale`` (LSQ)."""
        if not self.enabled:
            return x
        qn = int(self.zero_point)
        qp = qmax(self.bits) - qn
        grad_factor = lsq_grad_factor(x[0].numel() if x.dim() > 1 else x.numel(), qp)
        return lsq_quantize(x, self.scale, qn, qp, grad_factor, "float32").to(x.dtype)
