"""Use case: mixed precision under a bit budget (`msmodelslim analyze mixed`, issue #23 scope 2).

For every decoder-block linear and every candidate scheme s (e.g. W4A16 group 64, W8A16 per channel, float), the
error the linear adds when only it is quantized with s, estimated on the calibration data:

    e[l, s] = Σ_t ‖ΔW_s x_t‖² = trace(ΔW_s · G · ΔW_sᵀ),    G = Σ_t x_t x_tᵀ,    ΔW_s = Q_s(W) − W

x_t are the linear's calibration inputs from the FLOAT model (each block fed the float outputs of the blocks
before it, as `analyze layer` does), Q_s the scheme's weight quantizer (the same method `quant` will run:
minmax, ssz or GPTQ with G's Hessian). This is the second-order (Fisher-like) proxy of OBQ/GPTQ (Frantar et al.
2022) for the loss increase a linear's weight error causes, measured at its own output: G is collected once per
linear (one layer_wise pass, one block in memory at a time), which makes every (linear, scheme) score one
quantization and two matmuls. It does not weigh where an output error goes (a down_proj error reaches the residual
stream directly, a k_proj error through the softmax); the sum over linears is the objective the solver minimises.

The solver (app/mixed_budget.py) picks one scheme per linear (one per fused group: q/k/v and gate/up share a
type, as the engine fuses them) minimising Σ e under the average bits-per-weight
budget (scales and offsets counted as the writer stores them), and the plan is written as a plain modelslim_v1
config (one weight-only linear_quant rule per quantized scheme, with the exact linear names as its include list)
that `msmodelslim quant --config_path` runs unchanged.

Checked before any weight is read: the arguments, the schemes, the model's shapes against each grouped scheme, and
the budget against the cheapest possible plan.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml
from torch import nn

from msmodelslim.app.analysis_blocks import walk_blocks
from msmodelslim.app.analyze import _check_output, check_common_inputs, refuse_vision_language
from msmodelslim.app.mixed_budget import (WEIGHT_METHODS, CandidateScheme, Choice, Solution, check_budget,
                                          parse_schemes, solve)
from msmodelslim.core.config import load_config
from msmodelslim.core.dataset import load_texts
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core.errors import ConfigError, InvalidModelError
from msmodelslim.core.logging import get_logger
from msmodelslim.model.registry import create_adapter, resolve
from msmodelslim.quantizer.scheme import QConfig
from msmodelslim.quantizer.weight import fake_quantize_weight

log = get_logger("app.mixed")

PLAN_YAML = "mixed_precision.yaml"
PLAN_JSON = "mixed_precision.json"


@dataclass
class MixedRequest:
    model_type: str
    model_path: Path
    bits: float  # the average bits per weight allowed
    schemes: str = "w4a16_g64,w8a16,float"
    weight_method: str = "minmax"
    device: DeviceSpec = DeviceSpec("cpu")
    calib_dataset: str = "mix_calib.jsonl"
    output: Optional[Path] = None  # None: ./msmodelslim_analysis/<model>-mixed-<bits>
    trust_remote_code: bool = False


@dataclass
class LinearShape:
    name: str
    out_features: int
    in_features: int

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features


@dataclass
class MixedResult:
    plan: dict[str, str]  # linear -> scheme name
    predicted_bits: float  # average bits per weight of the plan
    predicted_error: float  # Σ e[l, s_l]
    uniform: dict[str, tuple[float, float]]  # scheme -> (average bits, Σ error) when every linear takes it
    budget: float
    files: dict[str, str] = field(default_factory=dict)


def _linear_shapes(model: nn.Module, block_names: list[str]) -> list[LinearShape]:
    return [LinearShape(f"{b}.{n}", m.out_features, m.in_features) for b in block_names
            for n, m in model.get_submodule(b).named_modules() if isinstance(m, nn.Linear)]


def fused_units(shapes: list[LinearShape], fused_groups: tuple[tuple[str, ...], ...]) -> list[list[LinearShape]]:
    """The linears that must share one scheme: the engine fuses q/k/v (gate/up, ...) of one module into one
    matmul and needs one type for them (ascendv1 checker), so each fused group is one choice; others stand alone."""
    group_of = {member: i for i, group in enumerate(fused_groups) for member in group}
    units: dict[tuple, list[LinearShape]] = {}
    for shape in shapes:
        parent, _, leaf = shape.name.rpartition(".")
        key = (parent, group_of[leaf]) if leaf in group_of else (shape.name,)
        units.setdefault(key, []).append(shape)
    return list(units.values())


def cost_table(units: list[list[LinearShape]], schemes: list[CandidateScheme]
               ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per unit, (allowed scheme indices, their bits); a unit no scheme fits is refused by name."""
    table = []
    for unit in units:
        options = tuple(i for i, s in enumerate(schemes) if all(s.fits(m.in_features) for m in unit))
        if not options:
            names = ", ".join(m.name for m in unit)
            raise ConfigError(f"no scheme of --schemes fits {names} (an input size is not a multiple of the group "
                              f"size); add float or w8a16 to --schemes")
        table.append((options, tuple(sum(schemes[i].stored_bits(m.out_features, m.in_features) for m in unit)
                                     for i in options)))
    return table


