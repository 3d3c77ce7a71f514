"""``quant.cast``: store floating parameters at 16 bits (IEEE fp16 or bfloat16).

Each selected parameter gets a :class:`CastRound` parametrization whose forward pass rounds the
weight to the 16-bit dtype and back, ``W -> float32(float16(W))`` (round to nearest even, as
``Tensor.to`` does), so the model keeps computing in fp32 on CPU with exactly the values the
artifact stores. Its ``value_codec()`` is the artifact's :class:`~modelpress.artifact.codecs.
RawCodec` at the 16-bit dtype, so a parameter takes 2 bytes per value on disk instead of 4,
and loading gives the same values back (the cast is exact on values already on the 16-bit grid).

fp16 (1 sign, 5 exponent, 10 mantissa bits) keeps more precision but overflows beyond
``65504`` and flushes magnitudes below ``2^-24`` to zero; bfloat16 (8 exponent, 7 mantissa
bits) has fp32's range with a coarser grid. A weight that would overflow is an error; values
flushed to zero are counted in the stage result (``flushed_to_zero``). A parameter an earlier
stage already stores more compactly (a quantized weight) keeps that storage and is listed
under ``already_stored``, so ``quant.rtn`` followed by ``quant.cast`` gives int weights with
fp16 biases and norms. Buffers (BatchNorm running statistics) are not parameters and stay as
they are.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from modelpress.artifact.codecs import RawCodec, dtype_from_name, dtype_name
from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.errors import ConfigError, NoMatchingModulesError, UnsupportedModuleError
from modelpress.parametrizations import add_parametrization, parametrizations_of
from modelpress.registry import technique
from modelpress.targeting import select_modules

OWNER = "quant.cast"
# type names of the usual weighted layers, and any module whose last name part says "norm"
# (BERT's "LayerNorm", Llama's "input_layernorm" and final "norm" of class LlamaRMSNorm)
DEFAULT_TARGETS = [
    "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "Embedding", "LayerNorm", "GroupNorm", "RMSNorm", "BatchNorm1d",
    "BatchNorm2d", "BatchNorm3d", r"re:(.*\.)?[^.]*[Nn]orm[^.]*",
]  # fmt: skip
Param = tuple[str, nn.Module, str]  # (module name, module, parameter name)


class CastConfig(TargetedConfig):
    """Cast the floating parameters of the targeted modules to a 16-bit float dtype."""

    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Modules whose parameters to cast: names, type names or 're:' regexes.",
    )
    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Storage dtype: float16 (range +-65504) or bfloat16."
    )


class CastRound(nn.Module):
    """``W -> W.to(dtype).to(W.dtype)``: the weight rounded to a 16-bit float grid.

    The gradient of the round trip is the identity (``Tensor.to`` is differentiable), so a
    later fine-tuning stage trains the fp32 original and the forward pass stays on the grid.
    """

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.storage_dtype = dtype

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The weight on the ``dtype`` grid, in ``w``'s own dtype."""
        return round_to_dtype(w, dtype_from_name(self.storage_dtype))

    def value_codec(self) -> RawCodec:
        """The artifact codec: the raw values at the 16-bit dtype."""
        return RawCodec(dtype_from_name(self.storage_dtype))


def round_to_dtype(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` rounded to the nearest value of ``dtype`` (ties to even), returned in ``w.dtype``.

    Args:
        w: any floating tensor.
        dtype: the storage dtype (``torch.float16`` or ``torch.bfloat16``).

    Returns:
        ``w.to(dtype).to(w.dtype)``; magnitudes beyond ``dtype``'s largest finite value become
        inf (check with :func:`overflowing` first).
    """
    return w.to(dtype).to(w.dtype)


def overflowing(w: torch.Tensor, dtype: torch.dtype) -> float | None:
    """The largest finite ``|w|`` if it exceeds ``torch.finfo(dtype).max``, else None.

    A value above the largest finite fp16 (65504) rounds to inf when cast, so it cannot be
    stored in that dtype.
    """
    finite = w.detach()[torch.isfinite(w.detach())]
    if not finite.numel():
        return None
    peak = float(finite.abs().max())
    return peak if peak > torch.finfo(dtype).max else None


def flushed_to_zero(w: torch.Tensor, dtype: torch.dtype) -> int:
    """How many nonzero values of ``w`` round to 0.0 in ``dtype`` (underflow)."""
    w = w.detach()
    return int(((w != 0) & (round_to_dtype(w, dtype) == 0)).sum())


def _floating_param_names(module: nn.Module) -> list[str]:
    """Names of the module's own floating parameters, parametrized ones included."""
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        names += [n for n in module.parametrizations if n not in names]
    return [n for n in names if getattr(module, n).is_floating_point()]


def select_params(model: nn.Module, cfg: CastConfig) -> list[Param]:
    """Every floating parameter owned by a module picked by ``cfg.targets``/``cfg.ignore``.

    Raises:
        NoMatchingModulesError: a selector matches nothing, or the picked modules own no
            floating parameter.
    """
    strict = "targets" in cfg.model_fields_set
    picked = select_modules(model, cfg.targets, cfg.ignore, owner=OWNER, strict_targets=strict)
    params = [(n, m, p) for n, m in picked for p in _floating_param_names(m)]
    if not params:
        raise NoMatchingModulesError(
            f"{OWNER}: the selected modules own no floating parameter; check targets {cfg.targets}."
        )
    return params


def _qualified(name: str, pname: str) -> str:
    return f"{name}.{pname}" if name else pname


def stored_by_codec(module: nn.Module, pname: str) -> bool:
    """Whether ``module.<pname>`` already carries a parametrization with its own artifact
    storage (a quantizer, or an earlier cast)."""
    return any(hasattr(p, "value_codec") for p in parametrizations_of(module, pname))


def check_range(params: list[Param], dtype: torch.dtype) -> None:
    """Raise before any change if a parameter has a value beyond ``dtype``'s range.

    Raises:
        ConfigError: names the parameter and its largest magnitude, and suggests bfloat16.
    """
    for name, module, pname in params:
        peak = overflowing(getattr(module, pname), dtype)
        if peak is not None:
            raise ConfigError(
                f"{_qualified(name, pname)}: |w| reaches {peak:.6g}, beyond {dtype_name(dtype)}'s "
                f"largest value {torch.finfo(dtype).max:.6g}; use dtype 'bfloat16' or ignore "
                f"'{name}'."
            )


@technique(OWNER, CastConfig)
def apply_cast(model: nn.Module, cfg: CastConfig, ctx: Context) -> nn.Module:
    """Store floating parameters as fp16 or bf16 (the model computes on the rounded values)."""
    dtype = dtype_from_name(cfg.dtype)
    params = select_params(model, cfg)
    stored = [(n, m, p) for n, m, p in params if stored_by_codec(m, p)]
    params = [(n, m, p) for n, m, p in params if not stored_by_codec(m, p)]
    if not params:
        raise UnsupportedModuleError(
            f"{OWNER}: every selected parameter is already stored by an earlier stage "
            f"(e.g. {_qualified(*stored[0][::2])}); select other modules."
        )
    check_range(params, dtype)
    flushed: dict[str, int] = {}
    for name, module, pname in params:
        n = flushed_to_zero(getattr(module, pname), dtype)
        if n:
            flushed[_qualified(name, pname)] = n
        add_parametrization(module, pname, CastRound(cfg.dtype))
    ctx.report("dtype", {_qualified(n, p): cfg.dtype for n, _, p in params})
    ctx.report("flushed_to_zero", flushed)
    ctx.report("already_stored", [_qualified(n, p) for n, _, p in stored])
    return model
