"""GPTQ towards the float model's outputs (compress/float_targets.py): the corrected weights
are the least-squares fit of the float stream's outputs on the quantized stream's inputs,
nothing moves where the two streams agree, and GPTQ with it runs end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import gptq_folder

from edgellm.compress.float_targets import TargetedHessian, retarget


def streams(shift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(float inputs x, quantized-stream inputs x̃ = x + noise·shift), 2 × 256 tokens of 24."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 256, 24, generator=gen) * torch.linspace(0.2, 3.0, 24)
    return x, x + shift * torch.randn(x.shape, generator=gen)


def linear(seed: int = 1) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(24, 16, bias=False)


def test_retarget_is_the_least_squares_fit_of_the_float_outputs():
    x, x_tilde = streams(0.3)
    layer = linear()
    hessian = TargetedHessian(24)
    hessian.add_pair(x_tilde, x)
    w = layer.weight.data.clone()
    retarget({"l": layer}, ["l"], hessian, ridge=1e-6)
    flat, flat_tilde = x.reshape(-1, 24), x_tilde.reshape(-1, 24)
    target = flat @ w.T
    best = torch.linalg.lstsq(flat_tilde, target).solution.T  # argmin ‖x̃ Wᵀ − x w ᵀ‖
    assert torch.allclose(layer.weight.data, best, atol=1e-3)
    error = (flat_tilde @ layer.weight.data.T - target).square().sum()
    assert error < (flat_tilde @ w.T - target).square().sum()


def test_nothing_moves_where_the_streams_agree():
    x, _ = streams(0.0)
    layer = linear()
    hessian = TargetedHessian(24)
    hessian.add_pair(x, x)
    w = layer.weight.data.clone()
    assert retarget({"l": layer}, ["l"], hessian, ridge=0.01) == 0.0
    assert torch.equal(layer.weight.data, w)


def test_the_float_stream_reaches_each_linear_with_its_own_inputs(tiny_llama):
    """The Hessians GPTQ collects pair each quantized-stream input with the float stream's
    input to the same linear, batch by batch."""
    from edgellm.compress.hessians import collect_hessians, linear_layers
    from edgellm.compress.layerwise import LayerInputs, layer_contexts
    from edgellm.models import load_folder_model

    model = load_folder_model(tiny_llama)
    ids = (torch.arange(4 * 32) * 7 % 250).reshape(4, 32)
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids).float()
    inputs = LayerInputs(hidden, layer_contexts(model, hidden[:1]), batch=2, float_stream=True)
    layer = model.model.layers[0]
    inputs.record_float(layer)
    agree = collect_hessians(layer, inputs)  # the streams start equal
    assert all(h.shift.abs().max() == 0 for h in agree.values())
    inputs.hidden = inputs.hidden + 0.01 * torch.randn(inputs.hidden.shape)  # as quantization does
    apart = collect_hessians(layer, inputs)
    assert set(apart) == set(linear_layers(layer))
    assert all(h.shift.abs().max() > 0 for h in apart.values())
    inputs.advance(layer)
    inputs.advance_float()
    with torch.no_grad():
        expected = layer(hidden[:2], **inputs.contexts[0])
        expected = expected[0] if isinstance(expected, tuple) else expected
    assert torch.allclose(inputs.float_hidden[:2], expected, atol=1e-5)


def test_gptq_with_float_targets_differs_and_stays_close(tiny_llama, tiny_gptq, tmp_path):
    from edgellm.models import load_folder_model

    targeted = gptq_folder(tiny_llama, tmp_path, grid="q4_0", float_targets=True)
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        original = load_folder_model(tiny_llama)(ids).logits
        plain = load_folder_model(tiny_gptq)(ids).logits
        fitted = load_folder_model(targeted)(ids).logits
    assert not torch.equal(plain, fitted)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(original.flatten(), fitted.flatten(), dim=0) > 0.75


def test_float_targets_change_the_step_key_only_when_on():
    from types import SimpleNamespace

    from edgellm.compress.gptq import Options, identity

    context = SimpleNamespace(export=None)
    assert identity(Options(float_targets=True), context)["float_targets"] is True
    assert "float_targets" not in identity(Options(), context)  # keys cached before it stay


@pytest.mark.parametrize("ridge", [0.01, 1.0])
def test_the_ridge_only_shrinks_the_correction(ridge):
    x, x_tilde = streams(0.3, seed=3)
    moves = []
    for d in (1e-6, ridge):
        hessian = TargetedHessian(24)
        hessian.add_pair(x_tilde, x)
        moves.append(retarget({"l": linear()}, ["l"], hessian, ridge=d))
    assert 0 < moves[1] <= moves[0]


def test_an_untied_lm_head_is_solved_towards_the_float_logits(tmp_path):
    """Under a budget the head's solve sees both streams: an untied lm_head moves towards
    the float stream's logits (lower error on them than plain GPTQ's), a tied one does not
    move (it is also the lookup table the streams started from)."""
    from conftest import build_tiny_llama

    from edgellm.compress.gptq import Options, solve_head
    from edgellm.compress.layerwise import LayerInputs
    from edgellm.gptq_checkpoint import from_checkpoint
    from edgellm.grids import Q8_0
    from edgellm.models import load_folder_model

    def solved(model, inputs, name, tensors):
        parts = solve_head(model, inputs, tensors, {name: Q8_0()}, Options())
        return from_checkpoint({k.split(".", 2)[-1] if name == "model.embed_tokens" else
                                k.split(".", 1)[1]: v for k, v in parts.items() if v is not None
                                and not k.endswith(".weight")}, 8, 32, name).dequantize()

    for tie, name in ((False, "lm_head"), (True, "model.embed_tokens")):
        model = load_folder_model(build_tiny_llama(tmp_path / f"tie-{tie}", tie=tie))
        float_hidden = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(5))
        quantized = float_hidden + 0.3 * torch.randn(float_hidden.shape)
        plain = LayerInputs(quantized, [], batch=2)
        paired = LayerInputs(quantized, [], batch=2, float_stream=True)
        paired.float_hidden = float_hidden
        with torch.no_grad():
            weight = model.get_output_embeddings().weight.detach().clone()
            target = model.model.norm(float_hidden) @ weight.T
            normed = model.model.norm(quantized)
            tensors = {f"{name}.weight": weight, "model.norm.weight": model.model.norm.weight.clone()}
            errors = [float((normed @ solved(model, inputs, name, tensors).T - target).square().sum())
                      for inputs in (plain, paired)]
        if tie:
            assert errors[1] == errors[0]
        else:
            assert errors[1] < 0.9 * errors[0]
