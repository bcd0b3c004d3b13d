"""Hostile or broken input fails early with an MsModelSlimError (exit 2) that names the problem, never a plain
Python exception (exit 1), a hang, or a file copied from outside the model folder."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import SCHEMES, run_quant, write_config
from msmodelslim.cli.__main__ import main
from msmodelslim.core.activations import BUDGET_ENV, budget_from_env
from msmodelslim.core.config import load_config
from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.format.hf_files import copy_model_files
from msmodelslim.model.checkpoint import SafetensorsCheckpoint
from msmodelslim.model.registry import create_adapter
from msmodelslim.processor.matching import brace_alternatives, expand_braces
from tiny_models import make_tiny_model

LLAMA = "Llama-2-7B"
BLOCK = "model.layers.0"


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_tensor(model_dir, name, change):
    """Replace tensor `name` in whichever *.safetensors file holds it."""
    for file in model_dir.glob("*.safetensors"):
        tensors = load_file(file)
        if name in tensors:
            tensors[name] = change(tensors[name])
            save_file(tensors, file, metadata={"format": "pt"})
            return file.name
    raise AssertionError(name)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected error" not in err
    return code, err


# ---- 1. YAML bombs ---------------------------------------------------------------------------------------
def billion_laughs() -> str:
    lines = ["apiversion: modelslim_v1", "spec: {}", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines)


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    with pytest.raises(ConfigError, match="expands through aliases .* to more than 100000 nodes"):
        load_config(path)


@pytest.mark.parametrize("name,text", [
    ("open.yaml", "[" * 5000),
    ("closed.json", "[" * 3000 + "]" * 3000),
    ("mapping.yaml", "apiversion: modelslim_v1\nspec: {}\nx: " + "{a: " * 400 + "1" + "}" * 400),
    ("aliases.yaml", "apiversion: modelslim_v1\nspec: {}\na0: &a0 [1]\n"
                     + "\n".join(f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 150))),
])
def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="nested more than 100 levels"):
        load_config(path)


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    path = tmp_path / "cycle.yaml"
    path.write_text("apiversion: modelslim_v1\nspec: {}\nx: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="would be infinite"):
        load_config(path)


def test_anchors_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("apiversion: modelslim_v1\n"
                    "w8: &w8 {dtype: int8, scope: per_channel, symmetric: true, method: minmax}\n"
                    "spec:\n  process:\n    - {type: linear_quant, qconfig: {weight: *w8}, exclude: [lm_head]}\n")
    assert load_config(path).spec.process[0].exclude == ["lm_head"]


# ---- 2. brace patterns -----------------------------------------------------------------------------------
def test_brace_explosion_is_refused_at_config_load_with_the_field_path(tmp_path):
    config = write_config(tmp_path / "c.yaml", SCHEMES["w8a16"], exclude=("lm_head", "{a,b}" * 26))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "spec.process[0].exclude[1]: pattern '{a,b}{a,b}" in str(info.value)
    assert "more than 1024 alternatives" in str(info.value)
    with pytest.raises(ConfigError, match="more than 1024 alternatives"):
        expand_braces("{a,b}" * 26)


def test_brace_alternatives_counts_what_expand_braces_returns():
    for pattern in ["*", "*.{q,k,v}_proj", "{a,b}{c,d}", "x{a,{b,c}d}y", "{a", "a}", "{}", "{a}" * 3000]:
        assert brace_alternatives(pattern) == len(expand_braces(pattern))
    assert len(expand_braces("{a,b}" * 10)) == 1024


def test_smoothing_and_autoround_patterns_share_the_check(tmp_path):
    bomb = "{a,b}" * 11
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"apiversion": "modelslim_v1", "spec": {"process": [
        {"type": "smooth_quant", "include": [bomb]},
        {"type": "autoround_quant", "strategies": [{"qconfig": {"weight": SCHEMES["w8a16"]["weight"]},
                                                    "exclude": [bomb]}]},
    ]}}))
    message = str(pytest.raises(ConfigError, load_config, config).value)
    assert "spec.process[0].include[0]: pattern" in message
    assert "spec.process[1].strategies[0].exclude[0]: pattern" in message


# ---- 3. numbers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,needle", [
    (".inf", "spec.save[0].part_file_size: inf is not a finite number"),
    (".nan", "spec.save[0].part_file_size: nan is not a finite number"),
    ("-.inf", "spec.save[0].part_file_size: -inf is not a finite number"),
    ("1.0e+308", "spec.save[0].part_file_size: Input should be less than or equal to 1000000"),
    ("100000000000000000000", "spec.save[0].part_file_size: 100000000000000000000 is beyond ±2**53"),
])
def test_non_finite_and_huge_numbers_are_refused_with_their_path(tmp_path, value, needle):
    path = tmp_path / "c.yaml"
    path.write_text(f"apiversion: modelslim_v1\nspec:\n  save: [{{type: ascendv1_saver, part_file_size: {value}}}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)


def test_quoted_inf_in_an_unbounded_float_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("apiversion: modelslim_v1\nspec:\n  process:\n    - type: autoround_quant\n      lr: 'inf'\n"
                    "      strategies: [{qconfig: {weight: {dtype: int8, scope: per_channel}}}]\n")
    with pytest.raises(ConfigError, match=r"spec\.process\[0\]\.lr: inf is not a finite number"):
        load_config(path)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_activation_budget_must_be_finite(monkeypatch, raw):
    monkeypatch.setenv(BUDGET_ENV, raw)
    with pytest.raises(ConfigError, match=BUDGET_ENV):
        budget_from_env()


# ---- 4. model loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,needle", [
    ("{not json", "config.json"),
    ("[1, 2]", "config.json"),
    (None, "config.json"),  # model_type removed
    ({"model_type": "no_such_arch"}, "config.json"),
    ({"hidden_size": -5}, "config.json"),
    ({"hidden_size": "big"}, "config.json"),
    ({"num_attention_heads": 0}, "config.json"),
    ({"vocab_size": -1}, "vocab_size is -1"),
    ({"num_hidden_layers": 0}, "num_hidden_layers is 0"),
])
def test_invalid_config_json_is_an_invalid_model_error(tiny_llama, tmp_path, text, needle):
    model = copy_model(tiny_llama, tmp_path / "m")
    config = model / "config.json"
    if isinstance(text, str):
        config.write_text(text)
    else:
        edit_json(config, (lambda d: d.pop("model_type")) if text is None else (lambda d: d.update(text)))
    with pytest.raises(InvalidModelError, match=needle):
        create_adapter(LLAMA, str(model), False).init_skeleton()


def test_a_model_torch_cannot_build_is_an_invalid_model_error(tiny_llama, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "m")
    edit_json(model / "config.json", lambda d: d.update(intermediate_size=2**70))
    adapter = create_adapter(LLAMA, str(model), False)  # the config itself is readable
    with pytest.raises(InvalidModelError, match="cannot build a model from .*config.json"):
        adapter.init_skeleton()


@pytest.mark.parametrize("change,needle", [
    (lambda t: t.to(torch.int32), "is torch.int32, expected a floating-point weight"),
    (lambda t: t[:-1].clone(), "has shape [63, 64], expected [64, 64]"),
])
def test_a_weight_that_does_not_fit_config_json_is_named(tiny_llama, tmp_path, change, needle):
    model = copy_model(tiny_llama, tmp_path / "m")
    file = rewrite_tensor(model, f"{BLOCK}.self_attn.q_proj.weight", change)
    adapter = create_adapter(LLAMA, str(model), False)
    with pytest.raises(InvalidModelError) as info:
        adapter.load_block(adapter.init_skeleton(), BLOCK, torch.device("cpu"))
    assert f"{BLOCK}.self_attn.q_proj.weight in {file}" in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_stop_the_run_and_nothing_is_written(tiny_llama, tmp_path, bad):
    model = copy_model(tiny_llama, tmp_path / "m")

    def poison(t):
        t = t.clone()
        t[3, 5] = bad
        return t

    rewrite_tensor(model, "model.layers.1.mlp.down_proj.weight", poison)
    out = tmp_path / "out"
    with pytest.raises(InvalidModelError, match="model.layers.1.mlp.down_proj.weight in .* holds NaN/Inf values"):
        run_quant(model, out, write_config(tmp_path / "c.yaml", SCHEMES["w8a16"]))
    assert not out.exists()


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("sharded"), "llama", shards="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_stray_safetensors_next_to_an_index_are_ignored_with_a_warning(sharded_llama, tmp_path, log_lines):
    model = copy_model(sharded_llama, tmp_path / "m")
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    first = sorted(set(weight_map.values()))[0]
    stray = load_file(model / first)
    save_file({k: torch.full_like(v, float("nan")) for k, v in stray.items()}, model / "consolidated.safetensors")
    checkpoint = SafetensorsCheckpoint(model)
    assert "consolidated.safetensors" not in {checkpoint.file_of(n) for n in checkpoint.names()}
    assert any("consolidated.safetensors not named by model.safetensors.index.json, ignored" in line
               for line in log_lines)
    name = next(iter(stray))
    assert torch.equal(checkpoint.load([name])[name], stray[name])


def test_index_problems_are_named(sharded_llama, tmp_path):
    model = copy_model(sharded_llama, tmp_path / "m")
    index = model / "model.safetensors.index.json"
    good = index.read_text()
    weight_map = json.loads(good)["weight_map"]
    name, file = next(iter(weight_map.items()))
    other = next(f for f in sorted(set(weight_map.values())) if f != file)
    for broken, needle in [
        ("{not json", "is not valid JSON"),
        (json.dumps({"weight_map": ["x"]}), "is malformed"),
        (json.dumps({"weight_map": {name: "../elsewhere.safetensors"}}), "is malformed"),
        (json.dumps({"weight_map": {**weight_map, name: "gone.safetensors"}}), "names ['gone.safetensors'], missing"),
        (json.dumps({"weight_map": {**weight_map, name: other}}), f"maps {name} to {other}, which lacks it"),
    ]:
        index.write_text(broken)
        with pytest.raises(InvalidModelError, match="model.safetensors.index.json") as info:
            SafetensorsCheckpoint(model)
        assert needle in str(info.value)


def test_a_tensor_in_two_files_without_an_index_names_both(tiny_llama, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "m")
    shutil.copyfile(model / "model.safetensors", model / "model-copy.safetensors")
    with pytest.raises(InvalidModelError, match="is in both .*model-copy.safetensors and .*model.safetensors|"
                                                "is in both .*model.safetensors and .*model-copy.safetensors"):
        SafetensorsCheckpoint(model)


# ---- 5. eval and convert ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(tiny_llama, tmp_path_factory):
    work = tmp_path_factory.mktemp("quantized")
    out = work / "out"
    run_quant(tiny_llama, out, write_config(work / "c.yaml", SCHEMES["w8a16"]))
    return out


@pytest.fixture
def eval_text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("Debian packages are installed with apt. " * 40)
    return path


def test_hub_ids_are_refused_before_anything_is_loaded(tiny_llama, quantized, tmp_path, capsys, eval_text,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "eval", "--model_path", "Qwen/Qwen2.5-7B", "--quant_path", quantized,
                        "--dataset", eval_text)
    assert code == 2 and "--model_path Qwen/Qwen2.5-7B is not a local directory; models are never downloaded" in err
    code, err = run_cli(capsys, "eval", "--model_path", tiny_llama, "--quant_path", "org/quantized",
                        "--dataset", eval_text)
    assert code == 2 and "--quant_path org/quantized is not a local directory" in err
    code, err = run_cli(capsys, "convert", "--model_path", "org/quantized", "--save_path", tmp_path / "o")
    assert code == 2 and "--model_path org/quantized is not a local directory" in err


@pytest.mark.parametrize("size", ["nan", "inf", "1e308"])
def test_convert_part_file_size_must_be_a_sane_number(quantized, tmp_path, capsys, size):
    code, err = run_cli(capsys, "convert", "--model_path", quantized, "--save_path", tmp_path / "o",
                        "--part_file_size", size)
    assert code == 2 and "--part_file_size" in err and not (tmp_path / "o").exists()


def remote_code_model(source, target):
    model = copy_model(source, target)
    edit_json(model / "config.json", lambda d: d.update(model_type="evilarch",
                                                        auto_map={"AutoConfig": "evil.EvilConfig"}))
    return model


def test_remote_code_needs_trust_in_eval_and_convert(tiny_llama, quantized, tmp_path, capsys, eval_text):
    remote = remote_code_model(tiny_llama, tmp_path / "remote")
    code, err = run_cli(capsys, "eval", "--model_path", remote, "--quant_path", quantized, "--dataset", eval_text)
    assert code == 2 and "needs its own Python code to load; review it, then pass --trust_remote_code True" in err
    remote_quant = remote_code_model(quantized, tmp_path / "remote_quant")
    code, err = run_cli(capsys, "convert", "--model_path", remote_quant, "--save_path", tmp_path / "o")
    assert code == 2 and "--trust_remote_code True" in err


def description_edits(layer):
    weight = f"{layer}.weight"
    return [
        (lambda path: path.write_text("{oops"), "is not valid JSON"),
        (lambda path: path.write_text("[]"), "must hold a JSON object"),
        (lambda path: edit_json(path, lambda d: d.update({weight: 8})), f"entry '{weight}' has type tag 8"),
        (lambda path: edit_json(path, lambda d: d.update({weight: "W3A7"})), f"entry '{weight}' has type 'W3A7'"),
    ]


@pytest.mark.parametrize("case", range(4))
def test_a_malformed_description_is_refused_before_the_float_model_loads(tiny_llama, quantized, tmp_path, capsys,
                                                                        eval_text, monkeypatch, case):
    import msmodelslim.app.evaluate as evaluate

    broken = copy_model(quantized, tmp_path / "q")
    edit, needle = description_edits(f"{BLOCK}.self_attn.q_proj")[case]
    edit(broken / "quant_model_description.json")
    monkeypatch.setattr(evaluate, "load_float_model", lambda *a: pytest.fail("the float model was loaded"))
    code, err = run_cli(capsys, "eval", "--model_path", tiny_llama, "--quant_path", broken, "--dataset", eval_text)
    assert code == 2 and "quant_model_description.json" in err and needle in err
    code, err = run_cli(capsys, "convert", "--model_path", broken, "--save_path", tmp_path / "o")
    assert code == 2 and needle in err and not (tmp_path / "o").exists()


def test_eval_checks_the_quant_path_before_the_float_model(tiny_llama, tmp_path, capsys, eval_text, monkeypatch):
    import msmodelslim.app.evaluate as evaluate

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(evaluate, "load_float_model", lambda *a: pytest.fail("the float model was loaded"))
    code, err = run_cli(capsys, "eval", "--model_path", tiny_llama, "--quant_path", tmp_path / "empty",
                        "--dataset", eval_text)
    assert code == 2 and "quant_model_description.json is missing" in err


def test_eval_names_the_way_out_for_the_other_layouts_quant_writes(tiny_llama, tmp_path, capsys, eval_text,
                                                                    monkeypatch):
    import msmodelslim.app.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_float_model", lambda *a: pytest.fail("the float model was loaded"))
    both = tmp_path / "both"  # what spec.save with two savers writes: one folder per format
    (both / "ascendv1").mkdir(parents=True)
    (both / "ascendv1" / "quant_model_description.json").write_text("{}")
    code, err = run_cli(capsys, "eval", "--model_path", tiny_llama, "--quant_path", both, "--dataset", eval_text)
    assert code == 2 and f"pass its ascendv1 folder, {both / 'ascendv1'}" in err
    ct = tmp_path / "ct"
    ct.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    (ct / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "compressed-tensors"}}))
    code, err = run_cli(capsys, "eval", "--model_path", tiny_llama, "--quant_path", ct, "--dataset", eval_text)
    assert code == 2 and f"{ct}: quantization_config does not validate: config_groups: Field required" in err
    code, err = run_cli(capsys, "convert", "--model_path", ct, "--save_path", tmp_path / "out")
    assert code == 2 and f"{ct} is a compressed-tensors checkpoint" in err and "ascendv1_saver" in err


def test_a_quantized_layer_missing_a_tensor_is_named(quantized, tmp_path, capsys):
    broken = copy_model(quantized, tmp_path / "q")
    rewrite = next(broken.glob("*.safetensors"))
    tensors = load_file(rewrite)
    layer = next(k for k in tensors if k.endswith("q_proj.weight_scale")).rpartition(".")[0]
    del tensors[f"{layer}.weight_scale"]
    save_file(tensors, rewrite)
    code, err = run_cli(capsys, "convert", "--model_path", broken, "--save_path", tmp_path / "o")
    assert code == 2 and f"quantized layer {layer} (W8A16) lacks tensor(s) {layer}.weight_scale" in err


# ---- 6. symlinked side files -----------------------------------------------------------------------------
def test_side_file_links_are_followed_only_inside_the_model_or_the_hf_cache(tmp_path, monkeypatch, log_lines):
    cache = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    (cache / "hub" / "blobs").mkdir(parents=True)
    (cache / "hub" / "blobs" / "abc").write_text('{"from": "cache"}')
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("private key")
    source, out = tmp_path / "model", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    (source / "config.json").write_text('{"model_type": "llama"}')
    (source / "tokenizer_config.json").symlink_to(cache / "hub" / "blobs" / "abc")
    (source / "alias.json").symlink_to("config.json")
    (source / "notes.txt").symlink_to(secret)
    copy_model_files(source, out)
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "cache"}
    assert (out / "alias.json").is_file() and not (out / "alias.json").is_symlink()
    assert any("notes.txt" in line and str(secret) in line and "symlink" in line for line in log_lines)
