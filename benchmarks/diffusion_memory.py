"""Peak memory of a Wan2.1 W8A8 dynamic run on a synthetic DiT ten times larger than one of its blocks.

Builds a random WanPipeline whose DiT has 10 equal blocks of ~67 MB (float32, width 1024, ffn 4096) next to tiny
text encoder and VAE, then measures the peak RSS of three fresh processes:
- baseline: the imports and the DiT skeleton on the meta device (no weight);
- sampling run: no calibration dump yet, so the float pipeline is loaded whole and samples (then quantizes
  block by block from the checkpoint);
- reusing run: the dump exists, so nothing samples and the DiT is read one block at a time.
Peaks are each process's VmHWM. Run: flock /tmp/heavy.lock python benchmarks/diffusion_memory.py [work_dir]
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 10

CHILD = r"""
import json, sys
from pathlib import Path
from msmodelslim.app.diffusion import DiffusionQuantizeRequest, _meta_denoiser, quantize_diffusion
from msmodelslim.model.diffusion import WAN2_1
mode, model, out, config = sys.argv[1:5]
if mode == "baseline":
    _meta_denoiser(WAN2_1, Path(model))
else:
    report = quantize_diffusion(DiffusionQuantizeRequest(Path(model), Path(out), "Wan2.1", config_path=Path(config)))
    assert report.sampled == (mode == "sampling"), report
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mib": peak_kib / 1024}))
"""


def build(path: Path) -> tuple[float, float]:
    """The synthetic pipeline; returns (one block's MiB, the whole DiT's MiB)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_diffusion_wan import make_tiny_wan  # the tests' tiny pipeline, with a larger DiT below

    import diffusers
    import torch

    make_tiny_wan(path)
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=4096, num_layers=BLOCKS, rope_max_seq_len=32)
    transformer.save_pretrained(path / "transformer")
    mib = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20  # noqa: E731
    return mib(transformer.blocks[0]), mib(transformer)


def run(mode: str, model: Path, out: Path, config: Path) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(model), str(out), str(config)], cwd=ROOT,
                          capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "2", "PATH": ""})
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="diffusion_memory_"))
    model = work / "wan"
    if (model / "model_index.json").is_file():  # built by an earlier run
        block, dit = json.loads((work / "sizes.json").read_text())
    else:
        block, dit = build(model)
        (work / "sizes.json").write_text(json.dumps([block, dit]))
    for previous in ("dump", "out-a", "out-b"):
        shutil.rmtree(work / previous, ignore_errors=True)
    config = work / "w8a8.yaml"
    config.write_text(json.dumps({
        "apiversion": "multimodal_sd_modelslim_v1",
        "spec": {"process": [{"type": "linear_quant", "qconfig": {
            "act": {"scope": "per_token", "dtype": "int8", "symmetric": True, "method": "minmax"},
            "weight": {"scope": "per_channel", "dtype": "int8", "symmetric": True, "method": "minmax"}}}],
            "save": [{"type": "ascendv1_saver", "part_file_size": 0}],
            "multimodal_sd_config": {"dump_config": {"dump_data_dir": str(work / "dump")},
                                     "inference_config": {"prompt": "a cat", "size": "32*32", "frame_num": 1,
                                                          "sample_steps": 2, "max_sequence_length": 8}}}}))
    baseline = run("baseline", model, work / "unused", config)
    sampling = run("sampling", model, work / "out-a", config)
    reusing = run("reusing", model, work / "out-b", config)
    print(f"DiT: {BLOCKS} blocks of {block:.1f} MiB, {dit:.1f} MiB in all (float32)")
    print(f"peak RSS: baseline {baseline:.0f} MiB; sampling run {sampling:.0f} MiB (+{sampling - baseline:.0f}); "
          f"dump-reusing run {reusing:.0f} MiB (+{reusing - baseline:.0f}, {(reusing - baseline) / block:.2f} blocks)")


if __name__ == "__main__":
    main()
