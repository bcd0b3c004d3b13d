"""`evaluation.type: service_oriented` (app/tune_service.py) against a fake serving stack: a fake engine package
(an http.server answering /v1/models and /v1/chat/completions, honouring --host/--port/--served-model-name) put on
PYTHONPATH through inference_engine.env_vars, and a fake `ais_bench` on PATH that loads the model config the way
AISBench does (--config-dir), queries the served model, and writes its outputs in AISBench's layout
(`Current exp folder:` line, results/<abbr>/<dataset>.json, summary/summary_<time>.csv).

After every path the engine's pid must be gone. Only localhost is used."""
from __future__ import annotations

import json
import os
import re
import socket
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from helpers import SCHEMES, small_calib
from tiny_models import make_tiny_model
from msmodelslim.app import tune as tune_module
from msmodelslim.app import tune_service
from msmodelslim.app.tune import TuneRequest, tune
from msmodelslim.app.tune_evaluators import ServiceOrientedEvaluator
from msmodelslim.app.tune_service_config import ServiceOrientedEvaluation
from msmodelslim.app.tune_aisbench import summary_accuracy
from msmodelslim.app.tune_service import engine_flags, garbled_reasons
from msmodelslim.core.errors import ConfigError, ProcessingError, UnsupportedError

FAKE_ENGINE = r'''
import argparse, json, os, signal, subprocess, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

parser = argparse.ArgumentParser()
for flag in ("--model", "--host", "--served-model-name"):
    parser.add_argument(flag, required=True)
parser.add_argument("--port", type=int, required=True)
args, _ = parser.parse_known_args()
state = Path(os.environ["FAKE_ENGINE_STATE"])
(state / "pid").write_text(str(os.getpid()))
(state / "argv.json").write_text(json.dumps(sys.argv[1:]))
mode = os.environ.get("FAKE_ENGINE_MODE", "serve")
print("fake engine loading", args.model, flush=True)
if mode == "exit":
    print("fatal: the checkpoint cannot be loaded", flush=True)
    sys.exit(3)
reply = os.environ.get("FAKE_ENGINE_REPLY", "2 + 2 = 4. I am fine, thank you for asking.")
if mode == "stubborn":  # ignores SIGTERM and has a worker process, as vLLM has
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (state / "worker_pid").write_text(str(worker.pid))


class Handler(BaseHTTPRequestHandler):
    def send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if mode == "never_ready":
            return self.send(503, {"error": "still loading"})
        if self.path == "/v1/models":
            return self.send(200, {"object": "list", "data": [{"id": args.served_model_name}]})
        self.send(404, {"error": self.path})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions" or body.get("model") != args.served_model_name:
            return self.send(404, {"error": f"no model {body.get('model')!r} at {self.path}"})
        self.send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
'''

