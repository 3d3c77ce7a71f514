"""``modelpress bench DIR``: torch fp32 of the uncompressed model vs the compressed model on
onnxruntime, measured in the same run, on the same inputs, with the same threads.

Rows (speedups are against the first):

1. torch eager, uncompressed fp32: the model rebuilt from the artifact's source without its
   edits or weights (latency does not depend on the values of dense weights);
2. torch eager, compressed: ``modelpress.load(DIR)`` (weights decoded to float; activation
   quantizers, if any, still fake-quantize in torch);
3. onnxruntime, uncompressed fp32: row 1 exported with ``mode="fp32"``;
4. onnxruntime, compressed: the artifact exported with ``mode="quant"`` (integer ops).

Every latency is :func:`~modelpress.measure.measure_latency`: warm-up, then the median of
``runs`` timed calls, torch intra-op threads and onnxruntime intra-op threads both fixed to
``threads``.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from modelpress.artifact import read_manifest
from modelpress.errors import ArtifactError, ConfigError
from modelpress.measure import measure_latency
from modelpress.models import ModelSource, build_from_source
from modelpress.parametrizations import baked_copy
from modelpress.runtime.artifact import load_quantized
from modelpress.runtime.export import export_onnx
from modelpress.runtime.session import OrtModule
from modelpress.techniques.early_exit.model import EarlyExitModel

Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class BenchRow:
    """One measured configuration."""

    name: str
    runtime: str  # "torch" or "onnxruntime"
    median_ms: float
    p10_ms: float
    p90_ms: float
    speedup: float  # torch fp32 median / this median
    onnx_bytes: int | None = None


@dataclass
class BenchReport:
    """Everything ``modelpress bench`` measured."""

    artifact: str
    threads: int
    runs: int
    inputs: dict[str, list[int]]
    rows: list[BenchRow] = field(default_factory=list)
    onnx_layers: dict[str, str] = field(default_factory=dict)
    # early-exit models: the share of the input batch that left at an exit (its latency
    # depends on the data; seeded random inputs seldom look like the data the exits know)
    left_early: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def example_inputs(
    source: ModelSource,
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> Inputs:
    """One seeded batch for ``model``: token ids and mask for ``hf:`` models, else a float
    tensor of ``input_shape`` (given, recorded in the source, or ``(in_features,)`` of a first
    Linear).

    Raises:
        ConfigError: the input shape cannot be told; pass ``input_shape``.
    """
    gen = torch.Generator().manual_seed(seed)
    config = source.kwargs.get("config") if source.spec.startswith("hf:") else None
    if config and input_shape is None:
        vocab = int(config.get("vocab_size", 2))
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    shape = input_shape or source.kwargs.get("input_shape") or _first_linear_width(model)
    if not shape:
        raise ConfigError(
            f"cannot tell the input shape of {source.spec}; pass it, e.g. --input-shape 3,32,32."
        )
    return torch.randn(batch_size, *[int(d) for d in shape], generator=gen)


def artifact_inputs(
    path: str | Path,
    *,
    batch_size: int,
    seq_len: int,
    input_shape: tuple[int, ...] | None = None,
) -> tuple[nn.Module, nn.Module, Inputs]:
    """The artifact at ``path`` loaded with its integer grids (for export), the uncompressed
    model rebuilt from its source, and one seeded batch of :func:`example_inputs` for them.

    Raises:
        ArtifactError: a bad artifact, or one that records no model source.
        ConfigError: the input shape cannot be told; pass ``input_shape``.
    """
    manifest = read_manifest(path)
    if not manifest.get("source"):
        raise ArtifactError(f"{path} records no model source, so the model cannot be "
                            "rebuilt.")  # fmt: skip
    compressed = load_quantized(path).eval()
    source = ModelSource.from_dict(manifest["source"])
    uncompressed = build_from_source(source).eval()
    inputs = example_inputs(source, uncompressed, batch_size=batch_size, seq_len=seq_len,
                            input_shape=input_shape)  # fmt: skip
    return compressed, uncompressed, inputs


def _first_linear_width(model: nn.Module) -> tuple[int, ...] | None:
    """``(in_features,)`` when the first layer with a weight is a Linear, else None."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if getattr(module, "weight", None) is not None and not list(module.children()):
            return None
    return None


