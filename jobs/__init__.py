"""ai-ratings: from people's ratings of webcam snapshots to a better ONNX model."""

__version__ = "0.1.0"
