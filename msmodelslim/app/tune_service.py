"""Serving and benchmarking behind `evaluation.type: service_oriented` (protocol.md §7.2; the configuration
classes live in app/tune_service_config.py).

One iteration:
  1. start the inference engine (vLLM / vLLM-Ascend) on the quantized checkpoint, in its own process group:
     `python -m <entrypoint> --model <quant_model> --host H --port P --served-model-name N <args as flags>`,
     output appended to `save_path/vllm_server.log`; poll `http://H:P<health_check_endpoint>` until HTTP 200;
  2. ask the `precheck` questions over /v1/chat/completions; a failing precheck scores the iteration zero;
  3. per data set, in the order of `demand.expectations` (fail-fast), write an AISBench model config and run
     `ais_bench --models <config> --datasets <config_name> --mode <mode> --config-dir ... --work-dir ...`,
     then read the accuracy from the summary AISBench writes;
  4. stop the engine (SIGTERM to its group, SIGKILL after a grace period) whatever happened, Ctrl-C included.

The AISBench side is app/tune_aisbench.py, the process groups app/process_group.py.
AISBench facts used (AISBench/benchmark, cli/config_manager.py and summarizers/default.py): `--models NAME` is
searched as NAME.py under `<--config-dir>/models` (recursively) and then AISBench's own configs/models; the run
logs `Current exp folder: <work_dir>/<YYYYmmdd_HHMMSS>`; the summary table is
`<exp>/summary/summary_<time>.csv` with the columns `dataset, version, metric, mode[, total_count], <model abbr>`
and values formatted `%.2f` (optionally followed by ` (correct/total)`); the unrounded numbers are in
`<exp>/results/<model abbr>/<dataset abbr>.json`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import unicodedata
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from msmodelslim.app.process_group import log_tail, stop_process_group
from msmodelslim.app.tune_aisbench import AisBench, Client, benchmark
from msmodelslim.app.tune_judge import TuneResult, judge
from msmodelslim.app.tune_service_config import (ExpectedAnswerCheck, GarbledTextCheck, InferenceEngine,
                                                 ServiceOrientedEvaluation)
from msmodelslim.core.errors import ProcessingError
from msmodelslim.core.logging import get_logger

log = get_logger("app.tune")

ENGINE_LOG = "vllm_server.log"
STOP_GRACE_SECONDS = 15.0  # SIGTERM first: vLLM frees the accelerator memory on a clean shutdown
HEALTH_POLL_SECONDS = 0.5
HEALTH_REQUEST_TIMEOUT = 3.0

# no proxy for our own localhost server: http_proxy in the environment must not capture these requests
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---- prechecks before anything is quantized ----------------------------------------------------------------------
def engine_environment(engine: InferenceEngine) -> dict[str, str]:
    return {**os.environ, **{key: str(value) for key, value in engine.env_vars.items()}}


FIND_SPEC = ("import importlib.util, sys\n"
             "try:\n"
             "    found = importlib.util.find_spec(sys.argv[1]) is not None\n"
             "except Exception as exc:  # a parent package that fails to import\n"
             "    print(f'{type(exc).__name__}: {exc}', file=sys.stderr)\n"
             "    found = False\n"
             "sys.exit(0 if found else 1)\n")


def entrypoint_problem(engine: InferenceEngine) -> Optional[str]:
    """Why `python -m <entrypoint>` cannot start in the Python and environment the engine will get, or None.
    Checked in a child of sys.executable with env_vars applied (they may set PYTHONPATH); find_spec imports the
    parent packages only, not the entrypoint module itself."""
    try:
        done = subprocess.run([sys.executable, "-c", FIND_SPEC, engine.entrypoint], env=engine_environment(engine),
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return f"importing the parents of {engine.entrypoint!r} took longer than 300 s"
    if done.returncode == 0:
        return None
    reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "not found"
    return (f"the serving entrypoint {engine.entrypoint!r} is not importable by {sys.executable} ({reason}): "
            f"install vLLM (and vLLM-Ascend on Ascend) into this Python, or set inference_engine.entrypoint / "
            f"inference_engine.env_vars.PYTHONPATH")


def port_in_use(host: str, port: int) -> bool:
    """Something already accepts connections there (a stale server would be benchmarked instead of ours)."""
    try:
        with socket.create_connection((client_host(host), port), timeout=1.0):
            return True
    except OSError:
        return False


def client_host(host: str) -> str:
    """Where to connect to a server bound to `host` (a wildcard bind is reached over loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


# ---- the engine --------------------------------------------------------------------------------------------------
def engine_flags(args: dict[str, Any]) -> list[str]:
    """`args` as command-line flags, the way vLLM's argparse takes them: `key: value` -> `--key value`;
    true -> the bare flag (`enforce_eager: true` -> `--enforce_eager`); false/null -> left out (turn off a
    default-on feature with its `no-` flag); a mapping -> compact JSON (`--additional_config '{...}'`); a list ->
    the flag followed by each item (nargs='+'). vLLM accepts `_` and `-` in flag names alike."""
    flags: list[str] = []
    for key, value in args.items():
        flag = key if key.startswith("-") else f"--{key}"
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value, separators=(",", ":"))]
        elif isinstance(value, (list, tuple)):
            flags += [flag, *(str(item) for item in value)]
        else:
            flags += [flag, str(value)]
    return flags


