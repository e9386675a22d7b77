"""edgellm: compress causal LMs, export them to GGUF/ONNX, measure them in their real runtimes."""

__version__ = "0.1.0"
