"""``distill.kd``: soft-target knowledge distillation (Hinton, Vinyals & Dean 2015).

During the next ``train`` stage the student learns from the teacher's softened outputs:

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * task_loss

``T`` (``temperature``) softens both distributions so the small logits of wrong classes carry
information ("dark knowledge"); the ``T^2`` factor keeps the soft term's gradients on the
scale of the hard-label term's as ``T`` changes (section 2 of the paper). With ``alpha == 1``
the task loss is not computed, so unlabeled data trains. For sequence logits ``(B, T, V)``
(causal language models) the KL is averaged over the tokens the batch's ``attention_mask``
keeps. The stage changes no weights itself; the ``train`` stage after it does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from modelpress.config import TechniqueConfig
from modelpress.context import Batch, Context
from modelpress.errors import DataError
from modelpress.registry import technique
from modelpress.techniques.distillation.teacher import (
    DistillCallback,
    attention_mask_of,
    check_same_shape,
    output_tensor,
    probe_inputs,
    resolve_teacher,
    run_frozen,
    teacher_field,
)

OWNER = "distill.kd"


class KDConfig(TechniqueConfig):
    """Soft-target distillation from the teacher's logits at a temperature (Hinton et al.)."""

    temperature: float = Field(4.0, gt=0, le=100, description="Softmax temperature T.")
    alpha: float = Field(
        0.9, gt=0, le=1, description="Weight of the soft-target term (1: no labels needed)."
    )
    teacher: str | None = teacher_field()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton et al.'s soft-target loss ``T^2 * KL(softmax(t / T) || softmax(s / T))``.

    The KL is summed over the last (class) dimension and averaged over every other position:
    the samples of ``(B, C)`` logits, the tokens of ``(B, T, V)`` logits — only those where
    ``mask`` is true when a mask of the leading shape is given.

    Args:
        student_logits: ``(..., C)`` student logits (gradients flow through these).
        teacher_logits: ``(..., C)`` teacher logits, same shape.
        temperature: ``T > 0``.
        mask: optional ``(...)`` bools or 0/1 marking the positions to average over.

    Returns:
        The scalar loss.

    Raises:
        DataError: the shapes differ, or the mask does not match the leading shape.
    """
    if student_logits.shape != teacher_logits.shape:
        raise DataError(
            f"{OWNER}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape."
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (...)
    scale = temperature * temperature
    if mask is None:
        return scale * kl.mean()
    if mask.shape != kl.shape:
        raise DataError(
            f"{OWNER}: mask shape {tuple(mask.shape)} does not match the logits' leading "
            f"shape {tuple(kl.shape)}."
        )
    keep = mask.to(kl.dtype)
    return scale * (kl * keep).sum() / keep.sum().clamp_min(1.0)


class KnowledgeDistillation(DistillCallback):
    """Adds ``alpha * kd_loss`` and scales the task loss by ``1 - alpha``."""

    key = "kd_loss"

    def __init__(self, teacher: nn.Module, cfg: KDConfig, ctx: Context) -> None:
        super().__init__(teacher, ctx, weight=cfg.alpha, task_weight=1.0 - cfg.alpha)
        self.temperature = cfg.temperature

    def distill_loss(self, batch: Batch, outputs: Any) -> torch.Tensor:
        """``kd_loss`` between the student's and the frozen teacher's logits on ``batch``."""
        student = output_tensor(outputs, OWNER)
        teacher = output_tensor(self.run_teacher(batch)[0], OWNER)
        mask = attention_mask_of(batch) if student.dim() == 3 else None
        if mask is not None and mask.shape != student.shape[:2]:
            mask = None
        return kd_loss(student, teacher, self.temperature, mask)


@technique(OWNER, KDConfig, needs=("later_train",))
def apply_kd(model: nn.Module, cfg: KDConfig, ctx: Context) -> nn.Module:
    """Distil the teacher's softened logits (Hinton et al. 2015) during the next train stage.

    Raises:
        ConfigError: no teacher, a teacher spec that cannot be loaded, or teacher and student
            outputs of different shapes (checked on the example inputs before training).
    """
    teacher = resolve_teacher(cfg.teacher, model, ctx, OWNER)
    inputs = probe_inputs(ctx)
    student_out = output_tensor(run_frozen(model, inputs)[0], OWNER)
    teacher_out = output_tensor(run_frozen(teacher, inputs)[0], OWNER)
    check_same_shape(
        student_out, teacher_out, "outputs", OWNER, "distill.kd needs logits over the same classes"
    )
    ctx.callbacks.append(KnowledgeDistillation(teacher, cfg, ctx))
    return model
