"""An onnxruntime CPU session called like the module it was exported from.

:class:`OrtModule` is an ``nn.Module`` (with no parameters), so everything that runs a model
— ``measure_latency``, ``accuracy``, ``embeddings`` — runs it unchanged: torch tensors in
(positional in the graph's input order, or by name), torch tensors out.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelpress.errors import ArtifactError, ConfigError, DataError

_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


class OrtOutputs(dict):
    """Several named outputs: by name (``out["last_hidden_state"]``), as attributes
    (``out.last_hidden_state``) or by position (``out[0]``), like a Hugging Face output."""

    def __getattr__(self, name: str) -> Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: str | int) -> Tensor:  # type: ignore[override]
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def session_options(threads: int, optimized_path: Path | None = None) -> Any:
    """Sequential execution, ``threads`` intra-op threads, every graph optimisation on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


class OrtModule(nn.Module):
    """Runs an ONNX file with onnxruntime on the CPU, called like the exported module.

    Args:
        path: the ``.onnx`` file (e.g. ``export_onnx(...).path``).
        threads: intra-op threads (fixed for the session's life), ``>= 1``.

    Raises:
        ConfigError: ``threads`` is not an int ``>= 1``.
        ArtifactError: the file is missing or onnxruntime cannot load it.
    """

    def __init__(self, path: str | Path, *, threads: int = 1) -> None:
        super().__init__()
        import onnxruntime as ort

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(
                f"The 'threads' parameter of OrtModule must be an int >= 1. Got {threads!r} "
                "instead."
            )
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: no such ONNX file; export one with export_onnx.")
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{self.path}: onnxruntime cannot load it ({exc}).") from None
        self.threads = threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = {i.name: _NUMPY.get(i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def forward(self, *args: Any, **kwargs: Any) -> Tensor | OrtOutputs:
        """Run the session on torch tensors; one output as a tensor, several as
        :class:`OrtOutputs`.

        Raises:
            DataError: too many, missing, unknown or non-tensor inputs.
        """
        feed = self._feed(args, kwargs)
        outputs = self.session.run(None, feed)
        tensors = [torch.from_numpy(np.ascontiguousarray(o)) for o in outputs]
        if len(tensors) == 1:
            return tensors[0]
        return OrtOutputs(zip(self.output_names, tensors, strict=True))

    def _feed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        """numpy arrays by input name, cast to the graph's dtypes."""
        if len(args) > len(self.input_names):
            raise DataError(f"{self.path.name} takes {len(self.input_names)} inputs "
                            f"{self.input_names}; got {len(args)} positional.")  # fmt: skip
        named = dict(zip(self.input_names, args, strict=False))
        unknown = [k for k in kwargs if k not in self.input_names or k in named]
        missing = [n for n in self.input_names if n not in named and n not in kwargs]
        if unknown or missing:
            raise DataError(f"{self.path.name} takes inputs {self.input_names}; unknown or "
                            f"repeated {unknown}, missing {missing}.")  # fmt: skip
        named.update(kwargs)
        feed = {}
        for name, value in named.items():
            if not isinstance(value, Tensor):
                raise DataError(f"input {name!r} must be a torch Tensor, not "
                                f"{type(value).__name__}.")  # fmt: skip
            array = value.detach().cpu().numpy()
            dtype = self.input_types[name]
            feed[name] = array if dtype is None else array.astype(dtype, copy=False)
        return feed

    def extra_repr(self) -> str:
        return f"{self.path.name}, threads={self.threads}"


def optimized_op_types(path: str | Path, *, threads: int = 1) -> collections.Counter[str]:
    """Count the node types of the graph onnxruntime actually runs (after its fusions).

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads of the session (some fusions depend on it).

    Returns:
        ``Counter`` of op types, e.g. ``{"DynamicQuantizeMatMul": 6, "Relu": 5}``.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="modelpress-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(str(path), session_options(threads, optimized),
                             providers=["CPUExecutionProvider"])  # fmt: skip
        graph = onnx.load(str(optimized), load_external_data=False).graph
    return collections.Counter(node.op_type for node in graph.node)
