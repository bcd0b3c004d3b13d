"""How `msmodelslim tune` judges one quantized checkpoint (the plan YAML's `evaluation`, protocol.md §7.2).

  perplexity        ours, no server: perplexity of the checkpoint read back by our ascendv1 reader, divided by
                    the float model's perplexity on the same windows; passes when the ratio <= demand.max_ratio.
                    Default text: a held-out tail of the calibration set (see `HeldOutSplit`), never the data
                    the checkpoint was calibrated on.
  command           any program that prints a score (an lm-eval or AISBench wrapper, a script): `{model}` in
                    the command becomes the checkpoint's directory; the LAST number on stdout is the score,
                    judged as one entry of `demand.expectations`.
  service_oriented  the established evaluator: serve the checkpoint with vLLM(-Ascend), ask the precheck
                    questions, benchmark it with AISBench (app/tune_service.py). Its precheck, before any
                    quantization, names what is missing: the serving entrypoint in this Python, the AISBench
                    binary on PATH, a free port.

The demand and the judgement of scores are in app/tune_judge.py, the service_oriented plan section in
app/tune_service_config.py.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msmodelslim.app.tune_judge import Demand, TuneResult, judge
from msmodelslim.app.tune_service import entrypoint_problem, evaluate_served, port_in_use
from msmodelslim.app.tune_service_config import ServiceOrientedEvaluation
from msmodelslim.core.errors import ConfigError, ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger

log = get_logger("app.tune")


# ---- perplexity (built in) -------------------------------------------------------------------------------------
class PerplexityDemand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_ratio: float = Field(gt=1.0, le=100.0, description="quantized / float perplexity must stay at or below this")


class PerplexityEvaluation(BaseModel):
    """`type: perplexity`. Without `dataset`, the last `holdout` share of the calibration samples (whole samples,
    in file order) is cut off: quantization calibrates on the rest, tune evaluates on it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["perplexity"]
    demand: PerplexityDemand
    dataset: Optional[str] = Field(None, description="evaluation text (path or built-in name); default: held out")
    holdout: float = Field(0.25, gt=0, lt=1, description="share of the calibration samples held out for tune")
    window: int = Field(512, ge=2, le=1 << 20)
    max_windows: int = Field(16, ge=1, le=10_000)


@dataclass
class HeldOutSplit:
    """Calibration samples [0, cut) and tune-evaluation samples [cut, n) of one data set: disjoint by construction
    (whole samples are split, never windows), so no calibration token is ever scored."""

    calibration: list[str]
    evaluation: list[str]

    @classmethod
    def of(cls, texts: list[str], holdout: float, name: str) -> "HeldOutSplit":
        held = max(1, round(len(texts) * holdout))
        if len(texts) - held < 1:
            raise ConfigError(f"evaluation.holdout {holdout}: the calibration set {name} has {len(texts)} "
                              f"sample(s), too few to hold any out; give evaluation.dataset (a separate text)")
        return cls(texts[: len(texts) - held], texts[len(texts) - held :])


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PerplexityEvaluator:
    """Perplexity ratio against the float model; the float perplexity is computed once (cached by the caller)."""

    def __init__(self, config: PerplexityEvaluation, model_path: Path, texts: list[str], trust_remote_code: bool,
                 device, baseline_cache: Callable[[str, Callable[[], float]], float]):
        from transformers import AutoTokenizer

        from msmodelslim.app.evaluate import token_windows
        from msmodelslim.model.hf_config import model_load_errors

        self.config, self.model_path, self.device = config, model_path, device
        self.trust_remote_code, self.baseline_cache = trust_remote_code, baseline_cache
        with model_load_errors(model_path, f"cannot load the tokenizer from {model_path}"):
            tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code,
                                                      local_files_only=True)
        # too little text for one window fails here, before any weight is read
        self.windows = token_windows(tokenizer, texts, config.window, config.max_windows)
        self.baseline_key = digest({"model": str(model_path.resolve()), "windows": [w.tolist() for w in self.windows]})
        log.info("tune evaluation: perplexity on %d window(s) of %d tokens; demand ratio <= %g", len(self.windows),
                 config.window, config.demand.max_ratio)

    def precheck(self) -> None:
        """Nothing to check beyond the constructor (tokenizer, windows)."""

    def float_perplexity(self) -> float:
        from msmodelslim.app.evaluate import load_float_model, perplexity

        def compute() -> float:
            model = load_float_model(self.model_path, self.trust_remote_code)
            return perplexity(model, self.windows, self.device, "float").perplexity

        return self.baseline_cache(self.baseline_key, compute)

    def evaluate(self, quant_path: Path) -> TuneResult:
        from msmodelslim.app.evaluate import perplexity
        from msmodelslim.format.readers import load_quantized_checkpoint, own_output_folder
        from msmodelslim.ir.quant_linear import keep_decoded_weights

        reference = self.float_perplexity()
        quantized_model = keep_decoded_weights(load_quantized_checkpoint(own_output_folder(quant_path),
                                                                         self.trust_remote_code))
        quantized = perplexity(quantized_model, self.windows, self.device, "quantized").perplexity
        ratio = quantized / reference
        passed = Decimal(str(ratio)) <= Decimal(str(self.config.demand.max_ratio))
        return TuneResult(passed, {"perplexity": quantized, "float_perplexity": reference, "ratio": ratio}, -ratio,
                          f"perplexity {quantized:.4f} / float {reference:.4f} = x{ratio:.4f} "
                          f"({'<=' if passed else '>'} {self.config.demand.max_ratio:g})")