def check_request(request: MixedRequest) -> list[CandidateScheme]:
    if not request.bits > 0:
        raise ConfigError(f"--bits must be a positive number of bits per weight, got {request.bits}")
    if request.weight_method not in WEIGHT_METHODS:
        raise ConfigError(f"--weight_method {request.weight_method!r}: use one of {', '.join(WEIGHT_METHODS)}")
    check_common_inputs(request)
    return parse_schemes(request.schemes)


class _Gram:
    """G = Σ_t x_t x_tᵀ (float64) and the token count of one linear's inputs."""

    def __init__(self) -> None:
        self.matrix: Optional[torch.Tensor] = None
        self.tokens = 0

    def add(self, product: torch.Tensor, tokens: int) -> None:
        self.matrix = product if self.matrix is None else self.matrix + product
        self.tokens += tokens


@torch.no_grad()
def scheme_error(weight: torch.Tensor, gram: torch.Tensor, tokens: int, scheme: CandidateScheme,
                 method: str) -> float:
    """trace(ΔW G ΔWᵀ) = Σ_t ‖ΔW x_t‖² for the weight error ΔW of `scheme` (0 for float)."""
    if scheme.is_float:
        return 0.0
    spec = QConfig(**scheme.qconfig(method)["weight"])
    hessian = 2.0 * gram / max(tokens, 1) if method == "gptq" else None  # GPTQ's H = 2·XᵀX/n
    delta = fake_quantize_weight(weight, spec, hessian).double() - weight.double()
    return float(((delta @ gram) * delta).sum())


