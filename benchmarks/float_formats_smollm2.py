"""FP8 and MX formats on the real SmolLM2-135M-Instruct with llm-compressor's floating-point presets in the
same run (issue #22; run by hand, not in CI).

Same protocol as side_by_side.py: --calib_windows windows of 512 tokens of the calibration half for both tools,
perplexity on 40 x 512 tokens of the evaluation half. Ours quantize layer-wise through the real CLI in a child
process and are read back by our ascendv1 reader, which quantizes activations at run time as the kernels do
(per token for FP8, per block of 32 for MX). llm-compressor's presets run in its own environment and are
scored in memory after oneshot (its fake-quantized forward).

    python benchmarks/float_formats_smollm2.py --peer_python /tmp/lcvenv/bin/python --float_ppl 17.3552

Peer presets (compressed-tensors 0.19): fp8_dynamic (E4M3 weights per channel, activations per token),
mxfp8, mxfp4 / mxfp4a16 (E2M1 in blocks of 32, E8M0 scales), nvfp4 / nvfp4a16 (E2M1 in blocks of 16, FP8
scales under a per-tensor global scale); `gptq_<preset>` runs GPTQModifier with that preset.

Our NVFP4 rows (w4a16_nvfp4, w4a16_nvfp4_gptq: weight dtype nvfp4, a compressed_tensors-only extension) are saved
with the compressed_tensors saver and scored twice: with the weights dequantized in float32 from the written
tensors (q · weight_scale / weight_global_scale), and as transformers loads them (CompressedTensorsConfig with
dequantize=True: the library's decompressor, which rounds the weights to bf16).

A trailing `+qin` on one of our schemes (before `+ct`) sets `spec.calibration.next_block_inputs: quantized`:
each block calibrates on the quantized outputs of the block before it, as llm-compressor's sequential pipeline
does. `+gptaq<alpha>` (e.g. `+gptaq0.25`, before `+qin`/`+ct`) sets GPTQ's `gptaq_alpha` (GPTAQ's asymmetric
calibration, quantizer/gptaq.py) and implies `+qin`; `+seq` splits the GPTQ step into four steps run one after the
other in each block (q/k/v, o_proj, gate/up, down_proj), so each later one calibrates on the earlier ones' quantized
outputs (GPTQ's "true sequential").
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from side_by_side import protocol, run_peer  # noqa: E402
from smollm2_accuracy import SCHEMES, linear, quantize_in_child, smooth, write_config  # noqa: E402

NVFP4 = {"dtype": "nvfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}
NVFP4_SCHEMES = {"w4a16_nvfp4": [linear({"weight": NVFP4})],
                 "w4a16_nvfp4_gptq": [linear({"weight": {**NVFP4, "method": "gptq"}})]}
SCHEMES.update(NVFP4_SCHEMES)
SVD_RES = {"type": "svd_res", "rank": 32, "exclude": ["lm_head"]}


def scheme_steps(name: str) -> list[dict]:
    """A scheme of smollm2_accuracy.py by name, or a variant of one: a trailing `+ao` sets GPTQ's
    `act_order: true` (columns by decreasing Hessian diagonal, llm-compressor's default), `+ao+clip` (or `+clip`)
    GPTQ's `clip_search: true` as well (integer ranges by the shrink search), a leading `quarot<n>+`
    rotates in blocks of n (`block_size: n`, e.g. 32 = one MX block) instead of the whole hidden size; `quarot+<scheme>`
    puts the rotation before any scheme, `quarot_online+<scheme>` (or `quarot<n>_online+`) adds the online rotations
    of o_proj's and every down_proj's input (max_tp_size 1: SmolLM2's 9 heads split into no power of 2 above 1),
    optionally followed by `svd_res+` (rank 32), `adapt_online+<scheme>` the same with the rotation learned by
    adapt_rotation (stage 1 in spec.prior, int4 per token, up_proj's inputs, 20 steps; `prior_of`) instead of the
    random Hadamard one, `adapt+<scheme>` that without the online rotations, `<rotation>@<n>+<scheme>` (e.g.
    `quarot_online@1+w4a4_int`) the rotation's random signs from seed n (stage 1 starts from the same),
    `awq+<scheme>` AWQ scored with the scheme's weight format (round to nearest) before a weight-only scheme,
    `sq<alpha>+<scheme>` SmoothQuant with that alpha before any scheme, `flex+<scheme>` flex_smooth_quant (alpha and
    beta searched per subgraph on the calibration data, scored with the scheme's own quantizers) before any scheme,
    `flatquant+<scheme>` FlatQuant's learned transforms (every decoder linear) before a W4A4 int or MXFP4 scheme."""
    head_seed, _, rest_seed = name.partition("@")  # quarot_online@1+...: that seed of the rotation (and stage 1)
    if rest_seed:
        seed_text, _, tail = rest_seed.partition("+")
        steps = scheme_steps(f"{head_seed}+{tail}")
        for step in steps:
            if step.get("type") in ("quarot", "adapt_rotation"):
                step["seed"] = int(seed_text)
        return steps
    name, clip = name.removesuffix("+clip"), name.endswith("+clip")
    base, act_order = name.removesuffix("+ao"), name.endswith("+ao")
    block = None
    head, _, rest = base.partition("+")
    online = "_online" if head.endswith("_online") else ""
    if head.startswith("quarot") and head[len("quarot"):].removesuffix(online).isdigit():  # quarot32+, quarot32_online+
        block, base = int(head[len("quarot"):].removesuffix(online)), f"quarot{online}+" + rest
    if head in ("adapt", "adapt_online"):  # adapt_rotation stage 2; prior_of adds stage 1
        stage_2 = {"type": "adapt_rotation", "stage": 2}
        if head == "adapt_online":
            stage_2.update(online=True, down_proj_online_layers=list(range(30)), max_tp_size=1)
        svd = [SVD_RES] if rest.startswith("svd_res+") else []
        steps = copy.deepcopy([stage_2, *svd, *SCHEMES[rest.removeprefix("svd_res+")]])
    elif base not in SCHEMES and base.startswith("quarot+"):  # any scheme behind the whole-size rotation
        steps = copy.deepcopy([{"type": "quarot"}, *SCHEMES[base.removeprefix("quarot+")]])
    elif base.startswith("quarot_online+"):  # SmolLM2-135M has 30 decoder layers
        online = {"type": "quarot", "online": True, "down_proj_online_layers": list(range(30)), "max_tp_size": 1}
        rest = base.removeprefix("quarot_online+")
        svd = [SVD_RES] if rest.startswith("svd_res+") else []  # SVDQuant's rank-32 float branch behind the rotation
        steps = copy.deepcopy([online, *svd, *SCHEMES[rest.removeprefix("svd_res+")]])
    elif base not in SCHEMES and base.startswith("sq") and "+" in base:  # e.g. sq0.5+w8a8_mxfp8_gptq
        alpha, _, rest = base.removeprefix("sq").partition("+")
        steps = copy.deepcopy([smooth(float(alpha)), *SCHEMES[rest]])
    elif base not in SCHEMES and base.startswith("flex+"):  # e.g. flex+w8a8_mxfp8_gptq
        steps = copy.deepcopy([{"type": "flex_smooth_quant"}, *SCHEMES[base.removeprefix("flex+")]])
    elif base not in SCHEMES and base.startswith("flatquant+"):  # e.g. flatquant+w4a4_int, flatquant+w4a4_mxfp4_gptq
        flat = {"type": "flatquant", "exclude": ["lm_head"]}
        steps = copy.deepcopy([flat, *SCHEMES[base.removeprefix("flatquant+")]])
    elif base not in SCHEMES and base.startswith("awq+"):  # AWQ scored with the scheme's own weight format
        steps = copy.deepcopy(SCHEMES[base.removeprefix("awq+")])
        weight = next(s["qconfig"]["weight"] for s in steps if s.get("type") == "linear_quant")
        steps.insert(0, {"type": "awq", "weight_qconfig": {**weight, "method": "minmax", "ext": {}}})
    else:
        steps = copy.deepcopy(SCHEMES[base])
    for step in steps:
        if block is not None and step.get("type") == "quarot":
            step["block_size"] = block
        weight = step.get("qconfig", {}).get("weight", {})
        if act_order and weight.get("method") == "gptq":
            weight["ext"] = {**weight.get("ext", {}), "act_order": True}
        if clip and weight.get("method") == "gptq":
            weight["ext"] = {**weight.get("ext", {}), "clip_search": True}
    return steps


def prior_of(steps: list[dict]) -> list[dict]:
    """spec.prior for these steps: adapt_rotation's stage 1 (its defaults) where stage 2 is among them."""
    for step in steps:
        if step.get("type") == "adapt_rotation":
            return [{"process": [{"type": "adapt_rotation", "stage": 1, "seed": step.get("seed", 0)}]}]
    return []


SEQUENTIAL_GROUPS = (["*q_proj", "*k_proj", "*v_proj"], ["*o_proj"], ["*gate_proj", "*up_proj"], ["*down_proj"])


def split_gptaq(name: str) -> tuple[str, float]:
    """`<scheme>+gptaq<alpha>` -> (scheme, alpha); no such suffix -> (name, 0.0)."""
    head, mark, alpha = name.rpartition("+gptaq")
    return (head, float(alpha)) if mark else (name, 0.0)


def variant_steps(steps: list[dict], alpha: float, sequential: bool) -> list[dict]:
    """GPTAQ's alpha on every GPTQ step; with `sequential` each GPTQ step split into SEQUENTIAL_GROUPS."""
    out = []
    for step in steps:
        weight = step.get("qconfig", {}).get("weight", {})
        if weight.get("method") != "gptq":
            out.append(step)
            continue
        if alpha > 0:
            weight["ext"] = {**weight.get("ext", {}), "gptaq_alpha": alpha}
        groups = SEQUENTIAL_GROUPS if sequential else [step.get("include", ["*"])]
        out.extend({**copy.deepcopy(step), "include": list(g)} for g in groups)
    return out


def load_nvfp4(out: Path, model_dir: Path):
    """The float model with every nvfp4-pack-quantized linear's weight dequantized in float32 from the files."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from msmodelslim.quantizer.float_formats import decode_fp4_e2m1, unpack_fp4_pairs
    from msmodelslim.quantizer.nvfp4 import dequantize_nvfp4

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tensors = {}
    for shard in out.glob("*.safetensors"):
        tensors.update(load_file(shard))
    count = 0
    for name in [k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")]:
        values = decode_fp4_e2m1(unpack_fp4_pairs(tensors[f"{name}.weight_packed"]))
        weight = dequantize_nvfp4(values, tensors[f"{name}.weight_scale"].float(), tensors[f"{name}.weight_global_scale"])
        model.get_submodule(name).weight.data.copy_(weight)
        count += 1
    assert count, f"{out} holds no nvfp4 layers"
    return model


def load_compressed_tensors_transformers(out: Path, dequantize: bool = True):
    """A compressed-tensors checkpoint as transformers loads it. dequantize=True: plain nn.Linear layers holding the
    decompressed weights, inputs never quantized. dequantize=False: compressed-tensors' quantized forward, which
    decompresses the weights on the first call and quantizes each input as input_activations says (per token for
    FP8, blocks of 32 for MX)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                quantization_config=CompressedTensorsConfig(dequantize=dequantize)
                                                ).eval()


def without_activation_quantization(model):
    """Our reader's model with every QuantLinear's run-time input quantization switched off, the weights as read:
    what transformers computes for a compressed-tensors checkpoint loaded with dequantize=True (plain nn.Linear
    layers holding the decompressed weights; no input quantization, whatever input_activations says)."""
    from msmodelslim.ir.quant_linear import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers, "the model holds no QuantLinear"
    for layer in layers:
        layer.quantize_input = lambda x: x  # an instance attribute: shadows the method for this layer only
    return model


OURS = ("fp8_dynamic,fp8_dynamic_gptq,sq0.5+fp8_dynamic,w8a8_mxfp8,w8a8_mxfp8_mse_round,w8a8_mxfp8_gptq,"
        "w4a16_mxfp4,w4a16_mxfp4_ceil_x,w4a16_mxfp4_gptq,w4a4_mxfp4,w4a4_mxfp4_gptq,quarot+w4a4_mxfp4,"
        "quarot+w4a4_mxfp4_gptq")
PEERS = "fp8_dynamic,mxfp8,mxfp4a16,nvfp4a16,gptq_mxfp4a16,gptq_nvfp4a16,mxfp4,nvfp4"


def main() -> None:
    from msmodelslim.app.evaluate import perplexity
    from msmodelslim.format.ascendv1.reader import load_ascendv1

    parser = argparse.ArgumentParser()
    parser.add_argument("--peer_python", type=Path, required=True, help="python of llm-compressor's environment")
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "msmodelslim" / "float_formats")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib_windows", type=int, default=128)
    parser.add_argument("--float_ppl", type=float, default=None,
                        help="the float model's perplexity on the same windows, from an earlier run (skips it)")
    parser.add_argument("--ours", default=OURS, help="comma-separated scheme names of smollm2_accuracy.py")
    parser.add_argument("--peers", default=PEERS, help="comma-separated llm-compressor recipes (see the docstring)")
    parser.add_argument("--peers_first", action="store_true", help="run llm-compressor's recipes before ours")
    parser.add_argument("--order", default=None,
                        help="comma-separated runs in the order to make them, each ours:<scheme> or peer:<recipe> "
                             "(replaces --ours/--peers; the most wanted first, so a cut-short run still has them)")
    parser.add_argument("--float_act_reader", action="store_true",
                        help="for <scheme>+ct runs, also score our reader with activations left float, as transformers "
                             "runs a compressed-tensors checkpoint loaded with dequantize=True")
    parser.add_argument("--ct_runtime", action="store_true",
                        help="for <scheme>+ct runs with quantized activations, also score transformers with "
                             "dequantize=False (compressed-tensors quantizes the inputs at run time); FP8 only: "
                             "for MX it stops on the first forward, compressed-tensors 0.20.1 decompressing the "
                             "weights to bf16 under a float32 model (F.linear: float != BFloat16)")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir, eval_path, windows, float_ppl, calib = protocol(args.work_dir, args.windows, args.calib_windows,
                                                                   args.float_ppl)
    table = []

    def run_ours(name: str) -> None:
        """`<scheme>+ct`: the scheme saved in both formats from one run; our reader scores the ascendv1 copy,
        transformers the compressed-tensors one (weights decompressed; activations float in both for W4A16)."""
        scheme, both = name.removesuffix("+ct"), name.endswith("+ct")
        scheme, fed = scheme.removesuffix("+qin"), scheme.endswith("+qin")
        scheme, alpha = split_gptaq(scheme)
        scheme, sequential = scheme.removesuffix("+seq"), scheme.endswith("+seq")
        fed = fed or alpha > 0
        config = args.work_dir / f"{name}.yaml"
        nvfp4 = scheme.removesuffix("+ao") in NVFP4_SCHEMES
        saver = "compressed_tensors" if nvfp4 else "ascendv1_saver+compressed_tensors" if both else "ascendv1_saver"
        steps = variant_steps(scheme_steps(scheme), alpha, sequential)
        write_config(config, steps, str(calib), "layer_wise", saver,
                     {"next_block_inputs": "quantized"} if fed else None, prior_of(steps))
        out = args.work_dir / f"smollm2-{name}"
        seconds, rss = quantize_in_child(model_dir, config, out)
        ours = out / "ascendv1" if both else out
        ppl = perplexity(load_nvfp4(out, model_dir) if nvfp4 else load_ascendv1(ours), windows, torch.device("cpu"),
                         name).perplexity
        if nvfp4 or both:
            transformers_model = load_compressed_tensors_transformers(out / "compressed_tensors" if both else out)
            loaded = perplexity(transformers_model, windows, torch.device("cpu"), name).perplexity
            print(f"msmodelslim {name} as transformers loads it (weights decompressed, inputs float): ppl {loaded:.4f} "
                  f"({(loaded / ppl - 1) * 100:+.3f} % against our reader)", flush=True)
            quantized_act = any("act" in step.get("qconfig", {}) for step in scheme_steps(scheme))
            if both and quantized_act and args.float_act_reader:  # like for like: our reader, float inputs
                plain = perplexity(without_activation_quantization(load_ascendv1(ours)), windows,
                                   torch.device("cpu"), name).perplexity
                print(f"msmodelslim {name} by our reader with float activations: ppl {plain:.4f} (transformers "
                      f"{(loaded / plain - 1) * 100:+.3f} % against it)", flush=True)
            if both and quantized_act and args.ct_runtime:  # like for like: transformers, quantized inputs
                runtime = perplexity(load_compressed_tensors_transformers(out / "compressed_tensors", dequantize=False),
                                     windows, torch.device("cpu"), name).perplexity
                print(f"msmodelslim {name} as transformers runs it with dequantize=False (inputs quantized by "
                      f"compressed-tensors): ppl {runtime:.4f} ({(runtime / ppl - 1) * 100:+.3f} % against our reader)",
                      flush=True)
        print(f"msmodelslim {name}: ppl {ppl:.4f} (x{ppl / float_ppl:.4f}), {seconds:.1f} s, {rss:.0f} MiB", flush=True)
        table.append(("msmodelslim", name, ppl, seconds, rss))

    def run_theirs(recipe: str) -> None:
        result = run_peer(args.peer_python, model_dir, calib, eval_path, recipe, args.windows)
        print(f"llm-compressor {recipe}: ppl {result['ppl']:.4f} (x{result['ppl'] / float_ppl:.4f}), "
              f"{result['seconds']:.1f} s, {result['peak_rss_mib']:.0f} MiB", flush=True)
        table.append(("llm-compressor", recipe, result["ppl"], result["seconds"], result["peak_rss_mib"]))

    ours = [n for n in args.ours.split(",") if n]
    peers = [r for r in args.peers.split(",") if r]
    runs = ([(r, run_theirs) for r in peers] + [(n, run_ours) for n in ours] if args.peers_first
            else [(n, run_ours) for n in ours] + [(r, run_theirs) for r in peers])
    if args.order:
        tools = {"ours": run_ours, "peer": run_theirs}
        runs = [(name, tools[tool]) for tool, name in (item.split(":", 1) for item in args.order.split(",") if item)]
    for name, run in runs:
        run(name)

    print("\n| tool | scheme | perplexity | vs float | quantize wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| - | float (fp32) | {float_ppl:.4f} | 1.0000 | - | - |")
    for tool, name, ppl, seconds, rss in table:
        print(f"| {tool} | {name} | {ppl:.4f} | {ppl / float_ppl:.4f} | {seconds:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
