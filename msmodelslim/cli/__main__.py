"""`msmodelslim` command line: the parsed arguments (cli/arguments.py) handed to msmodelslim.app, which does the
work, and its results printed; errors and signals become exit codes."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from msmodelslim.cli.arguments import MIXED_SCHEMES, build_parser, builtin_eval_sets, normalize_analyze_argv
from msmodelslim.core.errors import ConfigError, MsModelSlimError, Terminated

log = logging.getLogger("msmodelslim.cli")


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


def _eval_vlm(args: argparse.Namespace) -> int:
    from msmodelslim.app.evaluate_vlm import check_generation, evaluate_vlm
    from msmodelslim.app.quantize_request import peak_rss_mib
    from msmodelslim.core.device import parse_device

    check_generation(args.max_samples, args.max_new_tokens)  # arguments first; evaluate_vlm checks paths and data
    report = evaluate_vlm(args.model_path, args.quant_path, args.dataset, parse_device(args.device).primary,
                          args.max_samples, args.max_new_tokens, args.trust_remote_code, args.default_text)
    print(report.table())
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    return 0


def _convert(args: argparse.Namespace, config) -> int:
    from msmodelslim.app.convert_weights import convert_checkpoint
    from msmodelslim.core.errors import ConfigError

    if args.resume:
        raise ConfigError("--resume: a modelslim_convert run keeps no checkpoints to resume from (it streams one "
                          "tensor at a time); run it again without --resume")
    if args.model_type is not None:
        log.info("--model_type %s: a modelslim_convert run reads no model code and does not use it", args.model_type)
    report = convert_checkpoint(config, args.config_path, args.model_path, args.save_path, args.overwrite,
                                args.dry_run)
    if args.dry_run:
        print("\n".join(report.plan.lines()))
    return 0


def _run(args: argparse.Namespace, started_at: float) -> int:
    from msmodelslim.core.device import parse_device

    if args.command == "quant":
        from msmodelslim.core.convert_config import read_convert_config

        convert = read_convert_config(args.config_path)
        if convert is not None:  # offline weight conversion: its own use case, no model code (app/convert_weights.py)
            return _convert(args, convert)
        from msmodelslim.app.diffusion import diffusion_model_type, run_diffusion_quant_cli

        sd_model_type = diffusion_model_type(args.model_type, args.model_path, args.config_path)
        if sd_model_type is not None:  # a diffusion pipeline: its own service (app/diffusion.py)
            return run_diffusion_quant_cli(args, sd_model_type)
        from msmodelslim.app.quantize import quantize
        from msmodelslim.app.quantize_request import QuantizeRequest

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
                              + ", ".join(builtin_eval_sets()) + ")")
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
        from msmodelslim.app.quantize_request import peak_rss_mib

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
