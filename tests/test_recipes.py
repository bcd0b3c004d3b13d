"""The established tool's 89 recipes (protocol.md §3.4), each written as a config from its row
(tests/upstream_recipes.py) and run on a tiny random checkpoint of its family.

A row this version runs goes end to end: the dry-run plan, the quantization, `msmodelslim check`, our reader and
the independent reference reader (logits close to float), and the written description equals the plan. A row
that needs a feature this version lacks is refused before any weight is read, naming the missing feature.
Vision-language rows of the families with an adapter (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5) run the same
way on a tiny checkpoint of tests/tiny_vlm.py, calibrated on the row's calibImages and probed with image+prompt
inputs; the VLM rows of the other families are refused by name.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from msmodelslim.app.check import check_checkpoint
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.cli.__main__ import main
from msmodelslim.core.dataset import LAB_CALIB, load_texts
from msmodelslim.core.device import DeviceSpec
from msmodelslim.format.ascendv1.reader import load_ascendv1
from reference_reader import load_reference_model
from test_families_text import all_keys, float_reference
from tiny_models import make_tiny_model
from tiny_vlm import make_tiny_vlm
from upstream_recipes import ROWS, RUNS_DIFFUSION, VLM, RecipeRow, config_of, markdown_table

# The family whose tiny checkpoint stands in for a row's model (the row's folder is upstream's pedigree).
FOLDER_FAMILY = {
    "deepseek-r1-distill": "qwen2", "default": "llama", "qwen1_5": "qwen2", "qwen2": "qwen2", "qwen2_5": "qwen2",
    "qwq": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "deepseek_v3": "deepseek_v3",
    "deepseek_v3_2": "deepseek_v32", "deepseek_v4": "deepseek_v4", "glm4_moe": "glm4_moe",
    "glm4_moe_lite": "glm4_moe_lite", "glm_5": "glm_moe_dsa", "kimi_k2": "kimi_k2", "minimax_m2": "minimax_m2",
    "qwen3_next": "qwen3_next", "longcat_flash": "longcat_flash", "step_3_5_flash": "step3p5",
    "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl_moe",
    "qwen3_5_moe": "qwen3_5_moe",
    "internvl3_5": "internvl", "internvl3_5_moe": "internvl_moe", "glm4_6v": "glm4v_moe", "kimi_k2_5": "kimi_k25",
    "qwen2_5_omni_thinker": "qwen2_5_omni", "qwen3_omni_moe": "qwen3_omni_moe",
}
# Rows whose model is not of their folder's family: upstream's qwen3_5_moe folder holds the dense Qwen3.5/3.6 too
MODEL_FAMILY = {"Qwen3.5-27B": "qwen3_5", "Qwen3.6-27B": "qwen3_5"}
MOE_FAMILIES = {"qwen3_moe", "deepseek_v3", "deepseek_v32", "deepseek_v4", "glm4_moe", "glm4_moe_lite",
                "glm_moe_dsa", "kimi_k2", "minimax_m2", "qwen3_next", "longcat_flash", "step3p5", "qwen3_vl_moe",
                "qwen3_5_moe", "internvl_moe", "glm4v_moe", "kimi_k25", "qwen3_omni_moe"}
# Vision-language families with an adapter (msmodelslim/model/vlm.py): tiny checkpoints of tests/tiny_vlm.py
VLM_FAMILIES = {"qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "internvl", "internvl_moe",
                "glm4v_moe", "kimi_k25", "qwen2_5_omni", "qwen3_omni_moe"}
OMNI_FAMILIES = {"qwen2_5_omni", "qwen3_omni_moe"}  # the thinker of the whole model's checkpoint (model/vlm_omni.py)

# MX blocks are 32 inputs long: rows with MX layers widen the tiny MLA's kv_lora_rank (16) to one block, and the
# tiny Qwen3-VL-MoE experts' intermediate size (16, the down_proj's input) to one block
MX_SIZES = {"glm_moe_dsa": {"kv_lora_rank": 32}, "longcat_flash": {"kv_lora_rank": 32},
            # FA3 MX blocks run along MLA's latent: K = [c_kv; k_rot] and V = c_kv whole blocks of 32
            "deepseek_v3": {"kv_lora_rank": 32, "qk_rope_head_dim": 32},
            "kimi_k25": {"kv_lora_rank": 32, "qk_rope_head_dim": 32},  # its text decoder is DeepSeek-V3's
            "qwen3_vl_moe": {"moe_intermediate_size": 32}}
NO_TINY_CHECKPOINT: set[str] = set()  # families refused by name before their checkpoint is opened
SPARSE_ATTENTION = {"deepseek_v32", "glm_moe_dsa"}
# Families the reference reader cannot rebuild (family: why); it maps published names to transformers' modules
# itself (tests/reference_reader.py PUBLISHED_TO_TRANSFORMERS), so today none.
NO_REFERENCE_READER: dict[str, str] = {}
# Text like the calibration data (a random token sequence is nothing a calibrated static range was made for).
PROBE = ["The engine reads the quantized weights and maps integers back to floats for every layer.",
         "Calibration data decides the activation ranges; the evaluation text must never be used for it."]
# A VLM row's probes: images drawn here (none of them is in calibImages), each with a question about it.
IMAGE_PROBE = ["How many shapes are in this picture, and what colours are they?",
               "Read the labels in this chart and say which bar is the tallest."]
VLM_CALIB_SAMPLES = 3  # the first entries of the row's calibImages: the run stays quick, the ranges still image-made


def min_similarity(row: RecipeRow) -> float:
    """The logit similarity to float a row must keep on its tiny random model. 4-bit MX activations on random
    weights are coarse: GLM-5.1's W4A4 MXFP4 row keeps 0.65; LongCat's (iter_smooth at its default alpha moves the
    norms' spread into MXFP4 weight blocks) 0.52, 0.82 without the smoothing; a wrong layout or scale gives ~0."""
    return 0.4 if "mxfp4/per_block→mxfp4" in row.schemes else 0.6


def is_vlm(row: RecipeRow) -> bool:
    return row.apiversion == "mm_vlm"


def model_type_of(row: RecipeRow) -> str:
    return "default" if row.models == "–" else row.models.split(",")[0].strip()


def family_of(row: RecipeRow) -> str:
    # diffusion rows, VLM rows of families without an adapter, and families refused by name are refused before the
    # model matters
    family = MODEL_FAMILY.get(model_type_of(row)) or FOLDER_FAMILY.get(row.folder, "llama")
    return "llama" if family in NO_TINY_CHECKPOINT else family


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(family: str, **sizes) -> Path:
        key = family + "".join(f"-{k}{v}" for k, v in sorted(sizes.items()))
        if key not in made:
            make = make_tiny_vlm if family in VLM_FAMILIES else make_tiny_model
            made[key] = make(tmp_path_factory.mktemp(key), family, **sizes)
        return made[key]

    return get


def row_calib(row: RecipeRow, tmp_path: Path, samples: int = 6, words: int = 80) -> str:
    """The first samples of the row's own calibration set, shortened: the run stays quick on two cores while the
    ranges still come from the kind of text the recipe calibrates on. A VLM row's set (calibImages, calibVideos) is
    an index.jsonl of image/video+prompt entries: its first VLM_CALIB_SAMPLES entries, the media by absolute path."""
    from upstream_recipes import dataset_of

    if is_vlm(row):
        source = LAB_CALIB / dataset_of(row) / "index.jsonl"
        entries = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        path = tmp_path / "calib" / "index.jsonl"
        path.parent.mkdir()
        media = ("image", "video")  # calibVideos' clips are frame directories
        path.write_text("\n".join(json.dumps({**e, **{m: str(source.parent / e[m]) for m in media if m in e}},
                                              ensure_ascii=False) for e in entries[:VLM_CALIB_SAMPLES]))
        return str(path)
    texts = [" ".join(t.split()[:words]) for t in load_texts(dataset_of(row))[:samples]]
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts))
    return str(path)


