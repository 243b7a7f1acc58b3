"""diffrt.export: INT8 calibration and W8A8 layers (ONNX / TensorRT / ONNX Runtime backends: later issues).

* :func:`calibrate` -> :class:`Calibration`: activation scales per quantized layer and timestep
  group, saved and loaded with :meth:`Calibration.save` / :meth:`Calibration.load`;
* :class:`QuantPolicy`: which layers become W8A8 (``optimize(den, int8=calibration)`` installs them);
  :mod:`~diffrt.export.speed` times each layer in float and INT8 and keeps only those that gain.
"""
from .calibration import Calibration, calibrate, model_hash
from .quant import QuantPolicy

__all__ = ["Calibration", "QuantPolicy", "calibrate", "model_hash"]
