"""The registries agree with each other, and adding an entry is one module plus one line:
formats (export/formats/) name runtimes that open them, runtimes (runtimes/__init__.py)
name formats that list them, every tool whose version keys a build or a measurement is in
tools.TOOL_PACKAGES, and each grid class (edgellm/grids.py) is found by its name."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from edgellm.errors import UserError
from edgellm.export import formats as registry
from edgellm.export.formats import Format, format_of, formats
from edgellm.grids import GGUF_GRIDS, GRIDS, Q4_0, NBits, canonical, gguf_grid, same_grid
from edgellm.recipe import ExportSpec, parse_recipe
from edgellm.resources import bits_per_weight, export_need
from edgellm.runtimes import RUNTIMES, runtime_for
from edgellm.tools import STEP_TOOLS, TOOL_PACKAGES


def test_formats_and_runtimes_name_each_other():
    for name, fmt in formats().items():
        assert fmt.name == name and fmt.runtimes and fmt.weights
        assert fmt.lossless is None or fmt.lossless in fmt.weights
        for runtime in fmt.runtimes:
            assert name in RUNTIMES[runtime].formats, (name, runtime)
        assert runtime_for(name) == fmt.runtimes[0]
    for runtime, entry in RUNTIMES.items():
        for fmt in entry.formats:
            assert runtime in formats()[fmt].runtimes, (runtime, fmt)


def test_every_keyed_tool_is_a_known_package():
    keyed = set(STEP_TOOLS)
    keyed |= {tool for fmt in formats().values() for tool in fmt.build_tools}
    keyed |= {tool for entry in RUNTIMES.values() for tool in entry.tools}
    assert keyed <= set(TOOL_PACKAGES), keyed - set(TOOL_PACKAGES)


def test_a_runtime_that_does_not_open_a_format_is_refused():
    with pytest.raises(ValueError, match="does not open gguf"):
        runtime_for("gguf", "onnxruntime")
    with pytest.raises(ValueError, match="no runtime for format 'gif'"):
        runtime_for("gif")


def test_unknown_formats_are_refused_with_the_registered_ones():
    with pytest.raises(UserError, match="format 'gif' is not supported: use one of torch, gguf"):
        parse_recipe({"variant": [{"name": "a", "export": {"format": "gif"}}]})
    with pytest.raises(UserError, match="use one of torch, gguf, onnx, ort, mlx"):
        format_of("gif")


def test_a_new_format_is_one_module_and_one_registry_line(monkeypatch, tmp_path):
    """A format module registered by name alone reaches recipe validation, the artifact
    path, the resource guard and export, with no other file changed."""

    class Toy(Format):
        name = "toy"
        summary = "a test format"
        weights = ("f32", "t3")
        lossless = "f32"
        runtimes = ("torch",)
        build_tools = ("torch",)
        memory_factor = 7.0
        artifact = "model.toy"

        def export(self, model_dir, staging, spec, name, work, calibration=None):
            path = self.artifact_path(staging)
            path.write_text(spec.weights)
            return path

    module = types.ModuleType("edgellm.export.formats.toy")
    module.FORMAT = Toy()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "FORMAT_MODULES", (*registry.FORMAT_MODULES, "toy"))
    registry.formats.cache_clear()
    try:
        recipe = parse_recipe({"variant": [{"name": "a", "export": {"format": "toy", "weights": "t3"}}]})
        spec = recipe.variant[0].export
        with pytest.raises(UserError, match="weights 'q4_0' not available for toy"):
            parse_recipe({"variant": [{"name": "a", "export": {"format": "toy", "weights": "q4_0"}}]})
        assert format_of("toy").export(tmp_path, tmp_path, spec, "a", tmp_path).read_text() == "t3"
        assert bits_per_weight("toy", "t3") == 4.0
        assert export_need(10**6, "toy", "t3", []).memory > 7 * 4 * 10**6
        assert "toy" in registry.export_targets()
    finally:
        registry.formats.cache_clear()


def test_format_options_belong_to_the_formats_that_read_them():
    with pytest.raises(UserError, match="imatrix only applies to gguf exports"):
        parse_recipe({"variant": [{"name": "a", "export": {"format": "mlx", "weights": "q4",
                                                           "imatrix": True}}]})
    with pytest.raises(UserError, match="lm_head_bits only applies to onnx/ort exports"):
        parse_recipe({"variant": [{"name": "a", "export": {"format": "torch", "weights": "f32",
                                                           "lm_head_bits": 4}}]})
    assert ExportSpec(format="ort", weights="int4", block_size=64).block_size == 64


def test_artifact_paths_come_from_the_registry():
    folder = Path("variant")
    assert format_of("gguf").artifact_path(folder) == folder / "model.gguf"
    assert format_of("torch").artifact_path(folder) == folder
    assert format_of("ort").artifact_path(folder) == folder / "ort"


def test_grids_are_registered_by_name_and_aliases_resolve_once():
    assert set(GGUF_GRIDS) == {"q4_0", "q4_1", "q5_0", "q8_0"} and "nbits" in GRIDS
    assert all(gguf_grid(name).label == name for name in GGUF_GRIDS)
    assert canonical(NBits(4, 32, True)) == Q4_0()
    assert canonical(NBits(4, 32, False)) == NBits(4, 32, False)
    assert same_grid("nbits4-g32-sym", Q4_0()) and not same_grid("nbits4-g32-asym", Q4_0())
    # a foreign checkpoint is on a GGUF grid by its settings: symmetric, as wide, blocks of 32
    assert gguf_grid("q8_0").takes_checkpoint(8, 32, True)
    assert not gguf_grid("q5_0").takes_checkpoint(8, 32, True)  # 8-bit ints are not 5-bit
    assert not gguf_grid("q4_1").takes_checkpoint(4, 32, True)  # q4_1 holds no GPTQ checkpoint
