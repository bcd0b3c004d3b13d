"""`spec.calibration.precision` (issue #26 item 5): with bfloat16, range-only calibration forwards (smoothing's max
|x|, static min/max ranges) run under bfloat16 autocast; every other forward stays float32 and the run says so; the
hidden states handed to the next block stay float32. `auto` is bfloat16 where the CPU has bfloat16 units and a
step collects only ranges, float32 elsewhere, and the saved practice records the choice; the default, float32,
changes nothing."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from helpers import SCHEMES, run_quant, write_pipeline, saved_tensors, output_file_bytes
from msmodelslim.core.device import DeviceSpec
from msmodelslim.core import runner
from msmodelslim.core.calibration import ReducedPrecision
from msmodelslim.core.config import CalibrationConfig
from msmodelslim.core.errors import ConfigError
from msmodelslim.processor.base import Processor
from msmodelslim.processor.linear_quant import processor as linear_quant_processor
from msmodelslim.processor.smooth_quant.base import InputStats
from reference_reader import load_reference_model
from tiny_models import make_tiny_model

SMOOTH = {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear", "ov", "up-down"]}
DYNAMIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}
STATIC = {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "exclude": ["lm_head"]}
GPTQ = {"type": "linear_quant", "exclude": ["lm_head"],
        "qconfig": {**SCHEMES["w8a8_dynamic"], "weight": {**SCHEMES["w8a8_dynamic"]["weight"], "method": "gptq"}}}
DECLINED = "spec.calibration.precision bfloat16 does not apply to spec.process"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("precision") / "src", "llama", seed=5)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    texts = [f"Sample {i}: " + "word " * i + f"quantization maps floats to int8, apt installs package {i * 7}."
             for i in range(6)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return str(path)


def write(path, process, dataset, runner_type="layer_wise", precision=None):
    calibration = {"early_stop": False} if precision is None else {"early_stop": False, "precision": precision}
    return write_pipeline(path, process, dataset, runner_type, calibration)


def quantize(source, tmp_path, name, process, calib, precision=None, runner_type="layer_wise", **kwargs):
    out = tmp_path / name
    run_quant(source, out, write(tmp_path / f"{name}.yaml", process, calib, runner_type, precision), **kwargs)
    return out


@pytest.fixture
def forwards_seen(monkeypatch):
    """Per calibration forward: (block, autocast on?, dtypes of the hidden states in, dtypes of those out)."""
    seen = []
    real = runner._forward_all

    def spied(block_name, requests, *args, **kwargs):
        autocast = torch.is_autocast_enabled("cpu")
        outputs = real(block_name, requests, *args, **kwargs)
        seen.append((block_name, autocast, {r.args[0].dtype for r in requests},
                     {runner.block_hidden_state(o).dtype for o in outputs}))
        return outputs

    monkeypatch.setattr(runner, "_forward_all", spied)
    return seen


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def relative_norm(difference: torch.Tensor, reference: torch.Tensor) -> float:
    return float(difference.norm() / reference.norm())


# ---- the option -------------------------------------------------------------------------------------------------
@pytest.fixture
def bfloat16_units(monkeypatch):
    """Set whether this CPU multiplies bfloat16 in hardware (what `auto` asks), whatever the test machine has."""
    def set_units(present: bool) -> None:
        monkeypatch.setattr("msmodelslim.core.device.cpu_has_native_bfloat16", lambda: present)
    return set_units


def test_default_is_float32_and_auto_settles_by_the_hardware_and_the_steps(bfloat16_units):
    cpu = torch.device("cpu")
    bfloat16_units(True)
    assert CalibrationConfig().precision == "float32"
    assert CalibrationConfig().resolved(cpu, ranges_only_step=True).reduced_precision() is None
    auto = CalibrationConfig(precision="auto")
    with pytest.raises(ValueError, match="resolved"):
        auto.reduced_precision()
    chosen = auto.resolved(cpu, ranges_only_step=True)
    assert chosen.precision == "bfloat16" and chosen.reduced_precision().chosen
    # no step collects only ranges (GPTQ alone): no forward could use it, so the run records float32
    assert auto.resolved(cpu, ranges_only_step=False).precision == "float32"
    bfloat16_units(False)  # emulated bfloat16 is slower than float32: auto never picks it
    assert auto.resolved(cpu, ranges_only_step=True).reduced_precision() is None
    # an explicit setting is kept as written, on any hardware
    asked = CalibrationConfig(precision="bfloat16").resolved(cpu, ranges_only_step=False).reduced_precision()
    assert asked.dtype == torch.bfloat16 and not asked.chosen
    assert CalibrationConfig(precision="float32").resolved(cpu, True).reduced_precision() is None


@pytest.mark.parametrize("value", ["fp16", "half", "float16", "bf16", 16])
def test_a_bad_precision_is_refused_before_any_weight_is_read(source, calib, tmp_path, monkeypatch, value):
    def never(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)
    with pytest.raises(ConfigError) as refused:
        quantize(source, tmp_path, "bad", [SMOOTH, DYNAMIC], calib, precision=value)
    message = str(refused.value)
    assert "spec.calibration.precision" in message and "'float32'" in message and "'bfloat16'" in message, message
    assert not (tmp_path / "bad").exists()


def test_float32_written_out_is_byte_identical_to_the_default(source, calib, tmp_path, forwards_seen):
    default = quantize(source, tmp_path, "default", [SMOOTH, STATIC], calib)
    explicit = quantize(source, tmp_path, "float32", [SMOOTH, STATIC], calib, precision="float32")
    assert output_file_bytes(default) == output_file_bytes(explicit)
    # the saved practice (and the resume fingerprint hashing it) of a float32 run is the one written before the
    # field existed
    practice = yaml.safe_load((explicit / "Llama-2-7B_best_practice.yaml").read_text())
    assert "precision" not in practice["spec"]["calibration"]
    assert forwards_seen and not any(autocast for _, autocast, _, _ in forwards_seen)


@pytest.mark.parametrize("units", [False, True])
def test_auto_writes_what_the_precision_it_chose_writes_and_records_it(source, calib, tmp_path, forwards_seen,
                                                                       bfloat16_units, caplog, units):
    bfloat16_units(units)
    chosen = "bfloat16" if units else "float32"
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        auto = quantize(source, tmp_path, "auto", [SMOOTH, STATIC], calib, precision="auto")
    said = "this CPU multiplies bfloat16 in hardware" if units else "no bfloat16 matmul units on this CPU"
    assert f"spec.calibration.precision auto: {chosen} ({said})" in caplog.text
    assert forwards_seen and all(autocast == units for _, autocast, _, _ in forwards_seen)
    explicit = quantize(source, tmp_path, chosen, [SMOOTH, STATIC], calib, precision=chosen)
    assert output_file_bytes(auto) == output_file_bytes(explicit)
    # the saved practice (and the resume fingerprint hashing it) says what the run computed in (float32: the
    # default, left out), so that it reproduces the output on a machine that would settle auto otherwise
    practice = yaml.safe_load((auto / "Llama-2-7B_best_practice.yaml").read_text())
    assert practice["spec"]["calibration"].get("precision", "float32") == chosen


def test_auto_with_bfloat16_units_says_nothing_about_steps_it_does_not_apply_to(source, calib, tmp_path,
                                                                                bfloat16_units, caplog):
    bfloat16_units(True)
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        quantize(source, tmp_path, "auto", [SMOOTH, GPTQ], calib, precision="auto")
    assert DECLINED not in caplog.text  # the user did not ask for bfloat16: GPTQ staying float32 is not news
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        quantize(source, tmp_path, "asked", [SMOOTH, GPTQ], calib, precision="bfloat16")
    assert DECLINED in caplog.text


# ---- range-only forwards in bfloat16 ----------------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["dynamic", "static"])
@pytest.mark.parametrize("runner_type", ["layer_wise", "model_wise"])
def test_range_only_forwards_run_in_bfloat16_and_stay_close(source, calib, tmp_path, forwards_seen, caplog, quant,
                                                             runner_type):
    process = [SMOOTH, DYNAMIC if quant == "dynamic" else STATIC]
    exact = quantize(source, tmp_path, "float32", process, calib, "float32", runner_type=runner_type)
    assert not any(autocast for _, autocast, _, _ in forwards_seen)
    forwards_seen.clear()
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        reduced = quantize(source, tmp_path, "bfloat16", process, calib, "bfloat16", runner_type)
    assert DECLINED not in caplog.text  # every forward here is range-only
    practice = yaml.safe_load((reduced / "Llama-2-7B_best_practice.yaml").read_text())
    assert practice["spec"]["calibration"]["precision"] == "bfloat16"
    # one forward per block (smoothing's; static ranges come from its per-channel ranges), under autocast, fed and
    # feeding float32 hidden states
    assert [b for b, *_ in forwards_seen] == ["model.layers.0", "model.layers.1"]
    for block, autocast, inputs, outputs in forwards_seen:
        assert autocast and inputs == {torch.float32} and outputs == {torch.float32}, block

    a, b = saved_tensors(reduced), saved_tensors(exact)
    assert a.keys() == b.keys()
    # the smoothing scales live in the float norm weights they were folded into; static ranges in input_scale
    folded = [n for n in b if n.endswith("layernorm.weight") and ".layers." in n]
    compared = folded + [n for n in b if n.endswith("input_scale")]
    assert len(folded) == 4 and (quant == "dynamic" or len(compared) > len(folded))
    differences = {n: relative_difference(a[n], b[n]) for n in compared}
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %): the extremes of rounded activations move
    # the scales by about that, compounded over the blocks; an option ignored would leave them equal
    assert max(differences.values()) > 0, differences
    assert max(differences.values()) < 2e-2, differences
    for name in b:  # everything else the run wrote has the same dtype
        assert a[name].dtype == b[name].dtype, name

    # Measured (seed 5, 2 blocks): scales within 0.44 % (dynamic) and 0.44 % (static); the logits of the two
    # dequantized models 2.6 % / 2.3 % apart (relative norm), about the size of the quantization error itself (another
    # rounding of the int8 weights), while each run's error against the float model is the same to within 2 %.
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_reduced = load_reference_model(reduced)(input_ids=ids).logits
        logits_exact = load_reference_model(exact)(input_ids=ids).logits
        logits_float = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()(input_ids=ids).logits
    assert relative_norm(logits_reduced - logits_exact, logits_exact) < 5e-2
    error_reduced = relative_norm(logits_reduced - logits_float, logits_float)
    error_exact = relative_norm(logits_exact - logits_float, logits_float)
    assert error_reduced < 1.1 * error_exact, (error_reduced, error_exact)


def test_dp_layer_wise_ranks_calibrate_in_bfloat16_too(source, calib, tmp_path):
    """Max statistics merge exactly over ranks, so two CPU ranks write the single process's bytes: those of the
    bfloat16 run, which differ from the float32 run's (the setting reached every rank)."""
    process = [SMOOTH, STATIC]
    single = saved_tensors(quantize(source, tmp_path, "single", process, calib, "bfloat16"))
    exact = saved_tensors(quantize(source, tmp_path, "float32", process, calib, "float32"))
    ranks = saved_tensors(quantize(source, tmp_path, "dp", process, calib, "bfloat16", "dp_layer_wise",
                                     device=DeviceSpec("cpu", (0, 1))))
    assert ranks.keys() == single.keys()
    for name in single:
        assert torch.equal(ranks[name], single[name]), name
    assert any(not torch.equal(single[n], exact[n]) for n in single if n.endswith("input_scale"))


