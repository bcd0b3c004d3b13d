"""Use case: accuracy-driven auto-tuning, `msmodelslim tune` (protocol.md §1.4, §7.2).

The plan YAML holds a `strategy` (app/tune_strategies.py: what to try next) and an `evaluation`
(app/tune_evaluators.py: does a checkpoint meet the demand). The loop, for at most MAX_ITERATION iterations or
until `--timeout`:

  1. take the strategy's next practice;
  2. reuse its result if `history/accuracy.yaml` holds the same (practice, evaluation, model) key;
  3. otherwise quantize it into `save_path/quant_model` (the same use case as `quant`) and evaluate it;
  4. record the iteration in `history/history.yaml` and the practice as `history/<config_id>.yaml`.

The timeout is checked between iterations (a running quantization is never cut). At the end the chosen practice
(the strategy's answer, or the best so far when stopped early) is written to `history/best.yaml`, quantized into
`quant_model` if that does not hold it yet, and, when it meets the demand and $MSMODELSLIM_CUSTOM_PRACTICE_REPO
is set, saved there under the adapter's pedigree so that `quant --quant_type` finds it (app/tune_practice.py).

A rerun with the same save_path starts a new history.yaml but keeps accuracy.yaml: iterations already measured
are answered from it, so an interrupted or timed-out tune continues where it stopped without re-evaluating.
All history files are written atomically (temporary file + rename): a killed run leaves the old or the new file.
"""
from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from msmodelslim.app.quantize import quantize
from msmodelslim.app.quantize_request import QuantizeRequest
from msmodelslim.app.tune_evaluators import (CommandEvaluation, CommandEvaluator, HeldOutSplit,
                                             PerplexityEvaluation, PerplexityEvaluator, ServiceOrientedEvaluator,
                                             digest)
from msmodelslim.app.tune_history import (History, TunePlan, load_plan, parse_timeout, read_yaml,
                                          write_yaml_atomically)
from msmodelslim.app.tune_judge import TuneResult
from msmodelslim.app.tune_practice import TunedOrigin, check_practice_repo, save_practice
from msmodelslim.app.tune_strategies import Candidate, Proposal, build_strategy
from msmodelslim.core.config import parse_config
from msmodelslim.core.dataset import load_texts, resolve_dataset, resolve_eval_dataset, read_texts
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.core.logging import get_logger
from msmodelslim.model.registry import infer_model_type, resolve

log = get_logger("app.tune")

MAX_ITERATION = 30
QUANT_MODEL = "quant_model"
HISTORY = "history"


# ---- request and report ------------------------------------------------------------------------------------------
@dataclass
class TuneRequest:
    model_path: Path
    save_path: Path
    config_path: Path
    model_type: Optional[str] = None  # None: inferred from config.json, as quant does
    device: DeviceSpec = DeviceSpec("cpu")
    timeout: Optional[str] = None  # 1D2H30M45S grammar
    trust_remote_code: bool = False


@dataclass
class TuneReport:
    iterations: list[dict]
    chosen: Optional[dict]  # the chosen iteration's record
    stopped: str  # "strategy finished", "timeout", "max iterations"
    evaluated: int  # evaluations run by this process (the others came from the cache)
    seconds: float
    practice_file: Optional[Path] = None
    fallback: list[str] = field(default_factory=list)


@dataclass
class _Run:
    request: TuneRequest
    plan: TunePlan
    model_type: str
    pedigree: str
    history: History
    plan_dir: Path
    original_dataset: str
    split_note: str = ""


def _check_paths(request: TuneRequest) -> None:
    if not request.model_path.is_dir():
        raise InvalidModelError(f"--model_path {request.model_path} is not a directory")
    save, model = request.save_path.absolute(), request.model_path.resolve()
    if save == model or model in save.parents or save in model.parents:
        raise ConfigError(f"--save_path {request.save_path} overlaps --model_path {request.model_path}")
    if not save.parent.is_dir():
        raise ConfigError(f"the parent directory of --save_path ({save.parent}) does not exist; create it first")
    if save.exists() and not save.is_dir():
        raise ConfigError(f"--save_path {request.save_path} exists and is not a directory")