def engine_argv(engine: InferenceEngine, model_dir: Path) -> list[str]:
    return [sys.executable, "-m", engine.entrypoint, "--model", str(model_dir), "--host", engine.host,
            "--port", str(engine.port), "--served-model-name", engine.served_model_name, *engine_flags(engine.args)]


def http_get_status(url: str, timeout: float) -> Optional[int]:
    try:
        with _HTTP.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None  # not listening yet


def target_client(config: ServiceOrientedEvaluation) -> Client:
    """Where the precheck questions and AISBench go: evaluation.host when given (e.g. a name of this machine for
    an engine bound to 0.0.0.0), else the engine's host; the port and the served name are the engine's (the plan
    check refuses an evaluation.port or served_model_name that differs)."""
    evaluation, engine = config.evaluation, config.inference_engine
    host = evaluation.host if "host" in evaluation.model_fields_set else engine.host
    return Client(client_host(host), engine.port, engine.served_model_name)


class ServedModel:
    """The engine serving one checkpoint: started on enter, ready when the health check answers 200, stopped on
    exit (also on errors and Ctrl-C)."""

    def __init__(self, engine: InferenceEngine, model_dir: Path, log_path: Path, iteration: int):
        self.engine, self.model_dir, self.log_path, self.iteration = engine, model_dir, log_path, iteration
        self.client = Client(client_host(engine.host), engine.port, engine.served_model_name)
        self.process: Optional[subprocess.Popen] = None
        self.stopped = False

    def __enter__(self) -> "ServedModel":
        if port_in_use(self.engine.host, self.engine.port):
            raise ProcessingError(f"inference_engine.port {self.engine.port} on {self.engine.host} is taken by "
                                  f"another process: stop it or choose another port (its model would be "
                                  f"benchmarked instead of this checkpoint)")
        argv = engine_argv(self.engine, self.model_dir)
        with self.log_path.open("a", encoding="utf-8") as header:
            header.write(f"\n===== iteration {self.iteration}: {' '.join(argv)}\n")
        log.info("tune: starting the inference engine: %s (log: %s)", " ".join(argv), self.log_path)
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=engine_environment(self.engine), start_new_session=True)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_until_ready(self) -> None:
        url = self.client.url(self.engine.health_check_endpoint)
        deadline = time.monotonic() + self.engine.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ProcessingError(f"the inference engine exited with code {code} during start-up (before "
                                      f"{url} answered); {self.log_path} ends with:\n{log_tail(self.log_path)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcessingError(f"the inference engine did not answer HTTP 200 at {url} within "
                                      f"inference_engine.startup_timeout {self.engine.startup_timeout:g} s; "
                                      f"{self.log_path} ends with:\n{log_tail(self.log_path)}")
            if http_get_status(url, min(HEALTH_REQUEST_TIMEOUT, remaining)) == 200:
                log.info("tune: the inference engine answers at %s", url)
                return
            time.sleep(min(HEALTH_POLL_SECONDS, max(0.0, deadline - time.monotonic())))

    def stop(self) -> None:
        if self.process is not None and not self.stopped:
            stop_process_group(self.process, STOP_GRACE_SECONDS)
            self.stopped = True
            log.info("tune: the inference engine (pid %d) is stopped", self.process.pid)


