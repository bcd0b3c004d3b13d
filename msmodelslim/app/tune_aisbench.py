"""AISBench behind `evaluation.type: service_oriented` (app/tune_service.py serves the model): one model config
per iteration pointing at the served model, one `ais_bench` run per data set, the accuracy read from the summary
AISBench writes. Facts used are listed in app/tune_service.py's docstring."""
from __future__ import annotations

import csv
import json
import os
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Optional

from msmodelslim.app.process_group import log_tail, run_in_own_group
from msmodelslim.app.tune_judge import TuneResult, judge
from msmodelslim.app.tune_service_config import AisBenchDataset, ServiceOrientedEvaluation
from msmodelslim.core.errors import ProcessingError
from msmodelslim.core.logging import get_logger

log = get_logger("app.tune")

AISBENCH_LOGS = "aisbench_logs"
AISBENCH_OUTPUT = "aisbench_output"
AISBENCH_CONFIGS = "aisbench_configs"  # passed as --config-dir; the model config goes under models/<subdir>/
POSTPROCESSORS_MODULE = "ais_bench.benchmark.utils.model_postprocessors"  # present in old and current AISBench
GROUP_METRICS = ("naive_average", "weighted_average", "harmonic_mean")  # summary-group rows of AISBench
EXP_FOLDER = re.compile(r"Current exp folder:\s*(\S.*?)\s*$", re.MULTILINE)
LEADING_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))")


