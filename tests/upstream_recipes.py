"""The established tool's 89 best-practice recipes (protocol.md §3.4), one row each, and a builder that writes
a config from a row the way a user carrying that recipe would write it for this project.

A row keeps the facts of the table: the file, its apiversion, the label, the pipeline and the linear schemes
(`act dtype/scope -> weight dtype/scope/method`, `;`-separated; `FA3:`/`C8:` entries are attention/KV-cache
quantization). `expect` is what this version does with it: "runs", or the words of the refusal a user gets
before any weight is read (the missing feature by name).

How the builder reads a row (our reading of the upstream files, which split linears by role):
- several linear schemes: a static (`per_tensor`/`pd_mix`) one covers attention (`*self_attn*`), an int4 one the
  routed experts (`*experts*`, or the MLP in a dense model), the remaining dynamic int8 one everything else;
  `lm_head` stays float; each linear gets exactly one scheme;
- `group[linear_quant]` puts the linear_quant steps in one group, `linear_quant ×N` keeps them apart;
- `flex_awq_ssz` scores with the int4 (else the first) scheme; `flex_smooth_quant(norm-linear)` limits the subgraphs;
- v0 rows become `anti_cfg`/`calib_cfg` with upstream's keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

KV = "attention and KV-cache quantization"
FLOAT_FORMATS = "floating-point formats"
VLM = "vision-language"
DIFFUSION = "diffusion"
# Runs on the diffusion service, on a tiny random diffusers pipeline of its family (not a language model checkpoint):
# tests/test_diffusion_wan.py runs the row's YAML (msmodelslim/model/diffusion/).
RUNS_DIFFUSION = "runs on a tiny pipeline of its family (tests/test_diffusion_*.py)"


@dataclass(frozen=True)
class RecipeRow:
    file: str
    apiversion: str
    label: str
    models: str
    pipeline: str
    schemes: str
    dataset: str
    expect: str = "runs"

    @property
    def folder(self) -> str:
        return self.file.split("/")[0]


def _row(line: str, expect: str = "runs") -> RecipeRow:
    file, api, label, models, pipeline, schemes, dataset = (p.strip() for p in line.split("|"))
    return RecipeRow(file, api, label, models, pipeline, schemes, dataset, expect)


# file | apiversion | label | verified models | pipeline | linear schemes | dataset  (protocol.md §3.4)
ROWS: list[RecipeRow] = [
    _row("deepseek-r1-distill/deepseek-r1-distill-qwen-1.5b-sparse.yaml|modelslim_v0|w8a8s|DeepSeek-R1-Distill-Qwen-1.5B|anti=m4 → w4a8 lowbit+co_sparse||cn_en.jsonl"),
    _row("deepseek-r1-distill/deepseek-r1-distill-qwen-1.5b-w8a8.yaml|modelslim_v0|w8a8|DeepSeek-R1-Distill-Qwen-1.5B|anti=m4 → w8a8||(default)"),
    _row("deepseek-r1-distill/deepseek-r1-distill-qwen-7b-sparse.yaml|modelslim_v0|w8a8s|DeepSeek-R1-Distill-Qwen-7B|anti=m4 → w4a8 lowbit+co_sparse||cn_en.jsonl"),
    _row("deepseek-r1-distill/deepseek-r1-distill-qwen-7b-w8a8.yaml|modelslim_v0|w8a8|DeepSeek-R1-Distill-Qwen-7B|anti=m4 → w8a8||(default)"),
    _row("deepseek_v3/deepseek_w4a8_per_channel.yaml|modelslim_v1|w4a8|DeepSeek-R1-0528|flex_smooth_quant → group[linear_quant]|int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("deepseek_v3/deepseekr1_w4a8c8_per_channel.yaml|modelslim_v1|w4a8c8|DeepSeek-R1-0528|quarot → flex_smooth_quant → group[linear_quant] → fa3_quant|FA3:int8/per_head; int8/per_tensor→int8/per_channel/minmax; int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|(default)"),
    _row("deepseek_v3/deepseekv31_terminus_w4a4c8.yaml|modelslim_v1|w4a4c8|DeepSeek-V3.1-Terminus|fa3_quant → group[linear_quant]|FA3:details; mxfp4/per_block→mxfp4/per_block/minmax; mxfp8/per_block→mxfp8/per_block/minmax|(default)"),
    _row("deepseek_v3/deepseekv31_terminus_w8a8c8.yaml|modelslim_v1|w8a8c8|DeepSeek-V3.1-Terminus|fa3_quant → group[linear_quant]|FA3:details; mxfp8/per_block→mxfp8/per_block/minmax|(default)"),
    _row("deepseek_v3/deepseekv3_w4a8c8_per_channel.yaml|modelslim_v1|w4a8c8|DeepSeek-V3.1|quarot → flex_smooth_quant → group[linear_quant] → fa3_quant|FA3:int8/per_head; int8/per_tensor→int8/per_channel/minmax; int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|qwen3_cot_w4a4.json"),
    _row("deepseek_v3_2/deepseek_w4a8.yaml|modelslim_v1|w4a8|DeepSeek-V3.2-Exp|quarot → flex_awq_ssz → flex_smooth_quant → group[linear_quant]|int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|qwen3_cot_w4a4.json"),
    _row("deepseek_v3_2/deepseek_w8a8.yaml|modelslim_v1|w8a8|DeepSeek-V3.2-Exp|flex_smooth_quant → linear_quant ×2|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("deepseek_v3_2/deepseek_w8a8_quarot.yaml|modelslim_v1|w8a8|DeepSeek-V3.2|quarot → flex_smooth_quant → linear_quant ×2|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("deepseek_v4/deepseek_v4_flash_w8a8.yaml|modelslim_v1|w8a8|DeepSeek-V4-Flash|quarot → flex_smooth_quant → linear_quant ×2|int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("deepseek_v4/deepseek_v4_pro_w4a8.yaml|modelslim_v1|w4a8|DeepSeek-V4-Pro|quarot → flex_awq_ssz → flex_smooth_quant → linear_quant ×3|int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("deepseek_v4/deepseek_v4_pro_w8a8.yaml|modelslim_v1|w8a8|DeepSeek-V4-Pro|quarot → linear_quant ×3|int8/per_token→int8/per_channel/minmax|qwen3_cot_w4a4.json"),
    _row("default/default-w8a16.yaml|modelslim_v1|w8a16|–|linear_quant|float→int8/per_channel/minmax|(default)"),
    _row("default/default-w8a8.yaml|modelslim_v1|w8a8|–|iter_smooth → linear_quant|int8/per_token→int8/per_channel/minmax|(default)"),
    _row("flux1/flux1_w8a8f8_mxfp.yaml|mm_sd|w8a8f8|FLUX.1-dev|online_quarot → fa3_quant → linear_quant|FA3:fp8_e4m3/per_token; mxfp8/per_block→mxfp8/per_block/minmax|(default)", RUNS_DIFFUSION),
    _row("glm4_6v/glm4_6v_w8a8.yaml|mm_vlm|w8a8|GLM-4.6V|iter_smooth → linear_quant ×2|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("glm4_moe/glm4_7_moe-w8a8-v1.yaml|modelslim_v1|w8a8|GLM-4.7|flex_smooth_quant → group[linear_quant]|int8/per_token→int8/per_channel/minmax|(default)"),
    _row("glm4_moe_lite/glm4_moe_lite_w8a8.yaml|modelslim_v1|w8a8|GLM-4.7-Flash|quarot → flex_smooth_quant → linear_quant ×2|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("glm_5/glm_5_1_w4a4c8_mxfp4.yaml|modelslim_v1|w4a4c8|GLM-5.1|group[linear_quant]|mxfp4/per_block→mxfp4/per_block/minmax; mxfp8/per_block→mxfp8/per_block/minmax|qwen3_cot_w4a4.json"),
    _row("glm_5/glm_5_1_w4a8.yaml|modelslim_v1|w4a8|GLM-5.1|quarot → flex_awq_ssz → flex_smooth_quant → group[linear_quant]|int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("glm_5/glm_5_1_w4a8c8.yaml|modelslim_v1|w4a8c8|GLM-5.1|quarot → flex_awq_ssz → flex_smooth_quant → fa3_quant → group[linear_quant]|FA3:int8/per_token; int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("glm_5/glm_5_1_w8a8.yaml|modelslim_v1|w8a8|GLM-5.1|quarot → flex_smooth_quant → group[linear_quant]|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("glm_5/glm_5_1_w8a8c8.yaml|modelslim_v1|w8a8c8|GLM-5.1|quarot → flex_smooth_quant → fa3_quant → group[linear_quant]|FA3:int8/per_token; int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("glm_5/glm_5_w4a8.yaml|modelslim_v1|w4a8|GLM-5|quarot → flex_awq_ssz → flex_smooth_quant → group[linear_quant]|int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|qwen3_cot_w4a4.json"),
    _row("glm_5/glm_5_w8a8.yaml|modelslim_v1|w8a8|GLM-5|quarot → flex_smooth_quant → linear_quant ×2|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("hunyuan_video/hunyuan_video_w8a8f8_mxfp.yaml|mm_sd|w8a8f8|HunyuanVideo|linear_quant → online_quarot → fa3_quant|FA3:fp8_e4m3/per_token; mxfp8/per_block→mxfp8/per_block/minmax|hunyuanvideo", RUNS_DIFFUSION),
    _row("internvl3_5/internvl_w8a8.yaml|mm_vlm|w8a8|InternVL3_5-38B|quarot → iter_smooth → group[linear_quant]|int8/per_tensor→int8/per_channel/minmax|calibImages"),
    _row("internvl3_5_moe/internvl_moe_w8a8.yaml|mm_vlm|w8a8|InternVL3_5-241B-A28B|quarot → iter_smooth → group[linear_quant]|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("kimi_k2/kimi_w8a8_quarot.yaml|modelslim_v1|w8a8|Kimi-K2-Instruct-0905, Kimi-K2-Thinking|quarot → flex_smooth_quant → linear_quant ×2|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("kimi_k2_5/kimi_k2_6_w4a4c8.yaml|mm_vlm|w4a4c8|Kimi-K2.6|group[linear_quant] → fa3_quant|FA3:details; mxfp4/per_block→mxfp4/per_block/minmax; mxfp8/per_block→mxfp8/per_block/minmax|calibImages"),
    _row("kimi_k2_5/kimi_k2_6_w4a8.yaml|mm_vlm|w4a8|Kimi-K2.6|group[linear_quant]|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("kimi_k2_5/kimi_w4a8.yaml|mm_vlm|w4a8|Kimi-K2.5|flex_smooth_quant → group[linear_quant]|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("longcat_flash/longcat_flash_w4a4_mxfp4.yaml|modelslim_v1|w4a4|LongCat-Flash-Chat|iter_smooth → linear_quant ×2|mxfp4/per_block→mxfp4/per_block/minmax; mxfp8/per_block→mxfp8/per_block/minmax|mix_calib.jsonl"),
    _row("minimax_m2/minimax_m27_w8a8.yaml|modelslim_v1|w8a8|MiniMax-M2.7|quarot → linear_quant|int8/per_token→int8/per_channel/minmax|mix_calib.jsonl"),
    _row("minimax_m2/minimax_m27_w8a8_mxfp8.yaml|modelslim_v1|w8a8|MiniMax-M2.7|quarot → linear_quant|mxfp8/per_block→mxfp8/per_block/minmax|mix_calib.jsonl"),
    _row("minimax_m2/minimax_m27_w8a8c8.yaml|modelslim_v1|w8a8c8|MiniMax-M2.7|quarot → linear_quant → dynamic_cache|C8:int8/per_channel; int8/per_token→int8/per_channel/minmax|qwen3_cot.json"),
    _row("qwen1_5/qwen1.5-110b-w8a16.yaml|modelslim_v0|w8a16|Qwen1.5-110B|calib w8a16||(default)"),
    _row("qwen2/qwen2-72b-w8a16.yaml|modelslim_v0|w8a16|Qwen2-72B|calib w8a16||(default)"),
    _row("qwen2/qwen2-72b-w8a8.yaml|modelslim_v0|w8a8|Qwen2-72B|calib w8a8||boolq.jsonl"),
    _row("qwen2/qwen2-72b-w8a8c8.yaml|modelslim_v0|w8a8c8|Qwen2-72B|calib w8a8 + kv||boolq.jsonl"),
    _row("qwen2/qwen2-72b-w8a8s.yaml|modelslim_v0|w8a8s|Qwen2-72B|calib w4a8 lowbit+co_sparse||cn_en.jsonl"),
    _row("qwen2/qwen2-7b-w8a8.yaml|modelslim_v0|w8a8|Qwen2-7B|calib w8a8||boolq.jsonl"),
    _row("qwen2/qwen2-7b-w8a8s.yaml|modelslim_v0|w8a8s|Qwen2-7B|calib w4a8 lowbit+co_sparse||cn_en.jsonl"),
    _row("qwen2_5/qwen2.5-32b-w8a8.yaml|modelslim_v0|w8a8|Qwen2.5-32B-Instruct|calib w8a8||boolq.jsonl"),
    _row("qwen2_5/qwen2.5-7b-w8a8.yaml|modelslim_v0|w8a8|Qwen2.5-7B-Instruct|calib w8a8||boolq.jsonl"),
    _row("qwen2_5/qwen2.5-sparse.yaml|modelslim_v0|w8a8s|Qwen2.5-Coder-7B-Instruct|calib w4a8 lowbit+co_sparse||humaneval_x.jsonl"),
    _row("qwen2_5/qwen2.5-w8a8c8-pdmix.yaml|modelslim_v0|w8a8c8|Qwen2.5-72B-Instruct|anti=m6 → w8a8 pdmix + kv||qwen2.5_w8a8_pdmix_calib_prompt.jsonl"),
    _row("qwen2_5_omni_thinker/qwen2_5_omni_thinker_w8a8.yaml|mm_vlm|w8a8|Qwen2.5-Omni-7B|linear_quant|int8/per_token→int8/per_channel/minmax|calibVideos"),
    _row("qwen2_5_vl/qwen2.5-vl-7b-w8a8-mxfp.yaml|mm_vlm|w8a8|Qwen2.5-VL-7B-Instruct|linear_quant|mxfp8/per_block→mxfp8/per_block/minmax|calibImages"),
    _row("qwen2_5_vl/qwen2.5-vl-32b-w8a8-mxfp.yaml|mm_vlm|w8a8|Qwen2.5-VL-32B-Instruct|linear_quant|mxfp8/per_block→mxfp8/per_block/minmax|calibImages"),
    _row("qwen2_5_vl/qwen2.5-vl-72b-w8a8-mxfp.yaml|mm_vlm|w8a8|Qwen2.5-VL-72B-Instruct|linear_quant|mxfp8/per_block→mxfp8/per_block/minmax|calibImages"),
    _row("qwen3/qwen3-14b-dense-w8a8.yaml|modelslim_v0|w8a8|Qwen3-14B|anti=m4 → w8a8 pdmix||mix_calib.jsonl"),
    _row("qwen3/qwen3-14b-w8a8s.yaml|modelslim_v0|w8a8s|Qwen3-14B|anti=m4 → w4a8 lowbit+co_sparse||calib_prompt.jsonl"),
    _row("qwen3/qwen3-32b-dense-w16a16s.yaml|modelslim_v1|w16a16s|Qwen3-32B|float_sparse||long_calib.jsonl"),
    _row("qwen3/qwen3-32b-dense-w4a4.yaml|modelslim_v1|w4a4|Qwen3-32B|prior: adapt_rotation(1) → adapt_rotation(2) → autoround_quant|int4/per_token→int4/per_channel/autoround; int8/per_token→int8/per_channel/autoround|laos_calib.jsonl"),
    _row("qwen3/qwen3-32b-dense-w8a8.yaml|modelslim_v0|w8a8|Qwen3-32B|anti=m4 → w8a8 pdmix||mix_calib.jsonl"),
    _row("qwen3/qwen3-32b-dense-w8a8c8.yaml|modelslim_v1|w8a8c8|Qwen3-32B|iter_smooth → linear_quant → dynamic_cache|C8:int8/per_channel; int8/pd_mix→int8/per_channel/minmax|qwen3_cot.json"),
    _row("qwen3/qwen3-32b-w8a8s.yaml|modelslim_v0|w8a8s|Qwen3-32B|calib w4a8 lowbit+co_sparse||cn_en.jsonl"),
    _row("qwen3/qwen3-8b-w8a8s.yaml|modelslim_v0|w8a8s|Qwen3-8B|anti=m6 → w4a8 lowbit+co_sparse||mix_calib.jsonl"),
    _row("qwen3_5_moe/qwen3.5_moe_w4a8.yaml|mm_vlm|w4a8|Qwen3.5-397B-A17B|linear_quant ×2|int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("qwen3_5_moe/qwen3_5_235B_w8a8.yaml|mm_vlm|w8a8|Qwen3.5-397B-A17B|group[linear_quant]|int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("qwen3_5_moe/qwen3_5_dense_w8a8.yaml|mm_vlm|w8a8|Qwen3.5-27B|linear_quant|int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("qwen3_5_moe/qwen3_5_moe_w8a8.yaml|mm_vlm|w8a8|Qwen3.5-122B-A10B, Qwen3.5-35B-A3B|group[linear_quant]|int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("qwen3_5_moe/qwen3_6_dense_w8a8.yaml|mm_vlm|w8a8|Qwen3.6-27B|linear_quant|int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("qwen3_moe/qwen3-235B-w4a8-v1.yaml|modelslim_v1|w4a8|Qwen3-235B|flex_smooth_quant(norm-linear) → group[linear_quant]|int8/per_token→int8/per_channel/minmax; int8/per_token→int4/per_channel/ssz|(default)"),
    _row("qwen3_moe/qwen3-30b-a3b-w8a8.yaml|modelslim_v0|w8a8|Qwen3-30B|anti=m4 → w8a8||mix_calib.jsonl"),
    _row("qwen3_moe/qwen3-30b-w4a8-v1.yaml|modelslim_v1|w4a8|Qwen3-30B|flex_smooth_quant → group[linear_quant]|int8/per_token→int4/per_channel/ssz; int8/per_token→int8/per_channel/ssz|(default)"),
    _row("qwen3_moe/qwen3-coder-480b-w4a8.yaml|modelslim_v1|w4a8|Qwen3-Coder-480B-A35B|quarot → flex_smooth_quant → group[linear_quant]|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int4/per_channel/ssz|autocodebench.jsonl"),
    _row("qwen3_next/qwen3-next-80b-a3b-w8a8.yaml|modelslim_v1|w8a8|Qwen3-Next-80B-A3B-Instruct|flex_smooth_quant → group[linear_quant]|int8/per_token→int8/per_channel/minmax|(default)"),
    _row("qwen3_omni_moe/qwen3-omni-moe-w8a8.yaml|mm_vlm|w8a8|Qwen3-Omni-30B-A3B-Thinking|linear_quant|int8/per_token→int8/per_channel/minmax|calibVideos"),
    _row("qwen3_vl/qwen3_vl_4b_w8a8.yaml|mm_vlm|w8a8|Qwen3-VL-4B-Instruct|iter_smooth → linear_quant|int8/per_tensor→int8/per_channel/minmax|calibImages"),
    _row("qwen3_vl/qwen3_vl_embedding_w8a8.yaml|mm_vlm|w8a8|Qwen3-VL-Embedding-2B|iter_smooth → linear_quant|int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("qwen3_vl/qwen3_vl_w8a8.yaml|mm_vlm|w8a8|Qwen3-VL-32B-Instruct|quarot → iter_smooth → linear_quant|int8/per_tensor→int8/per_channel/minmax|calibImages"),
    _row("qwen3_vl_moe/qwen3_vl_moe_w8a8.yaml|mm_vlm|w8a8|Qwen3-VL-235B-A22B|quarot → iter_smooth → linear_quant ×2|int8/per_tensor→int8/per_channel/minmax; int8/per_token→int8/per_channel/minmax|calibImages"),
    _row("qwen3_vl_moe/qwen3_vl_moe_w8a8_mxfp8.yaml|mm_vlm|w8a8|Qwen3-VL-30B-A3B|quarot → iter_smooth → linear_quant|mxfp8/per_block→mxfp8/per_block/minmax|calibImages"),
    _row("qwen_image_edit/qwen-image-edit-w4a4f4-mxfp.yaml|mm_sd|w4a4f8|Qwen-Image-Edit-2509|linear_quant → online_quarot → fa3_quant|FA3:mxfp4/per_block; mxfp4/dual_scale→mxfp4/dual_scale/dualscale|(default)", RUNS_DIFFUSION),
    _row("qwen_image_edit/qwen-image-edit-w8a8f8-mxfp.yaml|mm_sd|w8a8f8|Qwen-Image-Edit-2509|linear_quant → online_quarot → fa3_quant|FA3:fp8_e4m3/per_token; mxfp8/per_block→mxfp8/per_block/minmax|(default)", RUNS_DIFFUSION),
    _row("qwq/qwq-32b-sparse.yaml|modelslim_v0|w8a8s|QwQ-32B|calib w4a8 lowbit+co_sparse||cn_en.jsonl"),
    _row("qwq/qwq-32b-w8a8.yaml|modelslim_v1|w8a8|QwQ-32B|quarot → iter_smooth → linear_quant|int8/per_tensor→int8/per_channel/minmax|autocodebench.jsonl"),
    _row("step_3_5_flash/step3_5_moe_w8a8.yaml|modelslim_v1|w8a8|Step-3.5-Flash|linear_quant|int8/per_token→int8/per_channel/minmax|data_list_1.jsonl"),
    _row("wan2_1/wan2_1_w8a8_dynamic.yaml|mm_sd|w8a8|Wan2.1|linear_quant|int8/per_token→int8/per_channel/minmax|(default)", RUNS_DIFFUSION),
    _row("wan2_2/wan2_2_w4a4f4_mxfp_t2v.yaml|mm_sd|w4a4f4|Wan2.2-T2V-A14B|linear_quant ×2 → online_quarot → fa3_quant ×2|FA3:fp8_e4m3/per_token; FA3:mxfp4/per_block; mxfp4/per_block→mxfp4/per_block/ceil_x; mxfp8/per_block→mxfp8/per_block/mse_round|wan2_2_t2v", RUNS_DIFFUSION),
    _row("wan2_2/wan2_2_w4a4f8_mxfp_t2v.yaml|mm_sd|w4a4f8|Wan2.2-T2V-A14B|linear_quant ×2 → online_quarot → fa3_quant|FA3:fp8_e4m3/per_token; mxfp4/per_block→mxfp4/per_block/ceil_x; mxfp8/per_block→mxfp8/per_block/mse_round|wan2_2_t2v", RUNS_DIFFUSION),
    _row("wan2_2/wan2_2_w8a8f8_mxfp_i2v.yaml|mm_sd|w8a8f8|Wan2.2-I2V-A14B|linear_quant → online_quarot → fa3_quant|FA3:fp8_e4m3/per_token; mxfp8/per_block→mxfp8/per_block/minmax|wan2_2_i2v", RUNS_DIFFUSION),
    _row("wan2_2/wan2_2_w8a8f8_mxfp_t2v.yaml|mm_sd|w8a8f8|Wan2.2-T2V-A14B|linear_quant → online_quarot → fa3_quant|FA3:fp8_e4m3/per_token; mxfp8/per_block→mxfp8/per_block/mse_round|wan2_2_t2v", RUNS_DIFFUSION),
    _row("wan2_2/wan2_2_w8a8f8_mxfp_ti2v.yaml|mm_sd|w8a8f8|Wan2.2-TI2V-5B|linear_quant → online_quarot → fa3_quant|FA3:fp8_e4m3/per_token; mxfp8/per_block→mxfp8/per_block/minmax|wan2_2_ti2v", RUNS_DIFFUSION),
]

APIVERSION = {"mm_vlm": "multimodal_vlm_modelslim_v1", "mm_sd": "multimodal_sd_modelslim_v1"}


# ---- v1 ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    act_dtype: str
    act_scope: str | None
    weight_dtype: str
    weight_scope: str
    method: str

    @property
    def static(self) -> bool:
        return self.act_scope in ("per_tensor", "pd_mix")

    def qconfig(self) -> dict:
        weight = {"dtype": self.weight_dtype, "scope": self.weight_scope, "symmetric": True, "method": self.method}
        if self.act_dtype == "float":
            return {"weight": weight}
        act = {"dtype": self.act_dtype, "scope": self.act_scope, "symmetric": not self.static, "method": "minmax"}
        return {"act": act, "weight": weight}


def parse_schemes(text: str) -> tuple[list[Scheme], list[str]]:
    """(linear schemes, attention entries) of a row's scheme column."""
    linear, attention = [], []
    for part in (p.strip() for p in text.split(";") if p.strip()):
        if part.startswith(("FA3:", "C8:")):
            attention.append(part)
            continue
        act, _, weight = part.partition("→")
        act_dtype, _, act_scope = act.strip().partition("/")
        w_dtype, w_scope, method = weight.strip().split("/")
        linear.append(Scheme(act_dtype, act_scope or None, w_dtype, w_scope, method))
    return linear, attention