def write_row_config(row: RecipeRow, tmp_path: Path, dataset: str | None = None) -> Path:
    config = config_of(row, family_of(row) in MOE_FAMILIES)
    if dataset is not None:
        key = "calib_dataset" if config["apiversion"] == "modelslim_v0" else "dataset"
        config["spec"][key] = dataset
    path = tmp_path / Path(row.file).name
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def request(row: RecipeRow, model: Path, out: Path, config: Path, dry_run: bool) -> QuantizeRequest:
    return QuantizeRequest(model_path=model, save_path=out, model_type=model_type_of(row), device=DeviceSpec("cpu"),
                           config_path=config, dry_run=dry_run)


REFUSED = [r for r in ROWS if r.expect not in ("runs", RUNS_DIFFUSION)]


def _run_key(row: RecipeRow) -> str:
    """Rows that write the same config for the same tiny checkpoint and adapter make the same run."""
    from msmodelslim.model.registry import lookup

    config = config_of(row, family_of(row) in MOE_FAMILIES)
    return json.dumps([family_of(row), lookup(model_type_of(row)).target, config], sort_keys=True)


_BY_KEY: dict[str, list[RecipeRow]] = {}
for _row in (r for r in ROWS if r.expect == "runs"):
    _BY_KEY.setdefault(_run_key(_row), []).append(_row)