@dataclass
class Client:
    """Where the served model answers (the precheck questions and AISBench both go here)."""

    host: str
    port: int
    model: str

    def url(self, endpoint: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{endpoint}"



# ---- runs and summaries ----------------------------------------------------------------------------------------------------
def _number(cell: str) -> Optional[Decimal]:
    match = LEADING_NUMBER.match(cell)  # "62.50" or "62.50 (5/8)"; "-" is a missing result
    return Decimal(match.group(1)) if match else None


def _unrounded(exp: Path, abbr: str, dataset: str, metric: str) -> Optional[Decimal]:
    """The summary rounds to 2 decimals; results/<abbr>/<dataset>.json holds the number itself."""
    path = exp / "results" / abbr / f"{dataset}.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal).get(metric)
    except (OSError, ValueError, AttributeError):
        return None
    return Decimal(value) if isinstance(value, (int, Decimal)) and not isinstance(value, bool) else None


def summary_accuracy(exp: Path, abbr: str, name: str) -> Decimal:
    """The accuracy of data set `name` (the plan's key) in AISBench's summary CSV, column `abbr`: the row whose
    dataset is `name` (its first metric row, the main one), else the only row with a number, else the only
    summary-group average row; anything else is ambiguous and refused with the rows found."""
    summaries = sorted((exp / "summary").glob("summary_*.csv"))
    if not summaries:
        raise ProcessingError(f"AISBench wrote no summary_*.csv under {exp / 'summary'} (did it run with --mode "
                              f"all or eval?)")
    with summaries[-1].open(newline="", encoding="utf-8") as handle:
        table = [row for row in csv.reader(handle) if row]
    header, rows = table[0], table[1:]
    if abbr not in header:
        raise ProcessingError(f"{summaries[-1]} has no column {abbr!r} (evaluation.aisbench.model_meta.abbr); its "
                              f"columns: {header}")
    column = header.index(abbr)
    scored = [(row[0], row[2], _number(row[column])) for row in rows if len(row) > column]
    scored = [(dataset, metric, value) for dataset, metric, value in scored if value is not None]
    if not scored:  # AISBench exits 0 with '-' rows when its inference or evaluation task failed
        raise ProcessingError(f"{summaries[-1]} holds no result in column {abbr!r} (its rows: "
                              f"{[','.join(row) for row in rows]}): AISBench's inference or evaluation failed; see "
                              f"its logs under {exp / 'logs'}")
    named = [s for s in scored if s[0] == name][:1]  # the first row of a data set is its main metric
    groups = [s for s in scored if s[1] in GROUP_METRICS]
    chosen = named or (scored if len(scored) == 1 else []) or (groups if len(groups) == 1 else [])
    if not chosen:
        found = [f"{d}/{m}={v}" for d, m, v in scored]
        raise ProcessingError(f"{summaries[-1]}: cannot tell which row is data set {name!r}; rows with a number "
                              f"in column {abbr!r}: {found}. Name the data set in evaluation.datasets after its "
                              f"summary row")
    dataset, metric, value = chosen[0]
    unrounded = _unrounded(exp, abbr, dataset, metric)
    return value if unrounded is None else unrounded


class AisBench:
    """The AISBench runs of one iteration: one model config file (rewritten per data set, removed at the end
    when cleanup_model_config), one log per data set."""

    def __init__(self, config: ServiceOrientedEvaluation, save_path: Path, client: Client, model_dir: Path,
                 iteration: int):
        self.config, self.save_path, self.client, self.model_dir = config, save_path, client, model_dir
        self.settings = config.evaluation.aisbench
        meta = self.settings.model_meta
        suffix = meta.name_suffix if meta.name_suffix not in ("", "auto") else f"trial{iteration}_{int(time.time())}"
        self.name = re.sub(r"[^0-9A-Za-z_-]+", "_", f"{meta.base_name.removesuffix('.py')}_{suffix}")
        if meta.directory:  # the user's directory, which AISBench must search itself (no --config-dir)
            self.config_dir, directory = None, Path(meta.directory)
        else:
            self.config_dir = save_path / AISBENCH_CONFIGS
            directory = self.config_dir / "models" / meta.subdir
        self.config_path = directory / f"{self.name}.py"
        self.log_dir = save_path / (self.settings.log_dir or AISBENCH_LOGS)
        self.work_dir = save_path / AISBENCH_OUTPUT
        self.iteration = iteration

    def model_config(self, dataset: AisBenchDataset) -> str:
        """The `models = [dict(...)]` file AISBench loads (as its configs/models/vllm_api/*.py)."""
        s, meta = self.settings, self.settings.model_meta
        fields = {"attr": meta.attr, "abbr": meta.abbr, "path": str(self.model_dir), "model": self.client.model,
                  "request_rate": dataset.request_rate or s.request_rate, "retry": s.retry,
                  "host_ip": self.client.host, "host_port": self.client.port,
                  "max_out_len": dataset.max_out_len or s.max_out_len, "batch_size": s.batch_size,
                  "trust_remote_code": s.trust_remote_code, "generation_kwargs": s.generation_kwargs}
        if dataset.returns_tool_calls is not None:
            fields["returns_tool_calls"] = dataset.returns_tool_calls
        lines = [f"from ais_bench.benchmark.models import {dataset.api_chat_type}"]
        body = [f"        type={dataset.api_chat_type},"] + [f"        {k}={v!r}," for k, v in fields.items()]
        if s.pred_postprocessor:
            lines.append(f"from {POSTPROCESSORS_MODULE} import {s.pred_postprocessor}")
            body.append(f"        pred_postprocessor=dict(type={s.pred_postprocessor}),")
        return "\n".join(lines + ["", "models = [", "    dict(", *body, "    )", "]", ""])

    def argv(self, dataset: AisBenchDataset) -> list[str]:
        argv = [self.settings.binary, "--models", self.name, "--datasets", dataset.config_name,
                "--mode", dataset.mode or self.settings.mode, "--work-dir", str(self.work_dir)]
        if self.config_dir is not None:
            argv += ["--config-dir", str(self.config_dir)]
        return argv + list(self.settings.extra_args) + list(dataset.extra_args)

    def accuracy(self, name: str) -> Decimal:
        dataset = self.config.evaluation.datasets[name]
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.model_config(dataset), encoding="utf-8")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{re.sub(r'[^0-9A-Za-z_.-]+', '_', name)}_trial{self.iteration}.log"
        argv = self.argv(dataset)
        log_path.write_text(f"[COMMAND] {' '.join(argv)}\n", encoding="utf-8")
        before = set(os.listdir(self.work_dir))
        log.info("tune: AISBench on %s: %s (log: %s)", name, " ".join(argv), log_path)
        code = run_in_own_group(argv, self.save_path, log_path, self.settings.timeout)
        if code != 0:
            raise ProcessingError(f"AISBench exited with {code} on data set {name} ({dataset.config_name}); "
                                  f"{log_path} ends with:\n{log_tail(log_path)}")
        accuracy = summary_accuracy(self._exp_folder(log_path, before), self.settings.model_meta.abbr, name)
        log.info("tune: AISBench %s accuracy %s", name, accuracy)
        return accuracy

    def _exp_folder(self, log_path: Path, before: set[str]) -> Path:
        """The run's `Current exp folder:` (the last one AISBench logged), else the one new folder in work_dir."""
        found = EXP_FOLDER.findall(log_path.read_text(encoding="utf-8", errors="replace"))
        if found:
            folder = Path(found[-1])
            return folder if folder.is_absolute() else self.save_path / folder
        new = sorted(set(os.listdir(self.work_dir)) - before)
        if len(new) != 1:
            raise ProcessingError(f"AISBench logged no 'Current exp folder:' in {log_path}, and {self.work_dir} "
                                  f"has {len(new)} new folder(s): cannot find its results")
        return self.work_dir / new[0]

    def cleanup(self) -> None:
        if self.settings.cleanup_model_config:
            self.config_path.unlink(missing_ok=True)


# ---- one iteration -----------------------------------------------------------------------------------------------

def benchmark(config: ServiceOrientedEvaluation, bench: AisBench) -> TuneResult:
    """AISBench per data set in the order of the expectations, stopping at the first one that misses its
    target; data sets that no expectation names run last (reported, not judged)."""
    scores: dict[str, float] = {}
    try:
        for expectation in config.demand.expectations:
            if expectation.dataset not in scores:
                scores[expectation.dataset] = float(bench.accuracy(expectation.dataset))
            if not expectation.met_by(scores[expectation.dataset]):
                break
        else:
            for name in config.evaluation.datasets:
                if name not in scores:
                    scores[name] = float(bench.accuracy(name))
    finally:
        bench.cleanup()
    result = judge(config.demand.expectations, scores)
    result.detail = f"{', '.join(f'{k} {v:g}' for k, v in scores.items())}: {result.detail}"
    return result
