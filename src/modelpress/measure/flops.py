"""Floating point operations of one forward pass, counted by ``torch.utils.flop_counter``.

Also home of the two small helpers every measurement that runs a model shares:
``call_model`` (Tensor / tuple / kwargs dispatch) and ``eval_mode`` (eval, then restore).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from modelpress.errors import DataError

__all__ = ["ExampleInputs", "call_model", "count_flops", "eval_mode"]

# A single tensor, positional tensors, or keyword tensors (``input_ids=..., attention_mask=...``).
ExampleInputs = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]


def call_model(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """Run ``model`` on ``example_inputs``: ``model(x)``, ``model(*xs)`` or ``model(**kw)``.

    Args:
        model: The module to call.
        example_inputs: A Tensor, a tuple/list of positional inputs, or a mapping of keyword
            inputs (Hugging Face models take ``input_ids=..., attention_mask=...``).

    Returns:
        Whatever the model returns.

    Raises:
        DataError: If ``example_inputs`` is none of the accepted kinds.
    """
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    raise DataError(
        "example_inputs must be a Tensor, a tuple of tensors or a dict of keyword tensors. "
        f"Got {type(example_inputs).__name__} instead."
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore each submodule's own mode.

    Restoring per submodule (not ``model.train(was_training)``) keeps deliberately frozen
    parts, such as batch-norm layers in eval inside a training model, as they were.

    Args:
        model: The module to switch.

    Returns:
        A context manager yielding ``model``.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def count_flops(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """Count the FLOPs of one forward pass with ``FlopCounterMode(display=False)``.

    PyTorch's counter charges a matrix product ``(m, k) @ (k, n)`` as ``2 * m * k * n`` FLOPs
    (one multiply and one add per MAC), so ``MACs = FLOPs / 2``; element-wise ops such as
    bias adds and activations are not counted. The model runs in eval mode under
    ``torch.no_grad()`` and its previous mode is restored.

    Args:
        model: The module to measure.
        example_inputs: A Tensor, a tuple of tensors or a dict of keyword tensors.

    Returns:
        The total FLOPs of the forward pass.

    Raises:
        DataError: If ``example_inputs`` is of an unsupported kind.
    """
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        call_model(model, example_inputs)
    return int(counter.get_total_flops())
