"""Targets: turn checked ONNX files into device artifacts (TensorRT engines, Core ML packages)."""