def bench_artifact(
    path: str | Path,
    *,
    batch_size: int = 1,
    seq_len: int = 128,
    threads: int = 1,
    runs: int = 20,
    warmup: int = 3,
    input_shape: tuple[int, ...] | None = None,
) -> BenchReport:
    """Measure the four rows of the module docstring for the artifact at ``path``.

    Args:
        path: an artifact directory.
        batch_size: samples per call.
        seq_len: tokens per sample (token models only).
        threads: intra-op threads of torch and onnxruntime.
        runs: timed calls per row (median reported).
        warmup: untimed calls first.
        input_shape: shape of one sample, for models whose shape the artifact does not tell.

    Returns:
        A :class:`BenchReport`.

    Raises:
        ConfigError: a bad option; ArtifactError: a bad artifact; UnsupportedModuleError: a
            layer the ONNX export cannot express.
    """
    _check_options(batch_size=batch_size, seq_len=seq_len, threads=threads, runs=runs,
                   warmup=warmup)  # fmt: skip
    compressed, baseline, inputs = artifact_inputs(path, batch_size=batch_size, seq_len=seq_len,
                                                   input_shape=input_shape)  # fmt: skip
    shapes = {"input": list(inputs.shape)} if isinstance(inputs, torch.Tensor) else {
        k: list(v.shape) for k, v in inputs.items()}  # fmt: skip
    report = BenchReport(
        str(path), threads, runs, shapes, left_early=_left_early(compressed, inputs)
    )
    with tempfile.TemporaryDirectory(prefix="modelpress-bench-") as tmp:
        fp32 = export_onnx(baseline, inputs, Path(tmp) / "fp32.onnx", mode="fp32")
        quant = export_onnx(compressed, inputs, Path(tmp) / "compressed.onnx", mode="quant")
        report.onnx_layers = quant.layers
        candidates = [
            ("torch fp32 (uncompressed)", baseline, None),
            ("torch eager (compressed)", baked_copy(compressed), None),
            ("onnxruntime fp32 (uncompressed)", OrtModule(fp32.path, threads=threads), fp32.bytes),
            ("onnxruntime (compressed)", OrtModule(quant.path, threads=threads), quant.bytes),
        ]
        for name, model, nbytes in candidates:
            lat = measure_latency(model, inputs, runs=runs, warmup=warmup, threads=threads)
            first = report.rows[0].median_ms if report.rows else lat.median_ms
            runtime = "torch" if nbytes is None else "onnxruntime"
            report.rows.append(BenchRow(name, runtime, lat.median_ms, lat.p10_ms, lat.p90_ms,
                                        first / lat.median_ms, nbytes))  # fmt: skip
    return report


@torch.no_grad()
def _left_early(model: nn.Module, inputs: Inputs) -> float | None:
    """For an early-exit model, the share of ``inputs`` leaving at an exit; else None."""
    if not isinstance(model, EarlyExitModel):
        return None
    model.eval()(**inputs) if isinstance(inputs, dict) else model.eval()(inputs)
    used = model.last_exit_index
    return float((used < len(model.heads)).double().mean())


def _check_options(**options: int) -> None:
    """Raise ConfigError unless every option is an int >= 1."""
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"The '{key}' parameter of bench must be an int >= 1. "
                              f"Got {value!r} instead.")  # fmt: skip


def bench_table(report: BenchReport) -> Table:
    """The report as a rich table: latency, spread, speedup and ONNX file size per row."""
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in report.inputs.items())
    table = Table(title=f"{report.artifact}: {shapes}, {report.threads} thread(s), "
                        f"median of {report.runs}")  # fmt: skip
    for col in ("model", "median ms", "p10-p90 ms", "speedup", "ONNX bytes"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in report.rows:
        size = "" if row.onnx_bytes is None else f"{row.onnx_bytes:,}"
        table.add_row(row.name, f"{row.median_ms:.3f}", f"{row.p10_ms:.3f}-{row.p90_ms:.3f}",
                      f"{row.speedup:.2f}x", size)  # fmt: skip
    if report.left_early is not None:
        table.caption = (
            f"early exit: {report.left_early:.0%} of these random inputs left at an exit; the "
            "compressed rows depend on the data (time real inputs for a real figure)"
        )
    return table
