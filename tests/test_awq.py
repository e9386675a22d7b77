"""AWQ-style scaling inside GPTQ (compress/awq.py): on every family it leaves each decoder
layer's function unchanged, the Hessians it hands GPTQ are those of the scaled inputs, and
the chosen scales never raise the rounding error on the export grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import gptq_folder
from families import FAMILIES, build_family

from edgellm.grids import Q4_0

OUTLIER = 30.0  # one hidden channel this many times larger, as real activations have


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq-families")
    return {name: build_family(name, root / name) for name in FAMILIES}


def first_layer(folder):
    """(config, layer 0, its LayerInputs over two windows with an outlier channel)."""
    from edgellm.compress.layerwise import LayerInputs, layer_contexts
    from edgellm.models import load_folder_model

    model = load_folder_model(folder)
    ids = torch.from_numpy((np.arange(128) * 7 % 250).reshape(2, 64).astype(np.int64))
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids).float()
    hidden[..., 3] *= OUTLIER
    inputs = LayerInputs(hidden, layer_contexts(model, hidden[:1]), batch=2)
    config = json.loads((folder / "config.json").read_text())
    return config, model.model.layers[0], inputs


def errors(layer, config, linears, hessians) -> list[float]:
    """Each migration's Q4_0 rounding error, weighted by its consumers' Hessian."""
    from edgellm.compress.awq import rounding_error
    from edgellm.compress.smoothquant import layer_migrations

    names = {id(m): n for n, m in linears.items()}
    out = []
    for migration in layer_migrations(layer, config):
        consumers = [names[id(c)] for c in migration.consumers]
        out.append(rounding_error([linears[n].weight.data for n in consumers],
                                  [Q4_0()] * len(consumers), hessians[consumers[0]].matrix(), None))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_scales_keep_the_layer_and_lower_its_rounding_error(family_models, family):
    from edgellm.compress.awq import scale_layer
    from edgellm.compress.hessians import collect_hessians, linear_layers

    config, layer, inputs = first_layer(family_models[family])
    linears = linear_layers(layer)
    hessians = collect_hessians(layer, inputs)
    before = errors(layer, config, linears, hessians)
    with torch.no_grad():
        outputs = inputs._run(layer, inputs.hidden)[0]
    alphas = scale_layer(layer, config, linears, dict.fromkeys(linears, Q4_0()), hessians)
    with torch.no_grad():
        scaled_outputs = inputs._run(layer, inputs.hidden)[0]
    assert torch.allclose(scaled_outputs, outputs, rtol=1e-4, atol=1e-4 * outputs.abs().max().item())
    assert any(alphas), alphas  # the outlier channel makes some scaling pay
    measured = collect_hessians(layer, inputs)
    for name, hessian in hessians.items():  # what GPTQ solves on: the scaled inputs' Hessian
        truth = measured[name].matrix()
        assert torch.allclose(hessian.matrix(), truth, rtol=1e-3, atol=1e-5 * truth.abs().max()), name
    after = errors(layer, config, linears, hessians)
    for alpha, old, new in zip(alphas, before, after, strict=True):  # f16 block scales: not to the bit
        assert new < old * 1.001 if alpha else new == pytest.approx(old, rel=1e-2)


def test_gptq_with_awq_stays_close_and_differs_from_plain_gptq(tiny_llama, tiny_gptq, tmp_path):
    from edgellm.models import load_folder_model

    plain = gptq_folder(tiny_llama, tmp_path, grid="q4_0", awq=False)
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        original = load_folder_model(tiny_llama)(ids).logits
        without = load_folder_model(plain)(ids).logits
        scaled = load_folder_model(tiny_gptq)(ids).logits  # the default: AWQ on
    assert not torch.equal(without, scaled)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(original.flatten(), scaled.flatten(), dim=0) > 0.75


def test_awq_is_on_in_the_native_solver_and_refused_with_the_gptqmodel_backend():
    from types import SimpleNamespace

    from edgellm.compress.gptq import Options, awq_for, identity
    from edgellm.errors import UserError

    context = SimpleNamespace(export=None)
    assert identity(Options(), context)["awq"] is True
    assert "awq" not in identity(Options(awq=False), context)  # keys cached before it stay
    assert not awq_for(Options(backend="gptqmodel"))
    with pytest.raises(UserError, match="awq"):
        identity(Options(awq=True, backend="gptqmodel"), context)
