"""Kimi-K2.5 / Kimi-K2.6 (model/vlm_kimi.py) on a tiny random checkpoint in Moonshot's published layout
(tests/tiny_vlm.py make_tiny_kimi_k25): MoonViT tower (fused `wqkv` with interleaved rotary rows) + projector +
DeepSeek-V3 text (MLA, a dense layer, then shared + routed experts). The block-by-block walk equals transformers' own
model (which reads the published names through its conversion mapping) on image+prompt inputs; flex_smooth_quant,
iter_smooth and quarot are exact in float; the practice recipe goes quant -> check -> both readers with the same
bytes from layer_wise and model_wise and the vision tensors untouched byte for byte.

transformers' Kimi_K25ImageProcessor needs torchvision, which this environment lacks: the tiny checkpoint names a
test stand-in (TinyKimiImageProcessor, same outputs on images cropped to whole merge windows), and the real one is
refused by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from msmodelslim.core.config import parse_config
from msmodelslim.core.errors import InvalidModelError, UnsupportedError
from msmodelslim.core.runner import run_blocks
from msmodelslim.core.vlm_dataset import VlmCalibSample
from msmodelslim.model import registry
from msmodelslim.model.vlm_kimi import KimiK25Adapter
from msmodelslim.processor.base import ProcessorContext, build_pipeline
from test_vlm_models import CPU, FLOAT_BOUND, PROCESSOR_FILES, finish_walk, logits, stored, walked_logits
from tiny_vlm import PROMPT, image_samples, make_tiny_kimi_k25, register_tiny_kimi_image_processor

TEXT = "language_model.model.layers"
VISION_PREFIXES = ("vision_tower.", "mm_projector.")
PRACTICE = Path(__file__).parents[1] / "msmodelslim" / "lab_practice" / "kimi_k2_5"
# relative logit error (‖Δ‖/‖logits‖) of the W4A8 model read back, image+prompt inputs: int4 experts on a
# random tiny model, measured 0.17 (K2.5's flex_smooth_quant) and 0.17 (K2.6); a wrong layout or scale gives ~1
READ_BACK_BOUND = 0.3
READER_AGREEMENT = 2e-3  # max |Δlogit| / max |logit| between our reader and the reference reader


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    register_tiny_kimi_image_processor()
    return make_tiny_kimi_k25(tmp_path_factory.mktemp("kimi_k25"))


def adapter_of(path: Path, name: str = "Kimi-K2.5") -> KimiK25Adapter:
    return KimiK25Adapter(name, path)


_ORIGINAL: dict[Path, torch.nn.Module] = {}


def original_model(path: Path) -> torch.nn.Module:
    if path not in _ORIGINAL:
        _ORIGINAL[path] = adapter_of(path).init_model(CPU, load_layers=True)
    return _ORIGINAL[path]


def pipeline(adapter, process: list[dict]):
    """The processors as app/quantize.py builds them for this adapter (MLA shape included)."""
    config = parse_config({"apiversion": "modelslim_v1", "spec": {"process": process}})
    context = ProcessorContext(type(adapter).__name__, adapter.structure, adapter.attention_shape(),
                               mla=adapter.mla_shape())
    return config, build_pipeline(config.spec.process, context)


def transformed(adapter, process: list[dict], data) -> tuple[torch.nn.Module, list[dict]]:
    _, processors = pipeline(adapter, process)
    skeleton = adapter.init_skeleton()
    for processor in processors:
        processor.check_model(skeleton, adapter.block_names(skeleton))
    model = adapter.load_weights(skeleton, CPU, load_layers=True)
    batches = adapter.handle_dataset(data, CPU)
    run_blocks(adapter, model, processors, None, batches, CPU, layer_wise=False)
    return model, batches


def write_ascendv1(adapter, process: list[dict], data, out: Path, layer_wise: bool) -> dict:
    """Plan on the skeleton, load, calibrate, walk, write (as app/quantize.py does), with the runner chosen here."""
    from msmodelslim.app.plan import plan_layers
    from msmodelslim.format.ascendv1.writer import AscendV1Writer
    from msmodelslim.format.edits import OutputEdits

    config, processors = pipeline(adapter, process)
    skeleton = adapter.init_skeleton()
    plan = plan_layers(config, processors, skeleton, adapter.block_names(skeleton))
    model = adapter.load_weights(skeleton, CPU, load_layers=not layer_wise, defer_output_head=layer_wise)
    out.mkdir()
    writer = AscendV1Writer(out, 4, adapter.global_dtype(),
                            is_row_parallel=lambda n: n.rsplit(".", 1)[-1] in adapter.structure.row_parallel,
                            dtype_for=adapter.original_dtype)
    run_blocks(adapter, model, processors, writer, adapter.handle_dataset(data, CPU), CPU, layer_wise,
               unread=adapter.unread_tensors(skeleton))
    edits = OutputEdits()
    for processor in processors:
        edits = edits.merge(processor.output_edits())
    writer.finish(adapter.model_path, edits)
    return plan


# ---- structure and forward ------------------------------------------------------------------------------------
def test_the_walk_equals_transformers_on_image_and_text(source, images):
    """transformers reads the published names through its own conversion (wqkv split, rotary rows permuted); the
    adapter keeps the published modules: the same logits, and the walk (tower, projector, text layers) too."""
    from transformers import AutoModelForImageTextToText

    adapter = adapter_of(source)
    model = original_model(source)
    reference = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    batches = adapter.handle_dataset(image_samples(images[:2]) + ["a prompt without an image"], CPU)
    assert "pixel_values" in batches[0] and "pixel_values" not in batches[2]
    image_tokens = int((batches[0]["input_ids"] == reference.config.image_token_id).sum())
    assert image_tokens == batches[0]["pixel_values"].shape[0] // 4  # 2x2 patches per image token
    for batch in batches:
        want = logits(reference, batch)
        assert (logits(model, batch) - want).abs().max() < 1e-5
        delta = (walked_logits(adapter, model, batch) - want).abs().max().item()
        print(f"kimi_k25: walk vs transformers max |Δlogit| {delta:.2e} (logits up to {want.abs().max():.2f})")
        assert delta < 1e-5


def test_the_rotary_row_order_matters(source, images):
    """The published q/k rows interleave each rotary pair: read as transformers' halves (no re-indexing), the
    tower's output changes (the test above can fail)."""
    from msmodelslim.model import vlm_kimi

    adapter = adapter_of(source)
    model = original_model(source)
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    block = model.vision_tower.encoder.blocks[0]
    original = vlm_kimi.MoonVitBlock._attention

    def unpermuted(self, x, cu_seqlens, position_embeddings):
        tokens = x.shape[0]
        q, k, v = self.wqkv(x).view(tokens, 3, self.heads, self.head_dim).unbind(1)
        q, k = self._rotary(q[None], k[None], *position_embeddings)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v[None]))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.wo(out.transpose(1, 2).reshape(tokens, -1))

    want = logits(model, batch)
    try:
        vlm_kimi.MoonVitBlock._attention = unpermuted
        assert (logits(model, batch) - want).abs().max() > 1e-3
    finally:
        vlm_kimi.MoonVitBlock._attention = original
    assert block is model.vision_tower.encoder.blocks[0]


