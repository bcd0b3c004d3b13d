"""The `msmodelslim` argument parser: one function per subcommand's arguments, and the established spellings
of `analyze` rewritten before parsing. What each command does is in cli/__main__.py (dispatch) and msmodelslim.app."""
from __future__ import annotations

import argparse
from pathlib import Path

def str_to_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "false"):
        return value == "true"
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", required=True, type=Path, help="Hugging Face model directory (safetensors)")
    parser.add_argument("--trust_remote_code", type=str_to_bool, default=False, metavar="True|False",
                        help="allow running Python code shipped with the checkpoint (default False)")


def builtin_eval_sets() -> list[str]:
    from msmodelslim.core.dataset import EVAL_DIRS, builtin_datasets

    return builtin_datasets(EVAL_DIRS)


ANALYZE_SCOPES = ("linear", "layer", "attn", "mixed")
MIXED_SCHEMES = "w4a16_g64,w8a16,float"


def _add_analyze(sub) -> None:
    analyze = sub.add_parser("analyze", help="rank layers by quantization sensitivity: analyze {linear|layer|attn} "
                                             "(writes analysis.json, exclude.yaml, scores.png); analyze mixed: "
                                             "choose a scheme per linear under a bit budget (writes a quant config)")
    analyze.add_argument("scope", choices=ANALYZE_SCOPES,
                         help="linear: input statistics per linear; layer: error per decoder block; attn: FA3 error "
                              "per attention; mixed: mixed precision plan under --bits (default linear when omitted)")
    _add_model_args(analyze)
    analyze.add_argument("--model_type", required=True, help="registered model name, e.g. Qwen2.5-7B-Instruct")
    analyze.add_argument("--device", default=None, help="cpu, npu, npu:0, cuda:0 (one device)")
    analyze.add_argument("--calib_dataset", default="mix_calib.jsonl",
                         help="calibration .jsonl/.json: a name in lab_calib/ or a path (default mix_calib.jsonl)")
    analyze.add_argument("--topk", type=int, default=15,
                         help="how many to list for exclude (ties included; default 15)")
    analyze.add_argument("--metrics", default=None,
                         help="linear: kurtosis (default), std, quantile; layer: mse_layer_wise (default), "
                              "mse_model_wise; attn: mse")
    analyze.add_argument("--pattern", nargs="+", default=["*"], help="linear scope: fnmatch patterns over linear names")
    analyze.add_argument("--quant_modules", nargs="+", default=["*"],
                         help="layer scope: fnmatch patterns of the linears quantized inside each block (default *)")
    scheme = analyze.add_mutually_exclusive_group()
    scheme.add_argument("--quant_type", default=None,
                        help="layer scope: score the error of this best practice's scheme (e.g. w8a8, w8a16) instead "
                             "of the default MXFP4")
    scheme.add_argument("--config_path", type=Path, default=None,
                        help="layer scope: score the error of this modelslim_v1 config's spec.process")
    analyze.add_argument("--allow_default_practice", action="store_true",
                         help="with --quant_type: accept the generic lab_practice/default recipe")
    analyze.add_argument("--output", type=Path, default=None,
                         help="directory for analysis.json, exclude.yaml, scores.png "
                              "(default ./msmodelslim_analysis/<model>-<scope>-<metric>); mixed: for "
                              "mixed_precision.yaml and .json (default ./msmodelslim_analysis/<model>-mixed-<bits>)")
    analyze.add_argument("--bits", type=float, default=None,
                         help="mixed: the average bits per weight allowed (scales counted), e.g. 5")
    analyze.add_argument("--schemes", default=MIXED_SCHEMES,
                         help="mixed: the schemes to choose from, comma-separated: w4a16_g<G>, w4a16, w8a16, float "
                              "(default w4a16_g64,w8a16,float)")
    analyze.add_argument("--weight_method", default="minmax", choices=["minmax", "gptq", "ssz"],
                         help="mixed: the weight method of every quantized scheme, scored and written (default minmax)")