def _check_perplexity_plan(config: PerplexityEvaluation, template: dict, plan_dir: Path) -> None:
    if config.dataset is not None:
        eval_file = resolve_eval_dataset(config.dataset)
        calibration_file = resolve_dataset(template["spec"].get("dataset", "mix_calib.jsonl"), plan_dir)
        if eval_file.resolve() == calibration_file.resolve():
            raise ConfigError(f"evaluation.dataset {config.dataset} is the calibration set itself; omit it to "
                              f"evaluate on a held-out part of the calibration set instead")


def _external_evaluator(plan: TunePlan, template: dict, request: TuneRequest, plan_dir: Path):
    """The command or service_oriented evaluator, prechecked (nothing written yet); None for perplexity."""
    config = plan.evaluation
    if isinstance(config, CommandEvaluation):
        evaluator = CommandEvaluator(config, plan_dir)
    elif isinstance(config, PerplexityEvaluation):
        _check_perplexity_plan(config, template, plan_dir)
        return None
    else:
        evaluator = ServiceOrientedEvaluator(config, request.save_path)
    evaluator.precheck()
    return evaluator


def _perplexity_evaluator(run: _Run, strategy) -> PerplexityEvaluator:
    """The built-in evaluator; without its own text, also the calibration/evaluation split (the template's data
    set is replaced by its calibration part, written into history/)."""
    config, request = run.plan.evaluation, run.request
    calibration_name = run.original_dataset
    if config.dataset is not None:
        texts = read_texts(resolve_eval_dataset(config.dataset))
    else:
        split = HeldOutSplit.of(load_texts(calibration_name, run.plan_dir), config.holdout, calibration_name)
        split_file = run.history.directory / "calibration_split.jsonl"
        split_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in split.calibration), encoding="utf-8")
        strategy.template["spec"]["dataset"] = str(split_file.resolve())
        texts = split.evaluation
        run.split_note = (f"calibrated on the first {len(split.calibration)} of the "
                          f"{len(split.calibration) + len(split.evaluation)} samples of {calibration_name}; "
                          f"tune-evaluated on the other {len(split.evaluation)}")
        log.info("tune: %s", run.split_note)
    return PerplexityEvaluator(config, request.model_path, texts, request.trust_remote_code,
                               request.device.primary, run.history.baseline)


def _pipeline(practice: dict, plan_dir: Path):
    config = parse_config(copy.deepcopy(practice), "tune practice")
    config.source_dir = plan_dir
    return config


def _quantize(run: _Run, practice: dict, dry_run: bool = False) -> None:
    request = run.request
    quantize(QuantizeRequest(model_path=request.model_path, save_path=request.save_path / QUANT_MODEL,
                             model_type=run.model_type, device=request.device,
                             pipeline=_pipeline(practice, run.plan_dir), trust_remote_code=request.trust_remote_code,
                             overwrite=True, dry_run=dry_run))


def _ranker(run: _Run):
    """Fallback candidates from `analyze` under the template's scheme, most sensitive first (cached)."""
    from msmodelslim.app.analysis_report import exclude_entries
    from msmodelslim.app.analyze import AnalyzeRequest, analyze

    def rank(template: dict, dataset: Optional[str], metric: str) -> list[Candidate]:
        request = run.request
        calib = str(resolve_dataset(dataset or template["spec"].get("dataset", "mix_calib.jsonl"), run.plan_dir))
        scope = "layer" if metric.startswith("mse") else "linear"
        key = digest({"process": template["spec"]["process"], "dataset": calib, "metric": metric,
                      "model": str(request.model_path.resolve()), "model_type": run.model_type})

        def compute() -> list[Candidate]:
            config_path = None
            if scope == "layer":
                config_path = run.history.directory / "analysis_template.yaml"
                write_yaml_atomically(config_path, {"apiversion": "modelslim_v1",
                                                    "spec": {"process": template["spec"]["process"]}})
            log.info("tune: ranking fallback candidates with analyze %s --metrics %s", scope, metric)
            result = analyze(AnalyzeRequest(scope=scope, model_type=run.model_type, model_path=request.model_path,
                                            device=request.device, calib_dataset=calib, metric=metric,
                                            config_path=config_path, output=run.history.directory / "analysis",
                                            trust_remote_code=request.trust_remote_code))
            names = exclude_entries([name for name, _ in result.scores], scope)
            return names if scope == "layer" else _fused_together(names, run)

        return run.history.ranking(key, compute)

    return rank