FAKE_AISBENCH = r'''
import argparse, json, os, sys, time, types, urllib.request
from pathlib import Path

parser = argparse.ArgumentParser()
for flag in ("--models", "--datasets", "--mode", "--work-dir", "--config-dir"):
    parser.add_argument(flag)
args, extra = parser.parse_known_args()
state = Path(os.environ["FAKE_AISBENCH_STATE"])
with (state / "calls.jsonl").open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
if os.environ.get("FAKE_AISBENCH_MODE") == "hang":  # a failed inner task can leave AISBench running, with workers
    import subprocess
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (state / "worker_pid").write_text(str(worker.pid))
    time.sleep(600)
# the model config, found and loaded as AISBench does (<config-dir>/models/**/<name>.py, mmengine-style python)
found = list(Path(args.config_dir, "models").rglob(args.models + ".py"))
if len(found) != 1:
    sys.exit(f"model config {args.models} matches {len(found)} files")
for name in ("ais_bench", "ais_bench.benchmark", "ais_bench.benchmark.models", "ais_bench.benchmark.utils",
             "ais_bench.benchmark.utils.model_postprocessors"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["ais_bench.benchmark.models"].VLLMCustomAPIChat = type("VLLMCustomAPIChat", (), {})
def extract_non_reasoning_content(text):
    return text
sys.modules["ais_bench.benchmark.utils.model_postprocessors"].extract_non_reasoning_content = \
    extract_non_reasoning_content
namespace = {}
exec(found[0].read_text(), namespace)
model = namespace["models"][0]
model["type"] = model["type"].__name__
model["pred_postprocessor"] = model["pred_postprocessor"]["type"].__name__
with (state / "models.jsonl").open("a") as f:
    f.write(json.dumps(model) + "\n")
request = urllib.request.Request(
    f"http://{model['host_ip']}:{model['host_port']}/v1/chat/completions", method="POST",
    data=json.dumps({"model": model["model"], "messages": [{"role": "user", "content": "q"}]}).encode(),
    headers={"Content-Type": "application/json"})
urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10).read()
accuracy = json.loads((state / "scores.json").read_text())[args.datasets]
stamp = time.strftime("%Y%m%d_%H%M%S")
exp = Path(args.work_dir) / stamp
print(f"{time.strftime('%m/%d %H:%M:%S')} - AISBench - INFO - Current exp folder: {exp}", flush=True)
abbr, dataset = model["abbr"], args.datasets.split("_gen")[0]
(exp / "results" / abbr).mkdir(parents=True, exist_ok=True)
(exp / "results" / abbr / f"{dataset}.json").write_text(json.dumps({"accuracy": accuracy}))
(exp / "summary").mkdir(exist_ok=True)
table = [["dataset", "version", "metric", "mode", abbr], [dataset, "401e4c", "accuracy", "gen", f"{accuracy:.2f}"]]
(exp / "summary" / f"summary_{stamp}.csv").write_text("\n".join(",".join(r) for r in table) + "\n")
print("| " + " | ".join(table[0]) + " |\n| " + " | ".join(table[1]) + " |")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(pid: int) -> bool:
    """No such process, or a zombie (killed; an orphan waits there until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


class Stack:
    """The fake engine package and ais_bench of one test, and what they recorded."""

    def __init__(self, root: Path, monkeypatch):
        self.engine_state, self.bench_state = root / "engine_state", root / "bench_state"
        self.engine_state.mkdir()
        self.bench_state.mkdir()
        self.packages = root / "packages"
        (self.packages / "fake_vllm").mkdir(parents=True)
        (self.packages / "fake_vllm" / "__init__.py").write_text("")
        (self.packages / "fake_vllm" / "api_server.py").write_text(FAKE_ENGINE)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        (bin_dir / "ais_bench").write_text(f"#!{sys.executable}\n{FAKE_AISBENCH}")
        (bin_dir / "ais_bench").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_AISBENCH_STATE", str(self.bench_state))
        self.port = free_port()

    def plan(self, scores: dict[str, float], expectations: list[dict], engine_env: dict | None = None,
             precheck: list | None = None, **engine) -> dict:
        (self.bench_state / "scores.json").write_text(json.dumps(scores))
        names = {"gsm8k": "gsm8k_gen_0_shot_cot_chat_prompt", "ceval": "ceval_gen_0_shot_cot"}
        datasets = {"gsm8k": {"config_name": names["gsm8k"], "max_out_len": 1024},
                    "ceval": {"config_name": names["ceval"]}}
        env = {"PYTHONPATH": str(self.packages), "FAKE_ENGINE_STATE": str(self.engine_state), **(engine_env or {})}
        return {"type": "service_oriented", "demand": {"expectations": expectations},
                "evaluation": {"type": "aisbench",
                               "datasets": {e["dataset"]: datasets[e["dataset"]] for e in expectations},
                               "aisbench": {"request_rate": 2.5, "generation_kwargs": {"temperature": 0.01}}},
                "inference_engine": {"entrypoint": "fake_vllm.api_server", "host": "127.0.0.1", "port": self.port,
                                     "served_model_name": "tuned", "env_vars": env, "startup_timeout": 30,
                                     "args": {"tensor_parallel_size": 1, "enforce_eager": True,
                                              "enable_prefix_caching": False,
                                              "additional_config": {"ascend": {"x": 1}}}, **engine},
                "precheck": [{"type": "expected_answer", "test_cases": [{"What is 2+2?": ["4", "four"]}],
                              "timeout": 10},
                             {"type": "garbled_text", "timeout": 10}] if precheck is None else precheck}

    def evaluator(self, plan: dict, save_path: Path) -> ServiceOrientedEvaluator:
        save_path.mkdir(exist_ok=True)
        return ServiceOrientedEvaluator(ServiceOrientedEvaluation.model_validate(plan), save_path)

    @property
    def engine_pid(self) -> int:
        return int((self.engine_state / "pid").read_text())

    def calls(self) -> list[list[str]]:
        path = self.bench_state / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def stack(tmp_path, monkeypatch) -> Stack:
    return Stack(tmp_path, monkeypatch)


GSM8K_95 = [{"dataset": "gsm8k", "target": 95, "tolerance": 0.5}]


# ---- precheck before anything is quantized ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("service_llama"), "llama", num_hidden_layers=2)


def tune_plan(tmp_path: Path, evaluation: dict) -> Path:
    template = {"apiversion": "modelslim_v1", "metadata": {"config_id": "w8a8-static"},
                "spec": {"runner": "layer_wise",
                         "process": [{"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"],
                                      "exclude": ["lm_head"]}],
                         "save": [{"type": "ascendv1_saver"}], "dataset": small_calib(tmp_path)}}
    plan = {"strategy": {"type": "binary_fallback", "template": template, "rollback_path": "spec.process.0.exclude",
                         "rollback_candidates": ["model.layers.0.*"]},
            "evaluation": evaluation}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_precheck_names_every_missing_piece_before_quantizing(stack, model, tmp_path, monkeypatch):
    monkeypatch.setattr(tune_module, "quantize", lambda *a, **k: pytest.fail("quantization started"))
    plan = stack.plan({}, GSM8K_95)
    plan["inference_engine"]["entrypoint"] = "no_such_engine.entrypoints.api_server"
    plan["evaluation"]["aisbench"]["binary"] = "no_such_ais_bench"
    request = TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=tune_plan(tmp_path, plan))
    with pytest.raises(UnsupportedError) as info:
        tune(request)
    message = str(info.value)
    assert "'no_such_engine.entrypoints.api_server' is not importable" in message and "install vLLM" in message
    assert "'no_such_ais_bench' is not on PATH" in message and "install AISBench" in message
    assert "Nothing was quantized" in message and not request.save_path.exists()


def test_precheck_finds_the_fake_stack_and_refuses_a_busy_port(stack, tmp_path):
    evaluator = stack.evaluator(stack.plan({}, GSM8K_95), tmp_path / "out")
    evaluator.precheck()  # the engine module is importable through env_vars.PYTHONPATH, ais_bench is on PATH
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", stack.port))
        busy.listen()
        with pytest.raises(UnsupportedError, match=f"port {stack.port} on 127.0.0.1 is already in use"):
            evaluator.precheck()


# ---- one iteration -------------------------------------------------------------------------------------------------
def test_full_iteration_passes_with_the_parsed_accuracy(stack, tmp_path):
    save = tmp_path / "out"
    quant_model = save / "quant_model"
    quant_model.mkdir(parents=True)
    evaluator = stack.evaluator(stack.plan({"gsm8k_gen_0_shot_cot_chat_prompt": 95.4567}, GSM8K_95), save)
    result = evaluator.evaluate(quant_model)
    assert result.passed and result.scores == {"gsm8k": 95.4567}  # unrounded: from results/<abbr>/gsm8k.json
    assert result.goodness == pytest.approx(0.4567)
    assert gone(stack.engine_pid)
    argv = json.loads((stack.engine_state / "argv.json").read_text())
    assert argv[:8] == ["--model", str(quant_model), "--host", "127.0.0.1", "--port", str(stack.port),
                        "--served-model-name", "tuned"]
    assert argv[8:] == ["--tensor_parallel_size", "1", "--enforce_eager", "--additional_config",
                        '{"ascend":{"x":1}}']
    [call] = stack.calls()
    assert call[:6] == ["--models", call[1], "--datasets", "gsm8k_gen_0_shot_cot_chat_prompt", "--mode", "all"]
    assert call[6:] == ["--work-dir", str(save / "aisbench_output"), "--config-dir", str(save / "aisbench_configs")]
    [seen] = [json.loads(line) for line in (stack.bench_state / "models.jsonl").read_text().splitlines()]
    assert seen == {"attr": "service", "abbr": "vllm-api-general-chat", "path": str(quant_model), "model": "tuned",
                    "request_rate": 2.5, "retry": 2, "host_ip": "127.0.0.1", "host_port": stack.port,
                    "max_out_len": 1024, "batch_size": 1, "trust_remote_code": False,
                    "generation_kwargs": {"temperature": 0.01}, "type": "VLLMCustomAPIChat",
                    "pred_postprocessor": "extract_non_reasoning_content"}
    assert "fake engine loading" in (save / "vllm_server.log").read_text()
    assert "Current exp folder:" in (save / "aisbench_logs" / "gsm8k_trial1.log").read_text()
    assert list((save / "aisbench_configs").rglob("*.py")) == []  # cleanup_model_config


def test_expectations_fail_fast(stack, tmp_path):
    expectations = [{"dataset": "gsm8k", "target": 95, "tolerance": 1}, {"dataset": "ceval", "target": 80}]
    scores = {"gsm8k_gen_0_shot_cot_chat_prompt": 93.9, "ceval_gen_0_shot_cot": 85.0}
    evaluator = stack.evaluator(stack.plan(scores, expectations), tmp_path / "out")
    result = evaluator.evaluate(tmp_path / "out")
    assert not result.passed and result.scores == {"gsm8k": 93.9}
    assert len(stack.calls()) == 1 and "gsm8k: 93.9 < target 95 - tolerance 1" in result.detail
    assert gone(stack.engine_pid)
    scores["gsm8k_gen_0_shot_cot_chat_prompt"] = 94.0  # 95 - 94 <= 1 exactly, in decimal: passes, ceval runs
    result = stack.evaluator(stack.plan(scores, expectations), tmp_path / "out").evaluate(tmp_path / "out")
    assert result.passed and result.scores == {"gsm8k": 94.0, "ceval": 85.0} and len(stack.calls()) == 3


def test_failing_expected_answer_scores_zero(stack, tmp_path):
    plan = stack.plan({"gsm8k_gen_0_shot_cot_chat_prompt": 99.0}, GSM8K_95, engine_env={"FAKE_ENGINE_REPLY": "5"})
    result = stack.evaluator(plan, tmp_path / "out").evaluate(tmp_path / "out")
    assert not result.passed and result.scores == {"gsm8k": 0.0} and stack.calls() == []
    assert "precheck failed" in result.detail and "expects one of ['4', 'four']" in result.detail
    assert "the reply was '5'" in result.detail
    assert gone(stack.engine_pid)


def test_garbled_reply_scores_zero(stack, tmp_path):
    plan = stack.plan({"gsm8k_gen_0_shot_cot_chat_prompt": 99.0}, GSM8K_95,
                      engine_env={"FAKE_ENGINE_REPLY": "4 " + "!" * 60}, precheck=[{"type": "garbled_text"}])
    result = stack.evaluator(plan, tmp_path / "out").evaluate(tmp_path / "out")
    assert not result.passed and result.scores == {"gsm8k": 0.0}
    assert "garbled_text: 'How are you?'" in result.detail and "repeated 60 times in a row" in result.detail
    assert gone(stack.engine_pid)


def test_engine_that_exits_at_start_up_gives_its_log_tail(stack, tmp_path):
    plan = stack.plan({}, GSM8K_95, engine_env={"FAKE_ENGINE_MODE": "exit"})
    with pytest.raises(ProcessingError) as info:
        stack.evaluator(plan, tmp_path / "out").evaluate(tmp_path / "out")
    assert "exited with code 3 during start-up" in str(info.value)
    assert "fatal: the checkpoint cannot be loaded" in str(info.value)
    assert gone(stack.engine_pid) and stack.calls() == []


def test_health_check_timeout_stops_the_engine(stack, tmp_path):
    plan = stack.plan({}, GSM8K_95, engine_env={"FAKE_ENGINE_MODE": "never_ready"}, startup_timeout=1.5)
    with pytest.raises(ProcessingError, match=r"did not answer HTTP 200 at http://127.0.0.1:\d+/v1/models within "
                                              r"inference_engine.startup_timeout 1.5 s"):
        stack.evaluator(plan, tmp_path / "out").evaluate(tmp_path / "out")
    assert gone(stack.engine_pid)


def test_an_engine_ignoring_sigterm_and_its_worker_are_killed(stack, tmp_path, monkeypatch):
    monkeypatch.setattr(tune_service, "STOP_GRACE_SECONDS", 0.5)
    plan = stack.plan({"gsm8k_gen_0_shot_cot_chat_prompt": 96.0}, GSM8K_95,
                      engine_env={"FAKE_ENGINE_MODE": "stubborn"})
    assert stack.evaluator(plan, tmp_path / "out").evaluate(tmp_path / "out").passed
    worker = int((stack.engine_state / "worker_pid").read_text())
    assert gone(stack.engine_pid) and gone(worker)


def test_a_hanging_benchmark_is_stopped_at_its_timeout(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_AISBENCH_MODE", "hang")
    plan = stack.plan({}, GSM8K_95)
    plan["evaluation"]["aisbench"]["timeout"] = 1.5
    with pytest.raises(ProcessingError, match=r"ais_bench ran longer than evaluation.aisbench.timeout 1.5 s"):
        stack.evaluator(plan, tmp_path / "out").evaluate(tmp_path / "out")
    assert gone(int((stack.bench_state / "worker_pid").read_text())) and gone(stack.engine_pid)


def test_ctrl_c_during_the_benchmark_stops_the_engine(stack, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_service, "failed_precheck", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stack.evaluator(stack.plan({}, GSM8K_95), tmp_path / "out").evaluate(tmp_path / "out")
    assert gone(stack.engine_pid)


def test_tune_end_to_end_with_a_served_checkpoint(stack, model, tmp_path):
    plan = stack.plan({"gsm8k_gen_0_shot_cot_chat_prompt": 96.0}, GSM8K_95)
    request = TuneRequest(model_path=model, save_path=tmp_path / "out", config_path=tune_plan(tmp_path, plan),
                          model_type="Llama-2-7B")
    report = tune(request)
    assert len(report.iterations) == 1 and report.chosen["passed"] and report.chosen["scores"] == {"gsm8k": 96.0}
    [seen] = [json.loads(line) for line in (stack.bench_state / "models.jsonl").read_text().splitlines()]
    assert seen["path"] == str(request.save_path / "quant_model")
    assert (request.save_path / "quant_model" / "quant_model_description.json").is_file()
    assert gone(stack.engine_pid)


# ---- pieces --------------------------------------------------------------------------------------------------------
def test_engine_flags_follow_vllm_argparse():
    assert engine_flags({"tp": 2, "enforce-eager": True, "x": False, "y": None, "--raw": "v", "l": ["a", "b"],
                         "cfg": {"k": [1]}}) == ["--tp", "2", "--enforce-eager", "--raw", "v", "--l", "a", "b",
                                                 "--cfg", '{"k":[1]}']


@pytest.mark.parametrize("reply, reason", [
    ("", "empty"), ("   \n", "empty"), ("a" + "h" * 40, "one character repeated 40 times"),
    ("ok " + "the " * 10, "one word repeated 10 times"), ("Hi. " + "abc" * 12, "ends in 'abc' repeated 12 times"),
    ("\x01\x02\x03\x04 hello", "printable"), ("caf\ufffd ok", "U+FFFD")])
def test_garbled_reasons_catch_broken_replies(reply, reason):
    assert any(reason in r for r in garbled_reasons(reply))


@pytest.mark.parametrize("reply", ["I am fine, thank you! How can I help you today?", "2 + 2 = 4.",
                                   "量化把浮点数映射到整数。", "Sure:\n\n1. apt\n2. dpkg\n\t- done", "Hmm... well, 10000."])
def test_garbled_reasons_accept_ordinary_replies(reply):
    assert garbled_reasons(reply) == []


def write_summary(exp: Path, rows: list[str], header="dataset,version,metric,mode,vllm-api-general-chat"):
    (exp / "summary").mkdir(parents=True)
    (exp / "summary" / "summary_20250628_151326.csv").write_text("\n".join([header, *rows]) + "\n")


def test_summary_rows_are_chosen_by_name_single_row_or_group(tmp_path):
    exp = tmp_path / "one"
    write_summary(exp, ["demo_gsm8k,401e4c,accuracy,gen,8,62.50 (5/8)"],
                  header="dataset,version,metric,mode,total_count,vllm-api-general-chat")
    assert summary_accuracy(exp, "vllm-api-general-chat", "gsm8k") == Decimal("62.50")
    exp = tmp_path / "named"
    write_summary(exp, ["ceval-law,1a2b3c,accuracy,gen,40.00", "ceval,-,naive_average,gen,55.25",
                        "other,-,naive_average,gen,1.00", "ceval,-,weighted_average,gen,54.00"])
    assert summary_accuracy(exp, "vllm-api-general-chat", "ceval") == Decimal("55.25")
    exp = tmp_path / "group"
    write_summary(exp, ["mmlu-a,1,accuracy,gen,40.00", "mmlu-b,1,accuracy,gen,60.00", "mmlu,-,naive_average,gen,50.00",
                        "mmlu-c,1,accuracy,gen,-"])
    assert summary_accuracy(exp, "vllm-api-general-chat", "my_mmlu") == Decimal("50.00")
    exp = tmp_path / "ambiguous"
    write_summary(exp, ["a,1,accuracy,gen,40.00", "b,1,accuracy,gen,60.00"])
    with pytest.raises(ProcessingError, match=r"cannot tell which row .*a/accuracy=40.00.*Name the data set"):
        summary_accuracy(exp, "vllm-api-general-chat", "mine")
    exp = tmp_path / "failed"  # what AISBench writes (exit code 0) when its inference task failed
    write_summary(exp, ["mini_gsm8k,-,-,-,-"])
    with pytest.raises(ProcessingError, match=r"holds no result .*'mini_gsm8k,-,-,-,-'.*failed; see its logs"):
        summary_accuracy(exp, "vllm-api-general-chat", "mini_gsm8k")
    with pytest.raises(ProcessingError, match="has no column 'other-abbr'"):
        summary_accuracy(exp, "other-abbr", "a")
    with pytest.raises(ProcessingError, match="no summary_"):
        summary_accuracy(tmp_path / "none", "vllm-api-general-chat", "a")


BASE = {"type": "service_oriented", "demand": {"expectations": [{"dataset": "gsm8k", "target": 90}]},
        "evaluation": {"type": "aisbench", "datasets": {"gsm8k": {"config_name": "gsm8k_gen"}}}}


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["evaluation"].update(port=9000), "evaluation.port 9000 differs from inference_engine.port 1234"),
    (lambda p: p["evaluation"].update(served_model_name="x"), "evaluation.served_model_name 'x' differs"),
    (lambda p: p["evaluation"].update(aisbench={"mode": "perf"}), "writes no accuracy in that mode"),
    (lambda p: p["evaluation"]["datasets"]["gsm8k"].update(mode="infer"), "datasets.gsm8k.mode 'infer'"),
    (lambda p: p.update(inference_engine={"args": {"served_model_name": "x"}}), "sets --model"),
])
def test_plans_that_would_benchmark_the_wrong_thing_are_refused(edit, message):
    plan = json.loads(json.dumps(BASE))
    edit(plan)
    with pytest.raises(ValueError, match=message):
        ServiceOrientedEvaluation.model_validate(plan)
    ServiceOrientedEvaluation.model_validate({**BASE, "evaluation": {**BASE["evaluation"], "port": 1234}})


def test_a_bad_plan_is_a_config_error_naming_the_field(tmp_path):
    plan = json.loads(json.dumps(BASE))
    plan["evaluation"]["port"] = 9000
    with pytest.raises(ConfigError, match="evaluation.port 9000 differs"):
        tune_module.load_plan(tune_plan(tmp_path, plan))


def test_the_docs_example_plan_validates():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "tune.md").read_text()
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if "type: service_oriented" in b]
    config = ServiceOrientedEvaluation.model_validate(yaml.safe_load(block)["evaluation"])
    assert engine_flags(config.inference_engine.args) == ["--tensor_parallel_size", "1", "--max_model_len", "8192",
                                                          "--quantization", "ascend", "--enforce_eager"]
