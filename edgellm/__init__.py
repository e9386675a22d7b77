"""edgellm: compress causal LMs, export them to GGUF/ONNX, measure them in their real runtimes."""

__version__ = "0.3.0"

import logging as _logging

# transformers imports torchao whenever it is installed (edgellm does not need it), and
# torchao logs notices about CUDA kernels a CPU build cannot load: keep them off the
# user's stderr, where edgellm promises one line per error
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