# ---- prechecks of the served model ---------------------------------------------------------------------------------
def chat(client: Client, question: str, max_tokens: int, timeout: float) -> str:
    """One user turn over the OpenAI-compatible /v1/chat/completions; the reply's text. Temperature 0: the
    answer must not depend on sampling luck."""
    body = json.dumps({"model": client.model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(client.url("/v1/chat/completions"), data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with _HTTP.open(request, timeout=timeout) as response:
        reply = json.loads(response.read().decode("utf-8"))
    try:
        return reply["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"not a chat completion: {str(reply)[:200]}") from None


MAX_RUN_SHARE = 0.3  # one character repeated back to back over more than 30 % of the reply
MAX_WORD_REPEATS = 8  # the same word 8 times in a row ("the the the ...")
MIN_PRINTABLE_SHARE = 0.9  # letters, digits, punctuation, symbols and spaces of any script
MIN_PERIODIC_REPEATS = 4  # the reply ends in one short piece (2-20 chars) repeated 4+ times, covering half of it


def garbled_reasons(text: str) -> list[str]:
    """What makes a reply look garbled (empty list: it reads as text). Each check is cheap and concrete: broken
    quantization typically yields nothing, one token over and over, or bytes that are not text."""
    stripped = text.strip()
    if not stripped:
        return ["the reply is empty"]
    reasons = []
    longest = max(len(m.group(0)) for m in re.finditer(r"(.)\1*", stripped, re.DOTALL))
    if longest > 3 and longest > MAX_RUN_SHARE * len(stripped):
        reasons.append(f"one character repeated {longest} times in a row ({longest}/{len(stripped)} of the reply)")
    words = stripped.split()
    run = best = 1
    for previous, word in zip(words, words[1:]):
        run = run + 1 if word == previous else 1
        best = max(best, run)
    if best >= MAX_WORD_REPEATS:
        reasons.append(f"one word repeated {best} times in a row")
    periodic = re.search(r"(.{2,20}?)\1{%d,}$" % (MIN_PERIODIC_REPEATS - 1), stripped, re.DOTALL)
    if periodic and len(periodic.group(0)) * 2 >= len(stripped) and len(set(periodic.group(1))) > 1:
        reasons.append(f"the reply ends in {periodic.group(1)!r} repeated "
                       f"{len(periodic.group(0)) // len(periodic.group(1))} times")
    printable = sum(1 for c in stripped if c.isspace() or unicodedata.category(c)[0] in "LNPSM")
    if printable < MIN_PRINTABLE_SHARE * len(stripped):
        reasons.append(f"only {printable}/{len(stripped)} characters are printable text")
    if "\ufffd" in stripped:
        reasons.append("the reply holds U+FFFD (bytes that were not valid UTF-8)")
    return reasons


def _ask(client: Client, question: str, check) -> tuple[Optional[str], str]:
    """(the reply, '') or (None, why there is none); an unanswered question fails its precheck."""
    try:
        return chat(client, question, check.max_tokens, check.timeout), ""
    except Exception as exc:  # HTTP error, timeout, bad JSON: the served model did not answer
        return None, f"no reply ({type(exc).__name__}: {exc})"


def failed_precheck(checks: list, client: Client) -> Optional[str]:
    """The first failing precheck, described with the question and the reply; None when all pass."""
    for check in checks:
        if isinstance(check, ExpectedAnswerCheck):
            cases = [(question, answer) for case in check.test_cases for question, answer in case.items()]
            for question, answer in cases:
                accepted = [answer] if isinstance(answer, str) else list(answer)
                reply, error = _ask(client, question, check)
                if reply is None:
                    return f"expected_answer: {question!r}: {error}"
                if not any(a.lower() in reply.lower() for a in accepted):
                    return f"expected_answer: {question!r} expects one of {accepted}; the reply was {reply!r}"
        elif isinstance(check, GarbledTextCheck):
            for question in check.test_cases:
                reply, error = _ask(client, question, check)
                if reply is None:
                    return f"garbled_text: {question!r}: {error}"
                reasons = garbled_reasons(reply)
                if reasons:
                    return f"garbled_text: {question!r}: {'; '.join(reasons)}; the reply was {reply[:500]!r}"
    return None


def zero_result(config: ServiceOrientedEvaluation, why: str) -> TuneResult:
    """A failed precheck: every expected data set scores zero (the established tool's rule)."""
    zeros = {e.dataset: 0.0 for e in config.demand.expectations}
    result = judge(config.demand.expectations, zeros)
    result.detail = f"precheck failed, scored zero: {why}"
    return result


def evaluate_served(config: ServiceOrientedEvaluation, save_path: Path, model_dir: Path,
                    iteration: int) -> TuneResult:
    """Serve, precheck, benchmark one checkpoint; the engine is stopped on every path out of here."""
    with ServedModel(config.inference_engine, model_dir, save_path / ENGINE_LOG, iteration):
        client = target_client(config)
        failure = failed_precheck(config.precheck, client)
        if failure is not None:
            log.warning("tune: %s; the iteration scores zero", failure)
            return zero_result(config, failure)
        return benchmark(config, AisBench(config, save_path, client, model_dir, iteration))
