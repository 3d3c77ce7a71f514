"""Per-layer sensitivity: how far the model's outputs move when one layer alone is quantized.

For layer ``l`` at ``b`` bits, the layer's weight is replaced by its quantized value
``Q_b(W_l)`` (every other layer unchanged) and the model's outputs ``y'`` on the calibration
batches are compared with the unquantized outputs ``y`` (computed once):

* ``mse``: the relative output error ``sum ||y' - y||^2 / sum ||y||^2`` over every output row;
* ``kl``: the mean over output rows of ``KL(softmax(y) || softmax(y'))`` (classifiers, LMs).

Both are normalised by the same reference for every layer, so the sensitivities of different
layers are comparable and can be added, as ZeroQ (Cai et al. 2020, eq. 5, KL) and HAWQ
(Dong et al. 2019) add per-layer sensitivities to score a mixed-precision configuration. A
Hugging Face output uses its ``logits`` or ``last_hidden_state`` (a layer that does not reach
it, like BERT's pooler, has sensitivity 0); rows of padding tokens (``attention_mask == 0``)
are left out. The cost is one forward pass per (layer, bit width) and calibration batch, each
quantized weight computed once and reused over the batches; on a stack of repeated blocks the
blocks before a layer's own are replayed from the reference pass, not recomputed
(:mod:`.replay`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from modelpress.context import Batch, forward
from modelpress.errors import DataError
from modelpress.layerwise import find_blocks
from modelpress.techniques.quantization.mixed.replay import BlockReplay

Metric = Literal["mse", "kl"]


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor to compare in a model's output: itself, ``logits``, ``last_hidden_state``,
    or the first item of a tuple or dict.

    Raises:
        DataError: the output holds no tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict) and output:
        return output_tensor(next(iter(output.values())))
    if isinstance(output, (tuple, list)) and output:
        return output_tensor(output[0])
    raise DataError(
        f"the model's output ({type(output).__name__}) holds no tensor to compare; "
        "quant.mixed needs a tensor, logits or last_hidden_state."
    )


def output_rows(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``output`` as float32 rows ``(N, C)`` over its last dimension, padding tokens dropped.

    Args:
        output: e.g. ``(B, C)`` logits or ``(B, T, C)`` hidden states.
        batch: the input batch; a dict with a ``(B, T)`` ``attention_mask`` marks real tokens.
    """
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    rows = output.detach().float().reshape(-1, output.shape[-1] if output.dim() else 1)
    if isinstance(mask, torch.Tensor) and output.dim() == 3 and mask.shape == output.shape[:2]:
        rows = rows[mask.reshape(-1).bool()]
    return rows


def relative_mse(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """``sum ||y' - y||^2 / sum ||y||^2`` over all rows of all batches.

    Args:
        reference: per batch, the unquantized output rows ``y`` ``(N, C)``.
        outputs: per batch, the rows ``y'`` of the model with one layer quantized.
    """
    num = sum(
        float((o - r).double().square().sum()) for r, o in zip(reference, outputs, strict=True)
    )
    den = sum(float(r.double().square().sum()) for r in reference)
    return num / den if den > 0 else num


def mean_kl(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    """Mean over rows of ``KL(p || q) = sum_c p_c (log p_c - log q_c)``, ``p = softmax(y)``,
    ``q = softmax(y')``, over all rows of all batches."""
    total, rows = 0.0, 0
    for r, o in zip(reference, outputs, strict=True):
        log_p, log_q = F.log_softmax(r.double(), -1), F.log_softmax(o.double(), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        rows += len(r)
    return total / max(rows, 1)


METRICS: dict[str, Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], float]] = {
    "mse": relative_mse,
    "kl": mean_kl,
}


def model_rows(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The model's output rows on every batch (see :func:`output_rows`)."""
    return [output_rows(output_tensor(forward(model, b)), b) for b in batches]


@contextmanager
def replaced_weight(module: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """Make the forward pass of ``module`` use ``value`` as its weight, then restore it.

    A plain weight has its data swapped; a parametrized one gets a last parametrization
    returning ``value``, removed afterwards. Nothing else about the module changes.
    """
    if parametrize.is_parametrized(module, "weight"):
        chain = module.parametrizations.weight
        chain.append(_Constant(value))
        try:
            yield
        finally:
            del chain[len(chain) - 1]
    else:
        param = module.weight
        saved = param.data
        param.data = value.to(saved.dtype)
        try:
            yield
        finally:
            param.data = saved


class _Constant(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.value.to(w.dtype)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the ``with``; every module's training flag restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def reference_rows(
    model: nn.Module, batches: Sequence[Batch], replay: BlockReplay
) -> list[torch.Tensor]:
    """The unquantized output rows of every batch, recording block outputs into ``replay``.

    Raises:
        DataError: the outputs contain NaN or inf.
    """
    with replay.recording():
        reference = model_rows(model, batches)
    if not all(torch.isfinite(r).all() for r in reference):
        raise DataError(
            "the model's outputs on the calibration data contain NaN or inf; "
            "check the data and the model."
        )
    return reference


def sensitivity_table(
    model: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[tuple[str, nn.Module]],
    quantized: Callable[[int, int], torch.Tensor],
    n_options: int,
    metric: Metric,
) -> torch.Tensor:
    """``(L, K)`` errors of the model's outputs with only layer ``l`` at option ``k``.

    Args:
        model: the model (eval mode, no gradients is set here; flags are restored).
        batches: calibration input batches.
        layers: the ``L`` ``(name, module)`` whose weights are tried.
        quantized: ``quantized(l, k)`` gives layer ``l``'s weight at option ``k``.
        n_options: ``K``.
        metric: ``"mse"`` or ``"kl"`` (see the module docstring).

    Raises:
        DataError: the unquantized outputs, or those with a layer quantized, are not finite.
    """
    found = find_blocks(model, list(layers))
    replay = BlockReplay(found[1] if found else [], [m for _, m in layers])
    table = torch.zeros(len(layers), n_options, dtype=torch.float64)
    with evaluating(model), torch.no_grad():
        reference = reference_rows(model, batches, replay)
        for i, (_, module) in enumerate(layers):
            for k in range(n_options):
                with (
                    replaced_weight(module, quantized(i, k)),
                    replay.replaying(replay.skippable(i)),
                ):
                    table[i, k] = METRICS[metric](reference, model_rows(model, batches))
    bad = (~torch.isfinite(table)).nonzero()
    if len(bad):
        name = layers[int(bad[0, 0])][0]
        raise DataError(f"{name}: quantizing it makes the model's outputs NaN or inf.")
    return table
