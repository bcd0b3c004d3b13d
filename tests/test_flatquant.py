"""FlatQuant (`flatquant`, then linear_quant W4A4_DYNAMIC): the transform and the kernel's quantization against slow
references, the loader's factor rule, training that lowers the block's error, the saved W4A4_FLATQUANT_DYNAMIC
layers read back by both readers and checked, and the refusals before any weight is read."""
import json

import pytest
import torch
import yaml

from helpers import SCHEMES, run_quant, saved_tensors, small_calib, write_pipeline
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.flat_transform import (CLIP_RATIO, LEFT_TRANS, RIGHT_TRANS, attach_flat_transform,
                                           clipped_mxfp4, clipped_per_token_int4, decompose_dim, flat_dims,
                                           transform_input, transform_weight)
from msmodelslim.processor.flatquant.train import FlatTrainLinear, GroupTransform, fake_quant_rows
from reference_reader import load_reference_model

FLAT_STEPS = [{"type": "flatquant", "exclude": ["lm_head"]},
              {"type": "linear_quant", "qconfig": SCHEMES["w4a4_dynamic"], "exclude": ["lm_head"]}]


def slow_decompose(n: int) -> tuple[int, int]:
    """The factor pair (a, b), a <= b, a·b = n, a and b of equal parity, with the smallest b − a: every divisor."""
    return min(((a, n // a) for a in range(1, n + 1) if n % a == 0 and a <= n // a and (n // a - a) % 2 == 0),
               key=lambda p: p[1] - p[0])


def slow_transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """x' = x·(L ⊗ R), the Kronecker product written out entry by entry: (L ⊗ R)[i·b + j, k·b + l] = L[i, k]·R[j, l]."""
    a, b = left.shape[0], right.shape[0]
    kron = torch.zeros(a * b, a * b, dtype=x.dtype)
    for i in range(a):
        for j in range(b):
            for k in range(a):
                for m in range(b):
                    kron[i * b + j, k * b + m] = left[i, k] * right[j, m]
    return x @ kron


def slow_clipped_int4(x: torch.Tensor, clip: float) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        s = max(abs(float(v)) for v in x[t]) * clip / 7
        if s == 0:
            continue  # an all-zero token
        for k in range(x.shape[1]):
            out[t, k] = min(max(round(float(x[t, k]) / s), -8), 7) * s
    return out


@pytest.mark.parametrize("n", [1, 7, 12, 64, 96, 576, 1536, 4096, 11008, 13, 45])
def test_factor_pair_is_the_loaders(n):
    assert decompose_dim(n) == slow_decompose(n)
    assert decompose_dim(576) == (24, 24) and decompose_dim(1536) == (32, 48) and decompose_dim(12) == (2, 6)


@pytest.mark.parametrize("n", [2, 6, 10, 4098])
def test_sizes_without_a_factor_pair_of_equal_parity_are_refused(n):
    with pytest.raises(ValueError, match="has no FlatQuant factor pair"):
        decompose_dim(n)


def test_transform_matches_the_written_out_kronecker_product_and_the_weight_absorbs_its_inverse():
    g = torch.Generator().manual_seed(0)
    left = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    right = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    assert torch.allclose(transform_input(x, left, right), slow_transform(x, left, right), atol=1e-10)
    y = transform_input(x, left, right) @ transform_weight(w, left, right).T
    assert torch.allclose(y, x @ w.T, atol=1e-9)


def test_clipped_int4_is_the_kernels_per_token_rule():
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(1))
    x[0] = 0.0  # an all-zero token stays zero
    for clip in (1.0, 0.9, 0.5):
        assert torch.allclose(clipped_per_token_int4(x, torch.tensor([clip])), slow_clipped_int4(x, clip), atol=1e-6)


def test_a_transformed_linear_computes_the_same_in_float_and_its_hooks_see_the_transformed_input():
    linear = torch.nn.Linear(15, 5, dtype=torch.float64)
    x = torch.randn(3, 15, dtype=torch.float64)
    expected = linear(x)
    transform = {LEFT_TRANS: torch.randn(3, 3) + 2 * torch.eye(3), RIGHT_TRANS: torch.randn(5, 5) + 2 * torch.eye(5),
                 CLIP_RATIO: torch.tensor([0.9])}
    attach_flat_transform(linear, transform)
    seen = []
    linear.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    assert torch.allclose(linear(x), expected, atol=1e-5)
    assert torch.allclose(seen[0], transform_input(x, transform[LEFT_TRANS].double(), transform[RIGHT_TRANS].double()),
                          atol=1e-5)
    with pytest.raises(ValueError, match="already has a FlatQuant transform"):
        attach_flat_transform(linear, transform)
    with pytest.raises(ValueError, match=r"left_trans must be \[3, 3\]"):
        attach_flat_transform(torch.nn.Linear(15, 5), {**transform, LEFT_TRANS: torch.eye(2)})
    with pytest.raises(ValueError, match="clip_ratio must be one value in"):
        attach_flat_transform(torch.nn.Linear(15, 5), {**transform, CLIP_RATIO: torch.tensor([1.5])})


def test_the_trained_parameterisation_is_invertible_and_its_weight_rounding_is_min_max_of_the_clamped_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 6)
    group = GroupTransform(flat_dims(12), torch.Generator().manual_seed(0), clip_init=4.0)
    with torch.no_grad():  # move away from the orthogonal start: the inverse must still be exact
        group.left.sigma.mul_(torch.tensor([0.5, 2.0]))
    wrapped = FlatTrainLinear(linear, group, clip_init=4.0)
    learned = group.learned()
    x = torch.randn(2, 12)
    w_t = wrapped.transformed_weight().detach()
    assert torch.allclose(transform_input(x, learned[LEFT_TRANS], learned[RIGHT_TRANS]) @ w_t.T,
                          x @ linear.weight.detach().T, atol=1e-4)
    clip = wrapped.weight_clip()
    bound = w_t.abs().amax(dim=1, keepdim=True) * clip.reshape(-1, 1)
    clamped = torch.maximum(torch.minimum(w_t, bound), -bound)
    scale = clamped.abs().amax(dim=1, keepdim=True) / 7  # linear_quant's min/max on the clamped weight
    assert torch.allclose(fake_quant_rows(w_t, clip), torch.round(clamped / scale) * scale, atol=1e-6)


