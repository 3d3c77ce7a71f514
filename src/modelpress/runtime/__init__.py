"""Running compressed models fast: ONNX export (QDQ int8, dynamic int8, MatMulNBits int2/4/8,
GatherBlockQuantized) and an onnxruntime session called like the module."""

from modelpress.runtime.artifact import load_quantized
from modelpress.runtime.export import ExportResult, export_onnx
from modelpress.runtime.session import OrtModule, optimized_op_types

__all__ = ["ExportResult", "OrtModule", "export_onnx", "load_quantized", "optimized_op_types"]
