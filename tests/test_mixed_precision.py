"""`msmodelslim analyze mixed`: the solver against brute force, the bit count against a hand count and against
the checkpoint quant writes from the plan, the error estimate against its definition, and early refusals."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import run_quant, small_calib
from tiny_models import make_tiny_model
from msmodelslim.app.mixed_budget import CandidateScheme, Choice, parse_schemes, solve
from msmodelslim.app.mixed_precision import MixedRequest, mixed_precision, scheme_error
from msmodelslim.cli.__main__ import main
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.quantizer.scheme import QConfig

MODEL_TYPE = "Llama-2-7B"
W4_G64, W8, FLOAT = CandidateScheme("w4a16_g64", 4, 64), CandidateScheme("w8a16", 8), CandidateScheme("float", 16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("mixed") / "llama")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    return small_calib(tmp_path_factory.mktemp("calib"))


def never(what: str):
    def fail(*_args, **_kwargs):
        raise AssertionError(f"{what} was called")
    return fail


# ---- solver -----------------------------------------------------------------------------------------------
def brute_force(choices: list[Choice], budget: float) -> float:
    """The least total error over every combination that fits (inf if none does)."""
    best = float("inf")
    for picks in itertools.product(*(range(len(c.costs)) for c in choices)):
        if sum(c.costs[p] for c, p in zip(choices, picks)) <= budget:
            best = min(best, sum(c.errors[p] for c, p in zip(choices, picks)))
    return best


def random_instance(rng: random.Random, items: int) -> list[Choice]:
    """Three schemes per item: cheap and lossy, middle, dear and exact (costs need not be ordered like errors)."""
    choices = []
    for _ in range(items):
        costs = (rng.randint(3, 9), rng.randint(8, 20), rng.randint(18, 30))
        errors = (rng.uniform(1, 10), rng.uniform(0, 3), 0.0)
        choices.append(Choice((0, 1, 2), costs, errors))
    return choices


@pytest.mark.parametrize("seed", range(6))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    choices = random_instance(rng, 6)
    cheapest, dearest = sum(min(c.costs) for c in choices), sum(max(c.costs) for c in choices)
    for budget in range(cheapest, dearest + 1, 3):
        solution = solve(choices, budget)
        assert solution.bits <= budget
        assert solution.bits == sum(c.costs[p] for c, p in zip(choices, solution.picks))
        assert solution.error == pytest.approx(brute_force(choices, budget), abs=1e-12)


def test_solver_with_coarse_units_stays_within_budget():
    """A room larger than the resolution is solved in rounded-up units: never over budget, close to optimal."""
    rng = random.Random(7)
    choices = random_instance(rng, 6)
    cheapest = sum(min(c.costs) for c in choices)
    for room in (10, 25, 40):
        solution = solve(choices, cheapest + room, resolution=4)
        assert solution.bits <= cheapest + room
        assert solution.error >= brute_force(choices, cheapest + room) - 1e-12


def test_solver_refuses_budget_below_cheapest():
    choices = random_instance(random.Random(1), 3)
    with pytest.raises(ConfigError, match="below the cheapest plan"):
        solve(choices, sum(min(c.costs) for c in choices) - 1)


# ---- bits -------------------------------------------------------------------------------------------------
def test_bit_accounting_by_hand():
    # [128, 64]: W4A16 g64 = 4·8192 codes + 128 rows · 1 group · 32-bit scale + int64[2] shape
    assert W4_G64.stored_bits(128, 64) == 32768 + 4096 + 128
    # W8A16 = 8·8192 codes + 128 float32 scales + 128 float32 offsets
    assert W8.stored_bits(128, 64) == 65536 + 4096 + 4096
    assert FLOAT.stored_bits(128, 64) == 16 * 8192
    # SmolLM2's q_proj [576, 576]: 4.5 bits per weight plus 128 bits; W8A16 8 + 64/576
    assert W4_G64.stored_bits(576, 576) / (576 * 576) == pytest.approx(4.5 + 128 / 576 ** 2)
    assert W8.stored_bits(576, 576) / (576 * 576) == pytest.approx(8 + 64 / 576)


def test_schemes_are_checked():
    assert [s.name for s in parse_schemes("w4a16_g64, w8a16,float")] == ["w4a16_g64", "w8a16", "float"]
    with pytest.raises(ConfigError, match="one group_size per model"):
        parse_schemes("w4a16_g64,w4a16_g128,float")
    with pytest.raises(UnsupportedError, match="quantizes activations"):
        parse_schemes("w4a16_g64,w8a8")
    with pytest.raises(ConfigError, match="at least two"):
        parse_schemes("w8a16")
    with pytest.raises(ConfigError, match="unknown mixed precision scheme"):
        parse_schemes("w3a16,float")


# ---- the estimate -----------------------------------------------------------------------------------------
def test_scheme_error_is_the_summed_output_error():
    """trace(ΔW G ΔWᵀ) equals Σ_t ‖(Q(W) − W) x_t‖² computed token by token."""
    torch.manual_seed(0)
    weight, x = torch.randn(24, 128), torch.randn(50, 128) * torch.linspace(0.1, 3, 128)
    gram = (x.double().T @ x.double())
    spec = QConfig(dtype="int4", scope="per_group", symmetric=True, method="minmax", ext={"group_size": 64})
    from msmodelslim.quantizer.weight import fake_quantize_weight

    delta = fake_quantize_weight(weight, spec).double() - weight.double()
    reference = sum(float((delta @ x[t].double()).pow(2).sum()) for t in range(x.shape[0]))
    assert scheme_error(weight, gram, 50, W4_G64, "minmax") == pytest.approx(reference, rel=1e-9)
    assert scheme_error(weight, gram, 50, W8, "minmax") < reference  # 8 bits err less than 4
    assert scheme_error(weight, gram, 50, FLOAT, "minmax") == 0.0
    # GPTQ minimises this very quantity (given G's Hessian): it must score below round-to-nearest
    assert scheme_error(weight, gram, 50, W4_G64, "gptq") < 0.9 * reference


# ---- end to end -------------------------------------------------------------------------------------------
def checkpoint_bits(out: Path) -> dict[str, tuple[str, int, int]]:
    """{linear: (type, stored bits, weights)} from the files quant wrote: the quantized tensors as stored (bias
    excluded), FLOAT linears at 16 bits per weight (the accounting's deployment dtype)."""
    description = json.loads((out / "quant_model_description.json").read_text())
    tensors = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    result = {}
    for key, tag in description.items():
        if ".layers." not in key or not key.endswith((".weight", ".weight_packed")):
            continue
        linear = key.rsplit(".", 1)[0]
        if not any(linear.endswith(p) for p in ("_proj",)):
            continue
        if tag == "FLOAT":
            n, k = tensors[key].shape
            result[linear] = (tag, 16 * n * k, n * k)
            continue
        stored = sum(t.numel() * t.element_size() * 8 for name, t in tensors.items()
                     if name.rsplit(".", 1)[0] == linear and not name.endswith(".bias"))
        if tag == "W4A16":
            n, k = (int(v) for v in tensors[f"{linear}.weight_shape"])
        else:
            n, k = tensors[key].shape
        result[linear] = (tag, stored, n * k)
    return result


TAG = {"w4a16_g64": "W4A16", "w8a16": "W8A16", "float": "FLOAT"}


def test_plan_runs_through_quant_and_matches(tiny, calib, tmp_path, capsys):
    out = tmp_path / "plan"
    rc = main(["analyze", "mixed", "--model_type", MODEL_TYPE, "--model_path", str(tiny), "--device", "cpu",
               "--calib_dataset", calib, "--bits", "6", "--schemes", "w4a16_g64,w8a16,float", "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "predicted:" in printed and "uniform w4a16_g64" in printed
    report = json.loads((out / "mixed_precision.json").read_text())
    plan = {row["name"]: row["scheme"] for row in report["linears"]}
    assert len(plan) == 14  # 2 blocks x 7 linears
    assert {"w4a16_g64", "w8a16"} <= set(plan.values())  # a real mixture at 6 bits
    assert report["predicted_bits_per_weight"] <= 6
    # the estimate orders the uniform plans as it should, and the mixed plan beats uniform W4A16
    uniform = report["uniform"]
    assert uniform["w8a16"]["error"] < uniform["w4a16_g64"]["error"]
    assert report["predicted_error"] < uniform["w4a16_g64"]["error"]

    quantized = tmp_path / "quantized"
    run_quant(tiny, quantized, out / "mixed_precision.yaml")
    stored = checkpoint_bits(quantized)
    assert {n: tag for n, (tag, _, _) in stored.items()} == {n: TAG[s] for n, s in plan.items()}
    bits = {row["name"]: row["bits"] for row in report["linears"]}
    assert {n: b for n, (_, b, _) in stored.items()} == bits  # the accounting is what the writer stores
    average = sum(b for _, b, _ in stored.values()) / sum(w for _, _, w in stored.values())
    assert average == pytest.approx(report["predicted_bits_per_weight"])
    assert average <= 6


def test_generous_budget_keeps_everything_float(tiny, calib, tmp_path):
    result = mixed_precision(MixedRequest(MODEL_TYPE, tiny, bits=16, calib_dataset=calib, output=tmp_path / "o"))
    assert set(result.plan.values()) == {"float"} and result.predicted_error == 0.0


def test_impossible_budget_is_refused_before_any_weight_is_read(tiny, calib, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never("a weight read"))
    rc = main(["analyze", "mixed", "--model_type", MODEL_TYPE, "--model_path", str(tiny), "--device", "cpu",
               "--calib_dataset", calib, "--bits", "4", "--schemes", "w4a16_g64,w8a16,float",
               "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "--bits 4 is below the cheapest possible plan" in err and "w4a16_g64" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, expected", [
    ([], "needs --bits"),
    (["--bits", "5", "--metrics", "kurtosis"], "does not take --metrics"),
    (["--bits", "5", "--schemes", "w4a16_g64,w4a16_g32"], "one group_size per model"),
    (["--bits", "0"], "positive number of bits"),
])
def test_cli_refuses_bad_arguments(tiny, calib, capsys, monkeypatch, extra, expected):
    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never("a weight read"))
    rc = main(["analyze", "mixed", "--model_type", MODEL_TYPE, "--model_path", str(tiny), "--device", "cpu",
               "--calib_dataset", calib, *extra])
    assert rc != 0
    assert expected in capsys.readouterr().err


def test_gptq_plan_is_written_with_gptq_and_runs(tiny, calib, tmp_path):
    import yaml

    result = mixed_precision(MixedRequest(MODEL_TYPE, tiny, bits=6, weight_method="gptq", calib_dataset=calib,
                                          output=tmp_path / "plan"))
    config = yaml.safe_load(Path(result.files["config"]).read_text())
    rules = config["spec"]["process"]
    assert rules and all(r["qconfig"]["weight"]["method"] == "gptq" for r in rules)
    assert config["spec"]["dataset"] == str(Path(calib).resolve())  # GPTQ calibrates on the scoring data
    run_quant(tiny, tmp_path / "quantized", Path(result.files["config"]))
    description = json.loads((tmp_path / "quantized" / "quant_model_description.json").read_text())
    assert {description.get(f"{n}.weight", description.get(f"{n}.weight_packed")) for n in result.plan} \
        == {TAG[s] for s in result.plan.values()}


def test_ranking_scopes_refuse_the_budget_options(tiny, capsys):
    rc = main(["analyze", "layer", "--model_type", MODEL_TYPE, "--model_path", str(tiny), "--bits", "5"])
    assert rc != 0
    assert "belong to 'analyze mixed'" in capsys.readouterr().err
