"""The independent reference reader (tests/reference_reader.py) on the families whose output it cannot take as
transformers' own: MiniMax-M2 and Step-3.5-Flash write their published names (block_sparse_moe.experts.E.w1,
moe.share_expert, moe.router_bias), Kimi-K2's config.json says a model_type transformers lacks, and LongCat-Flash's
transformers module keeps gate/up rows for weightless identity experts. The reader must rebuild each output through
transformers alone (strict load) and agree with our reader; MiniMax-M2's C8 KV cache goes through both readers."""
import json

import pytest
import torch
import yaml

from helpers import SCHEMES, run_quant, small_calib
from msmodelslim.cli.__main__ import main
from msmodelslim.format.ascendv1.reader import load_ascendv1
from reference_reader import load_reference_model, transformers_name
from tiny_models import make_tiny_model

MODEL_TYPE = {"kimi_k2": "Kimi-K2-Instruct-0905", "minimax_m2": "MiniMax-M2.7", "longcat_flash": "LongCat-Flash-Chat",
              "step3p5": "Step-3.5-Flash"}
ROUTED_EXPERTS = "*.experts.*"  # not shared experts (`shared_experts.`, `share_expert.`)


def rule(scheme: str, include=("*",), exclude=()) -> dict:
    return {"type": "linear_quant", "qconfig": SCHEMES[scheme], "include": list(include), "exclude": list(exclude)}


# Static attention, int4 routed experts, dynamic int8 for the rest: each reader path the families exercise.
MIXED = [rule("w8a8_static", include=["*self_attn*"]),
         rule("w4a8_dynamic", include=[ROUTED_EXPERTS]),
         rule("w8a8_dynamic", exclude=["lm_head", "*self_attn*", ROUTED_EXPERTS])]
C8 = {"type": "dynamic_cache", "qconfig": {"dtype": "int8", "scope": "per_channel", "symmetric": True,
                                           "method": "minmax"}}


def write_process(path, process: list[dict], dataset: str):
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1",
                                    "spec": {"runner": "layer_wise", "process": process, "dataset": dataset}}))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = make_tiny_model(tmp_path_factory.mktemp(family), family)
        return made[family]

    return get


def relative_logit_error(model, reference, ids) -> float:
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, reference(input_ids=ids).logits
    return float((a - b).abs().max() / b.abs().max())


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))


def test_published_names_map_to_transformers_modules():
    assert (transformers_name("model.layers.0.block_sparse_moe.experts.3.w2", "minimax_m2")
            == "model.layers.0.mlp.experts.3.down_proj")
    assert transformers_name("model.layers.0.block_sparse_moe.e_score_correction_bias", "minimax_m2") == \
        "model.layers.0.mlp.e_score_correction_bias"
    assert transformers_name("model.layers.2.moe.router_bias", "step3p5") == \
        "model.layers.2.mlp.gate.e_score_correction_bias"
    assert transformers_name("model.layers.2.moe.share_expert.up_proj.weight", "step3p5") == \
        "model.layers.2.mlp.shared_experts.up_proj.weight"
    assert transformers_name("model.layers.2.moe.experts.1.w1.weight", "step3p5") == \
        "model.layers.2.mlp.experts.1.w1.weight"  # Step-3.5 keeps gate/up/down_proj: only MiniMax renames w1/w2/w3
    assert transformers_name("model.layers.1.mlp.experts.0.gate_proj", "kimi_k2") == "model.layers.1.mlp.experts.0.gate_proj"


@pytest.mark.parametrize("family", list(MODEL_TYPE))
def test_reference_reader_rebuilds_the_family_and_agrees_with_ours(checkpoints, tmp_path, family):
    out = tmp_path / "out"
    run_quant(checkpoints(family), out, write_process(tmp_path / "c.yaml", MIXED, dataset=small_calib(tmp_path)),
              MODEL_TYPE[family])
    description = json.loads((out / "quant_model_description.json").read_text())
    assert {"W8A8", "W4A8_DYNAMIC"} <= {v for v in description.values() if isinstance(v, str)}
    ids = probe_ids()
    error = relative_logit_error(load_ascendv1(out).eval(), load_reference_model(out).eval(), ids)
    print(f"{family}: our reader vs the reference reader, max relative logit error {error:.2e}")
    assert error < 1e-4


def test_minimax_m2_c8_reads_back_through_both_readers(checkpoints, tmp_path):
    out = tmp_path / "out"
    process = [rule("w8a8_dynamic", exclude=["lm_head"]), C8]
    run_quant(checkpoints("minimax_m2"), out, write_process(tmp_path / "c.yaml", process, dataset=small_calib(tmp_path)),
              MODEL_TYPE["minimax_m2"])
    assert main(["check", str(out)]) == 0
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["kv_cache_type"] == "C8"
    for layer in range(2):
        for name in ("k_proj.kv_cache_scale", "k_proj.kv_cache_offset", "v_proj.kv_cache_scale", "v_proj.kv_cache_offset"):
            assert description[f"model.layers.{layer}.self_attn.{name}"] == "C8"
    ids = probe_ids()
    ours, reference = load_ascendv1(out).eval(), load_reference_model(out).eval()
    error = relative_logit_error(ours, reference, ids)
    print(f"minimax_m2 W8A8 dynamic + C8: our reader vs the reference reader, max relative logit error {error:.2e}")
    assert error < 1e-4
    # the cache quantization is really applied: without it the reference reads other logits
    without_c8 = load_reference_model(out).eval()
    for attention in (m for n, m in without_c8.named_modules() if n.endswith("self_attn")):
        attention._forward_pre_hooks.clear()
    assert relative_logit_error(ours, without_c8, ids) > 10 * error


def test_minimax_m2_kv_smooth_is_refused_before_any_weight_is_read(checkpoints, tmp_path, capsys, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)
    config = write_process(tmp_path / "c.yaml", [{"type": "kv_smooth"}, C8], dataset=small_calib(tmp_path))
    code = main(["quant", "--model_path", str(checkpoints("minimax_m2")), "--save_path", str(tmp_path / "out"),
                 "--device", "cpu", "--model_type", "MiniMax-M2.7", "--config_path", str(config)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "kv_smooth" in err and "q_norm" in err and "per-head norm" in err, err
    assert not (tmp_path / "out").exists()