def _targets(schemes: list[Scheme], moe: bool) -> list[tuple[Scheme, list[str], list[str]]]:
    """(scheme, include, exclude) per scheme: static → attention, int4 → experts (the MLP when dense), the rest
    (or a single scheme) → every linear not taken; lm_head always float."""
    if len(schemes) == 1:
        return [(schemes[0], ["*"], ["lm_head"])]
    taken: list[str] = []
    out = []
    rest = None
    for scheme in schemes:
        if scheme.static:
            include = ["*self_attn*"]
        elif scheme.weight_dtype == "int4":
            include = ["*experts*"] if moe else ["*mlp*"]
        elif rest is None:
            rest = scheme
            continue
        else:  # two dynamic int8 schemes: the second one takes attention
            include = ["*self_attn*"]
        taken += include
        out.append((scheme, include, ["lm_head"]))
    if rest is not None:
        out.append((rest, ["*"], ["lm_head", *taken]))
    return out


_STEP = re.compile(r"^(?P<name>[a-z0-9_]+)(?:\((?P<arg>[^)]*)\))?(?: ×(?P<times>\d))?$")


def fa3_step(attention: list[str]) -> dict:
    """The fa3_quant step of a row's `FA3:` entry: `FA3:<dtype>/<scope>` is its qconfig; `FA3:details` (rows with
    MX schemes) gives fa_q/fa_k/fa_v their own MX setting, here mxfp8 blocks for all three."""
    entry = next((a.removeprefix("FA3:") for a in attention if a.startswith("FA3:")), None)
    if entry is None:
        return {"type": "fa3_quant"}
    if entry == "details":
        mx = {"dtype": "mxfp8", "scope": "per_block", "symmetric": True, "method": "minmax"}
        return {"type": "fa3_quant", "details": {"fa_q": mx, "fa_k": mx, "fa_v": mx}}
    dtype, scope = entry.split("/")
    return {"type": "fa3_quant", "qconfig": {"dtype": dtype, "scope": scope, "symmetric": True, "method": "minmax"}}


