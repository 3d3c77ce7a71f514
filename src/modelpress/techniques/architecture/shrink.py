"""``architecture.shrink``: derive a smaller student from the teacher, shallower and/or narrower.

Depth: drop repeated blocks — transformer layers or residual blocks — keeping the teacher's
trained weights in the blocks that stay. ``keep_every: 2`` keeps blocks 0, 2, 4, ... of each
container, DistilBERT's student initialisation (Sanh et al. 2019, "one layer out of two");
``keep``/``drop`` list block indices counted over all containers in order (``layer1.0`` is 0
in a ResNet, ``layer2.0`` comes after the last block of ``layer1``). A residual block can only
go if its output shape equals its input shape (no stride, no projection shortcut), checked by
a shape probe on the example inputs before anything changes.

Width: keep the fraction ``width`` of the channels / attention heads / FFN neurons of every
group, through ``prune.structured`` (its coupled groups, importance and ``shrink`` edit).

Both are recorded as structural edits (``shrink``, ``drop_blocks``) so ``modelpress.load``
rebuilds the student from the teacher's source; the layer list of a Hugging Face model keeps
its config (``num_hidden_layers``, ``layer_types``) and KV-cache ``layer_idx`` consistent.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from modelpress.config import TargetedConfig
from modelpress.context import Context
from modelpress.errors import ConfigError, DataError, UnsupportedModuleError
from modelpress.measure import count_params
from modelpress.registry import technique
from modelpress.targeting import select_modules
from modelpress.techniques.architecture.blocks import (
    drop_blocks,
    find_containers,
    hf_config_changes,
    is_hf_container,
    probe_shapes,
)
from modelpress.techniques.pruning.structured.apply import StructuredConfig, apply_structured

OWNER = "architecture.shrink"


class ShrinkConfig(TargetedConfig):
    """A smaller student: drop blocks (one of keep_every / keep / drop) and/or narrow width."""

    targets: list[str] = Field(
        default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Conv3d"],
        description="Layers whose outputs 'width' narrows: names, types or 're:' regexes.",
    )
    ignore: list[str] = Field(
        default_factory=list, description="Layers 'width' leaves alone (same selector syntax)."
    )
    keep_every: int | None = Field(
        None, ge=2, le=64, description="Keep blocks 0, k, 2k, ... of each block container."
    )
    keep: list[int] | None = Field(
        None, description="Block indices to keep, counted over all containers in order."
    )
    drop: list[int] | None = Field(
        None, description="Block indices to drop, counted over all containers in order."
    )
    blocks: str | None = Field(
        None, description="The ModuleList/Sequential of blocks (default: found automatically)."
    )
    width: float | None = Field(
        None, gt=0, lt=1, description="Keep this fraction of channels/heads/FFN neurons."
    )
    importance: Literal["l1", "l2"] = Field(
        "l2", description="Channel importance for width: L1 or L2 norm of the weights."
    )

    @model_validator(mode="after")
    def _one_depth_option(self) -> ShrinkConfig:
        given = [k for k in ("keep_every", "keep", "drop") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of 'keep_every', 'keep', 'drop', not {given}")
        if not given and self.width is None:
            raise ValueError("nothing to shrink: set 'keep_every', 'keep' or 'drop', or 'width'")
        if self.width is None and {"targets", "ignore"} & self.model_fields_set:
            raise ValueError("'targets'/'ignore' choose the layers 'width' narrows; set 'width'")
        if self.blocks is not None and not given:
            raise ValueError("'blocks' names where to drop blocks; set 'keep_every', 'keep' or "
                             "'drop'")  # fmt: skip
        return self

    @property
    def drops_blocks(self) -> bool:
        """Whether a depth option is set."""
        return any(v is not None for v in (self.keep_every, self.keep, self.drop))


@dataclass(frozen=True)
class DepthPlan:
    """Which blocks of each container stay, and the HF config entries that change."""

    containers: dict[str, int]  # container -> blocks before
    keep: dict[str, list[int]]  # container -> kept indices
    config: dict[str, dict[str, Any]]  # container -> HF config changes (empty if not HF)

    def dropped(self) -> list[str]:
        """Names of the dropped blocks, in order."""
        return [f"{c}.{i}" for c, n in self.containers.items() for i in range(n)
                if i not in self.keep[c]]  # fmt: skip


def kept_indices(
    sizes: dict[str, int], keep_every: int | None, keep: list[int] | None, drop: list[int] | None
) -> dict[str, list[int]]:
    """The kept block indices of each container (local indices, ascending).

    ``keep_every`` k keeps ``0, k, 2k, ...`` of every container; ``keep``/``drop`` name global
    indices ``0 .. sum(sizes) - 1`` (container after container, in the order of ``sizes``).

    Args:
        sizes: container name -> number of blocks.
        keep_every, keep, drop: the depth options (exactly one is set).

    Returns:
        Container name -> kept local indices.

    Raises:
        ConfigError: an index is out of range or repeated, nothing would be dropped, or a
            container would lose every block.
    """
    starts = dict(zip(sizes, itertools.accumulate([0, *sizes.values()]), strict=False))
    total = sum(sizes.values())
    if keep_every is not None:
        wanted = {starts[c] + i for c, n in sizes.items() for i in range(0, n, keep_every)}
    else:
        key, listed = ("keep", keep) if keep is not None else ("drop", drop or [])
        bad = [i for i in listed if not 0 <= i < total]
        if bad:
            raise ConfigError(f"{OWNER}: {key} index {bad[0]} is out of range; the model has "
                              f"{total} blocks (0..{total - 1}).")  # fmt: skip
        if len(set(listed)) != len(listed):
            raise ConfigError(f"{OWNER}: {key} lists an index twice ({sorted(listed)}).")
        wanted = set(listed) if key == "keep" else set(range(total)) - set(listed)
    if len(wanted) == total:
        raise ConfigError(f"{OWNER}: this keeps all {total} blocks; drop at least one.")
    out = {c: [i for i in range(n) if starts[c] + i in wanted] for c, n in sizes.items()}
    for c, local in out.items():
        if not local:
            raise ConfigError(f"{OWNER}: this drops every block of {c} ({sizes[c]}); keep at "
                              "least one block in each container.")  # fmt: skip
    return out


def _containers(model: nn.Module, cfg: ShrinkConfig) -> list[str]:
    found = find_containers(model)
    if cfg.blocks is None:
        if not found:
            raise UnsupportedModuleError(
                f"{OWNER}: {type(model).__name__} has no repeated blocks (ModuleList/Sequential "
                "of one block class) to drop; name them with 'blocks' or use 'width'."
            )
        return found
    holder = dict(model.named_modules()).get(cfg.blocks)
    if not isinstance(holder, (nn.ModuleList, nn.Sequential)) or len(holder) < 2:
        raise ConfigError(
            f"{OWNER}: 'blocks' {cfg.blocks!r} is not a ModuleList/Sequential of 2+ blocks in "
            f"this model; block containers found: {found or 'none'}."
        )
    return [cfg.blocks]


def check_droppable(model: nn.Module, names: list[str], ctx: Context, hf: bool) -> None:
    """Raise before any change unless every block in ``names`` maps its input shape to itself.

    Raises:
        DataError: non-HF blocks and no example inputs to probe them with.
        UnsupportedModuleError: a block changes the shape (stride, projection shortcut) or did
            not run on the example inputs.
    """
    if ctx.example_inputs is None:
        if hf:
            return  # transformer layers map the residual stream to itself
        raise DataError(f"{OWNER} checks block shapes on example inputs; pass data=... or "
                        "example_inputs=...")  # fmt: skip
    shapes = probe_shapes(model, names, ctx.example_inputs)
    for name in names:
        if name not in shapes:
            raise UnsupportedModuleError(f"{name}: did not run on the example inputs, so "
                                         f"{OWNER} cannot check it may be dropped.")  # fmt: skip
        x, y = shapes[name]
        if x != y:
            raise UnsupportedModuleError(
                f"{name}: maps shape {list(x)} to {list(y)} (stride or projection shortcut), "
                f"so {OWNER} cannot drop it; keep it (see 'keep'/'drop')."
            )


def plan_depth(model: nn.Module, cfg: ShrinkConfig, ctx: Context) -> DepthPlan:
    """Validate the depth options against the model and say what stays; changes nothing.

    Raises:
        ConfigError, UnsupportedModuleError, DataError: as :func:`apply_shrink`.
    """
    names = _containers(model, cfg)
    sizes = {n: len(model.get_submodule(n)) for n in names}
    keep = kept_indices(sizes, cfg.keep_every, cfg.keep, cfg.drop)
    hf = {n: is_hf_container(model, n) for n in names}
    config = {n: hf_config_changes(model, keep[n]) if hf[n] else {} for n in names}
    plan = DepthPlan(sizes, keep, config)
    check_droppable(model, plan.dropped(), ctx, all(hf.values()))
    return plan


def narrow(model: nn.Module, cfg: ShrinkConfig, ctx: Context) -> None:
    """Keep ``cfg.width`` of every channel group through ``prune.structured`` (in place)."""
    assert cfg.width is not None
    strict = "targets" in cfg.model_fields_set
    select_modules(model, cfg.targets, cfg.ignore, owner=OWNER, strict_targets=strict)
    picks = {k: getattr(cfg, k) for k in ("targets", "ignore") if k in cfg.model_fields_set}
    structured = StructuredConfig(sparsity=1 - cfg.width, importance=cfg.importance, **picks)
    apply_structured(model, structured, ctx)


@technique(OWNER, ShrinkConfig)
def apply_shrink(model: nn.Module, cfg: ShrinkConfig, ctx: Context) -> nn.Module:
    """Drop repeated blocks (DistilBERT-style) and/or narrow width; the student really shrinks.

    Depth follows Sanh et al. 2019 (DistilBERT: the student keeps one teacher layer out of
    two, with its weights); width is ``prune.structured`` at sparsity ``1 - width``.

    Args:
        model: the model to shrink, in place (the pipeline passes a copy of the teacher).
        cfg: the depth option and/or ``width``.
        ctx: example inputs for the block shape probe (non-HF models) and for tracing.

    Returns:
        The student. Its stage record holds ``layers_before``/``layers_after``,
        ``kept_blocks``, ``dropped_blocks``, ``params_before``/``params_after`` (and the
        ``channels`` kept per group with ``width``).

    Raises:
        ConfigError: bad indices, dropping every block, an unknown ``blocks`` container.
        UnsupportedModuleError: no repeated blocks, or a block that changes the shape.
        DataError: a non-HF model and no example inputs for the shape probe.
    """
    params_before = count_params(model)
    plan = plan_depth(model, cfg, ctx) if cfg.drops_blocks else None
    if cfg.width is not None:
        narrow(model, cfg, ctx)
    if plan is not None:
        for name, keep in plan.keep.items():
            drop_blocks(model, name, keep, plan.config[name])
        ctx.report("layers_before", sum(plan.containers.values()))
        ctx.report("layers_after", sum(len(k) for k in plan.keep.values()))
        ctx.report("kept_blocks", plan.keep)
        ctx.report("dropped_blocks", plan.dropped())
    ctx.report("params_before", params_before)
    ctx.report("params_after", count_params(model))
    return model