def test_module_names_are_the_published_names_and_both_names_are_registered(source):
    adapter = adapter_of(source)
    skeleton = adapter.init_skeleton()
    assert adapter.unused_checkpoint_tensors(skeleton) == []
    assert set(skeleton.state_dict()) == set(adapter.checkpoint.names())  # experts are published per expert
    assert adapter.block_names(skeleton) == ["vision_tower", "mm_projector"] + [f"{TEXT}.{i}" for i in range(3)]
    assert isinstance(skeleton.get_submodule("vision_tower.encoder.blocks.0.wqkv"), torch.nn.Linear)
    assert adapter.loader_module_name("mm_projector.proj.2") == "model.mm_projector.out_proj"
    assert adapter.loader_module_name(f"{TEXT}.1.mlp.experts.0.up_proj") == \
        "model.language_model.layers.1.mlp.experts.0.up_proj"
    table = registry.registered_adapters()
    for name, key in (("Kimi-K2.5", "kimi_k2_5"), ("Kimi-K2.6", "kimi_k2_6")):
        assert table[name].key == key and table[name].pedigree == "kimi_k2_5"
        assert registry.adapter_class(name) is KimiK25Adapter and KimiK25Adapter.is_vlm
    from msmodelslim.core.roadmap import PLANNED_MODEL_FAMILIES

    assert not {"kimi_k2_5", "kimi_k2_6"} & set(PLANNED_MODEL_FAMILIES)
    assert adapter.mla_shape() is not None and adapter.attention_shape() is None


@pytest.mark.parametrize("finished", [0, 1])
def test_a_resumed_walk_continues_exactly(source, images, finished):
    """--resume sends the saved hidden states (the input of text layer `finished`) for every finished block."""
    adapter = adapter_of(source)
    model = original_model(source)
    (batch,) = adapter.handle_dataset(image_samples(images[:1]), CPU)
    want = walked_logits(adapter, model, batch)
    walk = adapter.generate_model_forward(model, batch)
    request = next(walk)
    with torch.no_grad():  # the uninterrupted walk up to text layer `finished`: its input is what was saved
        for _ in range(finished + 2):
            request = walk.send(request.module(*request.args, **request.kwargs))
    saved = request.args[0].clone()
    resumed = adapter.generate_model_forward(model, batch)
    next(resumed)
    for _ in range(finished + 2):  # the tower, the projector and the finished text layers
        request = resumed.send(saved)
    assert request.name == f"{TEXT}.{finished}" and request.args[0] is saved
    assert (finish_walk(adapter, model, resumed, request) - want).abs().max() < 1e-5


