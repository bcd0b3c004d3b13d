"""Where bfloat16 calibration forwards leave float32's statistics (issue #26 item 5; run by hand, not in CI).

Pushes each batch of calibration windows through the float model twice, in float32 and under bfloat16 autocast
(what `spec.calibration.precision: bfloat16` runs), and compares, decoder layer by decoder layer:
- each token's input hidden state (relative L2 distance): the median and the worst token, by window and position;
- the per-channel max |x| of every linear's input over the whole set (what smoothing and static ranges read):
  the largest relative change of any channel's maximum, and in which linear and channel.

    OMP_NUM_THREADS=2 python benchmarks/bf16_divergence.py              # the demo's SmolLM2, 128 x 512 windows

`--trace WINDOW:POSITION` follows one token instead: its window alone is pushed through in float32, then under
bfloat16 autocast once per set of `--float32_sets`, with the modules of that set (fnmatch patterns on
"<layer>.<module path>", e.g. `9.mlp`, `*.self_attn`) computed in float32 inside the autocast forward; printed is
the token's relative distance from float32 at the input of every other layer. It tells which op's bfloat16
rounding sets a diverging token off:

    OMP_NUM_THREADS=2 python benchmarks/bf16_divergence.py --trace 112:1 \
        --float32_sets 'none;*.self_attn;9.mlp;9.mlp.gate_proj;9.mlp.up_proj;9.mlp.down_proj'
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_accuracy import calibration_windows  # noqa: E402

DEMO = Path.home() / ".cache" / "msmodelslim" / "demo" / "SmolLM2-135M-Instruct"


class Recorder:
    """Hooks on every decoder layer and linear; `mode` names the forward running. Per mode: each token's input
    hidden state of the current batch per layer, and the running max |x| per channel of every linear's input."""

    def __init__(self, model: nn.Module):
        self.mode = "float32"
        self.hidden: dict[str, dict[int, torch.Tensor]] = {}
        self.channel_max: dict[str, dict[str, torch.Tensor]] = {}
        for index, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True)
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    module.register_forward_pre_hook(self._linear_hook(f"{index}.{name}"))

    def _layer_hook(self, index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.hidden.setdefault(self.mode, {})[index] = hidden.detach().float().reshape(-1, hidden.shape[-1]).clone()
        return hook

    def _linear_hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            maxima = self.channel_max.setdefault(self.mode, {})
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook


class Float32Inside:
    """Runs the modules whose "<layer>.<path>" matches one of `patterns` with autocast off (floating inputs in
    bfloat16 widened to float32): the rest of the forward keeps bfloat16 autocast."""

    def __init__(self, model: nn.Module):
        self.patterns: list[str] = []
        self._open: list = []
        for index, layer in enumerate(model.model.layers):
            for path, module in layer.named_modules():
                if path:
                    module.register_forward_pre_hook(self._enter(f"{index}.{path}"), with_kwargs=True)
                    module.register_forward_hook(self._leave(f"{index}.{path}"))

    def _matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)

    def _enter(self, name: str):
        def hook(_module, args, kwargs):
            if not self._matches(name):
                return None
            context = torch.autocast("cpu", enabled=False)
            context.__enter__()
            self._open.append(context)
            widen = lambda t: t.float() if torch.is_tensor(t) and t.dtype == torch.bfloat16 else t  # noqa: E731
            return tuple(widen(a) for a in args), {key: widen(value) for key, value in kwargs.items()}
        return hook

    def _leave(self, name: str):
        def hook(_module, _args, _output):
            if self._matches(name):
                self._open.pop().__exit__(None, None, None)
        return hook


def trace(model: nn.Module, tokenizer, text: str, position: int, sets: list[str]) -> None:
    """One window in float32, then under bfloat16 autocast per set of float32 modules; the token at `position`."""
    inside = Float32Inside(model)
    states: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            states[index] = hidden.detach().float()[0, position].clone()
        return hook

    layers = model.model.layers
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(keep(index), with_kwargs=True)
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    reference = dict(states)
    shown = list(range(0, len(layers), 2))
    print("| float32 inside the bfloat16 forward | " + " | ".join(f"layer {i}" for i in shown) + " |")
    print("|---|" + "---|" * len(shown))
    print("| (input norm in float32) | " + " | ".join(f"{float(reference[i].norm()):.0f}" for i in shown) + " |")
    for spec in sets:
        inside.patterns = [] if spec == "none" else spec.split(",")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)
        distances = [float((states[i] - reference[i]).norm() / reference[i].norm().clamp_min(1e-12)) for i in shown]
        print(f"| {spec} | " + " | ".join(f"{d:.3f}" for d in distances) + " |", flush=True)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model_path", type=Path, default=DEMO)
    parser.add_argument("--calib_windows", type=int, default=128, help="windows of 512 tokens of the calibration half")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "bf16_divergence")
    parser.add_argument("--trace", default=None, help="WINDOW:POSITION, one token to follow (see the docstring)")
    parser.add_argument("--float32_sets", default="none", help="';'-separated sets of ','-separated module patterns")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path, local_files_only=True)
    calib = calibration_windows(tokenizer, args.calib_windows, 512, args.work_dir / "calib.jsonl")
    texts = [json.loads(line)["text"] for line in calib.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    if args.trace is not None:
        window, position = (int(part) for part in args.trace.split(":"))
        trace(model, tokenizer, texts[window], position, args.float32_sets.split(";"))
        return
    layers = len(model.model.layers)
    recorder = Recorder(model)
    worst = {i: (0.0, -1, -1) for i in range(layers)}  # layer -> (distance, window, position)
    medians: dict[int, list[float]] = {i: [] for i in range(layers)}
    for start in range(0, len(texts), args.batch):
        batch = tokenizer(texts[start : start + args.batch], return_tensors="pt", padding=True)
        for recorder.mode in ("float32", "bfloat16"):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=recorder.mode == "bfloat16"):
                model(**batch)
        hidden = recorder.hidden
        valid = batch["attention_mask"].reshape(-1).bool()
        sequence = batch["input_ids"].shape[1]
        for i in range(layers):
            a, b = hidden["float32"][i][valid], hidden["bfloat16"][i][valid]
            distance = (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
            medians[i].append(float(distance.median()))
            token = int(distance.argmax())
            flat = int(valid.nonzero()[token])
            if float(distance[token]) > worst[i][0]:
                worst[i] = (float(distance[token]), start + flat // sequence, flat % sequence)
        print(f"batch {start // args.batch + 1}/{-(-len(texts) // args.batch)}", flush=True)

    print("\n| layer | median token distance | worst token (window, position) | largest change of a channel max "
          "(linear, channel) |\n|---|---|---|---|")
    f32, b16 = recorder.channel_max["float32"], recorder.channel_max["bfloat16"]
    for i in range(layers):
        changes = {name: (b16[name] / f32[name].clamp_min(1e-12) - 1) for name in f32 if name.startswith(f"{i}.")}
        name, change = max(changes.items(), key=lambda kv: float(kv[1].abs().max()))
        channel = int(change.abs().argmax())
        distance, window, position = worst[i]
        print(f"| {i} | {sorted(medians[i])[len(medians[i]) // 2]:.4f} | {distance:.3f} ({window}, {position}) | "
              f"{float(change[channel]):+.3f} ({name.split('.', 1)[1]}, {channel}) |")


if __name__ == "__main__":
    main()
