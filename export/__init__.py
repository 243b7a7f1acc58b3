"""diffrt.export: INT8 calibration, W8A8 layers, ONNX export, and the ONNX Runtime / TensorRT backends.

* :func:`calibrate` -> :class:`Calibration`: activation scales per quantized layer and timestep
  group, saved and loaded with :meth:`Calibration.save` / :meth:`Calibration.load`;
* :class:`QuantPolicy`: which layers become W8A8 (``optimize(den, int8=calibration)`` installs them);
  :mod:`~diffrt.export.speed` times each layer in float and INT8 and keeps only those that gain;
* :func:`export_onnx` / :func:`export_groups`: a Denoiser as ONNX (QDQ nodes with a calibration);
* ``optimize(den, backend="onnxruntime" | "tensorrt")`` (:mod:`~diffrt.export.backends`) runs the
  export in ONNX Runtime or TensorRT behind the Denoiser's signature; TensorRT is imported lazily.

onnx, onnxruntime and tensorrt are imported on first use.
"""
from .calibration import Calibration, calibrate, model_hash
from .onnx_export import export_groups, export_onnx
from .quant import QuantPolicy

__all__ = ["Calibration", "QuantPolicy", "calibrate", "export_groups", "export_onnx", "model_hash"]