def v1_process(row: RecipeRow, moe: bool) -> list[dict]:
    """spec.process of a v1 row."""
    linear, attention = parse_schemes(row.schemes)
    quant_steps = [{"type": "linear_quant", "qconfig": s.qconfig(), "include": inc, "exclude": exc}
                   for s, inc, exc in _targets(linear, moe)] if linear else []
    scoring = next((s for s in linear if s.weight_dtype == "int4"), linear[0] if linear else None)
    process: list[dict] = []
    pipeline = row.pipeline.removeprefix("prior: ")
    for step in (s.strip() for s in pipeline.split("→")):
        if step.startswith("group["):
            process.append({"type": "group", "configs": quant_steps})
            continue
        match = _STEP.match(step)
        if match is None:
            raise ValueError(f"{row.file}: cannot read pipeline step {step!r}")
        name, arg = match["name"], match["arg"]
        if name == "linear_quant":
            process.extend(quant_steps)
        elif name in ("smooth_quant", "iter_smooth", "flex_smooth_quant"):
            step_cfg: dict = {"type": name}
            if arg:
                step_cfg["enable_subgraph_type"] = [arg]
            process.append(step_cfg)
        elif name == "flex_awq_ssz":
            process.append({"type": name, "qconfig": scoring.qconfig()})
        elif name == "quarot":
            process.append({"type": "quarot"})
        elif name == "fa3_quant":
            process.append(fa3_step(attention))
        elif name == "dynamic_cache":
            process.append({"type": "dynamic_cache", "qconfig": {"dtype": "int8", "scope": "per_channel",
                                                                 "symmetric": True, "method": "minmax"}})
        elif name == "float_sparse":
            process.append({"type": "float_sparse", "sparse_ratio": 0.3})
        elif name == "adapt_rotation":
            process.append({"type": "adapt_rotation", "stage": int(arg)})
        elif name == "autoround_quant":
            strategies = [{"qconfig": s.qconfig(), "include": inc, "exclude": exc} for s, inc, exc in _targets(linear, moe)]
            process.append({"type": "autoround_quant", "strategies": strategies})
        else:  # online_quarot and the like
            process.append({"type": name})
    return process


