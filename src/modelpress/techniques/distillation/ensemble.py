"""Several trained models as one teacher: the mean of their logits.

Hinton, Vinyals & Dean (2015) distil an ensemble into one network; :func:`modelpress.compress`
takes ``teacher=[m1, m2, ...]`` and wraps the list in a :class:`LogitEnsemble`. Averaging
logits makes the ensemble's softmax at any temperature ``T`` the renormalised geometric mean
of the members' softmaxes at ``T`` (``softmax(mean_i z_i / T) ∝ prod_i softmax(z_i / T)^(1/K)``),
so one set of averaged logits serves ``distill.kd`` at every temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.techniques.distillation.teacher import output_tensor


class LogitEnsemble(nn.Module):
    """Members run on the same inputs; the output is the mean of their logits.

    A member's logits are what distillation takes from any teacher (``output_tensor``:
    ``.logits``, else ``.last_hidden_state``, else the tensor), so an ensemble of encoders
    averages their hidden states; all members' outputs must have one shape. Member ``i``'s
    modules are named ``members.i.<name>``, so hint distillation can pair layers with one
    member.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The mean over members of ``member(*args, **kwargs)``'s logits."""
        logits = [
            output_tensor(member(*args, **kwargs), f"ensemble teacher member {i}")
            for i, member in enumerate(self.members)
        ]
        shapes = {tuple(z.shape) for z in logits}
        if len(shapes) > 1:
            raise UnsupportedModuleError(
                f"ensemble teacher: its members return logits of different shapes "
                f"{sorted(shapes)}; give members with one output shape."
            )
        return torch.stack(logits).mean(dim=0)


def as_teacher(teacher: nn.Module | Sequence[nn.Module] | None) -> nn.Module | None:
    """``teacher`` itself, or a :class:`LogitEnsemble` of it when it is a list or tuple.

    The members are not changed: distillation runs the teacher frozen, in eval mode, and
    restores every training flag afterwards.

    Raises:
        ConfigError: an empty sequence, or an item that is not an ``nn.Module``.
    """
    if teacher is None or isinstance(teacher, nn.Module):
        return teacher
    if not isinstance(teacher, (list, tuple)) or not teacher:
        what = "an empty list" if isinstance(teacher, (list, tuple)) else type(teacher).__name__
        raise ConfigError(
            f"teacher= got {what}; pass a model or a non-empty list of models (an ensemble)."
        )
    for i, member in enumerate(teacher):
        if not isinstance(member, nn.Module):
            raise ConfigError(
                f"teacher=[...] item {i} is a {type(member).__name__}, not an nn.Module; "
                "pass trained models."
            )
    return LogitEnsemble(teacher)
