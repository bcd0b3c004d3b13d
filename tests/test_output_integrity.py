"""Outputs hold every tensor the model needs, the same bytes on every run, and the writers' last check catches a
writer that drops one (issue: compressed-tensors lost norms whose freed addresses were reused)."""
import json

import pytest
import torch
import yaml
from safetensors import safe_open

from helpers import SCHEMES, run_quant, saved_tensors
from msmodelslim.core.errors import FormatCheckError
from msmodelslim.format.integrity import required_tensors, verify_complete
from tiny_models import make_tiny_model


def _config(path, save_type, scheme="w8a8_dynamic"):
    spec = {"runner": "layer_wise",
            "process": [{"type": "linear_quant", "qconfig": SCHEMES[scheme], "exclude": ["lm_head"]}],
            "save": [{"type": save_type, "part_file_size": 0}]}
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


@pytest.fixture(scope="module")
def six_layer_llama(tmp_path_factory):
    # bf16: widening each tensor allocates, and freed addresses are reused block after block (the old bug)
    return make_tiny_model(tmp_path_factory.mktemp("llama6"), "llama", dtype=torch.bfloat16, num_hidden_layers=6)


@pytest.mark.parametrize("save_type", ["compressed_tensors", "ascendv1_saver"])
def test_repeated_runs_write_every_tensor_with_the_same_bytes(six_layer_llama, tmp_path, save_type):
    config = _config(tmp_path / "c.yaml", save_type)
    with safe_open(next(six_layer_llama.glob("*.safetensors")), "pt") as f:
        source_names = set(f.keys())
    runs = []
    for i in range(4):
        out = tmp_path / f"out{i}"
        run_quant(six_layer_llama, out, config)
        runs.append(saved_tensors(out))
    names = set(runs[0])
    norms = {n for n in source_names if "norm" in n}
    assert len(norms) == 13 and norms <= names  # 6 layers x 2 + final norm
    # every source tensor is there, either as itself (float) or as its quantized replacement
    for name in source_names:
        prefix = name.rsplit(".", 1)[0]
        assert name in names or f"{prefix}.weight_packed" in names, name
    for other in runs[1:]:
        assert set(other) == names
        assert all(torch.equal(other[k], runs[0][k]) for k in names)


def test_tied_table_is_stored_once_in_compressed_tensors_and_twice_in_ascendv1(tiny_qwen3_bf16_tied, tmp_path):
    for save_type, expect_head in (("compressed_tensors", False), ("ascendv1_saver", True)):
        out = tmp_path / save_type
        run_quant(tiny_qwen3_bf16_tied, out, _config(tmp_path / f"{save_type}.yaml", save_type), model_type="Qwen3-8B")
        assert ("lm_head.weight" in saved_tensors(out)) == expect_head


def test_verify_complete_names_what_a_writer_dropped(tiny_llama, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "out"
    run_quant(tiny_llama, out, _config(tmp_path / "c.yaml", "compressed_tensors"))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama))
    quantized = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    required = required_tensors(model, quantized, tied_aliases=False)
    verify_complete(out, required)  # the real output is complete
    tensors = saved_tensors(out)
    dropped = "model.layers.1.post_attention_layernorm.weight"
    del tensors[dropped]
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(FormatCheckError, match=dropped):
        verify_complete(out, required)


# ---- non-finite values are never written, and `check` reports them ------------------------------------------
def test_the_shard_writer_refuses_a_non_finite_tensor_by_name(tmp_path):
    from msmodelslim.core.errors import ProcessingError
    from msmodelslim.format.shards import ShardStream

    stream = ShardStream(tmp_path, 0)
    stream.add("ok.weight_scale", torch.ones(4))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ProcessingError, match="layers.0.q_proj.weight_scale holds NaN or Inf"):
            stream.add("model.layers.0.q_proj.weight_scale", torch.tensor([1.0, bad]))
        stream._seen.discard("model.layers.0.q_proj.weight_scale")
    with pytest.raises(ProcessingError, match="fp8"):
        stream.add("fp8", torch.tensor([float("nan")]).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("damage", ["nan_scale", "inf_deq_scale", "garbage_shard", "truncated_shard"])
def test_check_reports_non_finite_and_unreadable_tensors(tiny_llama, tmp_path, capsys, damage):
    from safetensors.torch import save_file

    from helpers import write_config
    from msmodelslim.cli.__main__ import main
    from msmodelslim.format.ascendv1.tensors import encode_deq_scale

    scheme = "w8a8_static" if damage == "inf_deq_scale" else "w8a8_dynamic"
    out = tmp_path / "out"
    run_quant(tiny_llama, out, write_config(tmp_path / "c.yaml", SCHEMES[scheme], part_file_size=0))
    shard = out / "quant_model_weights.safetensors"
    tensors = saved_tensors(out)
    target = "model.layers.1.mlp.down_proj"
    if damage == "nan_scale":
        tensors[f"{target}.weight_scale"][3, 0] = float("nan")
        save_file(tensors, str(shard))
        needle = f"{target}.weight_scale holds NaN or Inf"
    elif damage == "inf_deq_scale":
        deq = torch.full_like(tensors[f"{target}.deq_scale"], 0, dtype=torch.float32) + float("inf")
        tensors[f"{target}.deq_scale"] = encode_deq_scale(deq, torch.float32)
        save_file(tensors, str(shard))
        needle = f"{target}.deq_scale holds NaN or Inf"
    elif damage == "garbage_shard":
        shard.write_bytes(b"\x00garbage" * 100)
        needle = "is not a readable safetensors file"
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        needle = "is not a readable safetensors file"
    capsys.readouterr()  # only what check prints counts
    assert main(["check", str(out)]) == 4
    captured = capsys.readouterr()
    assert needle in captured.out and "Traceback" not in captured.err


def test_the_plan_lists_what_is_written(tiny_llama, tmp_path, log_lines):
    """include ["*"] without excluding lm_head: the head lies outside the decoder layers, which are all the runner
    quantizes, so the plan (and --dry_run) must say FLOAT for it, as the description then does, with a warning."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"process": [
        {"type": "linear_quant", "qconfig": SCHEMES["w8a16"], "include": ["*"]}]}}))
    dry = run_quant(tiny_llama, tmp_path / "dry", config, dry_run=True)
    assert dry.plan["lm_head"] == "FLOAT"
    assert any("matches lm_head, outside the decoder layers" in line for line in log_lines)
    report = run_quant(tiny_llama, tmp_path / "out", config)
    description = json.loads((tmp_path / "out" / "quant_model_description.json").read_text())
    for name, scheme in report.plan.items():
        assert description[f"{name}.weight"] == scheme, name


def test_checkpoint_tensors_the_model_does_not_read_are_named_and_kept(tmp_path, log_lines):
    """A tensor the architecture has no place for (here a fake multi-token-prediction layer) is named in the log
    and written unchanged instead of vanishing from the output (tests/test_passthrough.py covers the rest)."""
    from safetensors.torch import load_file, save_file

    model = make_tiny_model(tmp_path / "m", "llama")
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    run_quant(model, tmp_path / "out", _config(tmp_path / "c.yaml", "ascendv1_saver"))
    assert any("model.layers.2 (multi-token-prediction layer, 1 tensor(s)) is written unchanged" in line and
               "model.layers.2.eh_proj.weight" in line for line in log_lines)
    assert torch.equal(saved_tensors(tmp_path / "out")["model.layers.2.eh_proj.weight"], torch.zeros(4, 4))
