"""Where QuaRot helps and hurts on SmolLM2 (run by hand): rotate with `quarot` alone, check the float model
is unchanged, then compare per-layer relative output errors of int4 per-channel weights and of per-token int8
activations before and after the rotation, on one 128-token random input.

    python benchmarks/quarot_probe.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROBED = [f"model.layers.{i}.{s}" for i in (0, 5, 15, 29)
          for s in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]


def main() -> None:
    from transformers import AutoModelForCausalLM

    from msmodelslim.app.quantize import quantize
    from msmodelslim.app.quantize_request import QuantizeRequest
    from msmodelslim.core.device import DeviceSpec
    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.model.gguf_import import convert_gguf, find_gguf
    from msmodelslim.quantizer.primitives import dequantize_weight, quantize_per_token_dynamic, quantize_weight_minmax

    source = convert_gguf(find_gguf(), Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct")
    work = Path(tempfile.mkdtemp())
    config = work / "quarot.yaml"
    config.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": {"process": [{"type": "quarot"}]}}))
    quantize(QuantizeRequest(source, work / "out", "SmolLM2-135M-Instruct", DeviceSpec("cpu"), config_path=config))
    models = {"float": AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32), "rotated": load_ascendv1(work / "out")}
    ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    inputs, logits = {}, {}
    for tag, model in models.items():
        store = {}
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: store.__setitem__(n, args[0].detach())) for n in PROBED]
        with torch.no_grad():
            logits[tag] = model(input_ids=ids).logits
        for hook in hooks:
            hook.remove()
        inputs[tag] = store
    print(f"max |logit difference| after rotation: {(logits['float'] - logits['rotated']).abs().max():.2e} "
          f"(logits up to {logits['float'].abs().max():.1f})")
    print("| layer | int4 weights: float model | rotated | int8 per-token acts: float model | rotated |")
    print("|---|---|---|---|---|")
    for name in PROBED:
        cells = []
        for kind in ("w4", "a8"):
            for tag, model in models.items():
                w = model.get_submodule(name).weight.detach()
                x = inputs[tag][name].reshape(-1, w.shape[1])
                ref = x @ w.T
                if kind == "w4":
                    out = x @ dequantize_weight(*quantize_weight_minmax(w, 4, True)).T
                else:
                    out = quantize_per_token_dynamic(x, 8) @ w.T
                cells.append(f"{((out - ref).norm() / ref.norm()).item():.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
