"""The rank rule every ``lowrank.*`` technique shares: one rule at a time, ranks rounded up."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from modelpress.config import TargetedConfig


class RankRuleConfig(TargetedConfig):
    """A config holding several optional rank rules (``rank``, ``rank_ratio``, a budget, ...),
    of which at most one may be set; :attr:`rule` names the one in force.

    Subclasses declare the rule fields (their meaning differs per technique) and set
    ``RULES`` (the field names, in precedence order) and ``DEFAULT_RULE`` (the rule used when
    none is set).
    """

    RULES: ClassVar[tuple[str, ...]] = ()
    DEFAULT_RULE: ClassVar[tuple[str, float]] = ("", 0.0)

    round_to: int = Field(1, ge=1, le=1024, description="Round ranks up to a multiple of this.")

    @model_validator(mode="after")
    def _one_rule(self) -> RankRuleConfig:
        given = [k for k in self.RULES if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set one rank rule, not {' and '.join(map(repr, given))}")
        return self

    @property
    def rule(self) -> tuple[str, float]:
        """The rank rule in force and its value (``DEFAULT_RULE`` when none is set)."""
        for key in self.RULES:
            value = getattr(self, key)
            if value is not None:
                return key, value
        return self.DEFAULT_RULE


class ConvRankConfig(RankRuleConfig):
    """The fields ``lowrank.tucker`` and ``lowrank.cp`` share: Conv2d targets and the budgets."""

    targets: list[str] = Field(
        default_factory=lambda: ["Conv2d"],
        description="Convs to factorize: exact names, type names (Conv2d) or 're:' regexes.",
    )
    params_ratio: float | None = Field(
        None, gt=0, lt=1, description="Budget: keep this fraction of the convs' weights."
    )
    flops_ratio: float | None = Field(
        None, gt=0, lt=1, description="Budget: keep this fraction of the convs' FLOPs."
    )


def round_rank(rank: int, round_to: int, cap: int | None = None) -> int:
    """``rank`` (at least 1) rounded up to a multiple of ``round_to``, at most ``cap``."""
    r = -(-max(rank, 1) // round_to) * round_to
    return min(r, cap) if cap is not None else r
