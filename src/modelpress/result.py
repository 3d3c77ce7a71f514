"""The outcome of :func:`modelpress.compress`: the model, and what each stage did and measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from modelpress.recipe import Recipe
from modelpress.report.tables import metrics_table, render


@dataclass
class StageRecord:
    """One stage's outcome: its config, what it learned, and metrics measured after it."""

    technique: str
    config: dict[str, Any]
    learned: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the artifact manifest; the config is in the recipe)."""
        return {
            "technique": self.technique,
            "learned": self.learned,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Result:
    """The compressed model, the recipe, baseline metrics and one record per stage."""

    model: nn.Module
    recipe: Recipe
    baseline: dict[str, Any]
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        """Metrics after the last stage."""
        return self.stages[-1].metrics if self.stages else self.baseline

    def rich_table(self) -> Table:
        """Baseline vs each stage as a rich table (for a console that sizes it)."""
        rows = [("baseline", self.baseline)]
        rows += [(f"{i}. {s.technique}", s.metrics) for i, s in enumerate(self.stages, 1)]
        return metrics_table(rows, title=f"recipe {self.recipe.name}")

    def table(self) -> str:
        """Baseline vs each stage (accuracy, params, nonzeros, FLOPs, bytes, ratio, latency)."""
        return render(self.rich_table())

    def to_dict(self) -> dict[str, Any]:
        """Manifest entries: recipe, baseline and final metrics, stages."""
        return {
            "recipe": self.recipe.to_dict(),
            "metrics": {"baseline": self.baseline, "final": self.final},
            "stages": [s.to_dict() for s in self.stages],
        }

    def save(self, path: str | Path) -> Path:
        """Write the artifact (real packed bytes) with the recipe and metrics embedded.

        The last stage's ``bytes`` becomes the size of the directory actually written, the
        recorded metrics included (rewritten until the recorded number is the true one).
        """
        from modelpress.artifact import save_artifact
        from modelpress.artifact.save import encode_model
        from modelpress.measure import directory_bytes

        encoded = encode_model(self.model)  # the payload is the same on every rewrite
        for _ in range(4):
            saved = save_artifact(self.model, path, extra=self.to_dict(), encoded=encoded)
            size = directory_bytes(saved)
            if not self.stages or self.stages[-1].metrics.get("bytes") == size:
                break
            self.stages[-1].metrics["bytes"] = size
        return saved
