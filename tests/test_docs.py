"""The documentation's examples run: YAML blocks validate, and the adapter example quantizes a model."""
import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

from msmodelslim.app.quantize import QuantizeRequest, quantize
from msmodelslim.core.config import parse_config
from msmodelslim.core.device import DeviceSpec
from msmodelslim.model import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def code_blocks(language: str):
    for path in sorted(DOCS.glob("*.md")):
        for i, block in enumerate(re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)):
            yield pytest.param(block, id=f"{path.name}#{i}")


@pytest.mark.parametrize("block", [b for b in code_blocks("yaml") if "apiversion:" in b.values[0]])
def test_yaml_examples_in_docs_validate(block):
    config = parse_config(yaml.safe_load(block))
    assert config.apiversion == "modelslim_v1"


def test_adapter_example_runs(tiny_llama, tmp_path, monkeypatch):
    (python_block,) = [b.values[0] for b in code_blocks("python") if "AcmeAdapter" in b.values[0]]
    module = type(registry)("acme_adapter_example")
    exec(compile(python_block, "docs/adding_a_model.md", "exec"), module.__dict__)
    monkeypatch.setitem(__import__("sys").modules, "acme_adapter_example", module)
    ep = EntryPoint(name="Acme-7B", value="acme_adapter_example:AcmeAdapter", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    report = quantize(QuantizeRequest(model_path=tiny_llama, save_path=tmp_path / "o", model_type="Acme-7B",
                                      device=DeviceSpec("cpu"), quant_type="w8a16", allow_default_practice=True))
    assert "W8A16" in report.plan.values()