# ---- float-exact transforms -----------------------------------------------------------------------------------
TRANSFORMS = {"flex_smooth_quant": [{"type": "flex_smooth_quant"}], "iter_smooth": [{"type": "iter_smooth"}],
              "quarot": [{"type": "quarot"}]}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_are_exact_in_float_on_images(source, images, transform):
    data = image_samples(images[:2]) + ["a prompt without an image"]
    original = original_model(source)
    model, batches = transformed(adapter_of(source), TRANSFORMS[transform], data)
    delta = max((logits(model, b) - logits(original, b)).abs().max().item() for b in batches)
    print(f"kimi_k25 {transform}: max |Δlogit| {delta:.2e} on image+prompt")
    assert delta < FLOAT_BOUND
    before, after = original.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(f"{TEXT}.0.self_attn.q_a_proj.") for k in changed)  # MLA attention
    assert any(k.startswith(f"{TEXT}.1.mlp.experts.0.") for k in changed)  # routed experts
    vision = {k for k in changed if k.startswith(VISION_PREFIXES)}
    # only the rotation touches the vision part, and only the rows of the projector's output linear
    assert vision == ({"mm_projector.proj.2.weight", "mm_projector.proj.2.bias"} if transform == "quarot" else set())


# ---- output ---------------------------------------------------------------------------------------------------
def practice(name: str) -> list[dict]:
    import yaml

    return yaml.safe_load((PRACTICE / f"{name}.yaml").read_text())["spec"]["process"]


@pytest.mark.parametrize("name", ["kimi_k2_5-w4a8", "kimi_k2_6-w4a8"])
def test_practice_quant_check_and_both_readers(tmp_path, source, images, name):
    """The lab practice (flex_smooth_quant for K2.5; W8A8 static attention but kv_b_proj, W8A8_DYNAMIC dense/shared
    MLPs, W4A8_DYNAMIC experts): layer_wise and model_wise write the same bytes; the checklist passes; the vision
    tower and projector are written byte for byte; both readers agree, close to float on image+prompt inputs."""
    from msmodelslim.format.ascendv1.checker import check_ascendv1
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from reference_reader import load_reference_model

    outs = {}
    for runner in ("layer_wise", "model_wise"):
        outs[runner] = tmp_path / runner
        plan = write_ascendv1(adapter_of(source), practice(name), image_samples(images), outs[runner],
                              layer_wise=runner == "layer_wise")
    assert stored(outs["layer_wise"]) == stored(outs["model_wise"])  # identical bytes from both runners
    out = outs["layer_wise"]
    assert not [f for f in check_ascendv1(out, list(plan)) if f.level == "error"]
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description[f"{TEXT}.0.self_attn.q_a_proj.weight"] == "W8A8"
    assert description[f"{TEXT}.0.self_attn.kv_b_proj.weight"] == "FLOAT"
    assert description[f"{TEXT}.0.mlp.gate_proj.weight"] == "W8A8_DYNAMIC"
    assert description[f"{TEXT}.1.mlp.shared_experts.down_proj.weight"] == "W8A8_DYNAMIC"
    assert description[f"{TEXT}.1.mlp.experts.3.up_proj.weight"] == "W4A8_DYNAMIC"
    assert description[f"{TEXT}.1.mlp.gate.weight"] == "FLOAT"
    source_tensors, written = stored(source), stored(out)
    vision = [n for n in source_tensors if n.startswith(VISION_PREFIXES)]
    assert len(vision) > 20 and all(description[n] == "FLOAT" for n in vision)
    assert all(written[n] == source_tensors[n] for n in vision)  # byte for byte
    for file in PROCESSOR_FILES:
        assert (out / file).read_bytes() == (source / file).read_bytes()
    ours, reference = load_ascendv1(out).eval(), load_reference_model(out).eval()
    float_model = original_model(source)
    for batch in adapter_of(source).handle_dataset(image_samples(images[:2]), CPU):
        want, got, theirs = logits(float_model, batch), logits(ours, batch), logits(reference, batch)
        relative = ((got - want).norm() / want.norm()).item()
        agreement = ((got - theirs).abs().max() / theirs.abs().max()).item()
        print(f"{name} read back: relative logit error {relative:.3f}, our reader vs the reference reader "
              f"{agreement:.1e}")
        assert relative < READ_BACK_BOUND and agreement < READER_AGREEMENT