def normalize_analyze_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The established spellings of `analyze`: no scope means `linear`; `--metrics attention_mse` means
    `attn --metrics mse` (its --pattern is dropped). Returns the argv and the warnings to log."""
    if not argv or argv[0] != "analyze":
        return argv, []
    rest, notes = list(argv[1:]), []
    if not rest or (rest[0] not in ANALYZE_SCOPES and rest[0] not in ("-h", "--help")):
        rest.insert(0, "linear")
    for i, token in enumerate(rest[:-1]):
        if token == "--metrics" and rest[i + 1] == "attention_mse":
            rest[0], rest[i + 1] = "attn", "mse"
            notes.append("--metrics attention_mse is the old spelling of 'analyze attn --metrics mse'; running that")
            if "--pattern" in rest:
                at = rest.index("--pattern")
                end = next((j for j in range(at + 1, len(rest)) if rest[j].startswith("--")), len(rest))
                dropped = " ".join(rest[at + 1 : end])
                notes.append(f"--pattern {dropped} is ignored: the attn scope scores every attention")
                del rest[at:end]
            break
    return ["analyze"] + rest, notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msmodelslim", description="Post-training quantization of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    quant = sub.add_parser("quant", help="quantize a model (ascendv1 or compressed-tensors output, see spec.save)")
    _add_model_args(quant)
    quant.add_argument("--save_path", required=True, type=Path, help="output directory (must be new or empty)")
    quant.add_argument("--model_type", default=None,
                       help="registered model name, e.g. Qwen2.5-7B-Instruct (default: inferred from config.json's "
                            "model_type, preferring the model's own name; the choice is logged)")
    quant.add_argument("--device", default=None, help="cpu, cuda, cuda:0, npu, npu:0,1 (default: npu, else cuda, else cpu)")
    what = quant.add_mutually_exclusive_group(required=True)
    what.add_argument("--quant_type", help="use the best practice for --model_type, e.g. w8a8 or w8a16 "
                      "('msmodelslim practices' lists them)")
    what.add_argument("--config_path", type=Path, help="YAML config (apiversion: modelslim_v1, or modelslim_v0, "
                                                          "translated to v1: --dry_run prints the translation; "
                                                          "modelslim_convert: offline weight conversion, no "
                                                          "--model_type needed)")
    quant.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_path once the new output is complete")
    quant.add_argument("--dry_run", action="store_true",
                       help="validate everything, print the per-layer plan and estimates of the real run's peak RAM, "
                            "output size (and whether the disk has room) and wall time, from timing its first block "
                            "(reads the embeddings and that block); write nothing")
    quant.add_argument("--no_estimate", action="store_true",
                       help="with --dry_run: only the checks and the plan (no weight is read), no estimates")
    quant.add_argument("--resume", action="store_true",
                       help="continue a killed run of this --save_path from its last finished block (refused, with "
                            "the reason, if the config, model, data or code changed; starts over when none is left)")
    quant.add_argument("--tag", action="append", default=[], metavar="TAG",
                       help="with --quant_type: pick a practice verified for this scenario (e.g. MindIE, "
                            "Atlas_A2); repeatable, all must match one verified scenario")
    quant.add_argument("--debug", action="store_true", help="log at debug level, tracebacks included "
                                                            "(the same as MSMODELSLIM_LOG_LEVEL=debug)")
    quant.add_argument("--allow_default_practice", action="store_true",
                       help="with --quant_type: accept the generic lab_practice/default recipe when the model has no "
                            "verified practice (otherwise you are asked, or, without a terminal, the run stops)")

    _add_analyze(sub)

    tune = sub.add_parser("tune", help="accuracy-driven tuning: search the practice with the fewest float layers "
                                       "that meets an accuracy demand (plan YAML: strategy + evaluation; docs/tune.md)")
    _add_model_args(tune)
    tune.add_argument("--save_path", required=True, type=Path,
                      help="receives quant_model/ (the chosen checkpoint) and history/ (a rerun reuses its accuracy "
                           "cache)")
    tune.add_argument("--config", required=True, type=Path, help="tuning plan YAML (strategy + evaluation)")
    tune.add_argument("--model_type", default=None,
                      help="registered model name (default: inferred from config.json's model_type, as quant does)")
    tune.add_argument("--device", default=None, help="cpu, cuda, cuda:0, npu, npu:0 (default: npu, else cuda, else cpu)")
    tune.add_argument("--timeout", default=None,
                      help="stop between iterations after this long: D, H, M, S parts in order, e.g. 1D, 2H, 3D4H, "
                           "30M, 45S (the best so far is kept)")

    sub.add_parser("practices", help="list registered models and the practice each --quant_type would use")

    check = sub.add_parser("check", help="check an ascendv1 or compressed-tensors checkpoint against what its "
                                         "engine's loader requires (and finish an interrupted replacement of it)")
    check.add_argument("path", type=Path, help="directory written by 'quant' (or any ascendv1 / compressed-tensors "
                                               "checkpoint)")
    check.add_argument("--model_path", type=Path, default=None,
                       help="the checkpoint PATH was written from (quant's --model_path, convert's ascendv1 input): "
                            "every one of its tensors must be in PATH, as itself or as its linear's quantized "
                            "tensors, or be a documented consumed tensor (e.g. block-FP8 scales)")

    conv = sub.add_parser("convert", help="convert an ascendv1 (or MindIE) checkpoint into compressed-tensors (vLLM on "
                                          "GPUs)")
    conv.add_argument("--model_path", required=True, type=Path, help="ascendv1 or MindIE checkpoint directory")
    conv.add_argument("--save_path", required=True, type=Path, help="output directory (must be new or empty)")
    conv.add_argument("--format", default="compressed_tensors", choices=["compressed_tensors"])
    conv.add_argument("--part_file_size", type=float, default=4, help="shard size in GB (default 4)")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_path once the output is complete")
    conv.add_argument("--trust_remote_code", type=str_to_bool, default=False, metavar="True|False")

    ev = sub.add_parser("eval", help="float model vs a quantized checkpoint (ascendv1 or compressed-tensors): "
                                     "perplexity (text models); agreement on held-out image+prompt pairs "
                                     "(vision-language models; docs/vlm.md)")
    _add_model_args(ev)
    ev.add_argument("--quant_path", required=True, type=Path,
                    help="checkpoint written by 'quant': its ascendv1, MindIE or compressed-tensors folder; a "
                         "compressed-tensors checkpoint of another tool reads too")
    ev.add_argument("--dataset", default=None,
                    help="text model (required): text file (.txt/.jsonl/.json) or a built-in name: "
                         + ", ".join(builtin_eval_sets()) + ". Vision-language model: an image dataset (index.jsonl, "
                         "or a directory of images with at most one .json/.jsonl of {image, text}) or a built-in set "
                         "of lab_eval/ (default evalImages, never the calibration images)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--window", type=int, default=512, help="text: tokens per window (default 512)")
    ev.add_argument("--max_windows", type=int, default=40, help="text: number of windows (default 40)")
    ev.add_argument("--max_samples", type=int, default=8, help="VLM: image+prompt pairs evaluated (default 8)")
    ev.add_argument("--max_new_tokens", type=int, default=32,
                    help="VLM: length of the float model's greedy answer per sample (default 32)")
    ev.add_argument("--default_text", default="Describe this image in detail.",
                    help="VLM: prompt of the images that come without one")

    demo = sub.add_parser("demo", help="quantize and evaluate SmolLM2-135M-Instruct end to end (needs the [demo] extra)")
    demo.add_argument("--work_dir", type=Path, default=None, help="where the demo writes (default ~/.cache/msmodelslim/demo)")
    demo.add_argument("--max_windows", type=int, default=40)
    return parser
