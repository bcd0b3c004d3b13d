"""Layers the engine fuses (q/k/v, gate/up) must share one scheme: refused from the plan, before any weight is
read, instead of by the format checklist after the whole run."""
from __future__ import annotations

import pytest
import yaml

from helpers import SCHEMES, run_quant, small_calib
from msmodelslim.app.quantize_checks import refuse_split_fused_groups
from msmodelslim.core.errors import UnsupportedError

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def test_a_group_with_one_scheme_or_all_float_passes():
    plan = {"model.layers.0.self_attn.q_proj": "W8A8", "model.layers.0.self_attn.k_proj": "W8A8",
            "model.layers.0.self_attn.v_proj": "W8A8", "model.layers.0.self_attn.o_proj": "W8A16",
            "model.layers.0.mlp.gate_proj": "FLOAT", "model.layers.0.mlp.up_proj": "FLOAT"}
    refuse_split_fused_groups(plan, GROUPS)


@pytest.mark.parametrize("member, scheme", [("self_attn.v_proj", "W8A8_DYNAMIC"), ("mlp.up_proj", "FLOAT")])
def test_a_group_split_between_schemes_is_named(member, scheme):
    plan = {f"model.layers.1.{m}": "W8A8" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "mlp.gate_proj", "mlp.up_proj")}
    plan[f"model.layers.1.{member}"] = scheme
    with pytest.raises(UnsupportedError, match=rf"model\.layers\.1\.{member} {scheme}"):
        refuse_split_fused_groups(plan, GROUPS)


def test_quant_refuses_a_split_group_before_any_weight_is_read(tiny_llama, tmp_path, monkeypatch):
    from msmodelslim.model import transformers_model

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr(transformers_model.TransformersModel, "load_weights", no_weights)
    process = [{"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "include": ["*q_proj"]},
               {"type": "linear_quant", "qconfig": SCHEMES["w8a16"], "include": ["*"], "exclude": ["lm_head", "*q_proj"]}]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {
        "process": process, "dataset": small_calib(tmp_path), "save": [{"type": "ascendv1_saver"}]}}))
    with pytest.raises(UnsupportedError, match="fuses into one would get different schemes"):
        run_quant(tiny_llama, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
