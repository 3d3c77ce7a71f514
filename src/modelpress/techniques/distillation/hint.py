"""``distill.hint``: feature ("hint") distillation (FitNets, Romero et al. 2015) and embedding
distillation for encoders.

During the next ``train`` stage each named pair ``student module -> teacher module`` adds

    weight * D(r(f_s(x)), f_t(x))

where ``f`` is a module's output (captured with a forward hook), ``D`` is the mean squared
error or ``1 - cosine`` along the feature dimension, and ``r`` is FitNets' learned regressor
when the widths differ: a ``Linear`` on the last dimension for ``(B, ..., C)`` features, a
1x1 ``Conv2d`` for ``(B, C, H, W)``. With ``embedding`` set, the same loss compares the
student's and teacher's pooled outputs (``mean``: the attention-mask-weighted mean of
``last_hidden_state``, sentence-transformers' pooling; ``cls``: the first token; ``output``:
the model output as it is), so a sentence encoder distils from unlabeled text. The task loss
is scaled by ``task_weight`` (0: not computed, unlabeled batches train).

The regressors are trained with the student (added to the optimizer when training starts,
seeded initialisation) and thrown away afterwards: the artifact holds only the student.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from modelpress.config import TechniqueConfig
from modelpress.context import Batch, Context
from modelpress.errors import UnsupportedModuleError
from modelpress.registry import technique
from modelpress.techniques.distillation.teacher import (
    DistillCallback,
    Taps,
    attention_mask_of,
    find_modules,
    output_tensor,
    probe_inputs,
    resolve_teacher,
    run_frozen,
    teacher_field,
)
from modelpress.train import TrainState

OWNER = "distill.hint"
EMBEDDING = "embedding"  # the key of the pooled-output term among the pairs


class HintConfig(TechniqueConfig):
    """Match intermediate features (FitNets hints) and/or pooled embeddings to the teacher's."""

    pairs: dict[str, str] = Field(
        default_factory=dict, description="Student module name -> teacher module name."
    )
    loss: Literal["mse", "cosine"] = Field("mse", description="Distance: MSE or 1 - cosine.")
    weight: float = Field(1.0, gt=0, le=1000, description="Weight of the hint/embedding loss.")
    task_weight: float = Field(
        1.0, ge=0, le=1000, description="Weight of the task loss (0: no labels needed)."
    )
    embedding: Literal["none", "mean", "cls", "output"] = Field(
        "none", description="Also match pooled outputs: none, mean, cls (first token), output."
    )
    teacher: str | None = teacher_field()

    @model_validator(mode="after")
    def _asks_for_something(self) -> HintConfig:
        if not self.pairs and self.embedding == "none":
            raise ValueError(
                "nothing to distil: give 'pairs' (student module: teacher module) or set "
                "'embedding' (mean, cls or output)"
            )
        if any(not s or not t for s, t in self.pairs.items()):
            raise ValueError("'pairs' must map non-empty module names to module names")
        return self


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence-transformers' mean pooling: ``sum_t m_t h_t / sum_t m_t``.

    Args:
        hidden: ``(B, T, C)`` token states.
        mask: ``(B, T)`` attention mask (1 = token, 0 = padding); None averages every token.

    Returns:
        ``(B, C)`` sentence embeddings.
    """
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FitNets' hint loss: ``mean (s - t)^2`` or ``mean (1 - cos(s, t))``.

    The feature dimension is 1 for ``(B, C, H, W)`` maps and the last one otherwise; the
    cosine is taken along it, the squared error is averaged over it. Positions are averaged,
    over the ``(B, T)`` positions ``mask`` keeps when given for ``(B, T, C)`` features.

    Args:
        student: the (adapted) student features, same shape as ``teacher``.
        teacher: the teacher features.
        kind: ``"mse"`` or ``"cosine"``.
        mask: optional ``(B, T)`` mask for ``(B, T, C)`` features.

    Returns:
        The scalar loss.
    """
    dim = 1 if student.dim() == 4 else -1
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        per_position = 1.0 - F.cosine_similarity(s, t, dim=dim)
    else:
        per_position = (s - t).pow(2).mean(dim)
    if mask is not None and per_position.shape == mask.shape:
        keep = mask.to(per_position.dtype)
        return (per_position * keep).sum() / keep.sum().clamp_min(1.0)
    return per_position.mean()


