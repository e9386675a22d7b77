"""Export stage: turn an HF folder into a deployable artifact (GGUF, ONNX, ORT format, MLX).

What each format is, writes and needs is its entry in the format registry
(export/formats/); the modules here do the writing.
"""