def test_cli_quant_type_picks_the_practice_and_check_passes(tmp_path, source, images):
    """`msmodelslim quant --model_type Kimi-K2.6 --quant_type w4a8` (practice kimi_k2_6-w4a8 from kimi_k2_5/, here
    calibrated on the tiny images), then `check`."""
    import yaml

    from msmodelslim.cli.__main__ import main

    config = yaml.safe_load((PRACTICE / "kimi_k2_6-w4a8.yaml").read_text())
    config["spec"]["dataset"] = str(images[0].parent)
    path = tmp_path / "kimi_w4a8.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "Kimi-K2.6", "--config_path", str(path)]) == 0
    assert main(["check", str(out)]) == 0


def test_compressed_tensors_output_passes_check_and_reads_back_as_ascendv1(tmp_path, source, images):
    """One CLI run writing both formats (W8A8 dynamic text linears, W4A8 dynamic experts): the published tensor names
    (language_model.model.layers.*) stay, the targets name the loaded modules (model.language_model.*); quant's own
    checklist and `check` pass, and our two readers build the same layers (equal logits on image+prompt inputs)."""
    import yaml

    from msmodelslim.cli.__main__ import main
    from test_vlm_models import W8A8_DYNAMIC, assert_our_readers_agree

    w4a8 = {**W8A8_DYNAMIC, "weight": {**W8A8_DYNAMIC["weight"], "dtype": "int4"}}
    excluded = ["vision_tower*", "mm_projector*", "*lm_head", "*kv_b_proj", "*mlp.gate"]
    config = {"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": [{"type": "linear_quant", "qconfig": w4a8, "include": ["*experts.*"], "exclude": excluded},
                    {"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"],
                     "exclude": [*excluded, "*experts.*"]}],
        "save": [{"type": "ascendv1_saver"}, {"type": "compressed_tensors"}], "dataset": str(images[0].parent)}}
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["quant", "--model_path", str(source), "--save_path", str(out), "--device", "cpu",
                 "--model_type", "Kimi-K2.5", "--config_path", str(path)]) == 0
    assert main(["check", str(out)]) == 0
    quantization = json.loads((out / "compressed_tensors" / "config.json").read_text())["quantization_config"]
    targets = {t for group in quantization["config_groups"].values() for t in group["targets"]}
    assert "model.language_model.layers.1.mlp.experts.3.up_proj" in targets
    assert f"{TEXT}.1.mlp.experts.3.up_proj.weight" in stored(out / "compressed_tensors")
    assert_our_readers_agree(out / "compressed_tensors", out / "ascendv1",
                             adapter_of(source).handle_dataset(image_samples(images[:2]), CPU))


# ---- refusals -------------------------------------------------------------------------------------------------
def _copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def test_the_torchvision_image_processor_is_refused_by_name(source, tmp_path):
    pytest.importorskip("PIL")
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: the real image processor loads")
    except ImportError:
        pass
    path = _copy(source, tmp_path / "real_processor")
    (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Kimi_K25ImageProcessor",
                                                               "patch_size": 4, "merge_size": 2}))
    with pytest.raises(UnsupportedError, match="Kimi_K25ImageProcessor.*torchvision"):
        adapter_of(path).handle_dataset([VlmCalibSample(PROMPT)], CPU)


def test_quant_names_the_missing_torchvision_before_any_weight_is_read(source, images, tmp_path, monkeypatch):
    import yaml

    from msmodelslim.app.quantize import quantize
    from msmodelslim.app.quantize_request import QuantizeRequest
    from msmodelslim.core.device import DeviceSpec

    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed: the real image processor loads")
    except ImportError:
        pass
    path = _copy(source, tmp_path / "real_processor")
    (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Kimi_K25ImageProcessor",
                                                               "patch_size": 4, "merge_size": 2}))
    config = yaml.safe_load((PRACTICE / "kimi_k2_6-w4a8.yaml").read_text())
    config["spec"]["dataset"] = str(images[0].parent)
    config_path = tmp_path / "kimi_w4a8.yaml"
    config_path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(UnsupportedError, match="Kimi_K25ImageProcessor.*torchvision"):
        quantize(QuantizeRequest(model_path=path, save_path=tmp_path / "out", model_type="Kimi-K2.6",
                                 device=DeviceSpec("cpu"), config_path=config_path))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_resaved_by_transformers_is_refused_before_any_weight_is_read(source, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    path = _copy(source, tmp_path / "resaved")
    state = load_file(path / "model.safetensors")
    save_file({k.replace("vision_tower.encoder.blocks.", "model.vision_tower.layers."): v for k, v in state.items()},
              path / "model.safetensors")
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load",
                        lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(InvalidModelError, match="vision_tower.encoder.blocks"):
        adapter_of(path)


def test_another_model_type_is_refused(source, tmp_path):
    path = _copy(source, tmp_path / "other")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_vl"}))
    with pytest.raises(InvalidModelError, match="kimi_k25"):
        adapter_of(path)