def _gram_visit(schemes: list[CandidateScheme], method: str, errors: dict[str, list[float]]):
    """Per block: collect every linear's G over the calibration batches, then score each scheme on it."""
    def visit(block_name: str, block: nn.Module, requests: list) -> list:
        linears = {f"{block_name}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        grams = {name: _Gram() for name in linears}
        shared: list = [None, None]  # q/k/v (gate/up) receive the same tensor: compute its XᵀX once

        def collect(name: str):
            def hook(_module, args) -> None:
                x = args[0]
                if shared[0] is not x:
                    flat = x.detach().reshape(-1, x.shape[-1]).float()
                    shared[0], shared[1] = x, ((flat.T @ flat).double(), flat.shape[0])
                grams[name].add(*shared[1])
            return hook

        hooks = [m.register_forward_pre_hook(collect(n)) for n, m in linears.items()]
        try:
            outputs = [block(*r.args, **r.kwargs) for r in requests]
        finally:
            for hook in hooks:
                hook.remove()
            shared.clear()
        for name, module in linears.items():
            gram = grams[name]
            if gram.matrix is None:  # e.g. a routed expert no calibration token reached: weigh it as unseen
                log.warning("%s received no calibration input; its error is estimated as 0", name)
                errors[name] = [0.0] * len(schemes)
                continue
            weight = module.weight.detach()
            errors[name] = [scheme_error(weight, gram.matrix, gram.tokens, s, method) if s.fits(weight.shape[1])
                            else float("inf") for s in schemes]
        return outputs
    return visit


def plan_config(plan: dict[str, str], schemes: list[CandidateScheme], method: str, dataset: str) -> dict:
    """The modelslim_v1 config of a plan: one weight-only linear_quant rule per quantized scheme (its linears by
    exact name); float linears are in no rule."""
    process = []
    for scheme in schemes:
        names = [n for n, s in plan.items() if s == scheme.name]
        if names and not scheme.is_float:
            process.append({"type": "linear_quant", "qconfig": scheme.qconfig(method), "include": names})
    return {"apiversion": "modelslim_v1",
            "spec": {"runner": "layer_wise", "process": process, "save": [{"type": "ascendv1_saver"}],
                     "dataset": dataset}}


def _dataset_entry(calib: str) -> str:
    """The data set as the config should name it: an existing path absolute, a built-in name unchanged."""
    path = Path(calib)
    return str(path.resolve()) if path.exists() else calib


@dataclass
class LinearScores:
    """What one scoring pass yields: every plan for any budget is solved from it without reading weights again."""

    schemes: list[CandidateScheme]
    shapes: list[LinearShape]
    units: list[list[LinearShape]]  # the choices: fused groups or single linears
    table: list[tuple[tuple[int, ...], tuple[int, ...]]]  # per unit: allowed scheme indices, their bits
    errors: dict[str, list[float]]  # linear -> e[l, s] per scheme

    @property
    def weights(self) -> int:
        return sum(s.weights for s in self.shapes)

    def check_budget(self, bits: float) -> None:
        cheapest = min(self.schemes, key=lambda s: s.stored_bits(1024, 1024)).name
        check_budget(bits * self.weights, sum(min(costs) for _, costs in self.table), self.weights, cheapest)


def default_output(request: MixedRequest, bits: float) -> Path:
    return request.output or Path("msmodelslim_analysis") / f"{request.model_path.name}-mixed-{bits:g}"


def score_linears(request: MixedRequest) -> LinearScores:
    """Check everything (request.bits against the cheapest plan included), then one layer_wise pass: e[l, s]."""
    schemes = check_request(request)
    entry = resolve(request.model_type, request.model_path)
    texts = load_texts(request.calib_dataset)
    adapter = create_adapter(request.model_type, str(request.model_path), request.trust_remote_code, entry)
    refuse_vision_language(adapter, "analyze mixed")
    skeleton = adapter.init_skeleton()  # module names and shapes only, nothing read
    block_names = adapter.block_names(skeleton)
    shapes = _linear_shapes(skeleton, block_names)
    if not shapes:
        raise InvalidModelError(f"{request.model_path}: the decoder blocks hold no nn.Linear to choose schemes for")
    units = fused_units(shapes, adapter.structure.fused_groups)
    scores = LinearScores(schemes, shapes, units, cost_table(units, schemes), {})
    scores.check_budget(request.bits)
    _check_output(default_output(request, request.bits))

    device = request.device.primary
    model = adapter.load_weights(skeleton, device, load_layers=False)
    adapter.enable_kv_cache(model, False)
    batches = adapter.handle_dataset(texts, device)
    log.info("analyze mixed: %d linears in %d blocks, schemes %s (%s), %d calibration batches, one block in "
             "memory at a time", len(shapes), len(block_names), ", ".join(s.name for s in schemes),
             request.weight_method, len(batches))
    walk_blocks(adapter, model, batches, device, True, _gram_visit(schemes, request.weight_method, scores.errors))
    return scores


def choose(scores: LinearScores, request: MixedRequest, bits: float, output: Path) -> MixedResult:
    """The plan for an average of `bits` per weight, written to `output`."""
    scores.check_budget(bits)
    schemes, errors = scores.schemes, scores.errors
    choices = [Choice(options, costs, tuple(sum(errors[m.name][i] for m in unit) for i in options))
               for unit, (options, costs) in zip(scores.units, scores.table)]
    solution = solve(choices, bits * scores.weights)
    chosen = {m.name: schemes[c.options[p]].name
              for unit, c, p in zip(scores.units, choices, solution.picks) for m in unit}
    plan = {s.name: chosen[s.name] for s in scores.shapes}
    result = MixedResult(plan, solution.bits / scores.weights, solution.error,
                         _uniform(scores.shapes, schemes, errors), bits)
    result.files = write_plan(result, solution, scores.shapes, errors, schemes, request, output)
    log.info("mixed precision plan: %.4f bits per weight (budget %g), estimated error %.6g; wrote %s",
             result.predicted_bits, bits, result.predicted_error, ", ".join(result.files.values()))
    return result


def mixed_precision(request: MixedRequest) -> MixedResult:
    started = time.perf_counter()
    result = choose(score_linears(request), request, request.bits, default_output(request, request.bits))
    log.info("analyze mixed took %.1f s", time.perf_counter() - started)
    return result


def _uniform(shapes: list[LinearShape], schemes: list[CandidateScheme],
             errors: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Each scheme applied to every linear it fits (the others float): its average bits and Σ error."""
    weights = sum(s.weights for s in shapes)
    out = {}
    for i, scheme in enumerate(schemes):
        bits = error = 0.0
        for shape in shapes:
            fits = scheme.fits(shape.in_features)
            kept = scheme if fits else CandidateScheme("float", 16)
            bits += kept.stored_bits(shape.out_features, shape.in_features)
            error += errors[shape.name][i] if fits else 0.0
        out[scheme.name] = (bits / weights, error)
    return out


def write_plan(result: MixedResult, solution: Solution, shapes: list[LinearShape], errors: dict[str, list[float]],
               schemes: list[CandidateScheme], request: MixedRequest, output: Path) -> dict[str, str]:
    output.mkdir(parents=True, exist_ok=True)
    config = plan_config(result.plan, schemes, request.weight_method, _dataset_entry(request.calib_dataset))
    counts = {s.name: sum(v == s.name for v in result.plan.values()) for s in schemes}
    header = [f"# msmodelslim analyze mixed: {request.model_path} --bits {result.budget:g} --schemes {request.schemes} "
              f"--weight_method {request.weight_method}",
              f"# predicted: {result.predicted_bits:.4f} bits per weight over the decoder-block linears "
              f"({solution.bits} bits), estimated error Σ‖ΔW x‖² = {result.predicted_error:.6g}",
              "# linears per scheme: " + ", ".join(f"{n} {c}" for n, c in counts.items()),
              "# uniform: " + "; ".join(f"{n}: {b:.4f} bits, error {e:.6g}" for n, (b, e) in result.uniform.items()),
              "# run: msmodelslim quant --config_path <this file> ..."]
    yaml_path, json_path = output / PLAN_YAML, output / PLAN_JSON
    yaml_path.write_text("\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False))
    load_config(yaml_path)  # what quant will read: fails here, not in the user's quant run
    bits_of = {s.name: s for s in schemes}
    report = {
        "model_path": str(request.model_path), "budget_bits_per_weight": result.budget, "schemes": request.schemes,
        "weight_method": request.weight_method, "calib_dataset": request.calib_dataset,
        "predicted_bits_per_weight": result.predicted_bits, "predicted_error": result.predicted_error,
        "uniform": {n: {"bits_per_weight": b, "error": e} for n, (b, e) in result.uniform.items()},
        "linears": [{"name": s.name, "shape": [s.out_features, s.in_features], "scheme": result.plan[s.name],
                     "bits": bits_of[result.plan[s.name]].stored_bits(s.out_features, s.in_features),
                     "errors": {sc.name: errors[s.name][i] for i, sc in enumerate(schemes)}} for s in shapes],
    }
    json_path.write_text(json.dumps(report, indent=1))
    return {"config": str(yaml_path), "report": str(json_path)}
