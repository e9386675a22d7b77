"""edgellm: compress causal LMs, export them to GGUF/ONNX, measure them in their real runtimes."""

__version__ = "0.3.0"

import logging as _logging

# transformers imports torchao (the optional torch INT8 backend) whenever it is installed,
# and torchao logs notices about CUDA kernels a CPU build cannot load: keep them off the
# user's stderr, where edgellm promises one line per error
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
