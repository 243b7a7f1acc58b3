"""diffrt.export: ONNX export, INT8 calibration, TensorRT / ONNX Runtime backends (later issues)."""
