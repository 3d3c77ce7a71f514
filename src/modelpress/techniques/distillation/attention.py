"""``distill.attention``: self-attention relation transfer for transformer students (MiniLM,
Wang et al. 2020; MiniLMv2, Wang et al. 2021).

During the next ``train`` stage the student's last (or a named) attention layer learns the
teacher's self-attention relations. For a pair ``(a, b)`` of the layer's query/key/value
projection outputs (``relations``: ``qk`` — the attention distribution itself — and ``qq``,
``kk``, ``vv``), both are split into ``R`` relation heads of width ``d_r = width / R`` and

    rel_ab = softmax(A_r B_r^T / sqrt(d_r))          # (B, R, T, T), one row per query

    loss = sum over relations of mean over (batch, head, query) of KL(rel_teacher || rel_student)

Because the relations are ``T x T`` whatever the width, student and teacher may differ in
head count and hidden size (MiniLMv2's relation heads; ``relation_heads`` defaults to the
teacher's head count and must divide every projection width used). Padding keys are masked
out of the softmax and padding queries out of the average (the batch's ``attention_mask``);
causal layers (Llama) also mask future keys. Grouped-query layers repeat their key heads as
the model does before ``qk``.

The projections are captured with forward hooks on the ``query/key/value`` (BERT) or
``q_proj/k_proj/v_proj`` (Llama) linears, so for Llama-style models the relations are computed
**before the rotary position embedding** is applied to queries and keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from modelpress.config import TechniqueConfig
from modelpress.context import Batch, Context
from modelpress.errors import ConfigError, UnsupportedModuleError
from modelpress.registry import technique
from modelpress.techniques.distillation.teacher import (
    DistillCallback,
    Taps,
    attention_mask_of,
    find_modules,
    probe_inputs,
    resolve_teacher,
    run_frozen,
    teacher_field,
)
from modelpress.techniques.pruning.structured.transformer import attention_groups
from modelpress.train import TrainState

OWNER = "distill.attention"
Relation = Literal["qk", "qq", "kk", "vv"]


class AttentionConfig(TechniqueConfig):
    """Transfer last-layer self-attention relations to the student (MiniLM / MiniLMv2)."""

    student_layer: str | None = Field(
        None, description="Student attention module (default: its last one)."
    )
    teacher_layer: str | None = Field(
        None, description="Teacher attention module (default: its last one)."
    )
    relations: list[Relation] = Field(
        default_factory=lambda: ["qk", "vv"],
        description="Relations to transfer: qk (attention), qq, kk, vv (value relation).",
    )
    relation_heads: int | None = Field(
        None, ge=1, le=1024, description="Relation heads (default: the teacher's head count)."
    )
    weight: float = Field(1.0, gt=0, le=1000, description="Weight of the relation loss.")
    task_weight: float = Field(
        1.0, ge=0, le=1000, description="Weight of the task loss (0: no labels needed)."
    )
    teacher: str | None = teacher_field()

    @model_validator(mode="after")
    def _relations(self) -> AttentionConfig:
        if not self.relations:
            raise ValueError("'relations' is empty; use some of qk, qq, kk, vv")
        if len(set(self.relations)) != len(self.relations):
            raise ValueError(f"'relations' repeats an entry: {self.relations}")
        return self


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module: its q/k/v projection names, head count, key-head repeat, mask."""

    name: str
    projections: tuple[str, str, str]  # q, k, v module names
    heads: int
    kv_repeat: int
    causal: bool


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The model's attention modules in the BERT (``*.attention.self.{query,key,value}``) or
    Llama (``*.self_attn.{q,k,v}_proj``) layout, in module order."""
    modules = dict(model.named_modules())
    found = []
    for group, owner in attention_groups(model):
        q, k, v = (m.module for m in group.members[:3])
        module = modules[owner]
        if hasattr(module, "attention_head_size"):
            head_dim = int(module.attention_head_size)
        else:
            head_dim = int(module.head_dim)
        heads = modules[q].out_features // head_dim
        repeat = int(getattr(module, "num_key_value_groups", 1))
        causal = bool(getattr(module, "is_causal", False))
        found.append(AttentionLayer(owner, (q, k, v), heads, repeat, causal))
    return found


def pick_layer(model: nn.Module, name: str | None, role: str) -> AttentionLayer:
    """The attention layer called ``name``, or the model's last one.

    Raises:
        NoMatchingModulesError: ``name`` is not a module of the model.
        UnsupportedModuleError: ``name`` is not an attention module, or there is none.
    """
    layers = attention_layers(model)
    if name is not None:
        find_modules(model, [name], role, OWNER)
        for layer in layers:
            if layer.name == name:
                return layer
        known = ", ".join(layer.name for layer in layers) or "none"
        raise UnsupportedModuleError(
            f"{OWNER}: {role} module {name!r} is not a self-attention module with "
            f"query/key/value or q_proj/k_proj/v_proj projections; attention modules: {known}."
        )
    if not layers:
        raise UnsupportedModuleError(
            f"{OWNER}: the {role} has no self-attention module in the BERT "
            "(*.attention.self.query/key/value) or Llama (*.self_attn.q_proj/k_proj/v_proj) "
            "layout."
        )
    return layers[-1]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, T, W)`` -> ``(B, heads, T, W / heads)``."""
    b, t, w = x.shape
    return x.reshape(b, t, heads, w // heads).transpose(1, 2)


def repeat_kv(x: torch.Tensor, repeat: int, heads: int) -> torch.Tensor:
    """Grouped-query keys ``(B, T, kv_heads * d)`` -> ``(B, T, kv_heads * repeat * d)``, each
    key head repeated for the ``repeat`` query heads that share it (as the model does)."""
    if repeat == 1:
        return x
    b, t, w = x.shape
    kv_heads = heads // repeat
    per_head = x.reshape(b, t, kv_heads, w // kv_heads)
    return per_head.repeat_interleave(repeat, dim=2).reshape(b, t, w * repeat)


def relation_log_probs(
    a: torch.Tensor,
    b: torch.Tensor,
    heads: int,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """MiniLMv2's relation ``log softmax(A_r B_r^T / sqrt(d_r))`` per relation head.

    Args:
        a: ``(B, T, W)`` e.g. queries.
        b: ``(B, T, W)`` e.g. keys.
        heads: relation heads ``R`` (must divide ``W``).
        key_mask: ``(B, T)`` bools, False for padding keys (excluded from the softmax).
        causal: also exclude keys after the query.

    Returns:
        ``(B, R, T, T)`` log-probabilities over keys (excluded keys hold a huge negative).
    """
    a_r, b_r = split_heads(a.float(), heads), split_heads(b.float(), heads)  # (B, R, T, d_r)
    scores = a_r @ b_r.transpose(-1, -2) / math.sqrt(a_r.shape[-1])  # (B, R, T, T)
    allowed = _allowed(scores.shape[0], scores.shape[-1], key_mask, causal)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def _allowed(
    batch: int, length: int, key_mask: torch.Tensor | None, causal: bool
) -> torch.Tensor | None:
    """``(B, 1, T, T)`` bools: which (query, key) pairs enter the softmax, or None for all."""
    allowed = None
    if key_mask is not None:
        allowed = key_mask.bool()[:, None, None, :].expand(batch, 1, length, length)
    if causal:
        lower = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        allowed = lower if allowed is None else allowed & lower
    return allowed


def relation_kl(
    teacher_log_p: torch.Tensor,
    student_log_p: torch.Tensor,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(teacher || student)`` over keys, averaged over batch, heads and kept queries.

    Args:
        teacher_log_p: ``(B, R, T, T)`` from :func:`relation_log_probs`.
        student_log_p: the same for the student.
        query_mask: ``(B, T)`` bools, False for padding queries (left out of the average).

    Returns:
        The scalar loss (0 when the relations are equal).
    """
    p_t = teacher_log_p.exp()
    terms = torch.where(p_t > 0, p_t * (teacher_log_p - student_log_p), 0.0)
    kl = terms.sum(-1)  # (B, R, T)
    if query_mask is None:
        return kl.mean()
    keep = query_mask.to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * keep).sum() / keep.sum().clamp_min(1.0)


def relations_loss(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    layers: tuple[AttentionLayer, AttentionLayer],
    relations: list[str],
    heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sum over ``relations`` of :func:`relation_kl` between the teacher's and the
    student's relations of their ``q``/``k``/``v`` projection outputs (dicts keyed by letter)."""
    total = torch.zeros(())
    for rel in relations:
        log_p = []
        for proj, layer in zip((student, teacher), layers, strict=True):
            a, b = proj[rel[0]], proj[rel[1]]
            if rel == "qk":
                b = repeat_kv(b, layer.kv_repeat, layer.heads)
            log_p.append(relation_log_probs(a, b, heads, mask, layer.causal))
        total = total + relation_kl(log_p[1], log_p[0], mask)
    return total


def _widths(model: nn.Module, layer: AttentionLayer, relations: list[str]) -> dict[str, int]:
    """The projection widths the relations use (``qk`` uses the query width)."""
    modules = dict(model.named_modules())
    widths = {
        c: int(modules[n].out_features) for c, n in zip("qkv", layer.projections, strict=True)
    }
    used = {rel[0] for rel in relations}  # qq, kk, vv use their own; qk the (repeated) query's
    return {c: widths[c] for c in sorted(used)}


def check_heads(heads: int, widths: dict[str, dict[str, int]]) -> None:
    """Every projection width the relations use must split into ``heads`` relation heads.

    Raises:
        ConfigError: a width is not divisible; the message names the model and projection.
    """
    for role, by_proj in widths.items():
        for proj, width in by_proj.items():
            if width % heads:
                raise ConfigError(
                    f"{OWNER}: relation_heads={heads} does not divide the {role}'s {proj} "
                    f"projection width {width}; set 'relation_heads' to a common divisor of the "
                    f"widths {sorted({w for d in widths.values() for w in d.values()})}."
                )


class AttentionDistillation(DistillCallback):
    """Adds the relation loss of the chosen student and teacher attention layers."""

    key = "attention_loss"

    def __init__(
        self,
        teacher: nn.Module,
        cfg: AttentionConfig,
        ctx: Context,
        layers: tuple[AttentionLayer, AttentionLayer],
        student_taps: Taps,
        teacher_modules: dict[str, nn.Module],
        heads: int,
    ) -> None:
        super().__init__(teacher, ctx, weight=cfg.weight, task_weight=cfg.task_weight)
        self.relations, self.layers, self.heads = list(cfg.relations), layers, heads
        self.taps, self.teacher_modules = student_taps, teacher_modules

    def on_train_begin(self, state: TrainState) -> None:
        """Hook the student's projections."""
        super().on_train_begin(state)
        self.taps.attach()

    def distill_loss(self, batch: Batch, outputs: Any) -> torch.Tensor:
        """The relation loss on ``batch``."""
        _, t_feats = self.run_teacher(batch)
        student = dict(
            zip("qkv", (self.taps.values[n] for n in self.layers[0].projections), strict=True)
        )
        teacher = dict(zip("qkv", (t_feats[n] for n in self.layers[1].projections), strict=True))
        mask = attention_mask_of(batch)
        if mask is not None and mask.shape != student["q"].shape[:2]:
            mask = None
        return relations_loss(student, teacher, self.layers, self.relations, self.heads, mask)

    def on_train_end(self, state: TrainState) -> None:
        """Unhook the student and report the loss."""
        self.taps.detach()
        super().on_train_end(state)


def _check_lengths(model: nn.Module, teacher: nn.Module, layers: Any, ctx: Context) -> None:
    """Both layers must see the same number of tokens (one tokenizer) on the example inputs."""
    inputs = probe_inputs(ctx)
    s_mods = find_modules(model, layers[0].projections[:1], "student", OWNER)
    t_mods = find_modules(teacher, layers[1].projections[:1], "teacher", OWNER)
    s = run_frozen(model, inputs, s_mods)[1][layers[0].projections[0]]
    t = run_frozen(teacher, inputs, t_mods)[1][layers[1].projections[0]]
    if s.dim() != 3 or s.shape[:2] != t.shape[:2]:
        raise ConfigError(
            f"{OWNER}: the student's queries have shape {tuple(s.shape)} and the teacher's "
            f"{tuple(t.shape)}; relations need (batch, tokens, width) with the same tokens "
            "(one tokenizer)."
        )


@technique(OWNER, AttentionConfig, needs=("later_train",))
def apply_attention(model: nn.Module, cfg: AttentionConfig, ctx: Context) -> nn.Module:
    """Transfer the teacher's self-attention relations (MiniLM) during the next train stage.

    Wang et al. 2020 (attention and value relations) and 2021 (relation heads).

    Raises:
        ConfigError: no teacher, relation heads that do not divide a width, or student and
            teacher that see different token counts.
        NoMatchingModulesError: ``student_layer``/``teacher_layer`` is not a module.
        UnsupportedModuleError: the layer is not a self-attention module (or there is none).
    """
    teacher = resolve_teacher(cfg.teacher, model, ctx, OWNER)
    layers = (
        pick_layer(model, cfg.student_layer, "student"),
        pick_layer(teacher, cfg.teacher_layer, "teacher"),
    )
    heads = cfg.relation_heads or layers[1].heads
    check_heads(
        heads,
        {
            "student": _widths(model, layers[0], cfg.relations),
            "teacher": _widths(teacher, layers[1], cfg.relations),
        },
    )
    _check_lengths(model, teacher, layers, ctx)
    taps = Taps(find_modules(model, layers[0].projections, "student", OWNER))
    t_mods = find_modules(teacher, layers[1].projections, "teacher", OWNER)
    ctx.callbacks.append(AttentionDistillation(teacher, cfg, ctx, layers, taps, t_mods, heads))
    return model
