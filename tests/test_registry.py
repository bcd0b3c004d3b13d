"""Model registry: the shipped adapters.ini, third-party entry points, and helpful errors."""
from importlib.metadata import EntryPoint

import pytest

from msmodelslim.core.errors import ConfigError
from msmodelslim.model import registry
from msmodelslim.model.families import LlamaAdapter, Qwen2Adapter, Qwen3Adapter


def test_shipped_names_resolve_to_family_adapters():
    table = registry.registered_adapters()
    for name, cls in [("SmolLM2-135M-Instruct", LlamaAdapter), ("Llama-3.1-8B-Instruct", LlamaAdapter),
                      ("Qwen2.5-7B-Instruct", Qwen2Adapter), ("QwQ-32B", Qwen2Adapter), ("Qwen3-32B", Qwen3Adapter)]:
        assert registry.adapter_class(name, table) is cls


def test_entry_points_add_models(monkeypatch):
    ep = EntryPoint(name="MyModel-7B", value="msmodelslim.model.families:Qwen3Adapter", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    assert registry.adapter_class("MyModel-7B") is Qwen3Adapter


def test_unknown_name_lists_closest_and_is_case_sensitive():
    with pytest.raises(ConfigError, match="closest: .*Qwen2.5-7B-Instruct"):
        registry.adapter_class("qwen2.5-7b-instruct")


def test_quant_type_builtin_recipe_runs(tiny_qwen3_bf16_tied, tmp_path):
    from msmodelslim.app.quantize import quantize
    from msmodelslim.app.quantize_request import QuantizeRequest
    from msmodelslim.core.device import DeviceSpec

    report = quantize(QuantizeRequest(model_path=tiny_qwen3_bf16_tied, save_path=tmp_path / "o", model_type="Qwen3-8B",
                                      device=DeviceSpec("cpu"), quant_type="W8A16"))
    assert set(report.plan.values()) == {"W8A16", "FLOAT"} and report.plan["lm_head"] == "FLOAT"
    assert (tmp_path / "o" / "Qwen3-8B_best_practice.yaml").exists()