def pooled(outputs: Any, how: str, mask: torch.Tensor | None) -> torch.Tensor:
    """The embedding ``how`` pools from a model's outputs (``mean``, ``cls`` or ``output``).

    Raises:
        UnsupportedModuleError: ``mean``/``cls`` on outputs that are not ``(B, T, C)``.
    """
    if how == "output":
        return output_tensor(outputs, OWNER)
    hidden = getattr(outputs, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        hidden = output_tensor(outputs, OWNER)
    if hidden.dim() != 3:
        raise UnsupportedModuleError(
            f"{OWNER}: embedding {how!r} pools (batch, tokens, width) hidden states, but the "
            f"model returns shape {tuple(hidden.shape)}; use embedding: output."
        )
    if how == "cls":
        return hidden[:, 0]
    return mean_pool(hidden, mask if mask is not None and mask.shape == hidden.shape[:2] else None)


def make_adapter(
    student_shape: torch.Size, teacher_shape: torch.Size, what: str, seed: int
) -> nn.Module | None:
    """FitNets' regressor from student to teacher features: None when the shapes match, a
    1x1 ``Conv2d`` for ``(B, C, H, W)`` maps, else a ``Linear`` on the last dimension.

    Raises:
        UnsupportedModuleError: the shapes differ in more than the feature width; names both.
    """
    if student_shape == teacher_shape:
        return None
    channel = 1 if len(student_shape) == 4 else -1
    rest_s = list(student_shape)
    rest_t = list(teacher_shape)
    if len(rest_s) != len(rest_t) or len(rest_s) < 2:
        rest_s, rest_t = [0], [1]  # force the error below
    else:
        del rest_s[channel], rest_t[channel]
    if rest_s != rest_t:
        raise UnsupportedModuleError(
            f"{OWNER}: {what}: student shape {tuple(student_shape)} and teacher shape "
            f"{tuple(teacher_shape)} differ beyond the feature width; pick layers whose outputs "
            "match except in width."
        )
    c_s, c_t = int(student_shape[channel]), int(teacher_shape[channel])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Conv2d(c_s, c_t, 1) if channel == 1 else nn.Linear(c_s, c_t)


class HintDistillation(DistillCallback):
    """Adds the hint and embedding losses; trains the adapters alongside the student."""

    key = "hint_loss"

    def __init__(
        self,
        teacher: nn.Module,
        cfg: HintConfig,
        ctx: Context,
        student_taps: Taps,
        teacher_modules: dict[str, nn.Module],
        adapters: dict[str, nn.Module],
    ) -> None:
        super().__init__(teacher, ctx, weight=cfg.weight, task_weight=cfg.task_weight)
        self.cfg, self.taps, self.teacher_modules = cfg, student_taps, teacher_modules
        self.adapters = nn.ModuleDict({_key(k): m for k, m in adapters.items()})

    def on_train_begin(self, state: TrainState) -> None:
        """Hook the student's modules; add the adapters' parameters to the optimizer."""
        super().on_train_begin(state)
        self.taps.attach()
        params = list(self.adapters.parameters())
        if params:
            state.optimizer.add_param_group({"params": params})

    def _adapt(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        key = _key(name)
        return self.adapters[key](tensor) if key in self.adapters else tensor

    def distill_loss(self, batch: Batch, outputs: Any) -> torch.Tensor:
        """The sum of the pairs' hint losses and the embedding loss on ``batch``."""
        t_out, t_feats = self.run_teacher(batch)
        mask = attention_mask_of(batch)
        total = torch.zeros(())
        for s_name, t_name in self.cfg.pairs.items():
            s_feat = self._adapt(s_name, self.taps.values[s_name])
            total = total + feature_loss(s_feat, t_feats[t_name], self.cfg.loss, mask)
        if self.cfg.embedding != "none":
            s_emb = self._adapt(EMBEDDING, pooled(outputs, self.cfg.embedding, mask))
            t_emb = pooled(t_out, self.cfg.embedding, mask)
            total = total + feature_loss(s_emb, t_emb, self.cfg.loss)
        return total

    def on_train_end(self, state: TrainState) -> None:
        """Unhook the student and report the loss."""
        self.taps.detach()
        super().on_train_end(state)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


def _adapters(
    model: nn.Module, teacher: nn.Module, cfg: HintConfig, ctx: Context, taps: Taps
) -> dict[str, nn.Module]:
    """Probe both models on the example inputs and build an adapter where widths differ."""
    inputs = probe_inputs(ctx)
    teacher_modules = find_modules(teacher, cfg.pairs.values(), "teacher", OWNER)
    s_out, s_feats = run_frozen(model, inputs, taps.modules)
    t_out, t_feats = run_frozen(teacher, inputs, teacher_modules)
    seed = int(ctx.generator(offset=11).initial_seed())
    found: dict[str, nn.Module] = {}
    for i, (s_name, t_name) in enumerate(cfg.pairs.items()):
        for name, feats in ((s_name, s_feats), (t_name, t_feats)):
            if name not in feats:
                raise UnsupportedModuleError(
                    f"{OWNER}: module {name!r} produced no tensor output on the example inputs."
                )
        what = f"pair {s_name!r} -> {t_name!r}"
        adapter = make_adapter(s_feats[s_name].shape, t_feats[t_name].shape, what, seed + i)
        if adapter is not None:
            found[s_name] = adapter
    if cfg.embedding != "none":
        mask = attention_mask_of(inputs)
        s_emb, t_emb = pooled(s_out, cfg.embedding, mask), pooled(t_out, cfg.embedding, mask)
        what = f"embedding {cfg.embedding!r}"
        adapter = make_adapter(s_emb.shape, t_emb.shape, what, seed + len(cfg.pairs))
        if adapter is not None:
            found[EMBEDDING] = adapter
    return found


@technique(OWNER, HintConfig, needs=("later_train",))
def apply_hint(model: nn.Module, cfg: HintConfig, ctx: Context) -> nn.Module:
    """Match named features (FitNets) and/or pooled embeddings to the teacher's during training.

    Romero et al. 2015's hints with learned regressors; embedding distillation for encoders.

    Raises:
        ConfigError: no teacher or a teacher spec that cannot be loaded.
        NoMatchingModulesError: a student or teacher module name does not exist.
        UnsupportedModuleError: paired outputs differ beyond their width, or ``mean``/``cls``
            pooling on a model without ``(B, T, C)`` hidden states.
    """
    teacher = resolve_teacher(cfg.teacher, model, ctx, OWNER)
    taps = Taps(find_modules(model, cfg.pairs.keys(), "student", OWNER))
    teacher_modules = find_modules(teacher, cfg.pairs.values(), "teacher", OWNER)
    adapters = _adapters(model, teacher, cfg, ctx, taps)
    ctx.callbacks.append(HintDistillation(teacher, cfg, ctx, taps, teacher_modules, adapters))
    return model
