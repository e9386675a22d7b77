"""Recipe validation: good recipes parse; bad keys and values name the key and the line."""

from pathlib import Path

import pytest

from edgellm.errors import UserError
from edgellm.recipe import builtin_recipe_path, load_recipe


def write(tmp_path, text):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_builtin_demo_recipe_is_valid():
    recipe = load_recipe(builtin_recipe_path("demo"))
    weights = [v.export.weights for v in recipe.variant]
    assert weights == ["f16", "q8_0", "q4_k_m", "q4_0", "q4_0", "f32", "int4", "q4_0", "q5_0", "int4",
                       "int8", "f16"]
    assert [v.export.format for v in recipe.variant][5:7] == ["onnx", "onnx"]
    steps = [[s.method for s in v.compress] for v in recipe.variant]
    assert steps[-5:] == [["gptq"]] * 4 + [["wanda"]]
    assert recipe.eval.ctx == 512 and recipe.eval.max_tokens == 16384


def test_unknown_key_names_key_and_line(tmp_path):
    path = write(tmp_path, '[model]\nsource = "x"\n\n[eval]\nctx = 512\nwindow = 3\n')
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert f"{path}:6" in str(err.value) and "eval.window" in str(err.value)


def test_bad_weights_for_format(tmp_path):
    path = write(tmp_path, '[[variant]]\nname = "a"\nexport = { format = "gguf", weights = "q9" }\n')
    with pytest.raises(UserError, match="weights 'q9' not available for gguf"):
        load_recipe(path)


def test_bad_numeric_value(tmp_path):
    path = write(tmp_path, "[eval]\nctx = -4\n")
    with pytest.raises(UserError, match=r"recipe.toml:2: key 'eval.ctx'"):
        load_recipe(path)


def test_unknown_compress_method(tmp_path):
    path = write(tmp_path, '[[variant]]\nname = "a"\ncompress = [{method = "magic"}]\n'
                           'export = { format = "gguf", weights = "f16" }\n')
    with pytest.raises(UserError, match="unknown compress method 'magic'"):
        load_recipe(path)


def test_duplicate_and_reserved_names(tmp_path):
    one = '[[variant]]\nname = "{}"\nexport = {{ format = "gguf", weights = "f16" }}\n'
    with pytest.raises(UserError, match="appears twice"):
        load_recipe(write(tmp_path, one.format("a") + one.format("a")))
    with pytest.raises(UserError, match="reserved"):
        load_recipe(write(tmp_path, one.format("reference")))


def test_invalid_toml(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[model\nsource = 1"))


EXAMPLE_RECIPES = sorted((Path(__file__).parent.parent / "examples" / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLE_RECIPES, ids=lambda p: p.name)
def test_example_recipes_are_valid_including_their_steps(path):
    from edgellm.run_checks import check_steps

    check_steps(load_recipe(path))  # raises on a step that cannot feed its export
