"""The tuning plan YAML, the --timeout grammar and the history directory of `msmodelslim tune` (app/tune.py):
what a tune run reads before any weight and what it keeps across runs (protocol.md §1.4, §7.2)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from msmodelslim.app.tune_evaluators import EvaluationConfig
from msmodelslim.app.tune_judge import TuneResult
from msmodelslim.app.tune_strategies import StrategyConfig
from msmodelslim.core.yaml_reader import read_yaml_file
from msmodelslim.core.errors import ConfigError
from msmodelslim.core.logging import get_logger

log = get_logger("app.tune")

TIMEOUT_PATTERN = re.compile(r"^(?:(\d+)D)?(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?$", re.IGNORECASE)
TIMEOUT_UNITS = (86400, 3600, 60, 1)


def parse_timeout(text: Optional[str]) -> Optional[float]:
    """`1D2H30M45S` -> seconds: D, H, M, S in this order, each optional, at least one; None -> no limit."""
    if text is None:
        return None
    match = TIMEOUT_PATTERN.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ConfigError(f"--timeout {text!r} is not a duration: give D, H, M, S parts in this order, each "
                          f"optional, e.g. 1D, 2H, 3D4H, 30M, 45S, 1D2H30M45S")
    seconds = sum(int(part or 0) * unit for part, unit in zip(match.groups(), TIMEOUT_UNITS))
    if seconds <= 0:
        raise ConfigError(f"--timeout {text!r} is zero; give a positive duration")
    return float(seconds)


# ---- the plan YAML -----------------------------------------------------------------------------------------------
class TunePlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: StrategyConfig
    evaluation: EvaluationConfig


def _error_lines(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"] if not str(p).startswith(("function-", "tagged-union")))
        lines.append(f"{where}: {error['msg']}")
    return "\n  ".join(lines)


def load_plan(path: Path) -> TunePlan:
    """The plan, validated in full (every strategy and evaluation field), before anything else is read.
    `strategy.template` may also be a path to a practice YAML (relative to the plan file)."""
    data = read_yaml_file(path, f"--config {path} does not exist or is not a file", f"--config {path}")
    if not isinstance(data, dict) or set(data) != {"strategy", "evaluation"}:
        raise ConfigError(f"--config {path}: a tuning plan is a mapping with exactly two keys, strategy and "
                          f"evaluation (see docs/tune.md); got {sorted(data) if isinstance(data, dict) else data!r}")
    strategy = data["strategy"]
    if isinstance(strategy, dict) and isinstance(strategy.get("template"), str):
        where = f"--config {path}: strategy.template {strategy['template']!r}"
        strategy["template"] = read_yaml_file(path.parent / strategy["template"], f"{where} is not a file", where)
    try:
        return TunePlan.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"--config {path}: invalid tuning plan:\n  {_error_lines(exc)}") from None


# ---- history -----------------------------------------------------------------------------------------------------
def write_yaml_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is damaged ({exc}); delete it to measure again") from None


class History:
    """`save_path/history/`: accuracy.yaml (the cache, kept across runs), history.yaml (this run's iterations),
    one <config_id>.yaml per iteration, best.yaml, candidates.yaml (analysis rankings)."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        cache = read_yaml(directory / "accuracy.yaml") or {}
        self.results: dict[str, dict] = dict(cache.get("results", {}))
        self.baselines: dict[str, float] = dict(cache.get("baselines", {}))
        self.rankings: dict[str, list] = dict((read_yaml(directory / "candidates.yaml") or {}))
        self.iterations: list[dict] = []  # the history index starts empty on every run

    def _save_cache(self) -> None:
        write_yaml_atomically(self.directory / "accuracy.yaml", {"results": self.results, "baselines": self.baselines})

    def cached(self, key: str) -> Optional[TuneResult]:
        entry = self.results.get(key)
        if entry is None:
            return None
        return TuneResult(bool(entry["passed"]), dict(entry["scores"]), float(entry["goodness"]),
                          entry.get("detail", ""))

    def remember(self, key: str, config_id: str, result: TuneResult) -> None:
        self.results[key] = {"config_id": config_id, "passed": result.passed, "scores": result.scores,
                             "goodness": result.goodness, "detail": result.detail}
        self._save_cache()

    def baseline(self, key: str, compute: Callable[[], float]) -> float:
        if key not in self.baselines:
            self.baselines[key] = float(compute())
            self._save_cache()
        else:
            log.info("float reference from %s", self.directory / "accuracy.yaml")
        return self.baselines[key]

    def ranking(self, key: str, compute: Callable[[], list]) -> list:
        if key not in self.rankings:
            self.rankings[key] = list(compute())
            write_yaml_atomically(self.directory / "candidates.yaml", self.rankings)
        else:
            log.info("fallback candidates from %s", self.directory / "candidates.yaml")
        return self.rankings[key]

    def record(self, record: dict, practice: dict) -> None:
        write_yaml_atomically(self.directory / f"{record['config_id']}.yaml", practice)
        self.iterations.append(record)
        write_yaml_atomically(self.directory / "history.yaml", {"iterations": self.iterations})

    def finish(self, summary: dict, best: Optional[dict]) -> None:
        if best is not None:
            write_yaml_atomically(self.directory / "best.yaml", best)
        write_yaml_atomically(self.directory / "history.yaml", {"iterations": self.iterations, **summary})