def dataset_of(row: RecipeRow) -> str:
    if row.dataset == "(default)":
        return "teacher_qualification.jsonl" if row.apiversion == "modelslim_v0" else "mix_calib.jsonl"
    return row.dataset


def v1_config(row: RecipeRow, moe: bool) -> dict:
    """A `prior: ` pipeline's adapt_rotation stage 1 goes into spec.prior (on spec.dataset), as upstream writes it."""
    steps = v1_process(row, moe)
    prior = [s for s in steps if s["type"] == "adapt_rotation" and s["stage"] == 1]
    spec = {"process": [s for s in steps if s not in prior], "dataset": dataset_of(row),
            "save": [{"type": "ascendv1_saver", "part_file_size": 4}]}
    if prior:
        spec = {"prior": [{"process": prior}], **spec}
    return {"apiversion": APIVERSION.get(row.apiversion, row.apiversion), "spec": spec}


# ---- v0 ------------------------------------------------------------------------------------------------------
_V0 = re.compile(r"^(?:anti=(?P<anti>m\d) → )?(?:calib )?w(?P<w>\d+)a(?P<a>\d+)(?P<rest>.*)$")


def v0_config(row: RecipeRow, moe: bool) -> dict:
    """A modelslim_v0 spec (upstream keys: anti_cfg / calib_cfg / calib_params / calib_dataset) written from the
    row; on MoE models the MLP (experts) runs dynamic, as upstream's MoE v0 file does with mix_cfg."""
    match = _V0.match(row.pipeline)
    if match is None:
        raise ValueError(f"{row.file}: cannot read v0 pipeline {row.pipeline!r}")
    rest = match["rest"]
    calib = {"w_bit": int(match["w"]), "a_bit": int(match["a"]), "act_method": 1, "mm_tensor": False,
             "disable_names": ["lm_head"]}
    if "pdmix" in rest:
        calib["pdmix"] = True
    if "kv" in rest:
        calib["use_kvcache_quant"] = True
    if "co_sparse" in rest:
        calib.update(is_lowbit=True, co_sparse=True, fraction=0.011, use_sigma=True, sigma_factor=3.0)
    spec: dict = {"calib_cfg": calib, "calib_dataset": dataset_of(row),
                  "calib_save_params": {"part_file_size": 4}}
    if match["anti"]:
        spec["anti_cfg"] = {"anti_method": match["anti"]}
    if moe and calib["a_bit"] == 8:
        spec["calib_params"] = {"mix_cfg": {"*.mlp.*": "w8a8_dynamic", "*": "w8a8"}}
    return {"apiversion": "modelslim_v0", "spec": spec}


