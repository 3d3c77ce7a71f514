"""ONNX export and onnxruntime sessions for the benchmarks' latency measurements.

Benchmark-only: the package does not import this module. :func:`export_onnx` writes a model
with a dynamic batch axis and checks the exported graph against eager PyTorch;
:class:`OrtModule` wraps an onnxruntime CPU session as an ``nn.Module`` so the same timing
code (``_common.interleaved_latency`` / ``modelpress.measure.measure_latency``) times torch
eager and onnxruntime alike; :func:`eager_and_ort_latency` does both for a set of models.

Which exporter: torch 2.13's ``torch.onnx.export`` defaults to the ``torch.export``-based
("dynamo") exporter, which needs the ``onnxscript`` package. When ``onnxscript`` is not
installed the legacy TorchScript exporter (``dynamo=False``) is used; the choice is returned
so the benchmark records it.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _common import interleaved_latency
from torch import nn

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def exporter_name() -> str:
    """``"dynamo"`` when ``onnxscript`` is importable, else ``"torchscript"``."""
    return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ``path`` with a dynamic batch axis, then check it.

    The check runs the file in onnxruntime on ``example`` and compares the logits with eager
    PyTorch; a difference above ``1e-3`` is an error (a wrong graph must not be timed).

    Args:
        model: A module taking one ``(B, C, H, W)`` tensor and returning ``(B, classes)``.
        example: An input batch used for tracing and for the check, e.g. ``(2, 3, 32, 32)``.
        path: The ``.onnx`` file to write (its folder is created).

    Returns:
        ``{"exporter", "opset", "bytes", "max_abs_diff"}`` (diff of the logits on ``example``).

    Raises:
        RuntimeError: The exported graph's outputs differ from eager PyTorch.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    exporter = exporter_name()
    model = model.eval()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings():  # the legacy exporter warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=exporter == "dynamo",
        )
    session = OrtModule(path, threads=1)
    with torch.no_grad():
        diff = float((session(example) - model(example)).abs().max())
    if not diff <= 1e-3:
        raise RuntimeError(f"{path.name}: onnxruntime logits differ from eager by {diff:.3g}")
    return {"exporter": exporter, "opset": OPSET, "bytes": path.stat().st_size,
            "max_abs_diff": diff}  # fmt: skip


class OrtModule(nn.Module):
    """An onnxruntime CPU session behind the ``nn.Module`` call signature ``model(x)``.

    The session runs operators sequentially with ``threads`` intra-op threads and all graph
    optimizations (``ORT_ENABLE_ALL``: constant folding, Conv+BatchNorm fusion, NCHWc
    layouts). Inputs and outputs cross as zero-copy numpy views of float32 CPU tensors.
    """

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.threads = threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float32 -> logits ``(B, classes)``."""
        array = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits)


def eager_and_ort_latency(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    onnx_dir: Path,
    *,
    threads: Sequence[int],
    batches: Sequence[int],
    runs: int,
    rounds: int,
    warmup: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latency of every model in torch eager and in onnxruntime, interleaved in rounds.

    Every model is exported once (:func:`export_onnx`, checked against eager); then for each
    thread count, all models in both runtimes are timed in the same interleaved rounds
    (``_common.interleaved_latency``), so background load hits them alike.

    Args:
        models: name -> module in eval mode (the baseline among them).
        x: inputs ``(max(batches), C, H, W)``; batch ``b`` times ``x[:b]``.
        onnx_dir: where the ``<name>.onnx`` files go.
        threads: thread counts (torch intra-op threads / onnxruntime intra-op threads).
        batches, runs, rounds, warmup: as in ``interleaved_latency``.

    Returns:
        ``(latency, exports)``: ``latency[f"threads_{t}"][name]["eager" | "ort"]`` holds
        ``b{b}_median_ms`` and the round extremes; ``exports[name]`` is
        :func:`export_onnx`'s record.
    """
    exports = {name: export_onnx(m, x[:2], onnx_dir / f"{name}.onnx") for name, m in models.items()}
    latency: dict[str, Any] = {}
    for t in threads:
        timed: dict[str, nn.Module] = {}
        for name, model in models.items():
            timed[f"{name}\teager"] = model
            timed[f"{name}\tort"] = OrtModule(onnx_dir / f"{name}.onnx", threads=t)
        lat = interleaved_latency(
            timed, x, batches=batches, runs=runs, rounds=rounds, warmup=warmup, threads=t
        )
        per_model: dict[str, dict[str, Any]] = {name: {} for name in models}
        for key, entry in lat.items():
            name, runtime = key.split("\t")
            per_model[name][runtime] = entry
        latency[f"threads_{t}"] = per_model
    return latency, exports
