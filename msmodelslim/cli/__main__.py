"""`msmodelslim` command line: arguments only; the work happens in msmodelslim.app."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from msmodelslim.core.errors import ConfigError, MsModelSlimError, Terminated

log = logging.getLogger("msmodelslim.cli")


def str_to_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "false"):
        return value == "true"
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", required=True, type=Path, help="Hugging Face model directory (safetensors)")
    parser.add_argument("--trust_remote_code", type=str_to_bool, default=False, metavar="True|False",
                        help="allow running Python code shipped with the checkpoint (default False)")


def _builtin_eval_sets() -> list[str]:
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


def _refuse_options_of_other_scopes(args: argparse.Namespace) -> None:
    """analyze mixed needs --bits and takes none of the ranking scopes' options (a silent no-op would mislead)."""
    if args.bits is None:
        raise ConfigError("analyze mixed needs --bits, the average bits per weight allowed (e.g. --bits 5)")
    given = [flag for flag, value, default in (("--metrics", args.metrics, None), ("--pattern", args.pattern, ["*"]),
                                               ("--quant_modules", args.quant_modules, ["*"]),
                                               ("--quant_type", args.quant_type, None),
                                               ("--config_path", args.config_path, None)) if value != default]
    if given:
        raise ConfigError(f"analyze mixed does not take {', '.join(given)}: it scores --schemes with "
                          f"--weight_method")


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
                                                          "translated to v1: --dry_run prints the translation)")
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

    conv = sub.add_parser("convert", help="convert an ascendv1 checkpoint into compressed-tensors (vLLM on GPUs)")
    conv.add_argument("--model_path", required=True, type=Path, help="ascendv1 checkpoint directory")
    conv.add_argument("--save_path", required=True, type=Path, help="output directory (must be new or empty)")
    conv.add_argument("--format", default="compressed_tensors", choices=["compressed_tensors"])
    conv.add_argument("--part_file_size", type=float, default=4, help="shard size in GB (default 4)")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_path once the output is complete")
    conv.add_argument("--trust_remote_code", type=str_to_bool, default=False, metavar="True|False")

    ev = sub.add_parser("eval", help="float model vs an ascendv1 checkpoint: perplexity (text models); agreement on "
                                     "held-out image+prompt pairs (vision-language models, docs/vlm.md)")
    _add_model_args(ev)
    ev.add_argument("--quant_path", required=True, type=Path, help="ascendv1 checkpoint written by 'quant'")
    ev.add_argument("--dataset", default=None,
                    help="text model (required): text file (.txt/.jsonl/.json) or a built-in name: "
                         + ", ".join(_builtin_eval_sets()) + ". Vision-language model: an image dataset (index.jsonl, "
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


def _eval_vlm(args: argparse.Namespace) -> int:
    from msmodelslim.app.evaluate_vlm import check_generation, evaluate_vlm
    from msmodelslim.app.quantize import peak_rss_mib
    from msmodelslim.core.device import parse_device

    check_generation(args.max_samples, args.max_new_tokens)  # arguments first; evaluate_vlm checks paths and data
    report = evaluate_vlm(args.model_path, args.quant_path, args.dataset, parse_device(args.device).primary,
                          args.max_samples, args.max_new_tokens, args.trust_remote_code, args.default_text)
    print(report.table())
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


def _run(args: argparse.Namespace, started_at: float) -> int:
    from msmodelslim.core.device import parse_device

    if args.command == "quant":
        from msmodelslim.app.diffusion import diffusion_model_type, run_diffusion_quant_cli

        sd_model_type = diffusion_model_type(args.model_type, args.model_path, args.config_path)
        if sd_model_type is not None:  # a diffusion pipeline: its own service (app/diffusion.py)
            return run_diffusion_quant_cli(args, sd_model_type)
        from msmodelslim.app.quantize import QuantizeRequest, quantize

        report = quantize(QuantizeRequest(
            model_path=args.model_path, save_path=args.save_path, model_type=args.model_type,
            device=parse_device(args.device), quant_type=args.quant_type, config_path=args.config_path,
            trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, dry_run=args.dry_run, resume=args.resume,
            allow_default_practice=args.allow_default_practice, tags=tuple(args.tag),
            estimate=args.dry_run and not args.no_estimate, started_at=started_at,
        ))
        if args.dry_run:
            # A modelslim_v0 file: its modelslim_v1 translation, then the plan as comments, so that stdout is a
            # YAML file --config_path takes.
            translated = report.translated_config is not None
            if translated:
                print("# the modelslim_v1 translation of the modelslim_v0 recipe (valid input for --config_path)")
                print(report.translated_config, end="")
                print("# plan:")
            for name, scheme in report.plan.items():
                print(f"{'# ' if translated else ''}{scheme:14s} {name}")
            if report.estimate is not None:  # comments: a translation above stays a valid YAML file
                print("\n".join(f"# {line}" for line in report.estimate.lines()))
        return 0
    if args.command == "analyze" and args.scope == "mixed":
        from msmodelslim.app.mixed_precision import MixedRequest, mixed_precision

        _refuse_options_of_other_scopes(args)
        result = mixed_precision(MixedRequest(
            model_type=args.model_type, model_path=args.model_path, bits=args.bits, schemes=args.schemes,
            weight_method=args.weight_method, device=parse_device(args.device), calib_dataset=args.calib_dataset,
            output=args.output, trust_remote_code=args.trust_remote_code,
        ))
        print(f"predicted: {result.predicted_bits:.4f} bits per weight (budget {result.budget:g}), "
              f"estimated error {result.predicted_error:.6g}")
        for name, (bits, error) in result.uniform.items():
            print(f"  uniform {name}: {bits:.4f} bits per weight, estimated error {error:.6g}")
        print("wrote " + ", ".join(result.files.values()))
        return 0
    if args.command == "analyze":
        from msmodelslim.app.analyze import AnalyzeRequest, analyze

        if args.bits is not None or args.schemes != MIXED_SCHEMES or args.weight_method != "minmax":
            raise ConfigError("--bits, --schemes and --weight_method belong to 'analyze mixed'; the other scopes "
                              "rank layers")

        result = analyze(AnalyzeRequest(
            scope=args.scope, model_type=args.model_type, model_path=args.model_path,
            device=parse_device(args.device), calib_dataset=args.calib_dataset, topk=args.topk, metric=args.metrics,
            patterns=tuple(args.pattern), quant_modules=tuple(args.quant_modules), quant_type=args.quant_type,
            config_path=args.config_path, output=args.output, trust_remote_code=args.trust_remote_code,
            allow_default_practice=args.allow_default_practice,
        ))
        print(f"top {result.topk} of {len(result.scores)} ({result.scope}, {result.metric}); exclude list:")
        for entry in result.exclude:
            print(f"  - {entry}")
        print("wrote " + ", ".join(result.files.values()))
        return 0
    if args.command == "tune":
        from msmodelslim.app.tune import TuneRequest, parse_timeout, tune

        parse_timeout(args.timeout)  # a typo fails before torch is imported
        report = tune(TuneRequest(
            model_path=args.model_path, save_path=args.save_path, config_path=args.config, model_type=args.model_type,
            device=parse_device(args.device), timeout=args.timeout, trust_remote_code=args.trust_remote_code,
        ))
        cached = sum(r["cached"] for r in report.iterations)
        print(f"iterations: {len(report.iterations)} ({cached} from the cache, {report.evaluated} evaluated); "
              f"stopped: {report.stopped}; {report.seconds:.1f} s")
        if report.chosen is not None:
            verdict = "meets the demand" if report.chosen["passed"] else "does NOT meet the demand"
            print(f"chosen: {report.chosen['config_id']} ({verdict}): {report.chosen['detail']}")
            print(f"kept in float: {report.fallback}")
        print(f"history: {args.save_path / 'history'}")
        if report.practice_file is not None:
            print(f"practice saved: {report.practice_file}")
        return 0
    if args.command == "practices":
        from msmodelslim.app.practice import KNOWN_QUANT_TYPES, practice_table
        from msmodelslim.model.registry import registered_adapters

        rows = practice_table({name: entry.pedigree for name, entry in registered_adapters().items()})
        available = [q for q in KNOWN_QUANT_TYPES if any(q in cells for _, cells in rows)]
        width = max(len(name) for name, _ in rows)
        print(f"{'model_type':{width}s}  " + "  ".join(f"{q:16s}" for q in available))
        for name, cells in rows:
            print(f"{name:{width}s}  " + "  ".join(f"{cells.get(q, '-'):16s}" for q in available))
        missing = [q for q in KNOWN_QUANT_TYPES if q not in available]
        print(f"\nnot available yet (algorithms missing): {', '.join(missing)}")
        return 0
    if args.command == "check":
        from msmodelslim.app.check import check_checkpoint

        recovered, findings = check_checkpoint(args.path, args.model_path)
        for line in recovered:
            print(f"recovered: {line}")
        for finding in findings:
            print(f"{finding.level}: {finding.message}")
        errors = sum(f.level == "error" for f in findings)
        print(f"{errors} error(s), {len(findings) - errors} warning(s)")
        return 4 if errors else 0
    if args.command == "convert":
        from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors

        convert_ascendv1_to_compressed_tensors(args.model_path, args.save_path, args.overwrite, args.part_file_size,
                                               args.trust_remote_code)
        print(f"wrote {args.save_path} (compressed-tensors)")
        return 0
    if args.command == "eval":
        from msmodelslim.app.evaluate_vlm import is_vlm_checkpoint

        if is_vlm_checkpoint(args.model_path):  # image+prompt agreement (app/evaluate_vlm.py)
            return _eval_vlm(args)
        if args.dataset is None:
            raise ConfigError("eval: --dataset is required for a text model (a text file, or a built-in name: "
                              + ", ".join(_builtin_eval_sets()) + ")")
        if (args.quant_path / "model_index.json").is_file():  # a quantized diffusion pipeline (app/diffusion_eval.py)
            from msmodelslim.app.diffusion_eval import run_diffusion_eval_cli

            return run_diffusion_eval_cli(args)
        from msmodelslim.app.evaluate import check_window, evaluate

        check_window(args.window, args.max_windows)  # arguments first; evaluate checks paths and data before loading
        device = parse_device(args.device).primary
        results = evaluate(args.model_path, args.quant_path, args.dataset, device, args.window, args.max_windows,
                           args.trust_remote_code)
        f, q = results["float"], results["quantized"]
        print(f"windows: {f.windows} x {args.window} tokens")
        print(f"float perplexity:     {f.perplexity:.4f}")
        print(f"quantized perplexity: {q.perplexity:.4f}")
        print(f"ratio quantized/float: {q.perplexity / f.perplexity:.4f}")
        from msmodelslim.app.quantize import peak_rss_mib

        print(f"time: float {f.seconds:.1f} s, quantized {q.seconds:.1f} s; peak RSS {peak_rss_mib():.0f} MiB")
        return 0
    if args.command == "demo":
        print("msmodelslim demo: loading torch and transformers ...", file=sys.stderr, flush=True)
        from msmodelslim.app.demo import run_demo

        run_demo(args.work_dir, args.max_windows, started_at)
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    started_at = time.time()
    from msmodelslim.core.logging import setup_logging

    try:
        level = setup_logging()
    except MsModelSlimError as exc:
        print(f"msmodelslim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    argv, notes = normalize_analyze_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    for note in notes:
        log.warning(note)
    if getattr(args, "debug", False):
        logging.getLogger("msmodelslim").setLevel(logging.DEBUG)
        level = logging.DEBUG
    previous = _terminate_like_ctrl_c()
    try:
        return _run(args, started_at)
    except MsModelSlimError as exc:
        log.debug("details", exc_info=True)
        print(f"msmodelslim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("msmodelslim: terminated (SIGTERM); partial output removed, --save_path left as it was", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("msmodelslim: interrupted; partial output removed, --save_path left as it was", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment problem: short message, traceback under DEBUG
        if level <= logging.DEBUG:
            log.exception("unexpected error")
        print(f"msmodelslim: unexpected error: {type(exc).__name__}: {exc}\n"
              f"(run with MSMODELSLIM_LOG_LEVEL=debug for the traceback, and report it)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _terminate_like_ctrl_c():
    """SIGTERM (schedulers, `docker stop`, `kill`) unwinds like Ctrl-C, so staging directories are removed.
    Returns the previous handler (None where handlers cannot be set: outside the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