RUNS = [rows[0] for rows in _BY_KEY.values()]  # one end-to-end run per distinct config (e.g. Qwen2-7B / Qwen2-72B)


def test_rows_sharing_a_run_write_the_same_config():
    for rows in _BY_KEY.values():
        assert len({_run_key(r) for r in rows}) == 1
    assert sum(len(rows) for rows in _BY_KEY.values()) == sum(r.expect == "runs" for r in ROWS)


def test_the_table_has_every_recipe():
    files = {r.file for r in ROWS}
    assert len(files) == len(ROWS) == 89


def test_vlm_rows_run_where_a_vision_language_adapter_exists():
    """The VLM rows of the families with an adapter run (the Omni rows on calibVideos' frame-directory clips);
    none is left refused by name (test_a_recipe_needing_a_missing_feature_is_refused_by_name)."""
    from msmodelslim.model.registry import adapter_class

    vlm_rows = [r for r in ROWS if is_vlm(r)]
    running = [r for r in vlm_rows if family_of(r) in VLM_FAMILIES]
    assert len(running) == 21 and all(r.expect == "runs" and adapter_class(model_type_of(r)).is_vlm for r in running)
    assert all(r.expect == VLM for r in vlm_rows if r not in running)


@pytest.mark.parametrize("row", REFUSED, ids=lambda r: r.file)
def test_a_recipe_needing_a_missing_feature_is_refused_by_name(row, checkpoints, tmp_path, capsys, monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)
    config = write_row_config(row, tmp_path)
    code = main(["quant", "--model_path", str(checkpoints(family_of(row))), "--save_path", str(tmp_path / "out"),
                 "--device", "cpu", "--model_type", model_type_of(row), "--config_path", str(config)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "not implemented yet" in err or "not supported yet" in err, err
    assert row.expect.lower() in err.lower(), err
    assert not (tmp_path / "out").exists()


Probe = list[dict]  # the model inputs a row is probed with: {"input_ids": ...}, or a VLM's image+prompt inputs


def _logits(model, probe: Probe) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**inputs).logits.float() for inputs in probe]


def _logit_error(model, reference, probe: Probe) -> float:
    """max |Δlogit| / max |logit| of `reference`, over every position of every input."""
    pairs = list(zip(_logits(model, probe), _logits(reference, probe)))
    return max(float((a - b).abs().max()) for a, b in pairs) / max(float(b.abs().max()) for _, b in pairs)


def _logit_similarity(model, reference, probe: Probe) -> float:
    """Cosine similarity of the centred logits (per position over the vocabulary), the smallest position's."""
    similarities = []
    for a, b in zip(_logits(model, probe), _logits(reference, probe)):
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        similarities.append(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()))
    return min(similarities)


def draw_probe_images(directory: Path) -> list[Path]:
    """Two small pictures drawn with Pillow, unlike any calibImages entry: coloured shapes, and a labelled bar chart."""
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    shapes = Image.new("RGB", (48, 40), "white")
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((2, 2, 20, 20), fill=(220, 30, 30))
    draw.rectangle((26, 4, 44, 18), fill=(30, 60, 200))
    draw.polygon([(6, 38), (22, 24), (38, 38)], fill=(20, 160, 60))
    chart = Image.new("RGB", (56, 48), (245, 245, 235))
    draw = ImageDraw.Draw(chart)
    for i, height in enumerate((30, 12, 22)):
        draw.rectangle((6 + 16 * i, 40 - height, 16 + 16 * i, 40), fill=(40 + 80 * i, 90, 200 - 60 * i))
        draw.text((7 + 16 * i, 40), "ABC"[i], fill="black")
    paths = [directory / "shapes.png", directory / "chart.png"]
    shapes.save(paths[0])
    chart.save(paths[1])
    return paths


def probe_of(row: RecipeRow, source: Path, tmp_path: Path) -> Probe:
    """Text rows: two sentences of PROBE (24 tokens each, one batch). VLM rows: each drawn image with its question,
    made into model inputs by the checkpoint's own processor (chat template, image processor) through the adapter
    (one input per image: pixel_values of different sizes do not batch)."""
    if not is_vlm(row):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        ids = torch.stack([tokenizer(t, return_tensors="pt")["input_ids"][0][:24] for t in PROBE])
        return [{"input_ids": ids}]
    from msmodelslim.core.vlm_dataset import VlmCalibSample
    from msmodelslim.model.registry import create_adapter

    adapter = create_adapter(model_type_of(row), str(source), False)
    samples = [VlmCalibSample(text, image) for text, image in zip(IMAGE_PROBE, draw_probe_images(tmp_path / "probe"))]
    return [{**inputs, "use_cache": False} for inputs in adapter.handle_dataset(samples, torch.device("cpu"))]


