"""GPTAQ (quantizer/gptaq.py, weight.ext.gptaq_alpha of gptq): its statistics and target against slow direct
formulas, the error it is meant to lower, and the pipeline that feeds it the float model's activations beside the
quantized ones (core/reference.py)."""
import pytest
import torch

from helpers import SCHEMES, run_quant, saved_tensors, small_calib, write_pipeline
from msmodelslim.core import runner
from msmodelslim.core.errors import ConfigError
from msmodelslim.core.reference import ReferenceStream
from msmodelslim.quantizer.gptaq import accumulate_asymmetry, asymmetric_target
from msmodelslim.quantizer.gptq import accumulate_hessian, gptq_quantize
from tiny_models import make_tiny_model

W4 = SCHEMES["w4a16_g16"]["weight"]


def gptq_step(alpha: float, include=("*",)) -> dict:
    weight = {**W4, "method": "gptq", "ext": {**W4.get("ext", {}), "gptaq_alpha": alpha}}
    return {"type": "linear_quant", "include": list(include), "exclude": ["lm_head"], "qconfig": {"weight": weight}}


# ---- the math -------------------------------------------------------------------------------------------------
def test_the_running_asymmetry_is_the_mean_over_all_tokens():
    torch.manual_seed(0)
    batches = [torch.randn(n, 12) for n in (5, 9, 3)]
    references = [x + 0.1 * torch.randn_like(x) for x in batches]
    d, h, count = None, None, 0
    for x, r in zip(batches, references):
        d = accumulate_asymmetry(d, count, x, r)
        h, count = accumulate_hessian(h, count, x)
    x, r = torch.cat(batches).double(), torch.cat(references).double()
    assert torch.allclose(d, 2 * (r - x).T @ x / x.shape[0], atol=1e-12)
    assert torch.allclose(h, 2 * x.T @ x / x.shape[0], atol=1e-12)
    # no reference: counted as no difference, the mean still over every token
    assert torch.allclose(accumulate_asymmetry(d, count, x, None), d * count / (count + x.shape[0]))


def test_the_full_target_is_the_least_squares_fit_to_the_float_output():
    """alpha 1: W* = argmin ‖W·X − Ŵ·X̃‖ over every real Ŵ, from a direct least-squares solve."""
    torch.manual_seed(1)
    w = torch.randn(6, 10, dtype=torch.float64)
    x = torch.randn(400, 10, dtype=torch.float64)  # rows are tokens
    x_quantized = x + 0.2 * torch.randn_like(x) + 0.3 * x.roll(1, dims=1)
    h, _ = accumulate_hessian(None, 0, x_quantized)
    d = accumulate_asymmetry(None, 0, x_quantized, x)
    target = asymmetric_target(w, h, d, alpha=1.0, percdamp=1e-12)
    direct = torch.linalg.lstsq(x_quantized, x @ w.T).solution.T
    assert torch.allclose(target.double(), direct, atol=1e-5)
    assert torch.equal(asymmetric_target(w, h, torch.zeros_like(d), 0.25, 0.01), w.float())  # no difference: W


@pytest.mark.parametrize("quantized_input", [False, True])
def test_the_low_rank_pair_reads_the_unquantized_input(quantized_input):
    """A residual R served beside a float pair L, which reads the unquantized input X̃u while R reads Q (= X̃u
    without activation quantization): R* = argmin ‖(R + L)·X − R̂·Q − L·X̃u‖, from a direct least-squares solve."""
    torch.manual_seed(2)
    residual, pair = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    x = torch.randn(300, 8, dtype=torch.float64)
    x_unquantized = 1.1 * x + 0.1 * torch.randn_like(x)
    q = (x_unquantized * 4).round() / 4 if quantized_input else x_unquantized
    h, _ = accumulate_hessian(None, 0, q)
    d = accumulate_asymmetry(None, 0, q, x)
    error = accumulate_asymmetry(None, 0, q, x_unquantized) if quantized_input else None
    target = asymmetric_target(residual, h, d, 1.0, 1e-12, lowrank=pair, input_error=error)
    direct = torch.linalg.lstsq(q, x @ (residual + pair).T - x_unquantized @ pair.T).solution.T
    assert torch.allclose(target.double(), direct, atol=1e-5)