# ---- command ---------------------------------------------------------------------------------------------------
MODEL_PLACEHOLDER = "{model}"
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


class CommandEvaluation(BaseModel):
    """`type: command`: e.g. `command: "python my_eval.py --model {model}"` (or a list of arguments)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["command"]
    command: Union[str, list[str]]
    demand: Demand
    timeout: float = Field(7200, gt=0, description="seconds one run of the command may take")

    @model_validator(mode="after")
    def _check(self) -> "CommandEvaluation":
        if len(self.demand.expectations) != 1:
            raise ValueError("a command prints one score: give exactly one entry in demand.expectations")
        if not self.argv():
            raise ValueError("command is empty")
        if not any(MODEL_PLACEHOLDER in part for part in self.argv()):
            raise ValueError(f"command must contain {MODEL_PLACEHOLDER} (where the quantized model's directory goes); "
                             f"otherwise its score cannot depend on the model")
        return self

    def argv(self) -> list[str]:
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command)


def last_number(text: str) -> Optional[float]:
    found = NUMBER.findall(text)
    return float(found[-1]) if found else None


class CommandEvaluator:
    def __init__(self, config: CommandEvaluation, cwd: Path):
        self.config, self.cwd = config, cwd

    def precheck(self) -> None:
        program = self.config.argv()[0]
        if shutil.which(program) is None and not (self.cwd / program).is_file():
            raise ConfigError(f"evaluation.command: program {program!r} is not on PATH (nor a file in {self.cwd})")

    def evaluate(self, quant_path: Path) -> TuneResult:
        argv = [part.replace(MODEL_PLACEHOLDER, str(quant_path)) for part in self.config.argv()]
        log.info("tune evaluation: %s", " ".join(shlex.quote(a) for a in argv))
        try:
            done = subprocess.run(argv, cwd=self.cwd, capture_output=True, text=True, timeout=self.config.timeout)
        except subprocess.TimeoutExpired:
            raise ProcessingError(f"evaluation.command ran longer than evaluation.timeout {self.config.timeout:g} s") \
                from None
        if done.returncode != 0:
            raise ProcessingError(f"evaluation.command exited with {done.returncode}; its stderr ends with:\n"
                                  f"{done.stderr[-2000:]}")
        score = last_number(done.stdout)
        if score is None:
            raise ProcessingError(f"evaluation.command printed no number on stdout (the last one is the score); "
                                  f"stdout ends with: {done.stdout[-500:]!r}")
        expectation = self.config.demand.expectations[0]
        return judge([expectation], {expectation.dataset: score})


class ServiceOrientedEvaluator:
    """The established evaluator: serve the checkpoint, health-check it, ask the precheck questions, run AISBench
    per data set (app/tune_service.py). `precheck` runs before the first quantization: nothing is quantized for
    an evaluation that cannot run here."""

    def __init__(self, config: ServiceOrientedEvaluation, save_path: Path):
        self.config, self.save_path = config, save_path
        self.iterations = 0

    def missing(self) -> list[str]:
        """What this machine lacks for the evaluation, each with what to do."""
        engine, bench = self.config.inference_engine, self.config.evaluation.aisbench
        found = []
        problem = entrypoint_problem(engine)
        if problem:
            found.append(problem)
        if shutil.which(bench.binary) is None:
            found.append(f"the benchmark binary {bench.binary!r} is not on PATH (install AISBench: `pip install "
                         f"ais_bench_benchmark`, or set evaluation.aisbench.binary)")
        if port_in_use(engine.host, engine.port):
            found.append(f"port {engine.port} on {engine.host} is already in use (stop what listens there, or set "
                         f"inference_engine.port)")
        return found

    def precheck(self) -> None:
        missing = self.missing()
        if missing:
            raise UnsupportedError("evaluation service_oriented cannot run here: " + "; ".join(missing) +
                                   ". Nothing was quantized. Without a serving stack, use evaluation type perplexity "
                                   "(built in) or command (any script that prints a score)")

    def evaluate(self, quant_path: Path) -> TuneResult:
        self.iterations += 1
        return evaluate_served(self.config, self.save_path, quant_path, self.iterations)


# ---- the plan's evaluation section ----------------------------------------------------------------------------
EvaluationConfig = Annotated[Union[PerplexityEvaluation, CommandEvaluation, ServiceOrientedEvaluation],
                             Field(discriminator="type")]
EVALUATION_TYPES = ("perplexity", "command", "service_oriented")