def test_a_dry_run_times_the_forwards_in_the_precision_of_the_run(source, calib, tmp_path, forwards_seen):
    config = write(tmp_path / "dry.yaml", [SMOOTH, STATIC], calib, precision="bfloat16")
    estimate = run_quant(source, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    assert forwards_seen and all(autocast for _, autocast, _, _ in forwards_seen)
    assert any("precision bfloat16" in a for a in estimate.assumptions), estimate.assumptions


# ---- other statistics stay float32 ------------------------------------------------------------------------------
@pytest.fixture
def autocast_in_hooks(monkeypatch):
    """Whether autocast was on whenever smoothing recorded an input and whenever GPTQ accumulated a Hessian."""
    seen = {"smoothing": [], "hessian": []}
    real_update, real_accumulate = InputStats.update, linear_quant_processor.accumulate_hessian

    def update(self, x):
        seen["smoothing"].append(torch.is_autocast_enabled("cpu"))
        return real_update(self, x)

    def accumulate(hessian, tokens, x):
        seen["hessian"].append((torch.is_autocast_enabled("cpu"), x.dtype))
        return real_accumulate(hessian, tokens, x)

    monkeypatch.setattr(InputStats, "update", update)
    monkeypatch.setattr(linear_quant_processor, "accumulate_hessian", accumulate)
    return seen


def test_a_gptq_forward_runs_in_float32_and_the_run_says_so(source, calib, tmp_path, autocast_in_hooks, caplog):
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        quantize(source, tmp_path, "mixed", [SMOOTH, GPTQ], calib, precision="bfloat16")
    assert autocast_in_hooks["smoothing"] and all(autocast_in_hooks["smoothing"])
    assert autocast_in_hooks["hessian"] and all(not on and dtype == torch.float32
                                                for on, dtype in autocast_in_hooks["hessian"])
    declined = [r.getMessage() for r in caplog.records if DECLINED in r.getMessage()]
    assert len(declined) == 1, declined  # once per run, not once per block
    assert "spec.process[1] (linear_quant)" in declined[0] and "GPTQ" in declined[0] and "float32" in declined[0]


def test_a_gptq_only_run_is_byte_identical_to_float32(source, calib, tmp_path, caplog):
    exact = quantize(source, tmp_path, "float32", [GPTQ], calib)
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        reduced = quantize(source, tmp_path, "bfloat16", [GPTQ], calib, precision="bfloat16")
    assert sum(DECLINED in r.getMessage() for r in caplog.records) == 1
    exact_tensors, reduced_tensors = saved_tensors(exact), saved_tensors(reduced)
    assert exact_tensors.keys() == reduced_tensors.keys()
    for name in exact_tensors:
        assert torch.equal(exact_tensors[name], reduced_tensors[name]), name


# ---- the runner's pieces ----------------------------------------------------------------------------------------
class RangeOnly(Processor):
    """Collects nothing; declares its statistics range-only (as static min/max ranges are)."""

    range_statistics = True

    @property
    def needs_calibration(self) -> bool:
        return True

    def claims(self, linear_names):
        return {}

    def after_forward(self, block_name, block):
        pass


def test_block_outputs_that_autocast_left_in_bfloat16_go_back_to_float32():
    """A block whose output is a matmul's (no float32 residual to promote it back) would hand the next block
    bfloat16 under autocast: the runner casts it back, keeping bfloat16's rounding."""
    torch.manual_seed(0)
    block = nn.Linear(16, 16)
    x = torch.randn(3, 5, 16)
    request = SimpleNamespace(name="b", module=block, args=(x,), kwargs={})
    with torch.no_grad():
        exact = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = block(x)
    assert rounded.dtype == torch.bfloat16  # what the next block would otherwise get
    outputs = runner.process_block("b", block, [RangeOnly()], [request], precision=ReducedPrecision())
    assert outputs[0].dtype == torch.float32
    assert torch.equal(outputs[0], rounded.float()) and not torch.equal(outputs[0], exact)
    default = runner.process_block("b", block, [RangeOnly()], [request])
    assert torch.equal(default[0], exact)


# ---- a CPU without bfloat16 units -------------------------------------------------------------------------------
EMULATED = "this CPU has no bfloat16 matmul units"


@pytest.mark.parametrize("native", [False, True])
def test_a_cpu_without_bfloat16_units_is_warned_once_and_the_setting_still_applies(source, calib, tmp_path, monkeypatch,
                                                                                    forwards_seen, caplog, native):
    monkeypatch.setattr(runner, "cpu_has_native_bfloat16", lambda: native)
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        quantize(source, tmp_path, "bfloat16", [SMOOTH, DYNAMIC], calib, precision="bfloat16")
    warnings = [r for r in caplog.records if EMULATED in r.getMessage()]
    assert len(warnings) == (0 if native else 1), [r.getMessage() for r in warnings]  # once per run, not per block
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert forwards_seen and all(autocast for _, autocast, _, _ in forwards_seen)


@pytest.mark.parametrize("precision", [None, "float32", "auto"])
def test_float32_and_auto_runs_are_never_warned_about_bfloat16_units(source, calib, tmp_path, monkeypatch, caplog,
                                                                     bfloat16_units, forwards_seen, precision):
    monkeypatch.setattr(runner, "cpu_has_native_bfloat16", lambda: False)
    bfloat16_units(False)
    with caplog.at_level(logging.INFO, logger="msmodelslim"):
        quantize(source, tmp_path, "float32", [SMOOTH, DYNAMIC], calib, precision)
    assert EMULATED not in caplog.text
    assert forwards_seen and not any(autocast for _, autocast, _, _ in forwards_seen)
