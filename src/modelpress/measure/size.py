"""Model size: parameter counts, nonzeros, bytes on disk and bits per weight.

Counts are of the *effective* tensors a model computes with. A tensor carrying
``torch.nn.utils.parametrize`` parametrizations (pruning masks, fake quantizers, shared
codebooks) is counted once, by the shape and values of ``getattr(module, name)``; its
``parametrizations[name].original`` and any tensors owned by the parametrization modules
themselves are not counted separately, because baking (``remove_parametrizations``) leaves
only the effective tensor behind.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from modelpress.errors import ArtifactError, ConfigError
from modelpress.parametrizations import baked_copy

__all__ = [
    "bits_per_weight",
    "count_nonzeros",
    "count_params",
    "directory_bytes",
    "state_dict_bytes",
]


def _parametrized_slots(model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """Yield ``(module, tensor_name)`` for every parametrized tensor of ``model``, once each."""
    for module in model.modules():  # modules() already yields a shared module once
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                yield module, name


def _effective_params(model: nn.Module) -> Iterator[Tensor]:
    """Yield every unique effective parameter tensor of ``model`` (detached, no grad).

    Plain parameters are yielded as they are (a shared parameter once). A parametrized
    tensor is evaluated with ``getattr(module, name)`` (masks and quantizers applied) and
    yielded once per distinct set of originals; parametrized *buffers* are skipped.
    """
    owned_by_parametrizations: set[int] = set()
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            owned_by_parametrizations.update(id(p) for p in module.parameters())
    for param in model.parameters():  # de-duplicated by identity
        if id(param) not in owned_by_parametrizations:
            yield param.detach()
    seen: set[tuple[int, ...]] = set()
    with torch.no_grad():
        for module, name in _parametrized_slots(model):
            plist = module.parametrizations[name]
            originals = tuple(id(p) for p in plist.parameters(recurse=False))
            if not originals or originals in seen:  # a parametrized buffer, or a tied original
                continue
            seen.add(originals)
            yield getattr(module, name)


def count_params(model: nn.Module) -> int:
    """Count the unique effective parameters of a model.

    ``n = sum(t.numel() for t in effective_params(model))``: a parameter shared by several
    modules counts once; a parametrized tensor counts once by its effective shape (not its
    ``original`` and not the parametrization's own tensors).

    Args:
        model: Any ``nn.Module``, possibly carrying parametrizations.

    Returns:
        The number of scalar parameters.
    """
    return sum(t.numel() for t in _effective_params(model))


def count_nonzeros(model: nn.Module) -> int:
    """Count the nonzero entries of the effective parameters of a model.

    ``nnz = sum(count_nonzero(t) for t in effective_params(model))`` where a parametrized
    tensor is evaluated through its parametrizations, so pruning masks are applied.

    Args:
        model: Any ``nn.Module``, possibly carrying parametrizations.

    Returns:
        The number of nonzero scalar parameters.
    """
    return sum(int(torch.count_nonzero(t)) for t in _effective_params(model))


def directory_bytes(path: str | os.PathLike[str]) -> int:
    """Measure the bytes on disk of a file, or of every regular file under a directory.

    ``bytes = sum(st_size)`` over regular files found recursively; symbolic links and other
    special files are not followed or counted, so nothing is counted twice.

    Args:
        path: A file or a directory.

    Returns:
        The total size in bytes.

    Raises:
        ArtifactError: If ``path`` does not exist.
    """
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"Cannot measure '{root}': no such file or directory.")
    if root.is_file():
        return root.stat().st_size
    total = 0  # bytes
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            info = os.lstat(os.path.join(dirpath, filename))
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def _baked_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Return the state dict of ``model`` with every parametrization baked in (model untouched)."""
    if not any(True for _ in _parametrized_slots(model)):
        return model.state_dict()
    return baked_copy(model).state_dict()


def state_dict_bytes(model: nn.Module) -> int:
    """Measure the bytes of ``torch.save(model.state_dict())`` written to a temporary file.

    Parametrized models are baked on a copy (:func:`~modelpress.parametrizations.baked_copy`)
    first, so the file holds the
    effective tensors only (no ``original``, no masks). This is the honest uncompressed
    (typically fp32) baseline size; the model passed in is not modified.

    Args:
        model: Any ``nn.Module``, possibly carrying parametrizations.

    Returns:
        The size of the saved file in bytes.
    """
    state = _baked_state_dict(model)
    with tempfile.TemporaryDirectory(prefix="modelpress-size-") as tmp:
        file = Path(tmp) / "state_dict.pt"
        torch.save(state, file)
        return file.stat().st_size


def bits_per_weight(total_bytes: int, n_weights: int) -> float:
    """Average storage cost per weight: ``bpw = 8 * total_bytes / n_weights``.

    Args:
        total_bytes: Bytes on disk (e.g. from ``directory_bytes``), ``>= 0``.
        n_weights: Number of weights those bytes encode (e.g. from ``count_params``), ``>= 1``.

    Returns:
        Bits per weight (32.0 for plain fp32 without overhead).

    Raises:
        ConfigError: If ``total_bytes < 0`` or ``n_weights < 1`` or either is not an int.
    """
    for name, value, low in (("total_bytes", total_bytes, 0), ("n_weights", n_weights, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(
                f"The '{name}' parameter of bits_per_weight must be an int >= {low}. "
                f"Got {value!r} instead."
            )
    return 8.0 * total_bytes / n_weights