@pytest.fixture(scope="module")
def flat_run(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flat")
    config = write_pipeline(tmp / "flat.yaml", FLAT_STEPS, dataset=small_calib(tmp))
    out = tmp / "out"
    run_quant(tiny_llama, out, config)
    return tiny_llama, out


def test_saved_layers_are_flatquant_typed_and_both_readers_compute_the_same(flat_run):
    source, out = flat_run
    description = json.loads((out / "quant_model_description.json").read_text())
    tensors = saved_tensors(out)
    q = "model.layers.0.self_attn.q_proj"
    assert description[f"{q}.weight"] == "W4A4_FLATQUANT_DYNAMIC"
    assert description[f"{q}.clip_ratio"] == "W4A4_FLATQUANT_DYNAMIC"
    assert description["model_quant_type"] != "W4A4_FLATQUANT_DYNAMIC"  # FlatQuant tags never set it
    k = tensors[f"{q}.weight"].shape[1]
    a, b = decompose_dim(k)
    assert tensors[f"{q}.left_trans"].shape == (a, a) and tensors[f"{q}.right_trans"].shape == (b, b)
    assert tensors[f"{q}.clip_ratio"].dtype == torch.float32 and 0 < float(tensors[f"{q}.clip_ratio"]) <= 1
    layer = "model.layers.1"  # one transform per tensor read: shared by the layers the engine fuses, four in all
    groups = {"q": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
              "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
    for members in groups.values():
        for name in ("left_trans", "right_trans", "clip_ratio"):
            assert all(torch.equal(tensors[f"{layer}.{members[0]}.{name}"], tensors[f"{layer}.{m}.{name}"])
                       for m in members)
    firsts = [tensors[f"{layer}.{members[0]}.right_trans"] for members in groups.values()]
    assert all(not (x.shape == y.shape and torch.equal(x, y)) for i, x in enumerate(firsts) for y in firsts[i + 1:])
    codes = tensors["model.layers.0.mlp.down_proj.weight"]
    assert codes.dtype == torch.int8 and int(codes.min()) >= -7 and int(codes.max()) <= 7
    assert [f for f in check_ascendv1(out) if f.level == "error"] == []
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    ours = load_ascendv1(out).eval()
    reference = load_reference_model(out).eval()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=2e-4)


class OutlierMlp(torch.nn.Module):
    """A stand-in block: up, ReLU, down; its inputs carry two outlier channels, as LLM activations do."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def outlier_inputs(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(64)
    scale[[3, 17]] = 30.0
    return [torch.randn(1, 32, 64, generator=g) * scale for _ in range(count)]


def flat_quantized(settings) -> tuple[OutlierMlp, OutlierMlp, tuple[float, float]]:
    """(float block, the block after flatquant with `settings` and W4A4_DYNAMIC min/max, the training's first and
    last epoch losses)."""
    from msmodelslim.processor.flatquant.config import FlatQuantConfig
    from msmodelslim.processor.flatquant.processor import FlatQuantProcessor
    from msmodelslim.processor.linear_quant.config import LinearQuantConfig
    from msmodelslim.processor.linear_quant.processor import linear_to_ir

    torch.manual_seed(0)
    reference = OutlierMlp()
    block = OutlierMlp()
    block.load_state_dict(reference.state_dict())
    processor = FlatQuantProcessor(FlatQuantConfig(type="flatquant"), settings=settings)
    losses = []
    train = processor._train
    processor._train = lambda *args: losses.append(train(*args)) or losses[-1]
    processor.before_forward("block", block)
    with torch.no_grad():
        for x in outlier_inputs(32, seed=1):
            block(x)
    processor.after_forward("block", block)
    config = LinearQuantConfig(type="linear_quant", qconfig=SCHEMES["w4a4_dynamic"])
    block.up, block.down = (linear_to_ir(block.up, config, None), linear_to_ir(block.down, config, None))
    return reference, block, losses[0]


def test_training_lowers_its_objective_and_the_quantized_error_on_held_out_inputs():
    """On a block with outlier channels, FlatQuant's fixed schedule (10 epochs of 8 steps here) lowers the block's
    output error under W4A4 from where its Haar-random start leaves it (epochs 0), on inputs it never saw."""
    from msmodelslim.processor.flatquant.config import FlatQuantSettings

    reference, trained, (first, last) = flat_quantized(FlatQuantSettings())
    _, untrained, _ = flat_quantized(FlatQuantSettings(epochs=0))
    assert last < 0.85 * first
    held_out = torch.cat(outlier_inputs(8, seed=2))
    with torch.no_grad():
        expected = reference(held_out)
        error_trained = float((trained(held_out) - expected).pow(2).mean())
        error_untrained = float((untrained(held_out) - expected).pow(2).mean())
    assert error_trained < 0.85 * error_untrained


def test_the_checker_names_fused_layers_with_different_transforms_and_bad_shapes(flat_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, out = flat_run
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = next(bad.glob("*.safetensors"))
    tensors = load_file(shard)
    k = "model.layers.0.self_attn.k_proj"
    tensors[f"{k}.left_trans"] = tensors[f"{k}.left_trans"] * 1.5
    tensors["model.layers.0.mlp.down_proj.clip_ratio"] = torch.tensor([1.5])
    save_file(tensors, shard, metadata={"format": "pt"})
    errors = [f.message for f in check_ascendv1(bad, fused_groups=(("q_proj", "k_proj", "v_proj"),))
              if f.level == "error"]
    assert any("have different left_trans" in e for e in errors)
    assert any("down_proj: clip_ratio must be one value in (0, 1]" in e for e in errors)


def test_routed_experts_are_refused_by_name_before_any_weight_is_read(tiny_qwen3_moe, tmp_path):
    from msmodelslim.core.errors import ConfigError

    config = write_pipeline(tmp_path / "moe.yaml", FLAT_STEPS, dataset=small_calib(tmp_path))
    with pytest.raises(ConfigError, match=r"flatquant selects model\.layers\.0\.mlp\.experts\.0\.\w+, a routed expert"):
        run_quant(tiny_qwen3_moe, tmp_path / "out", config, model_type="Qwen3-30B-A3B")
    assert not (tmp_path / "out").exists()


def test_converting_a_flatquant_checkpoint_to_compressed_tensors_is_refused(flat_run, tmp_path):
    from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors
    from msmodelslim.core.errors import UnsupportedError

    _, out = flat_run
    with pytest.raises(UnsupportedError, match="holds W4A4_FLATQUANT_DYNAMIC layers"):
        convert_ascendv1_to_compressed_tensors(out, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def assert_checked_and_both_readers_agree(out) -> None:
    """The checker finds no error, and our reader's logits equal the reference reader's (the kernels' view)."""
    assert [f for f in check_ascendv1(out) if f.level == "error"] == []
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = load_ascendv1(out).eval()(ids).logits.float()
        reference = load_reference_model(out).eval()(ids).logits.float()
    assert torch.allclose(ours, reference, atol=2e-3 * float(reference.abs().max()))


GPTQ_W4A4 = {**SCHEMES["w4a4_dynamic"], "weight": {**SCHEMES["w4a4_dynamic"]["weight"], "method": "gptq"}}


@pytest.mark.parametrize("family,weights", [("qwen2", "minmax"), ("qwen3_bf16_tied", "minmax"), ("llama", "gptq")])
def test_other_families_and_gptq_read_back_equal_in_both_readers(family, weights, request, tmp_path):
    source = request.getfixturevalue(f"tiny_{family}")
    model_type = {"qwen2": "Qwen2.5-7B-Instruct", "qwen3_bf16_tied": "Qwen3-8B", "llama": "Llama-2-7B"}[family]
    steps = FLAT_STEPS if weights == "minmax" else [FLAT_STEPS[0], {**FLAT_STEPS[1], "qconfig": GPTQ_W4A4}]
    config = write_pipeline(tmp_path / "flat.yaml", steps, dataset=small_calib(tmp_path))
    out = tmp_path / "out"
    run_quant(source, out, config, model_type=model_type)
    tensors = saved_tensors(out)
    dtype = json.loads((source / "config.json").read_text()).get("torch_dtype") or json.loads(
        (source / "config.json").read_text()).get("dtype")
    assert str(tensors["model.layers.0.mlp.down_proj.left_trans"].dtype) == f"torch.{dtype}"
    assert_checked_and_both_readers_agree(out)


def test_training_is_deterministic(flat_run, tmp_path, log_lines):
    source, out = flat_run
    config = write_pipeline(tmp_path / "flat.yaml", FLAT_STEPS, dataset=small_calib(tmp_path))
    again = tmp_path / "again"
    run_quant(source, again, config)
    assert any("(FLOAT, W4A4_FLATQUANT_DYNAMIC layers)" in line for line in log_lines)
    first, second = saved_tensors(out), saved_tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


MXFP4_W4A4 = {"act": {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "minmax"},
              "weight": {"dtype": "mxfp4", "scope": "per_block", "symmetric": True, "method": "minmax"}}
SMOOTH = {"type": "smooth_quant", "alpha": 0.5, "enable_subgraph_type": ["norm-linear"]}
ONLINE = {"type": "quarot", "online": True, "max_tp_size": 1}


@pytest.mark.parametrize("steps,save,runner,message", [
    ([{"type": "flatquant", "epochs": 3}], None, None, "flatquant's training settings are fixed"),
    ([{"type": "flatquant", "exclude": ["lm_head"]},
      {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head"]}], None, None,
     "a later rule makes it W8A8_DYNAMIC"),
    ([{"type": "flatquant", "exclude": ["lm_head"]},
      {"type": "linear_quant", "qconfig": {side: {**MXFP4_W4A4[side], "dtype": "mxfp8"} for side in MXFP4_W4A4},
       "exclude": ["lm_head"]}], None, None,
     "a later rule makes it W8A8_MXFP8"),
    ([{"type": "flatquant", "exclude": ["lm_head"]},
      {"type": "linear_quant", "qconfig": SCHEMES["w4a4_dynamic"], "exclude": ["lm_head", "*down_proj"]}], None, None,
     "no later rule quantizes it"),
    ([*FLAT_STEPS[:1], SMOOTH, *FLAT_STEPS[1:]], None, None, "smooth_quant after flatquant is not supported"),
    ([ONLINE, *FLAT_STEPS], None, None, "quarot with online: true beside flatquant"),
    (FLAT_STEPS, [{"type": "compressed_tensors"}], None, "FlatQuant's per-layer Kronecker transform"),
    (FLAT_STEPS, [{"type": "mindie_format_saver"}], None, "FlatQuant's transforms"),
    (FLAT_STEPS, None, "dp_layer_wise", "it trains each block on all the calibration samples"),
])
def test_unsupported_combinations_are_refused_before_any_weight_is_read(tiny_llama, tmp_path, monkeypatch, steps,
                                                                      save, runner, message):
    from msmodelslim.core.errors import MsModelSlimError
    from msmodelslim.model import transformers_model

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(transformers_model.TransformersModel, "load_block", no_reading)
    config = write_pipeline(tmp_path / "bad.yaml", steps, dataset=small_calib(tmp_path), runner=runner or "layer_wise")
    if save:
        spec = yaml.safe_load(config.read_text())
        spec["spec"]["save"] = save
        config.write_text(yaml.safe_dump(spec))
    from msmodelslim.core.device import DeviceSpec

    device = DeviceSpec("cpu", (0, 1)) if runner == "dp_layer_wise" else DeviceSpec("cpu")  # two CPU ranks
    with pytest.raises(MsModelSlimError, match=message):
        run_quant(tiny_llama, tmp_path / "out", config, device=device)
    assert not (tmp_path / "out").exists()


def test_batched_calibration_samples_are_split_into_steps_of_cali_bsz_sequences():
    from msmodelslim.processor.flatquant.processor import Sample, _steps

    hidden = torch.arange(10 * 3 * 2, dtype=torch.float32).reshape(10, 3, 2)
    kwargs = {"attention_mask": torch.zeros(10, 1, 3, 3), "position_ids": torch.arange(30).reshape(10, 3),
              "position_embeddings": (torch.ones(1, 3, 4), torch.zeros(1, 3, 4)), "cache_position": torch.arange(3),
              "use_cache": False}
    steps = _steps([Sample((hidden,), kwargs, hidden + 1), Sample((hidden[:2],), kwargs, hidden[:2] + 1)], 4)
    assert [[piece.target.shape[0] for piece in step] for step in steps] == [[4], [4], [2, 2]]
    third = steps[1][0]
    assert torch.equal(third.args[0], hidden[4:8]) and torch.equal(third.target, hidden[4:8] + 1)
    assert torch.equal(third.kwargs["position_ids"], kwargs["position_ids"][4:8])
    assert third.kwargs["attention_mask"].shape == (4, 1, 3, 3)
    assert third.kwargs["position_embeddings"][0].shape == (1, 3, 4)  # broadcast over the batch: kept whole
    assert torch.equal(third.kwargs["cache_position"], torch.arange(3)) and third.kwargs["use_cache"] is False


# ---- W4A4_MXFP4_FLATQUANT ------------------------------------------------------------------------------------
def slow_mxfp4_pair(n: int, shards: int) -> tuple[int, int] | None:
    """vLLM-Ascend's get_decompose_dim for the MXFP4 scheme, spelled out: p from ceil(sqrt n) up until p² − n is a
    square q²; None where the loader raises (a side above 256)."""
    p = 1
    while p * p < n:
        p += 1
    while True:
        q = 0
        while q * q < p * p - n:
            q += 1
        if q * q == p * p - n:
            break
        p += 1
    if p + q > 256:
        return None
    return (256, shards * n // 256) if (p - q) * shards > 256 else (p - q, p + q)


@pytest.mark.parametrize("n", [64, 96, 576, 1536, 2048, 3072, 4096, 11008, 12288, 14336, 17408, 20480])
def test_mxfp4_factor_pairs_follow_the_loader(n):
    from msmodelslim.ir.flat_transform import mxfp4_decompose_dim

    expected = slow_mxfp4_pair(n, 1)
    if expected is None:
        with pytest.raises(ValueError, match="above 256"):
            mxfp4_decompose_dim(n)
    else:
        assert mxfp4_decompose_dim(n) == expected
        assert flat_dims(n, mxfp4=True) == type(flat_dims(n))(*expected)
    row = slow_mxfp4_pair(n // 4, 4)  # the loader: right side of K / max_supported_tp, left = K / right
    if row is not None and n % row[1] == 0 and (n // row[1]) % 4 == 0:
        dims = flat_dims(n, mxfp4=True, row_parallel=True)
        assert (dims.left, dims.right, dims.left_blocks) == (n // row[1], row[1], 4)


def test_clipped_mxfp4_equals_the_reference_kernel_and_the_training_fake_quant():
    from msmodelslim.ir.flat_transform import clipped_mxfp4
    from msmodelslim.processor.flatquant.train import fake_mxfp4_tokens
    from reference_reader import _kronecker_quant_mxfp4

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 96, generator=g) * torch.logspace(-2, 2, 96)
    clip = torch.tensor([0.8])
    eye_a, eye_b = torch.eye(8), torch.eye(12)
    expected = _kronecker_quant_mxfp4(x, eye_a, eye_b, 0.8)
    assert torch.equal(clipped_mxfp4(x, clip), expected)
    assert torch.equal(fake_mxfp4_tokens(x, clip), expected)
    assert not torch.equal(expected, clipped_mxfp4(x, torch.tensor([1.0])))  # the clip does act


def test_the_mxfp4_weight_fake_quant_is_mxfp4_minmax_of_the_clamped_weight():
    from msmodelslim.processor.flatquant.train import fake_mxfp4_rows
    from msmodelslim.quantizer.float_formats import mx_dequantize, mx_quantize

    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    clip = torch.linspace(0.6, 1.0, 6)
    bound = w.abs().amax(dim=1, keepdim=True) * clip.reshape(-1, 1)
    clamped = torch.maximum(torch.minimum(w, bound), -bound)
    assert torch.equal(fake_mxfp4_rows(w, clip), mx_dequantize(*mx_quantize(clamped, "fp4_e2m1")))


MXFP4_FLAT_STEPS = [FLAT_STEPS[0], {**FLAT_STEPS[1], "qconfig": MXFP4_W4A4}]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_bf16_tied"])
def test_mxfp4_flatquant_layout_checker_and_both_readers(family, request, tmp_path):
    from msmodelslim.ir.flat_transform import is_block_diagonal

    source = request.getfixturevalue(f"tiny_{family}")
    model_type = {"qwen2": "Qwen2.5-7B-Instruct", "qwen3_bf16_tied": "Qwen3-8B", "llama": "Llama-2-7B"}[family]
    config = write_pipeline(tmp_path / "flat.yaml", MXFP4_FLAT_STEPS, dataset=small_calib(tmp_path))
    out = tmp_path / "out"
    run_quant(source, out, config, model_type=model_type)
    description = json.loads((out / "quant_model_description.json").read_text())
    tensors = saved_tensors(out)
    assert description["max_supported_tp"] == 4 and description["group_size"] == 32
    layer = "model.layers.0"
    for name, row_parallel in (("self_attn.q_proj", False), ("mlp.up_proj", False), ("self_attn.o_proj", True),
                               ("mlp.down_proj", True)):
        prefix = f"{layer}.{name}"
        assert description[f"{prefix}.weight"] == "W4A4_MXFP4_FLATQUANT"
        assert tensors[f"{prefix}.weight"].dtype == tensors[f"{prefix}.weight_scale"].dtype == torch.uint8
        k = tensors[f"{prefix}.weight"].shape[1] * 2
        dims = flat_dims(k, mxfp4=True, row_parallel=row_parallel)
        assert tensors[f"{prefix}.left_trans"].shape == (dims.left, dims.left)
        assert tensors[f"{prefix}.right_trans"].shape == (dims.right, dims.right)
        assert is_block_diagonal(tensors[f"{prefix}.left_trans"], dims.left_blocks)
        if row_parallel:  # the rank blocks are learned: not one block repeated, not the identity
            left = tensors[f"{prefix}.left_trans"].float()
            step = dims.left // dims.left_blocks
            assert not torch.equal(left[:step, :step], left[step:2 * step, step:2 * step])
    assert_checked_and_both_readers_agree(out)


def test_the_checker_wants_row_parallel_mxfp4_transforms_block_diagonal(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    config = write_pipeline(tmp_path / "flat.yaml", MXFP4_FLAT_STEPS, dataset=small_calib(tmp_path))
    out = tmp_path / "out"
    run_quant(tiny_llama, out, config)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        key = "model.layers.0.mlp.down_proj.left_trans"
        if key in tensors:
            tensors[key] = tensors[key] + 0.01 * torch.ones_like(tensors[key])
            save_file(tensors, shard, metadata={"format": "pt"})
    errors = [f.message for f in check_ascendv1(bad) if f.level == "error"]
    assert any("down_proj: 'left_trans' has the row-parallel shape but is not block-diagonal" in e for e in errors)


def test_an_mxfp4_transform_the_loader_cannot_shape_is_refused_before_any_weight_is_read(tiny_llama, tmp_path,
                                                                                       monkeypatch):
    from msmodelslim.core.errors import ConfigError
    from msmodelslim.model import transformers_model

    monkeypatch.setattr(transformers_model.TransformersModel, "load_block",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a weight was read")))
    monkeypatch.setattr("msmodelslim.ir.flat_transform.MAX_SUPPORT_DIM", 4)  # tiny sides stand for 256
    config = write_pipeline(tmp_path / "flat.yaml", MXFP4_FLAT_STEPS, dataset=small_calib(tmp_path))
    with pytest.raises(ConfigError, match=r"flatquant cannot transform layer model\.layers\.0\.\w+\.\w+ for "
                                          r"W4A4_MXFP4_FLATQUANT: .*above 4"):
        run_quant(tiny_llama, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_the_checker_tells_the_row_parallel_mxfp4_shape_only_where_it_differs_from_the_column_one():
    from msmodelslim.format.ascendv1.flat_check import _row_parallel_dims

    assert _row_parallel_dims((48, 12), 576) and not _row_parallel_dims((24, 24), 576)  # SmolLM2's o_proj / q_proj
    assert _row_parallel_dims((64, 24), 1536) and not _row_parallel_dims((32, 48), 1536)  # its down_proj / up_proj
    # 524 = 4 * 131: the column pair (2, 262) has a side above 256, so only the row pair (4 x 131) exists
    assert flat_dims(524, mxfp4=True, row_parallel=True) == type(flat_dims(524))(4, 131, 4)
    assert _row_parallel_dims((4, 131), 524)


@pytest.mark.parametrize("act, clipped", [(SCHEMES["w4a4_dynamic"]["act"], clipped_per_token_int4),
                                          (MXFP4_W4A4["act"], clipped_mxfp4)])
def test_gptaq_sees_the_transformed_input_quantized_as_the_flatquant_kernel_will(act, clipped):
    """GPTAQ's X̃ for a FlatQuant layer is the transformed input, clipped by the learned ratio and quantized (int4
    per token or MXFP4), as aclnnFlatQuant computes it: H̃ is taken on exactly that, not on the unclipped input."""
    from msmodelslim.ir.quant_linear import run_time_input_quantizer
    from msmodelslim.processor.linear_quant.config import LinearQuantConfig
    from msmodelslim.processor.linear_quant.processor import LinearQuantProcessor
    from msmodelslim.quantizer.gptq import accumulate_hessian

    weight = {**MXFP4_W4A4["weight"], "method": "gptq", "ext": {"gptaq_alpha": 0.25}}
    if act["dtype"] == "int4":
        weight = {**SCHEMES["w4a4_dynamic"]["weight"], "method": "gptq", "ext": {"gptaq_alpha": 0.25}}
    processor = LinearQuantProcessor(LinearQuantConfig.model_validate(
        {"type": "linear_quant", "qconfig": {"act": act, "weight": weight}}))
    torch.manual_seed(3)
    linear = torch.nn.Linear(64, 8)
    transform = {LEFT_TRANS: torch.randn(8, 8) + 3 * torch.eye(8), RIGHT_TRANS: torch.randn(8, 8) + 3 * torch.eye(8),
                 CLIP_RATIO: torch.tensor([0.6])}
    attach_flat_transform(linear, transform, mxfp4=act["dtype"] == "mxfp4")
    block = torch.nn.Sequential(linear)
    processor.before_forward("block", block)
    record = processor._records["block.0"]
    x = torch.randn(5, 64)
    x_transformed = transform_input(x, transform[LEFT_TRANS], transform[RIGHT_TRANS])
    expected = clipped(x_transformed, transform[CLIP_RATIO])
    unclipped = run_time_input_quantizer(processor.config.qconfig.scheme)(x_transformed)
    assert not torch.allclose(expected, unclipped, atol=1e-3)  # the clip matters at 0.6
    assert torch.equal(record.input_quantizer(x_transformed), expected)
    with torch.no_grad():
        linear(x)
    assert torch.allclose(record.hessian, accumulate_hessian(None, 0, expected)[0], rtol=1e-4, atol=1e-6)
    for hook in processor._hooks:
        hook.remove()
