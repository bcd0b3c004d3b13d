"""`msmodelslim tune`: the strategies find exactly the expected practice, a rerun answers from the accuracy cache,
--timeout stops between iterations and keeps the best so far, and bad plans fail before any weight is read.

The end-to-end tests quantize a tiny random Llama for real and judge each checkpoint with a `command` evaluator:
a small script that reads the saved quant_model_description.json and scores 1.0 only when every linear of the
"fragile" blocks stayed FLOAT. The smallest passing fallback prefix is therefore known exactly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from helpers import SCHEMES, small_calib
from tiny_models import make_tiny_model
from msmodelslim.app import tune as tune_module
from msmodelslim.app.practice import find_practice, parse_quant_type
from msmodelslim.app.tune import MAX_ITERATION, TuneRequest, load_plan, parse_timeout, tune
from msmodelslim.app.tune_evaluators import HeldOutSplit, last_number
from msmodelslim.app.tune_judge import Expectation, TuneResult, judge
from msmodelslim.app.tune_service_config import ServiceOrientedEvaluation
from msmodelslim.app.tune_strategies import (BinaryFallback, BinaryFallbackConfig, StandingHigh, StandingHighConfig,
                                             StandingHighWithExperienceConfig, experience_template, rollback_list)
from msmodelslim.cli.__main__ import main
from msmodelslim.core.errors import ConfigError, SpecError, UnsupportedError

MODEL_TYPE = "Llama-2-7B"
CANDIDATES = ["model.layers.1.*", "model.layers.3.*", "model.layers.0.*", "model.layers.2.*"]
FRAGILE = [1, 0]  # the score script demands these blocks in float: the answer is the first 3 candidates

SCORE_SCRIPT = '''
import json, sys
from pathlib import Path
model, counter, fragile = Path(sys.argv[1]), Path(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
with counter.open("a") as f:
    f.write(str(model) + "\\n")
description = json.loads((model / "quant_model_description.json").read_text())
def block_float(b):
    tags = [t for k, t in description.items() if k.startswith(f"model.layers.{b}.") and k.endswith("proj.weight")]
    return bool(tags) and all(t == "FLOAT" for t in tags)
print("evaluating", model)
print(sum(block_float(b) for b in fragile) / len(fragile))
'''


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tune_llama"), "llama", num_hidden_layers=4)


def template(dataset: str) -> dict:
    return {"apiversion": "modelslim_v1", "metadata": {"config_id": "w8a8-static"},
            "spec": {"runner": "layer_wise",
                     "process": [{"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}],
                     "save": [{"type": "ascendv1_saver"}], "dataset": dataset}}


def command_plan(tmp_path: Path, fragile=FRAGILE, candidates=CANDIDATES, strategy: dict | None = None) -> Path:
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    counter = tmp_path / "calls.txt"
    plan = {"strategy": strategy or {"type": "binary_fallback", "template": template(small_calib(tmp_path)),
                                     "rollback_path": "spec.process.0.exclude", "rollback_candidates": candidates},
            "evaluation": {"type": "command",
                           "command": [sys.executable, str(script), "{model}", str(counter),
                                       ",".join(map(str, fragile))],
                           "demand": {"expectations": [{"dataset": "fragile_float", "target": 1.0,
                                                        "tolerance": 0}]}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def calls(tmp_path: Path) -> int:
    counter = tmp_path / "calls.txt"
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def described_float_blocks(quant_model: Path) -> list[int]:
    description = json.loads((quant_model / "quant_model_description.json").read_text())
    return sorted({int(k.split(".")[2]) for k, t in description.items()
                   if k.startswith("model.layers.") and k.endswith("proj.weight") and t == "FLOAT"})


# ---- end to end: binary_fallback, cache, practice --------------------------------------------------------------
@pytest.fixture(scope="module")
def first_run(model, tmp_path_factory):
    work = tmp_path_factory.mktemp("tune_run")
    repo = work / "practices"
    mp = pytest.MonkeyPatch()
    mp.setenv("MSMODELSLIM_CUSTOM_PRACTICE_REPO", str(repo))
    request = TuneRequest(model_path=model, save_path=work / "out", config_path=command_plan(work),
                          model_type=MODEL_TYPE)
    try:
        report = tune(request)
    finally:
        mp.undo()
    return work, repo, request, report


def test_binary_fallback_finds_the_smallest_prefix(first_run):
    work, _, request, report = first_run
    # zero fallback fails, 2 candidates fail, 3 pass: binary search over [1, 4] needs exactly these three
    assert [r["fallback"] for r in report.iterations] == [[], CANDIDATES[:2], CANDIDATES[:3]]
    assert [r["passed"] for r in report.iterations] == [False, False, True]
    assert report.fallback == CANDIDATES[:3] and report.stopped == "strategy finished"
    assert calls(work) == 3 and report.evaluated == 3
    # quant_model holds the chosen checkpoint: blocks 1, 3, 0 in float, block 2 quantized
    assert described_float_blocks(request.save_path / "quant_model") == [0, 1, 3]


def test_history_files(first_run):
    _, _, request, report = first_run
    history = request.save_path / "history"
    index = yaml.safe_load((history / "history.yaml").read_text())
    assert [r["config_id"] for r in index["iterations"]] == ["w8a8-static-iter01", "w8a8-static-iter02",
                                                             "w8a8-static-iter03"]
    assert index["chosen"] == "w8a8-static-iter03" and index["chosen_passed"] is True
    third = yaml.safe_load((history / "w8a8-static-iter03.yaml").read_text())
    assert third["spec"]["process"][0]["exclude"] == ["lm_head"] + CANDIDATES[:3]
    assert third["metadata"]["config_id"] == "w8a8-static-iter03"
    assert len(yaml.safe_load((history / "accuracy.yaml").read_text())["results"]) == 3
    assert yaml.safe_load((history / "best.yaml").read_text())["spec"] == third["spec"]
    assert not list(history.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_winning_practice_is_found_by_quant_type(first_run, monkeypatch):
    _, repo, _, report = first_run
    monkeypatch.setenv("MSMODELSLIM_CUSTOM_PRACTICE_REPO", str(repo))
    assert report.practice_file is not None and report.practice_file.parent == repo / "llama"
    practice = find_practice(MODEL_TYPE, "llama", parse_quant_type("w8a8"))
    assert practice is not None and practice.path == report.practice_file
    assert practice.config.spec.process[0].exclude == ["lm_head"] + CANDIDATES[:3]
    assert find_practice("Llama-2-13B", "llama", parse_quant_type("w8a8")).path != report.practice_file


def test_rerun_evaluates_nothing_new(first_run, monkeypatch):
    work, repo, request, first = first_run
    monkeypatch.setenv("MSMODELSLIM_CUSTOM_PRACTICE_REPO", str(repo))
    before = calls(work)

    def no_quantization(*args, **kwargs):
        if not kwargs.get("dry_run"):
            raise AssertionError("a cached rerun must not quantize")

    monkeypatch.setattr(tune_module, "_quantize", no_quantization)
    report = tune(request)
    assert calls(work) == before and report.evaluated == 0
    assert all(r["cached"] for r in report.iterations)
    assert report.fallback == first.fallback
    index = yaml.safe_load((request.save_path / "history" / "history.yaml").read_text())
    assert len(index["iterations"]) == 3  # the index restarted; it was not appended to


def test_full_candidate_list_failing_is_a_spec_error(model, tmp_path):
    plan = command_plan(tmp_path, fragile=[0, 1], candidates=["model.layers.0.*", "model.layers.2.*"])
    with pytest.raises(SpecError, match="even with all 2 candidates"):
        tune(TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=plan, model_type=MODEL_TYPE))
    index = yaml.safe_load((tmp_path / "out" / "history" / "history.yaml").read_text())
    assert [r["fallback"] for r in index["iterations"]] == [[], ["model.layers.0.*"],
                                                            ["model.layers.0.*", "model.layers.2.*"]]


def test_the_chosen_practice_is_quantized_again_when_the_last_try_failed(model, tmp_path):
    plan = command_plan(tmp_path, fragile=[1, 3])  # candidates 1, 3 pass; the search then tries candidate 1 alone
    report = tune(TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=plan, model_type=MODEL_TYPE))
    assert [r["passed"] for r in report.iterations] == [False, True, False]
    assert report.fallback == CANDIDATES[:2] and calls(tmp_path) == 3
    assert described_float_blocks(tmp_path / "out" / "quant_model") == [1, 3]


@pytest.mark.parametrize("metric", ["mse_layer_wise", "kurtosis"])
def test_candidates_come_from_the_analysis_when_not_given(metric, model, tmp_path, monkeypatch):
    plan = _plan_with(tmp_path, lambda p: (p["strategy"].pop("rollback_candidates"),
                                           p["strategy"].update(analysis_metric=metric),
                                           p["evaluation"]["command"].__setitem__(-1, "2")))
    request = TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=plan, model_type=MODEL_TYPE)
    report = tune(request)
    history = tmp_path / "out" / "history"
    (ranking,) = yaml.safe_load((history / "candidates.yaml").read_text()).values()
    if metric == "mse_layer_wise":  # analyze layer: one entry per block
        assert sorted(ranking) == [f"model.layers.{i}.*" for i in range(4)]
    else:  # analyze linear: one entry per linear, fused q/k/v and gate/up as one entry each (4 per block)
        assert len(ranking) == 16
        groups = [sorted(c) for c in ranking if isinstance(c, list)]
        assert sorted(g[0].rsplit(".", 1)[1] for g in groups) == ["gate_proj"] * 4 + ["k_proj"] * 4
    flat = [[c] if isinstance(c, str) else c for c in ranking]
    last_of_block_2 = max(i for i, names in enumerate(flat) if names[0].startswith("model.layers.2."))
    expected = [name for names in flat[: last_of_block_2 + 1] for name in names]
    assert report.fallback == expected  # the shortest prefix that keeps block 2 in float
    assert (history / "analysis" / "analysis.json").is_file()
    import msmodelslim.app.analyze as analyze_module
    monkeypatch.setattr(analyze_module, "analyze", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    assert tune(request).fallback == report.fallback  # the ranking is cached too


# ---- timeout ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("1D", 86400), ("2H", 7200), ("3D4H", 3 * 86400 + 4 * 3600),
                                           ("30M", 1800), ("45S", 45), ("1D2H30M45S", 86400 + 7200 + 1800 + 45),
                                           ("2h5m", 7500), (None, None)])
def test_timeout_grammar(text, seconds):
    assert parse_timeout(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "H", "2H1D", "1.5H", "1W", "0S", "1D 2H", "-1H"])
def test_bad_timeout_is_a_config_error(text):
    with pytest.raises(ConfigError, match="--timeout"):
        parse_timeout(text)


def test_bad_timeout_on_the_command_line(capsys, tmp_path):
    code = main(["tune", "--model_path", str(tmp_path), "--save_path", str(tmp_path / "o"), "--config",
                 str(tmp_path / "p.yaml"), "--timeout", "2H1D"])
    assert code == 2 and "--timeout '2H1D' is not a duration" in capsys.readouterr().err


def test_timeout_stops_between_iterations_and_keeps_the_best(model, tmp_path, log_lines):
    ticks = iter([0.0, 0.0])  # the start and the first check; every later reading is a day later
    report = tune(TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=command_plan(tmp_path),
                              model_type=MODEL_TYPE, timeout="1H"), clock=lambda: next(ticks, 86400.0))
    assert report.stopped == "timeout" and len(report.iterations) == 1 and calls(tmp_path) == 1
    assert any(line.startswith("tune: --timeout 1H reached after 1 iteration(s)") for line in log_lines)
    history = tmp_path / "out" / "history"
    index = yaml.safe_load((history / "history.yaml").read_text())
    assert index["stopped"] == "timeout" and index["chosen"] == "w8a8-static-iter01"
    assert (history / "best.yaml").is_file()


# ---- bad plans fail before any weight is read ---------------------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Any quantization or analysis (the only paths that read weights) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were about to be read")

    monkeypatch.setattr(tune_module, "quantize", refuse)
    import msmodelslim.app.analyze as analyze_module
    monkeypatch.setattr(analyze_module, "analyze", refuse)


def _plan_with(tmp_path: Path, edit) -> Path:
    path = command_plan(tmp_path)
    plan = yaml.safe_load(path.read_text())
    edit(plan)
    path.write_text(yaml.safe_dump(plan))
    return path


BAD_PLANS = {
    "no evaluation": (lambda p: p.pop("evaluation"), "exactly two keys"),
    "unknown strategy": (lambda p: p["strategy"].update(type="random_search"), "strategy"),
    "bad rollback path": (lambda p: p["strategy"].update(rollback_path="spec.process.4.exclude"),
                          "spec.process.4 is not an index"),
    "rollback path to a scalar": (lambda p: p["strategy"].update(rollback_path="spec.dataset"), "not a list"),
    "v0 template": (lambda p: p["strategy"]["template"].update(apiversion="modelslim_v0"), "modelslim_v1"),
    "bad template field": (lambda p: p["strategy"]["template"]["spec"]["process"][0].update(qconfig={"x": 1}),
                           "strategy.template"),
    "command without {model}": (lambda p: p["evaluation"].update(command="python score.py"), "{model}"),
    "two expectations for a command": (lambda p: p["evaluation"]["demand"]["expectations"].append(
        {"dataset": "b", "target": 1}), "exactly one"),
    "negative tolerance": (lambda p: p["evaluation"]["demand"]["expectations"][0].update(tolerance=-1),
                           "tolerance"),
    "perplexity ratio below 1": (lambda p: p.update(evaluation={"type": "perplexity", "demand": {"max_ratio": 0.9}}),
                                 "max_ratio"),
    "unknown evaluation key": (lambda p: p["evaluation"].update(server="x"), "server"),
    "missing program": (lambda p: p["evaluation"].update(command=["no-such-program-xyz", "{model}"]),
                        "not on PATH"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_bad_plan_fails_before_any_weight(name, model, tmp_path, no_weights):
    edit, message = BAD_PLANS[name]
    with pytest.raises(ConfigError) as info:
        tune(TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=_plan_with(tmp_path, edit),
                         model_type=MODEL_TYPE))
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_bad_plan_on_the_command_line(model, tmp_path, capsys):
    plan = _plan_with(tmp_path, BAD_PLANS["bad rollback path"][0])
    code = main(["tune", "--model_path", str(model), "--save_path", str(tmp_path / "out"), "--config", str(plan),
                 "--model_type", MODEL_TYPE, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "rollback_path" in err and "Traceback" not in err


def test_tune_on_the_command_line(model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MSMODELSLIM_CUSTOM_PRACTICE_REPO", raising=False)
    code = main(["tune", "--model_path", str(model), "--save_path", str(tmp_path / "out"), "--config",
                 str(command_plan(tmp_path)), "--model_type", MODEL_TYPE, "--device", "cpu", "--timeout", "1H"])
    out = capsys.readouterr().out
    assert code == 0
    assert "iterations: 3 (0 from the cache, 3 evaluated); stopped: strategy finished" in out
    assert f"kept in float: {CANDIDATES[:3]}" in out and "practice saved" not in out


# ---- service_oriented --------------------------------------------------------------------------------------------
SERVICE = {"type": "service_oriented",
           "demand": {"expectations": [{"dataset": "gsm8k", "target": 90, "tolerance": 2}]},
           "evaluation": {"type": "aisbench", "datasets": {"gsm8k": {"config_name": "gsm8k_gen_0_shot_cot"}},
                          "aisbench": {"binary": "ais_bench", "extra_args": ["--debug"]}},
           "inference_engine": {"type": "vllm-ascend", "args": {"tensor_parallel_size": 1}, "port": 8000},
           "precheck": [{"type": "expected_answer"}]}


def test_service_oriented_config_is_parsed_in_full():
    config = ServiceOrientedEvaluation.model_validate(SERVICE)
    bench = config.evaluation.aisbench
    assert (bench.mode, bench.timeout, bench.retry, bench.batch_size, bench.max_out_len) == ("all", 7200, 2, 1, 512)
    assert bench.model_meta.abbr == "vllm-api-general-chat" and bench.extra_args == ["--debug"]
    assert config.evaluation.datasets["gsm8k"].api_chat_type == "VLLMCustomAPIChat"
    engine = config.inference_engine
    assert (engine.entrypoint, engine.port, engine.health_check_endpoint, engine.startup_timeout) == (
        "vllm.entrypoints.openai.api_server", 8000, "/v1/models", 600)
    assert config.precheck[0].test_cases == [{"What is 2+2?": "4"}] and config.precheck[0].timeout == 60.0
    with pytest.raises(ValueError, match="1 and 65535|less than or equal"):
        ServiceOrientedEvaluation.model_validate({**SERVICE, "inference_engine": {"port": 70000}})
    with pytest.raises(ValueError, match="does not define"):
        ServiceOrientedEvaluation.model_validate({**SERVICE, "demand": {"expectations": [{"dataset": "mmlu",
                                                                                          "target": 1}]}})


def test_service_oriented_precheck_names_what_is_missing(model, tmp_path, no_weights):
    plan = _plan_with(tmp_path, lambda p: p.update(evaluation=SERVICE))
    with pytest.raises(UnsupportedError) as info:
        tune(TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=plan, model_type=MODEL_TYPE))
    message = str(info.value)
    assert "vllm.entrypoints.openai.api_server" in message and "'ais_bench' is not on PATH" in message
    assert "Nothing was quantized" in message and not (tmp_path / "out").exists()


# ---- built-in perplexity -----------------------------------------------------------------------------------------
def test_held_out_split_is_disjoint_and_complete():
    texts = [f"sample {i}" for i in range(10)]
    split = HeldOutSplit.of(texts, 0.25, "x")
    assert split.calibration == texts[:8] and split.evaluation == texts[8:]
    with pytest.raises(ConfigError, match="too few"):
        HeldOutSplit.of(["one"], 0.25, "x")


def test_perplexity_evaluator_end_to_end(model, tmp_path, monkeypatch):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"Paragraph {i}: apt installs package {i}; dpkg keeps the "
                                                 f"database of package {i * 7} under /var/lib/dpkg."}) + "\n"
                             for i in range(8)))
    plan = {"strategy": {"type": "binary_fallback", "template": template(str(calib)),
                         "rollback_path": "spec.process.0.exclude", "rollback_candidates": CANDIDATES},
            "evaluation": {"type": "perplexity", "demand": {"max_ratio": 50}, "window": 16, "max_windows": 4}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    request = TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=path, model_type=MODEL_TYPE)
    report = tune(request)
    assert len(report.iterations) == 1 and report.chosen["passed"] and report.fallback == []
    scores = report.chosen["scores"]
    assert scores["ratio"] == pytest.approx(scores["perplexity"] / scores["float_perplexity"])
    history = request.save_path / "history"
    split = [json.loads(line)["text"] for line in (history / "calibration_split.jsonl").read_text().splitlines()]
    assert split == [json.loads(line)["text"] for line in calib.read_text().splitlines()][:6]  # 2 of 8 held out
    assert yaml.safe_load((history / "w8a8-static-iter01.yaml").read_text())["spec"][
        "dataset"] == str((history / "calibration_split.jsonl").resolve())
    assert len(yaml.safe_load((history / "accuracy.yaml").read_text())["baselines"]) == 1
    # the rerun needs neither the float model nor a quantization
    import msmodelslim.app.evaluate as evaluate_module
    monkeypatch.setattr(evaluate_module, "load_float_model", lambda *a: (_ for _ in ()).throw(AssertionError()))
    assert tune(request).evaluated == 0


@pytest.mark.parametrize("save", [[{"type": "compressed_tensors"}],
                                  [{"type": "ascendv1_saver"}, {"type": "compressed_tensors"}]])
def test_perplexity_scores_compressed_tensors_and_two_format_outputs_as_ascendv1(model, tmp_path, save):
    calib = small_calib(tmp_path)
    scores = {}
    for name, savers in (("ascendv1", [{"type": "ascendv1_saver"}]), ("other", save)):
        spec_template = template(calib)
        spec_template["spec"]["save"] = savers
        # dynamic: both formats store the same weight scales (static W8A8 in ascendv1 keeps s_in·s_w, from which the
        # reader recovers s_w to an ulp, which may flip an int8 code downstream)
        spec_template["spec"]["process"][0]["qconfig"] = SCHEMES["w8a8_dynamic"]
        plan = {"strategy": {"type": "binary_fallback", "template": spec_template,
                             "rollback_path": "spec.process.0.exclude", "rollback_candidates": CANDIDATES},
                "evaluation": {"type": "perplexity", "demand": {"max_ratio": 50}, "window": 16, "max_windows": 2}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(plan))
        report = tune(TuneRequest(model_path=model, save_path=tmp_path / name, config_path=path,
                                  model_type=MODEL_TYPE))
        scores[name] = report.chosen["scores"]["perplexity"]
    assert scores["other"] == pytest.approx(scores["ascendv1"], rel=1e-6)


def test_perplexity_refuses_the_calibration_set_as_evaluation_text(model, tmp_path, no_weights):
    calib = small_calib(tmp_path)
    plan = {"strategy": {"type": "binary_fallback", "template": template(calib),
                         "rollback_path": "spec.process.0.exclude"},
            "evaluation": {"type": "perplexity", "demand": {"max_ratio": 1.02}, "dataset": calib}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(ConfigError, match="is the calibration set itself"):
        tune(TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=path, model_type=MODEL_TYPE))
    assert not (tmp_path / "out").exists()


# ---- strategies as generators (no model) ---------------------------------------------------------------------------
def drive(stream, passes) -> tuple[list, object]:
    """Run a strategy against `passes(proposal) -> bool`; the proposals tried and the one it returns."""
    tried = []
    try:
        proposal = next(stream)
        while len(tried) < MAX_ITERATION:
            tried.append(proposal)
            ok = passes(proposal)
            proposal = stream.send(TuneResult(ok, {"score": float(ok)}, -len(proposal.fallback)))
    except StopIteration as stop:
        return tried, stop.value
    raise AssertionError("the strategy did not stop")


@pytest.mark.parametrize("needed", range(0, 9))
def test_binary_fallback_search_is_exact(needed):
    names = [f"model.layers.{i}.*" for i in range(8)]
    config = BinaryFallbackConfig(type="binary_fallback", template=template("mix_calib.jsonl"),
                                  rollback_path="spec.process.0.exclude", rollback_candidates=names)
    tried, chosen = drive(BinaryFallback(config).proposals(lambda *a: []), lambda p: len(p.fallback) >= needed)
    assert chosen.fallback == names[:needed]
    assert len(tried) <= 1 + 1 + 3  # zero, then at most ceil(log2 8) + 1


def test_binary_fallback_ranks_candidates_only_when_needed():
    config = BinaryFallbackConfig(type="binary_fallback", template=template("mix_calib.jsonl"),
                                  rollback_path="spec.process.0.exclude")
    asked = []
    tried, chosen = drive(BinaryFallback(config).proposals(lambda *a: asked.append(a) or ["b.*", "a.*"]),
                          lambda p: True)
    assert chosen.fallback == [] and asked == []
    tried, chosen = drive(BinaryFallback(config).proposals(lambda *a: asked.append(a) or ["b.*", "a.*"]),
                          lambda p: "b.*" in p.fallback)
    assert chosen.fallback == ["b.*"] and asked[0][2] == "mse_layer_wise"


def test_rollback_path_creates_a_missing_list():
    document = {"spec": {"process": [{"type": "linear_quant"}]}}
    assert rollback_list(document, "spec.process.0.exclude") == [] and document["spec"]["process"][0]["exclude"] == []


def test_standing_high_walks_down_with_anti_outlier_strategies():
    smooth, iterative = [{"type": "smooth_quant", "alpha": 0.5}], [{"type": "iter_smooth"}]
    config = StandingHighConfig(type="standing_high", anti_outlier_strategies=[smooth, iterative])
    levels = [f"model.layers.{i}.*" for i in range(8)]

    def passes(p):  # plain: 6 blocks needed; smooth_quant: 4; iter_smooth: 1
        process = p.practice["spec"]["process"]
        kind = process[0]["type"] if len(process) > 1 else None
        return len(p.fallback) >= {None: 6, "smooth_quant": 4, "iter_smooth": 1}[kind]

    tried, chosen = drive(StandingHigh(config).proposals(lambda *a: levels), passes)
    assert chosen.fallback == levels[:1] and chosen.practice["spec"]["process"][0] == iterative[0]
    assert tried[0].fallback == [] and len(tried) < MAX_ITERATION
    linear = chosen.practice["spec"]["process"][-1]
    assert linear["type"] == "linear_quant" and linear["exclude"] == levels[:1]
    assert linear["qconfig"]["act"]["scope"] == "per_tensor"  # the default template is W8A8 static


def test_standing_high_refuses_a_template_without_linear_quant():
    config = StandingHighConfig(type="standing_high", anti_outlier_strategies=[[{"type": "iter_smooth"}]],
                                template={"apiversion": "modelslim_v1", "spec": {"process": []}})
    with pytest.raises(ConfigError, match="at least one linear_quant"):
        StandingHigh(config)


def test_experience_rules_build_the_schemes():
    config = StandingHighWithExperienceConfig(
        type="standing_high_with_experience",
        structure_configs=[{"type": "GQA", "include": ["*self_attn*"]}, {"type": "FFN", "include": ["*mlp*"]},
                           {"type": "SWA", "include": ["*window_attn*"]}])
    built = experience_template(config)
    steps = built.template["spec"]["process"][0]["configs"]
    assert [(s["include"], s["qconfig"]["act"]["scope"]) for s in steps] == [(["*self_attn*"], "per_tensor"),
                                                                             (["*mlp*"], "per_token")]
    assert [s[0]["type"] for s in built.anti_outlier_strategies] == ["flex_smooth_quant", "iter_smooth"]
    StandingHigh(built)  # every combination validates
    w4a8 = StandingHighWithExperienceConfig(type="standing_high_with_experience", quant_type="w4a8",
                                            structure_configs=[{"type": "FFN", "include": ["*mlp*"]}])
    with pytest.raises(UnsupportedError, match="no w4a8 scheme for FFN"):
        experience_template(w4a8)


# ---- small pieces ------------------------------------------------------------------------------------------------
def test_expectations_are_judged_in_decimal():
    assert 1.1 - 1.0 > 0.1  # in binary floats; in Decimal it is exactly the tolerance
    assert Expectation(target=1.1, tolerance=0.1).met_by(1.0)
    assert not Expectation(target=1.1, tolerance=0.1).met_by(0.99)
    assert judge([Expectation(dataset="a", target=90, tolerance=2)], {"a": 88}).passed
    assert not judge([Expectation(dataset="a", target=90, tolerance=2)], {"a": 87.9}).passed


def test_last_number_is_the_score():
    assert last_number("epoch 1 loss 0.3\naccuracy: 71.25%\n") == 71.25
    assert last_number("acc=1e-3") == 1e-3
    assert last_number("no score") is None


def test_plan_template_may_be_a_file(tmp_path):
    (tmp_path / "w8a8.yaml").write_text(yaml.safe_dump(template("mix_calib.jsonl")))
    plan = _plan_with(tmp_path, lambda p: p["strategy"].update(template="w8a8.yaml"))
    assert load_plan(plan).strategy.template["metadata"]["config_id"] == "w8a8-static"


def test_plans_in_the_docs_load(tmp_path):
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "tune.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    (template_block,) = [b for b in blocks if "apiversion:" in b]
    (tmp_path / "w8a8_static.yaml").write_text(template_block)
    plans = [b for b in blocks if b.startswith("strategy:")]
    assert len(plans) == 4
    for i, block in enumerate(plans):
        path = tmp_path / f"plan{i}.yaml"
        path.write_text(block)
        plan = load_plan(path)
        if plan.strategy.type == "binary_fallback":
            BinaryFallback(plan.strategy)
        elif plan.strategy.type == "standing_high":
            StandingHigh(plan.strategy)
        else:
            StandingHigh(experience_template(plan.strategy))
