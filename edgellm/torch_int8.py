"""Torch INT8 artifacts: int8 weights with one float32 scale per output row, stored in
safetensors and computed with as stored (nothing is quantized when the folder loads).

`write_int8_folder` (the torch format's `weights = "int8"`) rounds every nn.Linear and the
token embedding to symmetric int8 per row (scale = the row's largest magnitude / 127) and
saves `<name>.weight` (int8) beside `<name>.weight_scale` (float32, one per row), the
names compressed-tensors' int-quantized checkpoints use, in `int8.safetensors`. A tied
lm_head is the embedding's matrix and is stored once; norms and biases stay float32.
config.json carries `quantization_config = {"quant_method": "edgellm-int8", ...}`.
transformers 5 ignores a quantization method it does not know and would read the int8
codes as float weights; with no `model.safetensors` in the folder, plain `from_pretrained`
stops instead (no weights file found).

With calibration windows it also saves `<name>.input_max` (bfloat16): the largest
|input| of each linear per input channel on that text, a tied lm_head's included.

`load_int8_model` builds the model on the meta device and puts modules that compute with
the int8 tensors in place of the linears and the embedding. A decode step (one token) runs
fbgemm's dynamic INT8 linear (the token's activations rounded to 8 bits, integer
multiply-accumulate), except for a few outlier channels multiplied in float with their int8
weight rows (LLM.int8()'s outlier split): SmolLM2's outlier channels would otherwise
stretch the 8-bit scale of every other value (README, "INT8 in torch"). `DecodeKernel`
says which: the calibration's 16 largest where this CPU sums 8-bit products exactly, the
token's own 8 largest where fbgemm needs 7-bit tokens. Linears reading the same input
(q/k/v, gate/up) decode through one kernel over their stacked rows, with one choice of
outlier channels (`SharedInput`). Several tokens at once (a prompt, a scored window)
multiply the dequantized codes in float32: weight-only INT8. torch marks fbgemm's quantized
tensors deprecated (pytorch/pytorch#184982) and still ships them; where a build has no
quantized engine, decode steps take the weight-only path too.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import torch
from torch import nn

QUANT_METHOD = "edgellm-int8"
OUTLIER_CHANNELS = 8  # per decoded token, the channels multiplied in float (LLM.int8()-style)
FIXED_OUTLIERS = 16  # with full 8-bit activations: the calibration's largest channels
INPUT_MAX_SUFFIX = ".input_max"  # largest |activation| per input channel, calibration text
WEIGHTS_FILE = "int8.safetensors"
SCALE_SUFFIX = ".weight_scale"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (codes int8 [rows, cols], scales float32 [rows])."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    codes = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def int8_modules(model) -> dict[str, nn.Module]:
    """{qualified name: module} of what is stored in int8: every linear and the token
    embedding; a tied lm_head is left out (it is the embedding)."""
    embedding = model.get_input_embeddings()
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is embedding.weight
    chosen = {}
    for name, module in model.named_modules():
        if module is embedding or (isinstance(module, nn.Linear) and
                                   not (tied and module is model.get_output_embeddings())):
            chosen[name] = module
    return chosen


def int8_state(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to save and the names of the int8 modules."""
    chosen = int8_modules(model)
    state = {}
    for name, tensor in model.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if prefix in chosen and name.endswith(".weight"):
            state[name], state[prefix + SCALE_SUFFIX] = quantize_rows(tensor)
        else:
            state[name] = tensor.detach().float().contiguous()
    if model.config.tie_word_embeddings:
        head = _name_of(model, model.get_output_embeddings())
        state.pop(f"{head}.weight", None)
    return state, sorted(chosen)


