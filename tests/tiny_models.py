"""Tiny randomly initialised checkpoints of real architectures, saved to disk like a hub download."""
from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog. Quantization maps floating point values onto integers.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Debian packages are managed with apt and dpkg; configuration lives in /etc.",
    "量化把浮点数映射到整数。校准数据决定激活值的范围。",
]


def make_tokenizer(path: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2, norm_topk_prob=True)


def tiny_config(family: str, vocab_size: int, **overrides):
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        return LlamaConfig(**{**common, "head_dim": 16, **overrides})
    if family == "qwen2":
        return Qwen2Config(**common)  # q/k/v carry biases
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if family == "qwen3_moe":  # every layer sparse: 4 routed experts, top-2
        return Qwen3MoeConfig(**{**common, **MOE, "head_dim": 16, "num_experts": 4, "decoder_sparse_step": 1,
                                 **overrides})
    if family == "deepseek_v3":  # MLA; layer 0 dense, layers 1-2 one shared + 4 routed experts, top-2
        mla = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
        return DeepseekV3Config(**{**common, **MOE, **mla, "num_hidden_layers": 3, "num_key_value_heads": 4,
                                   "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                                   "n_group": 1, "topk_group": 1, **overrides})
    return _tiny_family_config(family, common, overrides)


MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
# The families of model/glm.py, deepseek.py, minimax.py, qwen_next.py and longcat.py: layer 0 dense where the
# family has dense layers, then one shared + 4 routed experts (top-2); MLA sizes as DeepSeek-V3's above.
KIMI_CONFIG_JSON = {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"],
                    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}}


def _tiny_family_config(family: str, common: dict, overrides: dict):
    import transformers as t

    moe = {**MOE, "n_routed_experts": 4, "n_shared_experts": 1}
    if family == "glm4_moe":  # GQA with q/k/v biases, q/k norms and half-rotary heads, as GLM-4.5
        return t.Glm4MoeConfig(**{**common, **moe, "num_hidden_layers": 3, "head_dim": 16, "first_k_dense_replace": 1,
                                  "attention_bias": True, "use_qk_norm": True, "n_group": 1, "topk_group": 1,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5}, **overrides})
    if family == "glm4_moe_lite":
        return t.Glm4MoeLiteConfig(**{**common, **moe, **MLA, "num_hidden_layers": 3, "num_key_value_heads": 4,
                                      "mlp_layer_types": ["dense", "sparse", "sparse"], **overrides})
    if family in ("glm_moe_dsa", "deepseek_v32"):  # + the sparse-attention indexer: 2 heads of 16, top-8 keys
        config_class = t.GlmMoeDsaConfig if family == "glm_moe_dsa" else t.DeepseekV32Config
        return config_class(**{**common, **moe, **MLA, "num_hidden_layers": 3, "num_key_value_heads": 4,
                               "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "head_dim": 8,
                               "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8, **overrides})
    if family == "kimi_k2":  # DeepSeek-V3's architecture; make_tiny_model rewrites config.json as Kimi ships it
        return tiny_config("deepseek_v3", common["vocab_size"], **overrides)
    if family == "minimax_m2":  # every layer sparse: 4 routed experts, top-2, no shared expert
        return t.MiniMaxM2Config(**{**common, "num_experts_per_tok": 2, "num_local_experts": 4, "head_dim": 16,
                                    "intermediate_size": 32, "bos_token_id": None, "eos_token_id": None,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.5}, **overrides})
    if family == "qwen3_next":  # three Gated DeltaNet layers, then full attention
        return t.Qwen3NextConfig(**{**common, **MOE, "num_hidden_layers": 4, "head_dim": 16, "num_experts": 4,
                                    "shared_expert_intermediate_size": 48, "linear_key_head_dim": 16,
                                    "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                    "layer_types": ["linear_attention"] * 3 + ["full_attention"], **overrides})
    if family == "deepseek_v4":  # sliding, CSA (compressor + indexer) and HCA layers; hash routing in layer 0;
        # 4 hyper-connection streams as published; head_dim 32 of which 8 rotary; wo_a in 2 groups
        sizes = {k: v for k, v in common.items() if k != "intermediate_size"}  # an alias of moe_intermediate_size
        return t.DeepseekV4Config(**{**sizes, **moe, "num_hidden_layers": 3, "num_key_value_heads": 1,
                                     "head_dim": 32, "q_lora_rank": 32, "partial_rotary_factor": 0.25,
                                     "layer_types": ["sliding_attention", "compressed_sparse_attention",
                                                     "heavily_compressed_attention"],
                                     "mlp_layer_types": ["hash_moe", "moe", "moe"],
                                     "compress_rates": {"compressed_sparse_attention": 4,
                                                        "heavily_compressed_attention": 8},
                                     "hc_mult": 4, "sliding_window": 16, "o_groups": 2, "o_lora_rank": 16,
                                     "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4,
                                     "num_nextn_predict_layers": 0, **overrides})
    if family == "longcat_flash":  # 2 layers of (2 MLA + 2 MLPs + MoE of 4 routed and 2 identity experts, top-2)
        sizes = {k: v for k, v in common.items() if k not in ("num_hidden_layers", "intermediate_size")}
        return t.LongcatFlashConfig(**{**sizes, **MLA, "num_key_value_heads": 4, "num_layers": 2,
                                       "ffn_hidden_size": 128, "moe_topk": 2, "n_routed_experts": 4,
                                       "zero_expert_num": 2, "expert_ffn_hidden_size": 32, "head_dim": 8, **overrides})
    raise ValueError(family)


# Step-3.5-Flash's config.json keys (its own code reads them; transformers' Step3p7TextConfig folds them in).
# Swiglu limits far below the published 7.0 / 16.0 so that the clamps act on the tiny model's activations; routed
# scaling 1.0 rather than the published 3.0, which triples the random experts' output and doubles the tiny model's
# sensitivity to int8 rounding (logit drift 0.14 against 0.06).
STEP35_CONFIG_JSON = {
    "model_type": "step3p5", "architectures": ["Step3p5ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_step3p5.Step3p5Config",
                 "AutoModelForCausalLM": "modeling_step3p5.Step3p5ForCausalLM"},
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_attention_groups": 2, "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "layer_types": ["full_attention", "sliding_attention", "full_attention"], "sliding_window": 8,
    "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 8,
                                "num_attention_groups": 2, "head_dim": 16},
    "rope_theta": [5000000.0, 10000.0, 5000000.0], "partial_rotary_factors": [0.5, 1.0, 0.5],
    "yarn_only_types": ["full_attention"], "moe_layers_enum": "1,2", "moe_num_experts": 4, "moe_top_k": 2,
    "moe_intermediate_size": 32, "share_expert_dim": 32, "moe_router_activation": "sigmoid",
    "moe_router_scaling_factor": 1.0, "norm_expert_weight": True, "use_moe_router_bias": True,
    "swiglu_limits": [0.0, 0.0, 0.3], "swiglu_limits_shared": [0.0, 0.0, 0.5], "use_head_wise_attn_gate": True,
    "use_qk_norm": True, "zero_centered": True, "need_fp32_gate": True, "att_impl_type": "GQA",
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def step35_published_state(state: dict, config) -> dict:
    """transformers' Step3p7 text-model names -> Step-3.5-Flash's checkpoint names: a sparse layer's `mlp` is
    `moe`, its experts stacked per projection (`moe.gate_proj.weight` [E, I, H], `moe.up_proj.weight`,
    `moe.down_proj.weight` [E, H, I]), the router bias `moe.router_bias`, the shared expert `moe.share_expert`."""
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if name.startswith("model.layers.") and config.mlp_layer_types[int(parts[2])] == "sparse":
            name = name.replace(".mlp.", ".moe.", 1)
            if name.endswith(".moe.experts.gate_up_proj"):
                block = name[: -len(".experts.gate_up_proj")]
                gate, up = tensor.chunk(2, dim=1)
                out[f"{block}.gate_proj.weight"], out[f"{block}.up_proj.weight"] = gate.contiguous(), up.contiguous()
                continue
            name = (name.replace(".moe.experts.down_proj", ".moe.down_proj.weight")
                    .replace(".moe.gate.e_score_correction_bias", ".moe.router_bias")
                    .replace(".moe.shared_experts.", ".moe.share_expert."))
        out[name] = tensor.contiguous()
    return out


def _make_step35(path: Path, vocab_size: int, dtype: torch.dtype) -> Path:
    """A tiny Step-3.5-Flash as published: legacy config.json keys, stacked experts per projection."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    from msmodelslim.model.step import register_causal_lm

    register_causal_lm()
    config_json = {**STEP35_CONFIG_JSON, "vocab_size": vocab_size}
    config = Step3p7TextConfig.from_dict({k: v for k, v in config_json.items() if k not in ("auto_map",)})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name:  # zero-centred norms scale by 1 + weight
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    state = step35_published_state(model.to(dtype).state_dict(), config)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_json, indent=2))
    return path


# transformers' DeepseekV4 names -> DeepSeek's native checkpoint names (the inverse of the renames transformers'
# conversion_mapping applies when it loads a DeepSeek-V4 checkpoint), applied in order.
DEEPSEEK_V4_NATIVE = (
    (r"^model\.embed_tokens\.", "embed."), (r"^lm_head\.", "head."), (r"^model\.norm\.", "norm."),
    (r"^model\.hc_head\.hc_", "hc_head_"), (r"^model\.layers\.", "layers."),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."), (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"), (r"\.sinks$", ".attn_sink"),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."), (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."), (r"\.q_b_proj\.", ".wq_b."), (r"\.q_a_norm\.", ".q_norm."),
    (r"\.kv_proj\.", ".wkv."), (r"\.gate_proj\.", ".wgate."), (r"\.o_a_proj\.", ".wo_a."), (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"), (r"\.shared_experts\.wgate\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."), (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
)


def deepseek_v4_native_state(state: dict) -> dict:
    """A transformers DeepseekV4 state dict under DeepSeek's native names, experts one tensor set per expert
    (`ffn.experts.E.w1/w3/w2`), rotary buffers dropped: the layout of the published DeepSeek-V4 checkpoints."""
    import re

    def native(name: str) -> str:
        for pattern, replacement in DEEPSEEK_V4_NATIVE:
            name = re.sub(pattern, replacement, name)
        return name

    out = {}
    for name, tensor in state.items():
        if "rotary_emb" in name:
            continue
        if name.endswith(".experts.gate_up_proj"):
            experts = native(name.removesuffix(".gate_up_proj"))
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{experts}.{e}.w1.weight"], out[f"{experts}.{e}.w3.weight"] = gate[e].clone(), up[e].clone()
        elif name.endswith(".experts.down_proj"):
            experts = native(name.removesuffix(".down_proj"))
            for e in range(tensor.shape[0]):
                out[f"{experts}.{e}.w2.weight"] = tensor[e].clone()
        else:
            out[native(name)] = tensor.contiguous()
    return out


def save_deepseek_v4(model, path: Path) -> None:
    """Save a transformers DeepseekV4 model as DeepSeek publishes it (native names; transformers' own save
    reverses its renames only in part, e.g. `model.embed_tokens`, `attn.norm` for kv_norm)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(path)
    save_file(deepseek_v4_native_state(model.state_dict()), path / "model.safetensors", metadata={"format": "pt"})


def _deepseek_v4_routing(model, seed: int) -> None:
    """Hash-routed layers get a token -> experts table with distinct experts per token (transformers initialises it
    to zeros, every token to expert 0), scored routers a non-zero correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                buffer.copy_(torch.stack([torch.randperm(experts, generator=g)[: buffer.shape[1]]
                                          for _ in range(buffer.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn(buffer.shape, generator=g))


def _as_published(path: Path, family: str) -> None:
    """Make the saved checkpoint look like the family's published one where transformers' save differs."""
    import json

    from safetensors.torch import load_file, save_file

    if family == "kimi_k2":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **KIMI_CONFIG_JSON}, indent=2))
    if family == "longcat_flash":  # transformers also saves gate/up rows for the weightless identity experts
        (weights,) = path.glob("*.safetensors")
        config = json.loads((path / "config.json").read_text())
        state = load_file(weights)
        routed = config["n_routed_experts"]
        state = {k: v for k, v in state.items()
                 if not (".mlp.experts." in k and int(k.split(".mlp.experts.")[1].split(".")[0]) >= routed)}
        save_file(state, weights, metadata={"format": "pt"})


def make_tiny_model(path: Path, family: str = "llama", dtype: torch.dtype = torch.float32, tie: bool = False,
                    seed: int = 0, shards: str | None = None, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
    if family == "step3p5":  # no transformers causal-LM class of its own: built and saved as published
        torch.manual_seed(seed)
        return _make_step35(path, len(tokenizer), dtype)
    config = tiny_config(family, len(tokenizer), **overrides)
    config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF init is tiny (std 0.02); widen it so activations and outliers are non-trivial
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # 3-D: fused MoE experts
                p.normal_(0, 0.08)
            if "bias" in name:
                p.normal_(0, 0.05)
            if ".linear_attn." in name and p.dim() >= 2:
                # Qwen3-Next's random gated delta rule amplifies weight noise through its recurrence at 0.08 (int8
                # rounding of in_proj_qkvz alone moved the logits by 26%); 0.04 keeps it as tame as the others
                p.normal_(0, 0.04)
    model = model.to(dtype)
    if family == "deepseek_v4":  # saved under DeepSeek's native names, as published
        _deepseek_v4_routing(model, seed)
        save_deepseek_v4(model, path)
        return path
    kwargs = {"max_shard_size": shards} if shards else {}
    model.save_pretrained(path, **kwargs)
    _as_published(path, family)
    return path
