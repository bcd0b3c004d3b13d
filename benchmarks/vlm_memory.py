"""Peak memory of a W8A8 dynamic run on a synthetic Qwen2.5-VL whose text decoder is >= 10x its vision tower.

Issue #24's memory acceptance: a VLM quantizes with peak RSS ~ baseline + vision tower + one decoder layer. The
vision tower is one block, read whole when its turn comes (it runs once per calibration sample, before the first
decoder layer); the text decoder is read one layer at a time.

Builds once (cached under ~/.cache/msmodelslim/synthetic/qwen2_5_vl_mem) a random Qwen2.5-VL checkpoint in bf16:
24 text layers of hidden 1024 (intermediate 2816, 16 heads, 2 KV heads) beside a 6-block vision tower of hidden
512, the small test tokenizer (vocabulary ~330, so the embeddings are small) and the tests' image processor
(4-pixel patches). Then measures, each in a fresh process under `/usr/bin/time -v` (Maximum resident set size):
- baseline: the imports and the model skeleton on the meta device (no weight read);
- layer_wise: `python -m msmodelslim quant` from a multimodal_vlm_modelslim_v1 config (always layer_wise);
- model_wise: the same config through the Python API with spec.runner forced to model_wise after parsing (the
  CLI replaces any runner of a VLM config by layer_wise; this run shows what layer_wise saves).
The expected bound is baseline + vision tower + one decoder layer + embeddings, all in float32 (what the run
materialises of them). Run: flock /tmp/heavy.lock env OMP_NUM_THREADS=2 python benchmarks/vlm_memory.py
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_TYPE = "Qwen2.5-VL-7B-Instruct"
TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=2, max_position_embeddings=4096)
VISION = dict(depth=6, hidden_size=512, intermediate_size=1024, num_heads=8, out_hidden_size=1024, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16, fullatt_block_indexes=[5])
W8A8_DYNAMIC = {"act": {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"},
                "weight": {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}}

BASELINE = r"""
import sys
from msmodelslim.app.quantize import quantize  # the imports of a quant run
from msmodelslim.model.registry import create_adapter
create_adapter(sys.argv[1], sys.argv[2], False).init_skeleton()
"""
MODEL_WISE = r"""
import sys
from pathlib import Path
from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.core.config import RunnerType, load_config
from msmodelslim.core.device import parse_device
from msmodelslim.core.logging import setup_logging
setup_logging()  # as the CLI does
model_type, model, out, config_path = sys.argv[1:5]
config = load_config(Path(config_path))
config.spec.runner = RunnerType.model_wise  # the CLI would run a VLM config layer_wise; forced here to compare
quantize(QuantizeRequest(Path(model), Path(out), model_type, parse_device("cpu"), pipeline=config))
"""


def build(path: Path) -> None:
    """The synthetic checkpoint, written like a hub download (published tensor names, processor files)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import transformers
    from tiny_vlm import CHAT_TEMPLATE, VISION_TOKENS, write_processor_files
    from tiny_models import make_tokenizer
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    make_tokenizer(staging)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(staging)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [16, 24, 24]}  # head_dim 64
    config = transformers.Qwen2_5_VLConfig(
        text_config={**TEXT, "vocab_size": len(tokenizer), "tie_word_embeddings": False, "rope_parameters": rope},
        vision_config=VISION, tie_word_embeddings=False, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    for c in (config, config.text_config):
        c.bos_token_id = c.eos_token_id = None
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # HF's init, but in one cheap pass: normal weights, unit norms
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
            elif "norm" in name and "weight" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    model.save_pretrained(staging)
    write_processor_files(staging, "qwen2_5_vl")
    staging.rename(path)


def sizes(path: Path) -> dict[str, float]:
    """MiB in float32 of the vision tower, one decoder layer, the embeddings (+ head) and the text decoder, read
    from the checkpoint's tensor headers under their published names (visual.*, model.layers.N.*)."""
    from safetensors import safe_open

    numel: dict[str, int] = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                count = 1
                for d in shape:
                    count *= d
                numel[name] = count
    mib = lambda names: 4 * sum(numel[n] for n in names) / 2**20  # noqa: E731
    layer0 = [n for n in numel if n.startswith("model.layers.0.")]
    return {"vision": mib([n for n in numel if n.startswith("visual.")]), "layer": mib(layer0),
            "embeddings": mib([n for n in numel if n in ("model.embed_tokens.weight", "lm_head.weight")]),
            "text": mib([n for n in numel if n.startswith("model.layers.")]),
            "disk": sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20}


def timed(command: list[str]) -> float:
    """Peak RSS in MiB of `command` (/usr/bin/time -v's Maximum resident set size)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), MSMODELSLIM_LOG_LEVEL="WARNING")
    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                 f"{done.stderr[-4000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(match.group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "synthetic")
    args = parser.parse_args()
    model = args.work_dir / "qwen2_5_vl_mem"
    if not (model / "config.json").is_file():
        print(f"building {model} (once) ...", flush=True)
        build(model)
    size = sizes(model)
    run_dir = args.work_dir / "vlm_memory_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_vlm import make_images

    images = make_images(run_dir / "images", count=2, size=(48, 48))
    config = run_dir / "w8a8_dynamic.yaml"
    config.write_text(json.dumps({"apiversion": "multimodal_vlm_modelslim_v1", "spec": {
        "process": [{"type": "linear_quant", "qconfig": W8A8_DYNAMIC, "include": ["*"],
                     "exclude": ["lm_head", "*merger*"]}],
        "save": [{"type": "ascendv1_saver", "part_file_size": 4}],
        "dataset": str(images[0].parent), "default_text": "Describe this image in detail."}}))
    python = sys.executable
    peaks = {
        "baseline": timed([python, "-c", BASELINE, MODEL_TYPE, str(model)]),
        "layer_wise": timed([python, "-m", "msmodelslim", "quant", "--model_path", str(model), "--save_path",
                             str(run_dir / "out-layer_wise"), "--model_type", MODEL_TYPE, "--config_path",
                             str(config), "--device", "cpu"]),
        "model_wise": timed([python, "-c", MODEL_WISE, MODEL_TYPE, str(model), str(run_dir / "out-model_wise"),
                             str(config)]),
    }
    bound = peaks["baseline"] + size["vision"] + size["layer"] + size["embeddings"]
    print(f"checkpoint: {size['disk']:.0f} MiB bf16 on disk; float32: text decoder {size['text']:.1f} MiB "
          f"({TEXT['num_hidden_layers']} layers of {size['layer']:.1f}), vision tower {size['vision']:.1f} MiB "
          f"(text/vision {size['text'] / size['vision']:.1f}x), embeddings + head {size['embeddings']:.1f} MiB")
    print(f"expected bound = baseline {peaks['baseline']:.0f} + vision {size['vision']:.1f} + one layer "
          f"{size['layer']:.1f} + embeddings {size['embeddings']:.1f} = {bound:.0f} MiB")
    print("| process | peak RSS MiB | above the baseline | peak / bound |")
    print("|---|---|---|---|")
    for name, peak in peaks.items():
        above = "" if name == "baseline" else f"{peak - peaks['baseline']:.0f}"
        print(f"| {name} | {peak:.0f} | {above} | {peak / bound:.2f} |")


if __name__ == "__main__":
    main()