def float_model_of(source: Path, family: str):
    """The float model as transformers builds it from the checkpoint (a VLM in its image-text-to-text class)."""
    if family in OMNI_FAMILIES:
        from tiny_vlm import float_omni_thinker

        return float_omni_thinker(source, family)
    if family in VLM_FAMILIES:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    return float_reference(source, family)


READER_AGREEMENT = 2e-3  # max |Δlogit| / max |logit| between our reader and the reference reader


@pytest.mark.parametrize("row", RUNS, ids=lambda r: r.file)
def test_a_recipe_runs_end_to_end(row, checkpoints, tmp_path):
    """Tolerances. To float: tiny random models calibrated on six short samples (a VLM row: three calibImages
    entries) quantize coarsely (static W8A8 on the sparse-attention MLA families keeps ~0.7 similarity, max relative
    logit error up to ~0.7), so this asks what a broken output cannot give: logits that still point the way float's
    do (min_similarity; a wrong layout or scale gives ~0). Accuracy is measured on SmolLM2 in benchmarks/, not here.
    Between the two readers: both compute the same dequantized weights and the same activation quantization, so
    they differ only by float32 rounding and where an activation sits exactly on a rounding boundary (an int8 step
    then moves one logit by ~1e-3 of the largest): READER_AGREEMENT, measured on the text probe or, for a VLM row,
    on image+prompt inputs at every position (image tokens included). Both round static int8 inputs as the kernel
    does, round(x * (1/s_in) + o_in) (formats.md A.4.1): with round(x/s) + o instead, Qwen3-VL's per_tensor rows
    (35 static layers over ~100 image+text tokens) flipped single steps at half-step inputs and disagreed by ~1e-2."""
    source = checkpoints(family_of(row), **(MX_SIZES.get(family_of(row), {}) if "mxfp" in row.schemes else {}))
    (tmp_path / "as_written").mkdir()
    as_written = write_row_config(row, tmp_path / "as_written")
    # The row's own calibration set resolves and plans; the run itself calibrates on a few samples to stay quick.
    planned = quantize(request(row, source, tmp_path / "dry", as_written, dry_run=True))
    assert not (tmp_path / "dry").exists()
    config = write_row_config(row, tmp_path, dataset=row_calib(row, tmp_path))
    report = quantize(request(row, source, tmp_path / "out", config, dry_run=False))
    out = report.save_path

    errors, findings = check_checkpoint(out)
    assert errors == [], errors
    description = json.loads((out / "quant_model_description.json").read_text())
    written = {name.removesuffix(".weight"): tag for name, tag in description.items()
               if name.endswith(".weight") and name.removesuffix(".weight") in planned.plan}
    assert written == planned.plan, "the plan differs from the written description"
    assert set(planned.plan.values()) != {"FLOAT"}

    family = family_of(row)
    float_model, ours = float_model_of(source, family), load_ascendv1(out).eval()
    if family in SPARSE_ATTENTION:  # top-k key selection flips under any perturbation: compare with all keys
        all_keys(float_model), all_keys(ours)
    probe = probe_of(row, source, tmp_path)
    if is_vlm(row):  # the probe really holds images
        assert all("pixel_values" in p and p["pixel_values"].numel() > 0 for p in probe)
    similarity = _logit_similarity(ours, float_model, probe)
    print(f"{row.file}: logit similarity to float {similarity:.3f}, max relative error "
          f"{_logit_error(ours, float_model, probe):.3f}")
    assert similarity > min_similarity(row), "the quantized model is far from float"
    if family not in NO_REFERENCE_READER:
        reference = load_reference_model(out).eval()
        if family in SPARSE_ATTENTION:
            all_keys(reference)
        agreement = _logit_error(ours, reference, probe)
        print(f"{row.file}: our reader vs the reference reader, max relative logit difference {agreement:.1e}")
        assert agreement < READER_AGREEMENT, "our reader and the reference reader disagree"


def test_docs_list_every_recipe_as_the_tests_run_it():
    docs = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
    assert docs.read_text() == markdown_table(), ("docs/recipes.md is stale: regenerate it with "
                                                  "`python tests/upstream_recipes.py > docs/recipes.md`")
