"""dp_layer_wise on the families of model/glm.py, minimax.py, qwen_next.py, step.py, deepseek.py and deepseek_v4.py:
a smoothing or rotation step then static W8A8 attention (min/max merged over ranks) and dynamic W8A8 elsewhere,
run by two CPU ranks, writes the bytes one process writes. (Qwen3-MoE and DeepSeek-V3: test_moe_smoothing.py and
test_quarot_moe.py; LongCat-Flash: test_longcat_transforms.py.)"""
import pytest

from helpers import SCHEMES, quantize_variants, shard_bytes
from msmodelslim.core.device import DeviceSpec
from test_moe_smoothing import rank_threads, varied_calib  # noqa: F401  (a fixture)
from tiny_models import make_tiny_model

ATTENTION = "*attn*"  # self_attn, and DeepSeek-V4's attn
PROCESS_AFTER = {"type": "group", "configs": [
    {"type": "linear_quant", "qconfig": SCHEMES["w8a8_static"], "include": [ATTENTION]},
    {"type": "linear_quant", "qconfig": SCHEMES["w8a8_dynamic"], "exclude": ["lm_head", "head", ATTENTION]}]}
CASES = [("glm4_moe", "GLM-4.5", "iter_smooth"), ("minimax_m2", "MiniMax-M2.7", "iter_smooth"),
         ("qwen3_next", "Qwen3-Next-80B-A3B-Instruct", "iter_smooth"), ("step3p5", "Step-3.5-Flash", "iter_smooth"),
         ("deepseek_v4", "DeepSeek-V4-Flash", "iter_smooth"), ("deepseek_v4", "DeepSeek-V4-Flash", "quarot"),
         ("glm_moe_dsa", "GLM-5", "quarot")]


@pytest.mark.parametrize("family, model_type, step", CASES)
def test_two_ranks_write_the_single_process_bytes(tmp_path, rank_threads, family, model_type, step):
    source = make_tiny_model(tmp_path / "source", family)
    outs = quantize_variants(source, tmp_path, [{"type": step}, PROCESS_AFTER], model_type, {
        "single": ("layer_wise", DeviceSpec("cpu")), "dp": ("dp_layer_wise", DeviceSpec("cpu", (0, 1)))},
        varied_calib(tmp_path))
    single, dp = shard_bytes(outs["single"]), shard_bytes(outs["dp"])
    assert single and single == dp
