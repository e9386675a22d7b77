"""The ONNX Runtime runtime: runs an exported ONNX (or ORT-format) decoder with a KV cache.

The graph (onnxruntime-genai builder layout) takes input_ids, attention_mask and
past_key_values.N.key/value, and returns logits for every position plus present.N.*.
Scoring feeds a window with an empty cache; generation prefills once, then feeds one
token per step with the cache it got back (no recomputation of the prefix).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgellm.errors import UserError
from edgellm.runtimes import Generation, timed_greedy

DEFAULT_PROVIDER = "CPUExecutionProvider"


class OrtRuntime:
    name = "onnxruntime"

    def __init__(self, path: str, threads: int, ctx: int, provider: str = DEFAULT_PROVIDER):
        model = Path(path)
        if model.is_dir():
            found = sorted(model.glob("model.ort")) or sorted(model.glob("*.onnx"))
            if not found:
                raise FileNotFoundError(f"{path} holds no model.ort or .onnx file")
            model = found[0]
        if provider not in ort.get_available_providers():
            raise RuntimeError(f"execution provider {provider} is not in this onnxruntime "
                               f"build (available: {', '.join(ort.get_available_providers())})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.version = f"onnxruntime {ort.__version__} ({provider})"
        try:
            self.session = ort.InferenceSession(str(model), options, providers=[provider])
        except (ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"model file {model} is not a valid ONNX/ORT model ({first}): "
                            "export it again with `edgellm export --to onnx`") from None
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.past_dtype = np.float16 if "float16" in self.past_inputs[0].type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.head_dim = _head_dim(model.parent, self.past_inputs[0].shape[3])
        self.wants_positions = any(i.name == "position_ids" for i in self.session.get_inputs())

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {spec.name: np.zeros((1, spec.shape[1], 0, self.head_dim), dtype=self.past_dtype)
                for spec in self.past_inputs}

    def forward(self, ids: np.ndarray, cache: dict, total: int):
        """Run `ids` after `cache` (total = cached + new tokens): (logits, new cache)."""
        feeds = {"input_ids": ids.astype(np.int64)[None],
                 "attention_mask": np.ones((1, total), dtype=np.int64), **cache}
        if self.wants_positions:  # graphs without GroupQueryAttention take explicit positions
            feeds["position_ids"] = np.arange(total - len(ids), total, dtype=np.int64)[None]
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        new_cache = {name.replace("present", "past_key_values"): value
                     for name, value in outputs.items() if name.startswith("present")}
        return outputs["logits"][0], new_cache

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        logits, _ = self.forward(window, self.empty_cache(), len(window))
        return logits[:-1].astype(np.float32)

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        cache, total = self.empty_cache(), 0

        def run(ids: np.ndarray) -> np.ndarray:
            nonlocal cache, total
            total += len(ids)
            logits, cache = self.forward(ids, cache, total)
            return logits[-1]

        return timed_greedy(lambda: run(prompt), lambda token: run(np.array([token])), new_tokens)

    def close(self) -> None:
        del self.session


def _head_dim(folder: Path, declared) -> int:
    """The KV head size: fixed in the graph, or (when symbolic) from genai_config.json."""
    if isinstance(declared, int):
        return declared
    config_path = folder / "genai_config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no genai_config.json to read the KV head size from")
    return int(json.loads(config_path.read_text())["model"]["decoder"]["head_size"])
