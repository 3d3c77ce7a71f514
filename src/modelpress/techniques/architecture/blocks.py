"""Repeated blocks of a model: finding them, probing their shapes, and dropping some of them.

A *container* is an ``nn.ModuleList`` or ``nn.Sequential`` holding a model's repeated blocks:
Hugging Face transformers keep their layers in one list as long as
``config.num_hidden_layers`` (BERT ``encoder.layer``, Llama ``model.layers``); CNNs such as the
zoo's CIFAR ResNets hold residual blocks in stages (``layer1`` .. ``layer3`` of
``BasicBlock``). Dropping blocks renumbers the survivors ``0 .. n-1`` in place, so the state
dict keys of the student are those a fresh instance gets when the ``drop_blocks`` edit is
replayed on it; for Hugging Face models the config (``num_hidden_layers``, per-layer lists)
and each attention module's ``layer_idx`` (the key of its KV-cache slot) follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelpress.edits import edit_op, record_edit
from modelpress.measure.flops import call_model, eval_mode

Container = nn.ModuleList | nn.Sequential
# config entries holding one value per layer (subset with the kept layers)
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "mlp_layer_types", "block_types")


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def _repeated(module: nn.Module) -> bool:
    """A container of two or more blocks of one class, each with sub-modules of its own."""
    blocks = list(module.children())
    return (
        _is_container(module)
        and len(blocks) >= 2
        and len({type(b) for b in blocks}) == 1
        and any(True for _ in blocks[0].children())
    )


def hf_layer_count(model: nn.Module) -> int | None:
    """``config.num_hidden_layers`` of a Hugging Face model, or None."""
    value = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def find_containers(model: nn.Module) -> list[str]:
    """Names of the model's block containers, outermost first, in module order.

    A Hugging Face model (``config.num_hidden_layers`` = L) has one: the shallowest container
    of L blocks. Otherwise every repeated-block container (two or more blocks of one class)
    that is not inside a block of another one (the three stages of a CIFAR ResNet).

    Returns:
        The container names; empty if the model has no repeated blocks.
    """
    n_layers = hf_layer_count(model)
    named = [(n, m) for n, m in model.named_modules() if n and _repeated(m)]
    if n_layers is not None:
        hf = [n for n, m in named if len(m) == n_layers]
        if hf:
            return [min(hf, key=lambda n: (n.count("."), n))]
    found: list[str] = []
    for name, _ in named:
        if not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    return found


def is_hf_container(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is the layer list of a Hugging Face model (its length is the config's)."""
    n_layers = hf_layer_count(model)
    container = model.get_submodule(name)
    return n_layers is not None and _is_container(container) and len(container) == n_layers


def _first_tensor(values: Any) -> torch.Tensor | None:
    """The first tensor in a tensor, a tuple/list, a dict or a model output."""
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, (tuple, list)):
        for v in values:
            if isinstance(v, torch.Tensor):
                return v
    return None


def probe_shapes(
    model: nn.Module, names: Sequence[str], example_inputs: Any
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input and output shapes of the modules ``names`` on one forward pass.

    The model runs in eval mode without gradients; a block's input is its first tensor
    argument (or ``hidden_states``), its output the first tensor it returns.

    Returns:
        ``{name: (input_shape, output_shape)}`` for every named module that ran.
    """
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(name: str) -> Any:
        def record(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = _first_tensor(args)
            x = kwargs.get("hidden_states") if x is None else x
            y = _first_tensor(out)
            if isinstance(x, torch.Tensor) and y is not None and name not in shapes:
                shapes[name] = (tuple(x.shape), tuple(y.shape))

        return record

    handles = [
        model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names
    ]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def hf_config_changes(model: nn.Module, keep: Sequence[int]) -> dict[str, Any]:
    """The config entries that change when only layers ``keep`` of a HF model remain:
    ``num_hidden_layers`` and the per-layer lists (``layer_types``, ...) present."""
    config = getattr(model, "config", None)
    n_layers = hf_layer_count(model)
    changes: dict[str, Any] = {"num_hidden_layers": len(keep)}
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n_layers:
            changes[key] = [value[i] for i in keep]
    return changes


def drop_blocks(
    model: nn.Module, container: str, keep: Sequence[int], config: dict[str, Any]
) -> None:
    """Keep only blocks ``keep`` of ``container`` (renumbered ``0..n-1``), set the HF
    ``config`` entries, and record the ``drop_blocks`` edit.

    The kept blocks are the teacher's own modules, so they keep their trained weights
    (DistilBERT's initialisation, Sanh et al. 2019: one layer out of two).
    """
    _drop(model, {"container": container, "keep": list(keep), "config": config})
    record_edit(model, "drop_blocks", container=container, keep=list(keep), config=config)


@edit_op("drop_blocks")
def _drop(model: nn.Module, edit: dict[str, Any]) -> None:
    holder = model.get_submodule(edit["container"])
    blocks = list(holder.children())
    kept = [blocks[i] for i in edit["keep"]]
    holder._modules.clear()
    for new_index, block in enumerate(kept):
        holder._modules[str(new_index)] = block
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_index  # Llama/BERT index their KV-cache slot by it
    config = getattr(model, "config", None)
    for key, value in edit.get("config", {}).items():
        setattr(config, key, value)