def test_gptq_on_the_target_lowers_the_error_against_the_float_output():
    torch.manual_seed(3)
    w = torch.randn(32, 64)
    x = torch.randn(2048, 64) * torch.linspace(0.2, 3.0, 64)
    x_quantized = x + 0.15 * x.std() * torch.randn_like(x) + 0.1 * x.roll(3, dims=1)
    h, _ = accumulate_hessian(None, 0, x_quantized)
    d = accumulate_asymmetry(None, 0, x_quantized, x)

    def error(target: torch.Tensor) -> float:
        codes, scale, offset = gptq_quantize(target, h, bits=4, symmetric=False, group_size=16)
        dequantized = (codes.float() - offset.repeat_interleave(16, 1)) * scale.repeat_interleave(16, 1)
        return float((x @ w.T - x_quantized @ dequantized.T).square().mean())

    plain, full = error(w), error(asymmetric_target(w, h, d, 1.0, 0.01))
    assert full < 0.8 * plain, (plain, full)


@pytest.mark.parametrize("ext, message", [({"gptaq_alpha": 1.5}, "gptaq_alpha"), ({"gptaq_alpha": "a"}, "gptaq_alpha"),
                                          ({"gptaq_alpha": 0.25, "percdamp": -1}, "percdamp")])
def test_bad_alpha_is_refused_by_name(ext, message):
    from msmodelslim.quantizer.scheme import LinearQConfig

    with pytest.raises(ValueError, match=message):
        LinearQConfig.model_validate({"weight": {**W4, "method": "gptq", "ext": {**W4["ext"], **ext}}})


# ---- the pipeline ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gptaq") / "src", "llama", seed=5)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    return small_calib(tmp_path_factory.mktemp("calib"))


def quantize(source, tmp_path, name, process, calib, next_block_inputs="quantized"):
    calibration = {"early_stop": False, "next_block_inputs": next_block_inputs}
    out = tmp_path / name
    run_quant(source, out, write_pipeline(tmp_path / f"{name}.yaml", process, calib, calibration=calibration))
    return out