def _fused_together(ranked: list[str], run: _Run) -> list[Candidate]:
    """Per-linear candidates with each fused group (q/k/v, gate/up: one kernel, one type) as one candidate,
    placed where its most sensitive member ranks."""
    from msmodelslim.model.registry import create_adapter

    adapter = create_adapter(run.model_type, str(run.request.model_path), run.request.trust_remote_code)
    group_of = {leaf: group for group in adapter.structure.fused_groups for leaf in group}
    present = set(ranked)
    out: list[Candidate] = []
    seen: set[str] = set()
    for name in ranked:
        if name in seen:
            continue
        prefix, _, leaf = name.rpartition(".")
        members = [f"{prefix}.{m}" for m in group_of.get(leaf, (leaf,)) if f"{prefix}.{m}" in present]
        seen.update(members)
        out.append(members if len(members) > 1 else name)
    return out


def _better(a: dict, b: Optional[dict]) -> bool:
    """Passing beats failing; then fewer float layers; then the larger goodness."""
    if b is None:
        return True
    if a["passed"] != b["passed"]:
        return a["passed"]
    if a["passed"] and len(a["fallback"]) != len(b["fallback"]):
        return len(a["fallback"]) < len(b["fallback"])
    return a["goodness"] > b["goodness"]


def _config_id(base: str, iteration: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', base)}-iter{iteration:02d}"


@dataclass
class _Iterations:
    """What the loop has measured so far in this run."""

    records: list[dict] = field(default_factory=list)
    practices: dict[str, dict] = field(default_factory=dict)  # key -> the practice as tried
    best: Optional[dict] = None
    evaluated: int = 0
    quant_model_key: Optional[str] = None  # whose checkpoint save_path/quant_model holds


def _iterate(run: _Run, evaluator, proposal: Proposal, base_id: str, done: _Iterations,
             clock: Callable[[], float]) -> TuneResult:
    """One iteration: the cached result, or quantize + evaluate; recorded in history either way."""
    request = run.request
    config_id = _config_id(base_id, len(done.records) + 1)
    practice = copy.deepcopy(proposal.practice)
    practice.setdefault("metadata", {})["config_id"] = config_id
    key = digest({"practice": {k: v for k, v in practice.items() if k != "metadata"},
                  "evaluation": run.plan.evaluation.model_dump(mode="json"),
                  "model": str(request.model_path.resolve()), "model_type": run.model_type})
    started = clock()
    result = run.history.cached(key)
    cached = result is not None
    if cached:
        log.info("tune %s: %s; cached result: %s", config_id, proposal.note, result.detail)
    else:
        log.info("tune %s: %s; quantizing", config_id, proposal.note)
        _quantize(run, practice)
        done.quant_model_key = key
        write_yaml_atomically(run.history.directory / "quant_model.yaml", {"key": key, "config_id": config_id})
        result = evaluator.evaluate(request.save_path / QUANT_MODEL)
        done.evaluated += 1
        run.history.remember(key, config_id, result)
        log.info("tune %s: %s -> %s", config_id, result.detail, "PASS" if result.passed else "fail")
    record = {"iteration": len(done.records) + 1, "config_id": config_id, "note": proposal.note,
              "fallback": list(proposal.fallback), "passed": result.passed, "scores": result.scores,
              "goodness": result.goodness, "detail": result.detail, "cached": cached, "key": key,
              "seconds": round(clock() - started, 3)}
    run.history.record(record, practice)
    done.records.append(record)
    done.practices[key] = practice
    if _better(record, done.best):
        done.best = record
    return result


def _prepare(request: TuneRequest):
    """Every check, in the order that fails fastest; nothing is written before the plan and the evaluator's
    precheck passed, and no weight is read here (the template's plan is checked on the empty model)."""
    plan = load_plan(request.config_path)
    _check_paths(request)
    model_type = request.model_type or infer_model_type(request.model_path)
    entry = resolve(model_type, request.model_path)
    repo = check_practice_repo()
    strategy = build_strategy(plan.strategy)
    plan_dir = request.config_path.resolve().parent
    evaluator = _external_evaluator(plan, strategy.template, request, plan_dir)
    request.save_path.mkdir(exist_ok=True)  # the first write
    run = _Run(request, plan, model_type, entry.pedigree, History(request.save_path / HISTORY), plan_dir,
               strategy.template["spec"].get("dataset", "mix_calib.jsonl"))
    evaluator = evaluator or _perplexity_evaluator(run, strategy)
    _quantize(run, strategy.template, dry_run=True)
    return run, strategy, evaluator, repo


def tune(request: TuneRequest, clock: Callable[[], float] = time.monotonic) -> TuneReport:
    started = clock()
    timeout = parse_timeout(request.timeout)
    run, strategy, evaluator, repo = _prepare(request)
    base_id = str(strategy.template.get("metadata", {}).get("config_id") or run.plan.strategy.type)
    done = _Iterations(quant_model_key=(read_yaml(run.history.directory / "quant_model.yaml") or {}).get("key"))
    stream = strategy.proposals(_ranker(run))
    proposal: Proposal = next(stream)
    chosen_proposal: Optional[Proposal] = None
    stopped = "strategy finished"
    while True:
        if len(done.records) >= MAX_ITERATION:
            stopped = "max iterations"
            log.warning("tune: stopped after %d iterations (the maximum)", MAX_ITERATION)
            break
        if timeout is not None and clock() - started >= timeout:
            stopped = "timeout"
            log.warning("tune: --timeout %s reached after %d iteration(s) (%.0f s): stopping, the best so far is "
                        "kept", request.timeout, len(done.records), clock() - started)
            break
        result = _iterate(run, evaluator, proposal, base_id, done, clock)
        try:
            proposal = stream.send(result)
        except StopIteration as stop:
            chosen_proposal = stop.value
            break
    return _conclude(run, done, chosen_proposal, stopped, repo, clock() - started)


def _conclude(run: _Run, done: _Iterations, chosen_proposal: Optional[Proposal], stopped: str,
              repo: Optional[Path], seconds: float) -> TuneReport:
    """The chosen practice: best.yaml, quant_model/, the summary in history.yaml, the custom practice repo."""
    request = run.request
    chosen = done.best
    if chosen_proposal is not None:  # the strategy's answer: one of the iterations
        chosen = next((r for r in done.records if r["fallback"] == chosen_proposal.fallback
                       and done.practices[r["key"]]["spec"] == chosen_proposal.practice["spec"]), done.best)
    best_practice = done.practices[chosen["key"]] if chosen else None
    if chosen is not None:
        log.info("tune: chosen %s (%s; %d pattern(s) in float: %s)", chosen["config_id"], chosen["detail"],
                 len(chosen["fallback"]), chosen["fallback"])
        if chosen["key"] != done.quant_model_key and stopped != "timeout":
            log.info("tune: quantizing the chosen %s into %s", chosen["config_id"], request.save_path / QUANT_MODEL)
            _quantize(run, best_practice)
            write_yaml_atomically(run.history.directory / "quant_model.yaml",
                                  {"key": chosen["key"], "config_id": chosen["config_id"]})
        elif chosen["key"] != done.quant_model_key:
            log.info("tune: %s holds an earlier iteration; history/best.yaml holds the chosen practice",
                     request.save_path / QUANT_MODEL)
    summary = {"stopped": stopped, "chosen": chosen["config_id"] if chosen else None,
               "chosen_passed": bool(chosen and chosen["passed"]), "evaluated": done.evaluated,
               "seconds": round(seconds, 3)}
    run.history.finish(summary, best_practice)
    practice_file = None
    if chosen is not None and chosen["passed"] and repo is not None:
        origin = TunedOrigin(run.model_type, run.pedigree, run.plan.strategy.type, run.original_dataset, run.plan_dir,
                             run.split_note)
        practice_file = save_practice(origin, repo, best_practice, chosen)
    elif chosen is not None and not chosen["passed"]:
        log.warning("tune: no practice met the demand; the best found is %s (%s), not saved as a practice",
                    chosen["config_id"], chosen["detail"])
    return TuneReport(done.records, chosen, stopped, done.evaluated, seconds, practice_file,
                      list(chosen["fallback"]) if chosen else [])
