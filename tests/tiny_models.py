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
    raise ValueError(family)


def make_tiny_model(path: Path, family: str = "llama", dtype: torch.dtype = torch.float32, tie: bool = False,
                    seed: int = 0, shards: str | None = None, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(path)
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
    model = model.to(dtype)
    kwargs = {"max_shard_size": shards} if shards else {}
    model.save_pretrained(path, **kwargs)
    return path