def write_int8_folder(model, staging: Path, windows=()) -> None:
    """The int8 artifact of `model` into staging/ (WEIGHTS_FILE + config.json); with
    calibration `windows` (token id arrays), each linear's largest |input| per channel
    on them as well, which decode steps use to choose their outlier channels."""
    from safetensors.torch import save_file

    state, names = int8_state(model)
    maxima = input_maxima(model, windows) if len(windows) else {}
    state.update({name + INPUT_MAX_SUFFIX: value for name, value in maxima.items()})
    save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "bits": 8, "symmetric": True, "strategy": "channel",
        "modules": names, "activations": "int8 per token when decoding one token, "
        "float when several (weight-only)", "calibrated_inputs": len(maxima)}
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def input_maxima(model, windows) -> dict[str, torch.Tensor]:
    """{linear's name: largest |input| per input channel} over the token windows (the float
    model's forward passes; a tied lm_head included)."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if len(x):
                seen = x.abs().amax(0).float()
                maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)
        return hook

    handles = [module.register_forward_pre_hook(record(name))
               for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:
        with torch.inference_mode():
            for window in windows:
                model(input_ids=torch.as_tensor(window, dtype=torch.long)[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # bfloat16: ranks the channels as well as float32 does, in half the bytes
    return {name: value.to(torch.bfloat16).contiguous() for name, value in maxima.items()}


def is_int8_folder(folder: Path) -> bool:
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == QUANT_METHOD


class Int8Linear(nn.Module):
    """y = x · (codes × scale)ᵀ + b, the codes kept in int8 (transposed, [in, out], so the
    rows of a token's outlier channels are contiguous). A linear of a `SharedInput` group
    decodes through the group's kernel and takes its rows of the result."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_max: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.register_buffer("codes_t", codes.t().contiguous(), persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        # the calibration text's largest |activation| per input channel (None: not measured)
        self.input_max = input_max
        # a plain attribute, not a submodule: given by `attach_kernels` once the model is
        # whole (None: no quantized engine, or decoding through a SharedInput's)
        object.__setattr__(self, "kernel", None)
        self.split_outliers = True  # False: the whole token through the integer kernel
        self.shared: SharedInput | None = None
        self.rows = slice(None)  # this linear's outputs in the group's

    @property
    def decode_kernel(self) -> DecodeKernel | None:
        """The kernel this linear's decode steps run: its group's, or its own."""
        return self.shared.kernel if self.shared is not None else self.kernel

    def dequantized(self) -> torch.Tensor:
        """The float weight [out, in]."""
        return (self.codes_t.float() * self.scale).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() == 1:
            if self.shared is not None:
                y = self.shared.decode(x, self.split_outliers)[:, self.rows]
                return y.reshape(*x.shape[:-1], self.out_features)
            if self.kernel is not None:
                y = self.kernel(x.reshape(1, -1), self.split_outliers)
                return y.reshape(*x.shape[:-1], self.out_features)
        return nn.functional.linear(x, self.dequantized(), self.bias)


class DecodeKernel:
    """One token [1, in] through the platform's dynamic INT8 linear (fbgemm on x86, qnnpack
    on ARM: the token's activations rounded to 8 bits, integer multiply-accumulate), except
    its outlier channels, multiplied in float with their weight rows (with those channels
    zeroed, the token's 8-bit scale covers the ordinary values only).

    Where the kernel accumulates 8-bit products exactly (`full_range_products`: int32
    accumulation, VNNI), activations take all 8 bits and the outlier channels are fixed:
    the FIXED_OUTLIERS largest on the calibration text (`input_max`), their weight rows
    converted to float once. Elsewhere fbgemm needs 7-bit activations (its int16 pair sums
    overflow otherwise), and the token's own OUTLIER_CHANNELS largest are taken instead:
    with one bit less, outliers the calibration did not see cost too much (README, "INT8
    in torch")."""

    def __init__(self, codes_t: torch.Tensor, scale: torch.Tensor, bias, input_max=None):
        self.codes_t, self.scale = codes_t, scale
        self.packed = pack_int8(codes_t.t().contiguous(), scale, bias)
        self.reduce_range = not full_range_products()
        self.fixed = None
        if input_max is not None and not self.reduce_range:
            channels = input_max.topk(min(FIXED_OUTLIERS, len(input_max))).indices.sort().values
            self.fixed = channels, (codes_t.index_select(0, channels).float() * scale).contiguous()

    def __call__(self, flat: torch.Tensor, split_outliers: bool = True) -> torch.Tensor:
        if not split_outliers:
            return self.integer(flat)
        if self.fixed is not None:
            channels, rows = self.fixed
        else:
            channels = flat.abs().topk(min(OUTLIER_CHANNELS, flat.shape[1])).indices[0]
            rows = self.codes_t.index_select(0, channels).float() * self.scale
        return torch.addmm(self.integer(flat.index_fill(1, channels, 0.0)),
                           flat.index_select(1, channels), rows)

    def integer(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(flat, self.packed, reduce_range=self.reduce_range)


class SharedInput:
    """Linears fed the same tensor (q/k/v, gate/up) decoding one token: one choice of
    outlier channels and one integer kernel over their stacked rows, computed when the
    first of them is called and handed to the others (the same tensor object, unchanged
    since: see `_version`); a different input is simply computed again.
    Each linear's codes become a view of the stacked ones and its own kernel goes: the
    packed weights are held once. Measured on SmolLM2 (bench/int8_speed.py): fewer,
    larger kernel calls per token, 1.28x (AMD EPYC) and 1.09x (Xeon) the decode speed."""

    def __init__(self, members: list[Int8Linear]):
        self.codes_t = torch.cat([m.codes_t for m in members], dim=1)
        self.scale = torch.cat([m.scale for m in members])
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in members]
        bias = torch.cat(biases) if any(m.bias is not None for m in members) else None
        maxima = [m.input_max for m in members if m.input_max is not None]
        input_max = torch.stack(maxima).amax(0) if len(maxima) == len(members) else None
        self.kernel = DecodeKernel(self.codes_t, self.scale, bias, input_max)
        start = 0
        for member in members:
            rows = slice(start, start + member.out_features)
            member.codes_t, member.scale = self.codes_t[:, rows], self.scale[rows]
            member.shared, member.rows = self, rows
            start = rows.stop
        self._last: tuple[torch.Tensor, int, bool, torch.Tensor] | None = None

    def decode(self, x: torch.Tensor, split_outliers: bool) -> torch.Tensor:
        last, version = self._last, _version(x)
        if last is not None and last[0] is x and last[1] == version and \
                last[2] == split_outliers:
            return last[3]
        y = self.kernel(x.reshape(1, -1), split_outliers)
        self._last = (x, version, split_outliers, y)
        return y


def _version(x: torch.Tensor) -> int | None:
    """How many in-place writes the tensor has had; None for an inference-mode tensor,
    which keeps no count (the same object is then taken as unchanged: the decoder layers
    hand one normed tensor to q/k/v, and one to gate/up, without writing to it between)."""
    return None if x.is_inference() else x._version


def attach_kernels(model) -> None:
    """Give the int8 linears their decode kernels, where this torch has a quantized engine:
    one per group of linears reading the same input, one each for the others. Built once
    the model is whole, so no linear packs a kernel it then gives up."""
    if not has_quantized_engine():
        return
    share_decode_inputs(model)
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.shared is None:
            object.__setattr__(module, "kernel", DecodeKernel(
                module.codes_t, module.scale, module.bias, module.input_max))


def share_decode_inputs(model) -> int:
    """Group each decoder layer's int8 linears that read the same input (the consumers of
    one norm in the family's description: q/k/v, gate/up) into `SharedInput`s; returns how
    many groups."""
    from edgellm.archs import family_of

    family = family_of(model.config.to_dict())
    groups = 0
    for layer in model.model.layers:
        for smooth in family.smooth:
            members = [layer.get_submodule(name) for name in smooth.consumers]
            if len(members) > 1 and all(isinstance(m, Int8Linear) for m in members):
                SharedInput(members)
                groups += 1
    return groups


class Int8Embedding(nn.Module):
    """Rows looked up in int8 and scaled; a scaled embedding (Gemma's √hidden) keeps its
    multiplier."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, multiplier=None, padding_idx=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx = padding_idx
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)
        self.multiplier = multiplier

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[ids].float() * self.scale[ids].unsqueeze(-1)
        return rows if self.multiplier is None else rows * self.multiplier.to(rows.dtype)


def has_quantized_engine() -> bool:
    """Whether this torch build can run dynamic INT8 linears (fbgemm on x86, qnnpack on ARM)."""
    try:
        import torch.ao.nn.quantized.dynamic  # noqa: F401
    except ImportError:
        return False
    return bool(torch.backends.quantized.supported_engines) and \
        torch.backends.quantized.engine != "none"


def pack_int8(codes: torch.Tensor, scale: torch.Tensor, bias):
    """The platform's packed INT8 weight holding these very codes [out, in], one scale per row."""
    with warnings.catch_warnings():  # "quantized tensor creation functions are deprecated"
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(
            codes, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(weight, None if bias is None else bias.detach())


@functools.cache
def full_range_products() -> bool:
    """Whether this CPU's dynamic INT8 kernel sums full 8-bit products exactly. Measured,
    not read from CPU flags: a token of 255s against weights of 127 overflows the int16
    pair sums of fbgemm's AVX2 path (what `reduce_range` exists for) but not VNNI's int32
    accumulation."""
    inputs = 64
    codes = torch.full((8, inputs), 127, dtype=torch.int8)
    packed = pack_int8(codes, torch.ones(8), None)
    y = torch.ops.quantized.linear_dynamic(torch.ones(1, inputs), packed, reduce_range=False)
    return bool(torch.allclose(y, torch.full_like(y, 127.0 * inputs), rtol=1e-3))


def load_int8_model(folder: Path, dequantize: bool = False):
    """The model of an int8 folder computing with its int8 tensors, or with `dequantize`
    an ordinary float model of the same weights (what compression steps read)."""
    from safetensors import safe_open

    from edgellm.empty_model import assign_state, empty_model, plain_config

    config = plain_config(folder)
    names = set(json.loads((Path(folder) / "config.json").read_text())["quantization_config"]["modules"])
    model = empty_model(config)
    state = {}
    # one tensor at a time: each int8 matrix becomes its module before the next is read
    with safe_open(str(Path(folder) / WEIGHTS_FILE), "pt") as stored:
        keys = set(stored.keys())
        maxima = {key.removesuffix(INPUT_MAX_SUFFIX): stored.get_tensor(key).float()
                  for key in keys if key.endswith(INPUT_MAX_SUFFIX) and not dequantize}
        for key in sorted(keys):
            prefix = key.rsplit(".", 1)[0]
            if key.endswith(INPUT_MAX_SUFFIX):
                continue
            if prefix not in names or (dequantize and key.endswith(".bias")):
                state[key] = stored.get_tensor(key)
            elif key.endswith(".weight"):
                codes, scale = stored.get_tensor(key), stored.get_tensor(prefix + SCALE_SUFFIX)
                if dequantize:
                    state[key] = codes.float() * scale[:, None]
                else:
                    bias = f"{prefix}.bias"
                    _put_int8(model, prefix, codes, scale,
                              stored.get_tensor(bias) if bias in keys else None, maxima.get(prefix))
    if config.tie_word_embeddings and not dequantize:
        embedding = model.get_input_embeddings()
        head = _name_of(model, model.get_output_embeddings())
        model.set_output_embeddings(Int8Linear(embedding.codes, embedding.scale, None,
                                               maxima.get(head)))
    assign_state(model, state, f"int8 model {folder} does not match its config ({{name}}): "
                 "the folder is incomplete or from another model")
    if config.tie_word_embeddings and dequantize:
        model.tie_weights()
    if not dequantize:
        attach_kernels(model)
    return model


def _put_int8(model, name: str, codes: torch.Tensor, scale: torch.Tensor, bias,
              input_max: torch.Tensor | None) -> None:
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new = Int8Linear(codes, scale, bias, input_max)
    else:
        new = Int8Embedding(codes, scale, getattr(old, "embed_scale", None),
                            getattr(old, "padding_idx", None))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _name_of(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
