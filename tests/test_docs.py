"""The documentation's examples run: YAML blocks validate, and the adapter example quantizes a model."""
import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
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
    data = yaml.safe_load(block)
    if data["apiversion"] == "modelslim_convert":  # its own protocol (core/convert_config.py)
        from msmodelslim.core.convert_config import parse_convert_config

        assert parse_convert_config(data).spec.linears
        return
    config = parse_config(data)
    # a modelslim_v0 example is translated to modelslim_v1; a diffusion example stays multimodal_sd_modelslim_v1
    assert config.apiversion == ("modelslim_v1" if data["apiversion"] == "modelslim_v0" else data["apiversion"])


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


def _readme_commands() -> list[list[str]]:
    import shlex

    text = (DOCS.parent / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                part = part.strip()
                if part.startswith("msmodelslim "):
                    commands.append(shlex.split(part.replace("$M", "/models/SmolLM2"))[1:])
    return commands


def test_readme_commands_are_valid_command_lines():
    from msmodelslim.cli.arguments import build_parser

    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"demo", "quant", "eval", "convert", "check"}
    for argv in commands:
        build_parser().parse_args(argv)  # argparse exits on an unknown flag or a missing required one
    for argv in commands:  # files the examples name ship with the project
        for flag in ("--config_path",):
            if flag in argv:
                assert (DOCS.parent / argv[argv.index(flag) + 1]).is_file()


def test_readme_python_api_example_matches_the_api():
    import inspect

    import msmodelslim

    (block,) = [b for b in re.findall(r"```python\n(.*?)```", (DOCS.parent / "README.md").read_text(), re.S)
                if "msmodelslim.quantize" in b]
    for name, call in re.findall(r"msmodelslim\.(quantize|evaluate)\((.*?)\)\s*(?:#|\n)", block):
        args, kwargs = eval(f"(lambda *a, **k: (a, k))({call})")
        inspect.signature(getattr(msmodelslim, name)).bind(*args, **kwargs)