def config_of(row: RecipeRow, moe: bool) -> dict:
    return v0_config(row, moe) if row.apiversion == "modelslim_v0" else v1_config(row, moe)


def markdown_table() -> str:
    """docs/recipes.md's table: every row and what this version does with it (regenerate with
    `python tests/upstream_recipes.py > docs/recipes.md` after changing a row's expectation)."""
    runs = sum(r.expect in ("runs", RUNS_DIFFUSION) for r in ROWS)
    lines = ["# The established tool's 89 recipes, here", "",
             "Generated by `python tests/upstream_recipes.py > docs/recipes.md` from the rows that "
             "`tests/test_recipes.py` runs: each recipe (protocol.md §3.4) written as a config and run end to end on a "
             "tiny random checkpoint of its family (quant, `msmodelslim check`, our reader and the independent "
             "reference reader, plan = written description), or refused before any weight is read, naming what is "
             "missing. Vision-language rows (mm_vlm) run on a tiny checkpoint of their family (tests/tiny_vlm.py), "
             "calibrated on the first calibImages entries and compared on image+prompt logits.", "",
             f"**{runs} of {len(ROWS)} run**; the others are refused by name.", "",
             "| recipe | apiversion | pipeline | here |", "|---|---|---|---|"]
    for r in ROWS:
        here = r.expect if r.expect in ("runs", RUNS_DIFFUSION) else f"refused: {r.expect}"
        lines.append(f"| {r.file} | {r.apiversion} | {r.pipeline} | {here} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
