"""Straight-through building blocks shared by the trained quantizers (QAT, LSQ, binary, ternary).

Each is an autograd function whose forward does a non-differentiable (or deliberately
re-scaled) operation and whose backward is chosen by the method it serves:

* :func:`on_dtype_grid` — a scale rounded to its storage dtype (and kept positive) in the
  forward pass, identity backward, so the trained model computes with exactly the scale the
  artifact stores;
* :func:`sign_ste` — ``+1`` / ``-1`` forward, gradient passed where ``|x| <= 1`` and
  cancelled elsewhere (Hubara et al. 2016; the sign estimator of XNOR-Net);
* :func:`substitute_ste` — the quantized value forward, the identity gradient to the latent
  weight (the plain straight-through estimator, as TWN trains).
"""

from __future__ import annotations

from typing import Any

import torch

from modelpress.techniques.quantization.affine import _DTYPES


class _OnDtypeGrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        info = torch.finfo(dtype)
        return x.clamp(min=info.tiny, max=info.max).to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def on_dtype_grid(x: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``x`` clamped to ``[tiny, max]`` of ``scale_dtype`` and rounded to it; identity backward.

    Args:
        x: positive scales (float32).
        scale_dtype: ``float32``, ``float16`` or ``bfloat16``, the dtype the artifact stores.

    Returns:
        ``x`` as its stored value, in ``x``'s dtype (no zero or negative scale survives).
    """
    return _OnDtypeGrid.apply(x, _DTYPES[scale_dtype])


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) = +1``; gradient ``1_{|x| <= 1}`` (clipped straight-through).

    Args:
        x: any tensor.

    Returns:
        ``+1`` / ``-1`` of ``x``'s dtype and shape.
    """
    return _SignSTE.apply(x)


class _Substitute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def substitute_ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exactly ``y`` in the forward pass; the gradient goes to ``x`` unchanged (plain STE).

    Unlike ``x + (y - x).detach()``, the forward value is bit-for-bit ``y`` (no rounding of
    the sum), so a quantizer's output is exactly what its codec stores.

    Args:
        x: the latent (real-valued) tensor that receives the gradient.
        y: its quantized value, same shape; no gradient reaches it.

    Returns:
        A tensor equal to ``y``.
    """
    return _Substitute.apply(x, y.detach())
