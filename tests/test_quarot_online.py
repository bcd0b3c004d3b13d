"""QuaRot's online rotations (`quarot` with online: true): the rotation against a slow element-by-element
reference, the factor choice, exactness in float on a real architecture, the saved tensors (no description entry,
metadata.quarot), both readers, the checker, and the refusals before any weight is read."""
import json

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import SCHEMES, run_quant
from msmodelslim.app.convert import convert_ascendv1_to_compressed_tensors
from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.format.ascendv1.checker import check_ascendv1
from msmodelslim.format.ascendv1.reader import load_ascendv1
from msmodelslim.ir.online_rotation import (HEADS_ROTATION, KRONECKER_M, KRONECKER_N, attach_rotation, inverse,
                                            rotate_input, unrotated_weight)
from msmodelslim.processor.quarot.hadamard import hadamard
from msmodelslim.processor.quarot.online import heads_rotation, kronecker_factors, kronecker_rotation
from reference_reader import load_reference_model


def orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q


def slow_heads(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x'[h'·d + j] = Σ_h R[h, h'] · x[h·d + j], one element at a time."""
    heads, d = r.shape[0], x.shape[-1] // r.shape[0]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for g in range(heads):
            for j in range(d):
                out[t, g * d + j] = sum(r[h, g] * x[t, h * d + j] for h in range(heads))
    return out


def slow_kronecker(x: torch.Tensor, r_m: torch.Tensor, r_n: torch.Tensor) -> torch.Tensor:
    """X' = R_mᵀ·X·R_n on the row-major [m, n] view: x'[a·n + b] = Σ_c Σ_e R_m[c, a] · x[c·n + e] · R_n[e, b]."""
    m, n = r_m.shape[0], r_n.shape[0]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for a in range(m):
            for b in range(n):
                out[t, a * n + b] = sum(r_m[c, a] * x[t, c * n + e] * r_n[e, b] for c in range(m) for e in range(n))
    return out


def test_rotations_match_the_slow_reference_and_invert():
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    heads = {HEADS_ROTATION: orthogonal(3, 1)}
    kron = {KRONECKER_M: orthogonal(3, 2), KRONECKER_N: orthogonal(4, 3)}
    assert torch.allclose(rotate_input(x, heads), slow_heads(x, heads[HEADS_ROTATION]), atol=1e-12)
    assert torch.allclose(rotate_input(x, kron), slow_kronecker(x, kron[KRONECKER_M], kron[KRONECKER_N]), atol=1e-12)
    for rotation in (heads, kron):
        assert torch.allclose(rotate_input(rotate_input(x, rotation), inverse(rotation)), x, atol=1e-12)
        assert not torch.allclose(rotate_input(x, rotation), x)


def test_a_rotated_linear_computes_the_same_and_its_hooks_see_the_rotated_input():
    linear = torch.nn.Linear(12, 5, dtype=torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = linear(x)
    original = linear.weight.detach().clone()
    rotation = {KRONECKER_M: orthogonal(4, 4), KRONECKER_N: orthogonal(3, 5)}
    attach_rotation(linear, rotation)
    seen = []
    linear.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    assert torch.allclose(linear(x), expected, atol=1e-6)
    assert torch.allclose(seen[0], rotate_input(x, rotation), atol=1e-6)
    assert torch.allclose(unrotated_weight(linear, linear.weight.detach()), original, atol=1e-6)
    with pytest.raises(ValueError, match="already has an online rotation"):
        attach_rotation(linear, rotation)
    with pytest.raises(ValueError, match="not orthogonal"):
        attach_rotation(torch.nn.Linear(12, 5), {HEADS_ROTATION: torch.ones(3, 3)})


@pytest.mark.parametrize("size,tp", [(1536, 1), (1536, 4), (128, 2), (11008, 4), (96, 1)])
def test_kronecker_factors_are_the_cheapest_shard_local_hadamard_split(size, tp):
    m, n = kronecker_factors(size, tp)
    assert m * n == size and m % tp == 0
    both = [(a, size // a) for a in range(tp, size + 1, tp)
            if size % a == 0 and hadamard(a // tp) is not None and hadamard(size // a) is not None]
    if both:  # a split into known Hadamard orders exists: the chosen one is such a split, and none is cheaper
        assert hadamard(m // tp) is not None and hadamard(n) is not None
        assert m // tp + n == min(a // tp + b for a, b in both)
    r_m, r_n = kronecker_rotation(size, tp, seed=0)
    assert r_m.shape == (m, m) and r_n.shape == (n, n)
    block = m // tp  # R_m never mixes rows of different tensor-parallel shards
    mask = torch.block_diag(*[torch.ones(block, block)] * tp)
    assert not bool(r_m[mask == 0].any())


def test_with_a_block_size_the_down_proj_rotation_is_block_diagonal():
    r_m, r_n = kronecker_rotation(96, 4, seed=0, block_size=32)
    assert torch.equal(r_m, torch.eye(3)) and r_n.shape == (32, 32)
    x = torch.randn(2, 96, dtype=torch.float64)
    rotated = rotate_input(x, {KRONECKER_M: r_m.double(), KRONECKER_N: r_n.double()})
    for block in range(3):  # each block of 32 channels rotated by R_n alone
        part = slice(32 * block, 32 * block + 32)
        assert torch.allclose(rotated[:, part], x[:, part] @ r_n.double(), atol=1e-12)
    with pytest.raises(UnsupportedError, match="block_size 64 does not divide down_proj's input size 96"):
        kronecker_rotation(96, 1, seed=0, block_size=64)


def test_heads_rotation_stays_inside_shards_and_refuses_heads_that_do_not_split():
    r = heads_rotation(8, 2, seed=0)
    assert torch.allclose(r.double() @ r.double().T, torch.eye(8, dtype=torch.float64), atol=1e-6)
    assert not bool(r[:4, 4:].any()) and not bool(r[4:, :4].any())
    with pytest.raises(UnsupportedError, match="9 attention heads do not split into 4"):
        heads_rotation(9, 4, seed=0)


def logits(model, seed=1):
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_online_rotations_are_exact_in_float_on_a_llama(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    reference = logits(model)
    r_heads = heads_rotation(model.config.num_attention_heads, 2, seed=0)
    r_m, r_n = kronecker_rotation(model.config.intermediate_size, 2, seed=1)
    for layer in model.model.layers:
        attach_rotation(layer.self_attn.o_proj, {HEADS_ROTATION: r_heads})
        attach_rotation(layer.mlp.down_proj, {KRONECKER_M: r_m, KRONECKER_N: r_n})
    rotated = logits(model)
    assert (rotated - reference).abs().max() < 1e-4
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, r_m)  # the weights did change


def write(path, process, save=("ascendv1_saver",)):
    spec = {"runner": "layer_wise", "process": process, "save": [{"type": s} for s in save]}
    path.write_text(yaml.safe_dump({"apiversion": "modelslim_v1", "spec": spec}))
    return path


W4A4 = {"type": "linear_quant", "qconfig": SCHEMES["w4a4_dynamic"], "exclude": ["lm_head"]}
ONLINE = {"type": "quarot", "online": True, "down_proj_online_layers": [0, 1], "max_tp_size": 2}


def test_w4a4_with_online_rotations_saves_reads_and_checks(tiny_llama, tmp_path):
    out = tmp_path / "online"
    run_quant(tiny_llama, out, write(tmp_path / "a.yaml", [ONLINE, W4A4]))
    description = json.loads((out / "quant_model_description.json").read_text())
    tensors = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    names, r_m = set(tensors), tensors["model.layers.1.mlp.down_proj.kronecker_rotation_m"]
    for i in (0, 1):
        for suffix in ("self_attn.o_proj.heads_rotation", "mlp.down_proj.kronecker_rotation_m",
                       "mlp.down_proj.kronecker_rotation_n"):
            assert f"model.layers.{i}.{suffix}" in names
            assert f"model.layers.{i}.{suffix}" not in description  # written without an entry (protocol.md §4.4)
    assert r_m.dtype == torch.float32
    assert description["metadata"]["quarot"] == {
        "max_tp_size": 2,
        "heads_rotation": {"layers": [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]},
        "kronecker_rotation": {"layers": [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]}}
    assert description["model.layers.0.mlp.down_proj.weight"] == "W4A4_DYNAMIC"
    findings = check_ascendv1(out)
    assert [f.message for f in findings if f.level == "error"] == []
    assert any("rotate their input online" in f.message for f in findings if f.level == "warning")
    ours, reference = logits(load_ascendv1(out)), logits(load_reference_model(out))
    assert (ours - reference).abs().max() < 1e-3
    # the rotations matter: the same layers read without them compute something else
    unrotated = load_ascendv1(out)
    for layer in unrotated.model.layers:
        for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
            for name in (HEADS_ROTATION, KRONECKER_M, KRONECKER_N):
                setattr(module, name, None)
    assert (logits(unrotated) - ours).abs().max() > 1e-2


def test_only_listed_and_quantized_layers_rotate_and_gptq_svd_res_keep_the_rotation(tiny_llama, tmp_path):
    gptq = {**W4A4, "qconfig": {**SCHEMES["w4a4_dynamic"], "weight": {**SCHEMES["w4a4_dynamic"]["weight"],
                                                                       "method": "gptq"}},
            "exclude": ["lm_head", "model.layers.0.self_attn.o_proj"]}
    process = [{**ONLINE, "down_proj_online_layers": [1]}, {"type": "svd_res", "rank": 4}, gptq]
    out = tmp_path / "o"
    run_quant(tiny_llama, out, write(tmp_path / "a.yaml", process))
    quarot = json.loads((out / "quant_model_description.json").read_text())["metadata"]["quarot"]
    assert quarot["heads_rotation"]["layers"] == ["model.layers.1.self_attn.o_proj"]
    assert quarot["kronecker_rotation"]["layers"] == ["model.layers.1.mlp.down_proj"]
    assert [f.message for f in check_ascendv1(out) if f.level == "error"] == []
    model = load_ascendv1(out)
    assert model.model.layers[1].mlp.down_proj.svd_rank == 4
    assert model.model.layers[1].mlp.down_proj.kronecker_rotation_m is not None
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear  # float, unrotated
    assert (logits(model) - logits(load_reference_model(out))).abs().max() < 1e-3


def test_refusals_come_before_any_weight_is_read(tiny_llama, tmp_path):
    out = tmp_path / "never"
    cases = [
        (ConfigError, "needs online: true", [{"type": "quarot", "down_proj_online_layers": [0]}, W4A4], None),
        (UnsupportedError, r"layer\(s\) \[5\]", [{**ONLINE, "down_proj_online_layers": [5]}, W4A4], None),
        (UnsupportedError, "4 attention heads do not split into 8", [{**ONLINE, "max_tp_size": 8}, W4A4], None),
        (UnsupportedError, "iter_smooth after quarot with online: true",
         [ONLINE, {"type": "iter_smooth"}, W4A4], None),
        (UnsupportedError, "quarot cannot be saved as compressed_tensors",
         [ONLINE, {**W4A4, "qconfig": SCHEMES["w8a8_dynamic"]}], ("compressed_tensors",)),
    ]
    for error, message, process, save in cases:
        with pytest.raises(error, match=message):
            run_quant(tiny_llama, out, write(tmp_path / "c.yaml", process, save or ("ascendv1_saver",)))
        assert not out.exists()


def test_convert_refuses_online_rotations(tiny_llama, tmp_path):
    out = tmp_path / "online"
    run_quant(tiny_llama, out, write(tmp_path / "a.yaml", [ONLINE, {**W4A4, "qconfig": SCHEMES["w8a8_dynamic"]}]))
    with pytest.raises(UnsupportedError, match="rotates layer inputs online"):
        convert_ascendv1_to_compressed_tensors(out, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