def test_without_quantized_inputs_it_is_refused_before_any_weight_is_read(source, calib, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr("msmodelslim.model.checkpoint.SafetensorsCheckpoint.load", never)
    with pytest.raises(ConfigError) as refused:
        quantize(source, tmp_path, "refused", [gptq_step(0.25)], calib, next_block_inputs="float")
    message = str(refused.value)
    assert "gptaq_alpha" in message and "next_block_inputs: quantized" in message, message
    assert not (tmp_path / "refused").exists()


def test_alpha_zero_is_plain_gptq_and_alpha_changes_the_later_blocks(source, calib, tmp_path):
    plain = saved_tensors(quantize(source, tmp_path, "plain", [gptq_step(0.0)], calib))
    fitted = saved_tensors(quantize(source, tmp_path, "fitted", [gptq_step(0.25)], calib))
    first = [k for k in plain if k.startswith("model.layers.0.") and k.endswith(".weight_packed")]
    later = [k for k in plain if k.startswith("model.layers.1.") and k.endswith(".weight_packed")]
    assert first and later
    # block 0: both streams start from the embeddings, and one step's forward sees no quantized layer
    assert all(torch.equal(plain[k], fitted[k]) for k in first)
    assert any(not torch.equal(plain[k], fitted[k]) for k in later)


def test_the_float_stream_is_the_float_models_hidden_states(source, calib, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    streams, first_requests = [], []
    real_advance, real_process = ReferenceStream.advance, runner.process_block

    def advance(self, outputs):
        streams.append([runner.block_hidden_state(o).clone() for o in outputs])
        real_advance(self, outputs)

    def process_block(name, block, processors, requests, *args, **kwargs):
        if not first_requests:
            first_requests.extend((r.args, dict(r.kwargs)) for r in requests)
        return real_process(name, block, processors, requests, *args, **kwargs)

    monkeypatch.setattr(ReferenceStream, "advance", advance)
    monkeypatch.setattr(runner, "process_block", process_block)
    quantize(source, tmp_path, "streams", [gptq_step(0.25, ["*q_proj", "*k_proj", "*v_proj"]),
                                           gptq_step(0.25, ["*o_proj", "*gate_proj", "*up_proj", "*down_proj"])],
             calib)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = [args[0] for args, _ in first_requests]
    assert len(streams) == len(model.model.layers)
    with torch.no_grad():
        for layer, stream in zip(model.model.layers, streams):
            expected = [runner.block_hidden_state(layer(x, *args[1:], **kwargs))
                        for x, (args, kwargs) in zip(expected, first_requests)]
            for got, want in zip(stream, expected):
                assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_dry_run_times_the_float_blocks_forward_and_says_so(source, calib, tmp_path, monkeypatch):
    from msmodelslim.core import reference

    paired = []
    real = reference.Pairing.__call__

    def counted(self, index, request):
        paired.append(index)
        return real(self, index, request)

    monkeypatch.setattr(reference.Pairing, "__call__", counted)
    config = write_pipeline(tmp_path / "c.yaml", [gptq_step(0.25)], calib, calibration={"next_block_inputs": "quantized"})
    estimate = run_quant(source, tmp_path / "dry", config, dry_run=True, estimate=True).estimate
    assert not (tmp_path / "dry").exists()
    assert any("GPTAQ" in a for a in estimate.assumptions)
    assert paired  # the timed block forwarded the float stream too


def test_the_diffusion_service_refuses_it_by_name():
    from msmodelslim.core.sd_config import parse_sd_config

    step = gptq_step(0.25)
    with pytest.raises(ConfigError, match="gptaq_alpha .*diffusion runner does not"):
        parse_sd_config({"apiversion": "multimodal_sd_modelslim_v1", "spec": {"process": [step]}})


def test_the_quantized_models_input_is_quantized_as_the_kernel_will():
    """For a scheme whose kernel quantizes its input at run time (per token, per block), X̃ is that quantized
    input: H̃ and ΔX·X̃ᵀ are taken on what the layer will read."""
    from msmodelslim.ir.quant_linear import run_time_input_quantizer
    from msmodelslim.processor.linear_quant.processor import InputRecord
    from msmodelslim.quantizer.primitives import quantize_per_token_dynamic
    from msmodelslim.quantizer.scheme import Scheme

    torch.manual_seed(4)
    x, reference = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    quantizer = run_time_input_quantizer(Scheme.W4A4_DYNAMIC)
    record = InputRecord(collect_hessian=True, collect_asymmetry=True, input_quantizer=quantizer)
    record.references.append(reference)
    record.update(x)
    x_quantized = quantize_per_token_dynamic(x, 4)
    assert not torch.equal(x_quantized, x)
    assert torch.allclose(record.hessian, accumulate_hessian(None, 0, x_quantized)[0])
    assert torch.allclose(record.asymmetry, accumulate_asymmetry(None, 0, x_quantized, reference))
    assert run_time_input_quantizer(Scheme.W4A16) is None and run_time_input_quantizer(Scheme.W8A8) is None


@pytest.mark.parametrize("act, quantized", [(None, False), (SCHEMES["w8a8_dynamic"]["act"], True)])
def test_the_records_quantize_inputs_only_for_run_time_schemes(act, quantized):
    from msmodelslim.processor.linear_quant.config import LinearQuantConfig
    from msmodelslim.processor.linear_quant.processor import LinearQuantProcessor

    step = gptq_step(0.25)
    if act is not None:
        step["qconfig"] = {"weight": {**SCHEMES["w8a8_dynamic"]["weight"], "method": "gptq", "ext": {"gptaq_alpha": 0.25}},
                           "act": act}
    processor = LinearQuantProcessor(LinearQuantConfig.model_validate(step))
    block = torch.nn.Sequential(torch.nn.Linear(16, 8))
    processor.before_forward("block", block)
    record = processor._records["block.0"]
    assert record.collect_asymmetry and (record.input_quantizer is not None) == quantized
    for hook in processor._hooks:
        hook.remove()


def test_w4a4_with_svd_res_runs_and_reads_back(source, calib, tmp_path):
    """Run-time int4 activations (X̃ quantized per token) beside svd_res's float pair: quantized, saved, and read
    back by the independent reader into a model that still predicts like the float one."""
    from reference_reader import load_reference_model
    from transformers import AutoModelForCausalLM

    w4a4 = SCHEMES["w4a4_dynamic"]
    weight = {**w4a4["weight"], "method": "gptq", "ext": {**w4a4["weight"].get("ext", {}), "gptaq_alpha": 0.25}}
    process = [{"type": "svd_res", "rank": 4, "exclude": ["lm_head"]},
               {"type": "linear_quant", "exclude": ["lm_head"], "qconfig": {"act": w4a4["act"], "weight": weight}}]
    out = quantize(source, tmp_path, "w4a4_svd", process, calib)
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got = load_reference_model(out).float().eval()(input_ids=ids).logits
        want = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()(input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9
