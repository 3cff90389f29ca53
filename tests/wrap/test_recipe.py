import json

import pytest

from fewbits import BUILTIN_RECIPES, PerChannel, PerGroup, QuantSpec, Recipe, get_recipe
from fewbits.recipe import LayerRecipe, TensorRecipe


def test_builtins_exist_with_their_documented_grids():
    assert set(BUILTIN_RECIPES) >= {"w8a8", "w8a8-dynamic", "w8", "w4a8", "w4-g128"}
    linear = dict(get_recipe("w8a8").by_type)["Linear"]
    assert linear.weight.spec == QuantSpec(bits=8, granularity=PerChannel(0))
    assert linear.input.spec == QuantSpec(bits=8, signed=False, symmetric=False) and not linear.input.dynamic
    assert dict(get_recipe("w8a8-dynamic").by_type)["Linear"].input.dynamic
    assert dict(get_recipe("w8").by_type)["Linear"].input is None
    assert dict(get_recipe("w4-g128").by_type)["Linear"].weight.spec.granularity == PerGroup(128, axis=1)
    assert get_recipe("w8a8").needs_calibration and not get_recipe("w8").needs_calibration
    assert not get_recipe("w8a8-dynamic").needs_calibration


@pytest.mark.parametrize("name", sorted(BUILTIN_RECIPES))
def test_json_round_trip(name, tmp_path):
    recipe = BUILTIN_RECIPES[name]
    assert Recipe.from_json(recipe.to_json()) == recipe
    path = tmp_path / "r.json"
    path.write_text(recipe.to_json())
    assert get_recipe(str(path)) == recipe


def test_bad_recipes_are_named_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown recipe 'w9a9'; built-ins: \['w1-binary', 'w2-ternary', 'w3-pow2', 'w4-apot', 'w4-g128', 'w4-kmeans', 'w4a8', 'w8', 'w8a8', 'w8a8-bc', 'w8a8-bc-adds', 'w8a8-bc-int', 'w8a8-dynamic', 'w8a8-inputs', 'w8a8-matmul', 'w8a8-per-token', 'w8a8-smoothquant'\]"):
        get_recipe("w9a9")
    data = json.loads(BUILTIN_RECIPES["w8a8"].to_json())
    with pytest.raises(ValueError, match=r"unknown recipe keys \['layers'\]"):
        Recipe.from_dict({**data, "layers": {}})
    with pytest.raises(ValueError, match="layer type must be one of"):
        Recipe("x", (("LSTM", LayerRecipe()),))
    with pytest.raises(ValueError, match="calibration method must be one of"):
        TensorRecipe(QuantSpec(), method="kl")
    with pytest.raises(ValueError, match="dynamic activation quantization is per tensor"):
        TensorRecipe(QuantSpec(granularity=PerChannel(1)), dynamic=True)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "name": "x", "by_type": {"Linear": {"weights": null}}}')
    with pytest.raises(ValueError, match=r"bad.json: unknown layer recipe keys \['weights'\]"):
        get_recipe(str(bad))


def test_name_overrides_include_exclude():
    w8 = TensorRecipe(QuantSpec())
    recipe = Recipe("r", (("Linear", LayerRecipe(weight=w8)),), by_name=(("head", None), ("enc.*", LayerRecipe(weight=w8, input=w8))),
                    exclude=("enc.skip",))
    assert recipe.for_layer("head", "Linear") == (None, "kept float by the recipe ('head')")
    assert recipe.for_layer("enc.a", "Linear")[0].input == w8
    assert recipe.for_layer("enc.skip", "Linear") == (None, "excluded by the recipe")
    assert recipe.for_layer("other", "Linear")[0].input is None
    assert recipe.for_layer("emb", "Embedding") == (None, "the recipe has no rule for Embedding")


def test_yaml_recipe_file(tmp_path):
    yaml = pytest.importorskip("yaml")
    recipe = BUILTIN_RECIPES["w4a8"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(json.loads(recipe.to_json())))
    assert get_recipe(str(path)) == recipe


def test_recipe_file_with_steps(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "r.yaml"
    data = {**json.loads(BUILTIN_RECIPES["w8a8"].to_json()), "name": "mine",
            "steps": [{"name": "smoothquant", "alpha": 0.75}, "smoothquant"]}
    path.write_text(yaml.safe_dump(data))
    from fewbits import SmoothQuant

    assert get_recipe(str(path)).steps == (SmoothQuant(alpha=0.75), SmoothQuant())
    path.write_text(yaml.safe_dump({**data, "steps": [{"name": "smoothquant", "alfa": 1}]}))
    with pytest.raises(ValueError, match=r"r.yaml: step 'smoothquant': unknown keys \['alfa'\]"):
        get_recipe(str(path))


def test_grouped_weight_names_build_the_family():
    r = get_recipe("w3-g64-asym")
    spec = dict(r.by_type)["Linear"].weight.spec
    assert (spec.bits, spec.symmetric, spec.granularity) == (3, False, PerGroup(64, axis=1))
    assert dict(r.by_type)["Linear"].input is None  # weights only
    assert get_recipe("w4-g128") is BUILTIN_RECIPES["w4-g128"]
    assert dict(get_recipe("w4-g32").by_type)["Linear"].weight.spec.granularity == PerGroup(32, axis=1)
    with pytest.raises(ValueError, match="grouped weights need 2 to 8 bits and groups of at least 2, got 9 bits"):
        get_recipe("w9-g32")
    with pytest.raises(ValueError, match="unknown recipe 'w4-g'"):
        get_recipe("w4-g")
