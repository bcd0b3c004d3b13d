"""What `msmodelslim analyze` reports: the ranked table, the top-k as a ready-to-paste `exclude` list, and the
files written next to them (analysis.json, exclude.yaml, scores.png).

Equal scores form one group: a group is never split at the top-k boundary, so more than k names may be listed
(protocol.md §1.3). Layer-scope names get a `.*` suffix: `exclude` patterns are fnmatch patterns over full linear
names (processor/matching.py), so `model.layers.7.*` keeps every linear of block 7 in float.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from msmodelslim.core.errors import OutputWriteError
from msmodelslim.core.logging import get_logger

log = get_logger("app.analyze")
PASTE_INTO = {"linear": "the exclude of a linear_quant step", "layer": "the exclude of a linear_quant step",
              "attn": "the exclude of the fa3_quant step (attention modules)"}


@dataclass
class AnalysisResult:
    """`scores`: [(name, score)] highest (most sensitive) first; ties keep the model's order."""

    scope: str
    metric: str
    scheme: str  # what the error is measured against (layer/attn), "float activations" for linear statistics
    model_path: str
    scores: list[tuple[str, float]]
    topk: int
    patterns: list[str] = field(default_factory=list)  # --pattern (linear) or --quant_modules (layer)
    files: dict[str, str] = field(default_factory=dict)  # what was written: {kind: path}

    @property
    def top(self) -> list[str]:
        return top_names(self.scores, self.topk)

    @property
    def exclude(self) -> list[str]:
        return exclude_entries(self.top, self.scope)


def rank(scores: dict[str, float]) -> list[tuple[str, float]]:
    """Highest score first; `scores` in model order, which equal scores keep (a stable sort)."""
    return sorted(scores.items(), key=lambda item: -item[1])


def groups(ranked: list[tuple[str, float]]) -> list[tuple[float, list[str]]]:
    out: list[tuple[float, list[str]]] = []
    for name, score in ranked:
        if out and out[-1][0] == score:
            out[-1][1].append(name)
        else:
            out.append((score, [name]))
    return out


def top_names(ranked: list[tuple[str, float]], k: int) -> list[str]:
    """The k most sensitive names, extended to the end of the group of equal scores the k-th one belongs to."""
    chosen: list[str] = []
    for _, names in groups(ranked):
        if len(chosen) >= k:
            break
        chosen.extend(names)
    return chosen


def exclude_entries(names: list[str], scope: str) -> list[str]:
    return [f"{n}.*" for n in names] if scope == "layer" else list(names)


def table_lines(result: AnalysisResult) -> list[str]:
    width = max((len(n) for n, _ in result.scores), default=4)
    lines = [f"{'rank':>4}  {'name':{width}s} | {result.metric} score"]
    position = 1
    for score, names in groups(result.scores):
        for name in names:  # equal scores share one rank
            lines.append(f"{position:>4}  {name:{width}s} | {score:.6e}")
        position += len(names)
    return lines


def exclude_yaml(result: AnalysisResult) -> str:
    header = (f"# msmodelslim analyze {result.scope} --metrics {result.metric}: the top {result.topk} "
              f"(ties included) of {len(result.scores)}, most sensitive first; scheme: {result.scheme}\n"
              f"# paste into {PASTE_INTO[result.scope]} to keep them in float\n")
    return header + yaml.safe_dump({"exclude": result.exclude}, sort_keys=False)


def log_result(result: AnalysisResult) -> None:
    log.info("sensitivity (%s scope, %s, %s), highest = most sensitive:\n%s", result.scope, result.metric,
             result.scheme, "\n".join(table_lines(result)))
    log.info("top %d (ready to paste into exclude):\n%s", result.topk, exclude_yaml(result))


def _plot(result: AnalysisResult, path: Path) -> bool:
    """A bar per layer in model order (the ranking is in the table); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so %s was not drawn (pip install 'msmodelslim[analyze]')", path.name)
        return False
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    by_order = sorted(result.scores, key=lambda item: _model_order(item[0]))
    top = set(result.top)
    height = max(3.0, 0.18 * len(by_order) + 1.5)
    figure, axes = plt.subplots(figsize=(9, height))
    names = [n for n, _ in by_order]
    axes.barh(range(len(by_order)), [s for _, s in by_order],
              color=["tab:red" if n in top else "tab:blue" for n in names])
    axes.set_yticks(range(len(by_order)), names, fontsize=7)
    axes.invert_yaxis()
    values = [s for _, s in by_order]
    if min(values) > 0 and max(values) > 100 * min(values):  # errors often span decades: keep the small ones visible
        axes.set_xscale("log")
    axes.set_xlabel(f"{result.metric} ({result.scheme})")
    axes.set_title(f"msmodelslim analyze {result.scope}: red = top {result.topk}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _model_order(name: str) -> tuple:
    """Numbers compare as numbers: model.layers.10 after model.layers.9."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def write_outputs(result: AnalysisResult, output: Path) -> dict[str, str]:
    """analysis.json, exclude.yaml and (with matplotlib) scores.png in `output`; {kind: path} of those written."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        files = {"json": output / "analysis.json", "exclude": output / "exclude.yaml", "plot": output / "scores.png"}
        document = {k: v for k, v in asdict(result).items() if k not in ("scores", "files")}
        document["scores"] = [{"name": n, "score": s} for n, s in result.scores]
        document["top"] = result.top
        document["exclude"] = result.exclude
        files["json"].write_text(json.dumps(document, indent=2) + "\n")
        files["exclude"].write_text(exclude_yaml(result))
        if not _plot(result, files["plot"]):
            del files["plot"]
    except OSError as exc:
        raise OutputWriteError(f"cannot write the analysis into {output}: {exc}") from None
    return {kind: str(path) for kind, path in files.items()}


def default_output(scope: str, metric: str, model_path: Path, cwd: Optional[Path] = None) -> Path:
    return (cwd or Path.cwd()) / "msmodelslim_analysis" / f"{model_path.resolve().name}-{scope}-{metric}"
