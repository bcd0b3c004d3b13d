"""An independent ascendv1 reader for tests, written from the format notes (formats.md §C.3) with plain torch.

It shares no code with msmodelslim: it turns every quantized layer back into a float weight and bias, loads the
result into the Hugging Face architecture with strict=True, and installs activation fake-quant hooks that mimic
the serving kernels; a dynamic int8 layer with per-channel symmetric int codes computes the kernel's own
arithmetic (formats.md A.4.3: exact integer sums, then the two scales). MoE experts, saved one tensor set per
expert (formats.md A.5), are stacked back into the fused `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]
parameters of the Hugging Face module; with dynamic activations that module's forward is replaced by one that
quantizes each expert's inputs per token.
Families whose published names are not transformers' (MiniMax-M2, Step-3.5-Flash, Qwen2.5-VL) are renamed to
transformers' modules first (PUBLISHED_TO_TRANSFORMERS); vision-language checkpoints (Qwen2.5-VL, Qwen3-VL,
Qwen3-VL-MoE) are rebuilt in transformers' image-text-to-text class, so image+prompt inputs run through them;
Kimi-K2's config.json is read as DeepSeek-V3's, Step-3.5's text model gets an lm_head here, and LongCat's
weightless identity experts get zero gate/up rows (transformers keeps them).
A type ending in `_SVD` / `_SVD_DYNAMIC` (SVDQuant, formats.md A.4.4) is the inner type's layer plus a float
branch `(x @ svd_lowrank_l1.T) @ svd_lowrank_l2.T` that reads the unquantized input.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

GLOBAL = {"version", "model_quant_type", "metadata", "group_size", "optional", "kv_cache_type", "kv_quant_type",
          "fa_quant_type"}
FA3 = "#fa3"  # acts key suffix of an attention's FA quant (its C8 info, if any, sits under the bare name)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _deq_scale_f32(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.int64:  # the low 32 bits are the float32 bit pattern
        bits = (t & 0xFFFFFFFF).numpy().astype("uint32")
        return torch.from_numpy(bits.view("float32").copy())
    return t.float()


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    rows = []
    for j in range(packed.shape[0]):
        byte = packed[j].to(torch.int32) & 0xFF
        lo, hi = byte & 0xF, (byte >> 4) & 0xF
        rows.append(torch.where(lo >= 8, lo - 16, lo))
        rows.append(torch.where(hi >= 8, hi - 16, hi))
    return torch.stack(rows).float()


def _unpack_int32(packed: torch.Tensor, k: int) -> torch.Tensor:
    u = packed.to(torch.int64) & 0xFFFFFFFF
    cols = [((u >> (4 * i)) & 0xF) - 8 for i in range(8)]
    return torch.stack(cols, dim=-1).reshape(packed.shape[0], -1)[:, :k].float()


def _expand(param: torch.Tensor, k: int) -> torch.Tensor:
    """[N, n_groups] -> [N, K] by repeating each group's value over its columns."""
    return param.float().repeat_interleave(k // param.shape[1], dim=1)


def dequantized_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(float state dict, {layer prefix: activation info}) from an ascendv1 directory, or a MindIE one (the same
    entries and tensors, described in quant_model_description_<type>.json)."""
    files = [path / "quant_model_description.json"] + sorted(path.glob("quant_model_description_*.json"))
    desc = json.loads(next(f for f in files if f.is_file()).read_text())
    t = _tensors(path)
    state: dict[str, torch.Tensor] = {}
    acts: dict[str, dict] = {}
    used = set()
    for key, tag in desc.items():
        if key in GLOBAL or tag == "FLOAT":
            continue
        if not (key.endswith(".weight") or key.endswith(".weight_packed")):
            continue
        p = key.rsplit(".", 1)[0]
        lowrank = tag.endswith(("_SVD", "_SVD_DYNAMIC"))
        if lowrank:  # W4A4_MXFP4_SVD -> W4A4_MXFP4, W8A8_SVD_DYNAMIC -> W8A8_DYNAMIC
            tag = tag.replace("_SVD", "", 1) if tag.endswith("_SVD_DYNAMIC") else tag[: -len("_SVD")]
        if tag in ("W8A8", "W8A8S"):  # W8A8S: the W8A8 tensors, the int8 codes merely sparse
            q, s_in, o_in = t[f"{p}.weight"].float(), t[f"{p}.input_scale"].float(), t[f"{p}.input_offset"].float()
            dq = _deq_scale_f32(t[f"{p}.deq_scale"])
            w = q * (dq / s_in)[:, None]
            b = (t[f"{p}.quant_bias"].float() + o_in * q.sum(dim=1)) * dq
            if f"{p}.bias" not in t:  # no float bias: quant_bias only carries the zero-point correction
                assert bool((b.abs() <= dq / 2 + 1e-7).all()), f"{p}: quant_bias implies a bias the layer lacks"
                b = None
            acts[p] = {"kind": "static", "scale": s_in, "offset": o_in}
            used |= {f"{p}.{s}" for s in ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias")}
        elif tag == "W8A8_MIX":  # prefill nodes: the dynamic kernel on weight_scale; decode's static half must agree
            q = t[f"{p}.weight"].float()
            s_w = t[f"{p}.weight_scale"].float()[:, 0]
            s_in = t[f"{p}.input_scale"].float()
            assert torch.allclose(_deq_scale_f32(t[f"{p}.deq_scale"]) / s_in, s_w, rtol=1e-6), f"{p}: two scales"
            assert not bool(t[f"{p}.weight_offset"].any()), f"{p}: W8A8_MIX weights are symmetric"
            w, b = q * s_w[:, None], t.get(f"{p}.bias")
            acts[p] = {"kind": "dynamic", "integer": (q, s_w)}
            used |= {f"{p}.{s}" for s in ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias",
                                          "weight_scale", "weight_offset")}
        elif tag in ("W8A8_DYNAMIC", "W8A16"):
            q = t[f"{p}.weight"].float()
            w = (q - _expand(t[f"{p}.weight_offset"], q.shape[1])) * _expand(t[f"{p}.weight_scale"], q.shape[1])
            b = t.get(f"{p}.bias")
            if tag == "W8A8_DYNAMIC":
                acts[p] = {"kind": "dynamic"}
                if t[f"{p}.weight_scale"].shape[1] == 1 and not bool(t[f"{p}.weight_offset"].any()):
                    acts[p]["integer"] = (q, t[f"{p}.weight_scale"].float()[:, 0])
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale", "weight_offset")}
        elif tag == "W4A4_DYNAMIC":  # A.4.7: int4 codes one per int8, per-channel scale, per-token int4 input
            w = t[f"{p}.weight"].float() * t[f"{p}.weight_scale"].float()
            b = t.get(f"{p}.bias")
            acts[p] = {"kind": "dynamic_int4"}
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale", "weight_offset")}
        elif tag == "W4A4_FLATQUANT_DYNAMIC":  # A.4.8, as vLLM-Ascend loads it: P1 = left_trans^T, P2 = right_trans
            w = t[f"{p}.weight"].float() * t[f"{p}.weight_scale"].float()
            b = t.get(f"{p}.bias")
            acts[p] = {"kind": "flatquant", "p1": t[f"{p}.left_trans"].float().t().contiguous(),
                       "p2": t[f"{p}.right_trans"].float(), "clip": float(t[f"{p}.clip_ratio"].reshape(-1)[0])}
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale", "weight_offset", "left_trans", "right_trans",
                                          "clip_ratio")}
        elif tag == "W4A4_MXFP4_FLATQUANT":  # A.4.8 over A.4.10, as vLLM-Ascend's scheme of that name loads it
            stored = t[f"{p}.weight"]
            w = _fp4_values(stored) * _expand(_e8m0(t[f"{p}.weight_scale"]), stored.shape[1] * 2)
            b = t.get(f"{p}.bias")
            acts[p] = {"kind": "flatquant_mxfp4", "p1": t[f"{p}.left_trans"].float().t().contiguous(),
                       "p2": t[f"{p}.right_trans"].float(), "clip": float(t[f"{p}.clip_ratio"].reshape(-1)[0])}
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale", "left_trans", "right_trans", "clip_ratio")}
        elif tag == "W4A8_DYNAMIC":
            q = _unpack_rows(t[f"{p}.weight"])
            w = q * t[f"{p}.weight_scale"].float()
            b = t.get(f"{p}.bias")
            acts[p] = {"kind": "dynamic", "integer": (q, t[f"{p}.weight_scale"].float()[:, 0])}
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale", "weight_offset", "scale_bias")}
        elif tag in ("WFP8AFP8_DYNAMIC", "W8A8FP8_DYNAMIC"):  # A.4.9: the writer's and the engine's spelling
            w = t[f"{p}.weight"].float() * t[f"{p}.weight_scale"].float()
            b = t.get(f"{p}.bias")
            acts[p] = {"kind": "dynamic_fp8"}
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale", "weight_offset")}
        elif tag in MX_ACT_KIND:  # A.4.10: E8M0 bytes, FP4 packed low nibble first
            stored = t[f"{p}.weight"]
            values = _fp4_values(stored) if stored.dtype == torch.uint8 else stored.float()
            w = values * _expand(_e8m0(t[f"{p}.weight_scale"]), values.shape[1])
            b = t.get(f"{p}.bias")
            if MX_ACT_KIND[tag] != "float":
                acts[p] = {"kind": MX_ACT_KIND[tag]}
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale")}
            if tag == "W4A4_MXFP4_DUALSCALE":  # float32 [N, K/D, 1] over the MXFP4 weight; inputs alike at run time
                dual = t[f"{p}.weight_dual_scale"].float()
                assert dual.dim() == 3 and dual.shape[2] == 1 and w.shape[1] % dual.shape[1] == 0, p
                w = w * _expand(dual[:, :, 0], w.shape[1])
                acts[p] = {"kind": "dynamic_mxfp4_dual", "dual_block": w.shape[1] // dual.shape[1]}
                used.add(f"{p}.weight_dual_scale")
        elif tag == "W16A16S":  # a pruned float weight, used as it is
            w, b = t[f"{p}.weight"].float(), t.get(f"{p}.bias")
            used.add(f"{p}.weight")
        elif tag == "W4A16":
            n, k = (int(v) for v in t[f"{p}.weight_shape"])
            q = _unpack_int32(t[f"{p}.weight_packed"], k)
            w = q * _expand(t[f"{p}.weight_scale"], k)
            b = t.get(f"{p}.bias")
            used |= {f"{p}.{s}" for s in ("weight_packed", "weight_scale", "weight_shape")}
        else:
            raise ValueError(tag)
        if lowrank:  # l1 [r, K] projects the input down, l2 [N, r] back up
            l1, l2 = t[f"{p}.svd_lowrank_l1"].float(), t[f"{p}.svd_lowrank_l2"].float()
            assert l1.shape[1] == w.shape[1] and l2.shape[0] == w.shape[0] and l1.shape[0] == l2.shape[1], p
            acts.setdefault(p, {"kind": "float"})["lowrank"] = (l1, l2)
            used |= {f"{p}.svd_lowrank_l1", f"{p}.svd_lowrank_l2"}
        if f"{p}.heads_rotation" in t:  # online QuaRot (protocol.md §4.4): input [H, d] -> R^T [H, d]
            acts.setdefault(p, {"kind": "float"})["rotate"] = (t[f"{p}.heads_rotation"].float(),)
            used.add(f"{p}.heads_rotation")
        elif f"{p}.kronecker_rotation_m" in t:  # input [m, n] -> R_m^T [m, n] R_n
            pair = (t[f"{p}.kronecker_rotation_m"].float(), t[f"{p}.kronecker_rotation_n"].float())
            acts.setdefault(p, {"kind": "float"})["rotate"] = pair
            used |= {f"{p}.kronecker_rotation_m", f"{p}.kronecker_rotation_n"}
        state[f"{p}.weight"] = w
        if b is not None:
            state[f"{p}.bias"] = b.float()
            used.add(f"{p}.bias")
    for key, tag in desc.items():  # C8 (formats.md A.6): <attn>.{k,v}_proj.kv_cache_{scale,offset} [kv_heads·head_dim]
        if key in GLOBAL or tag != "C8":
            continue
        attention, projection, name = key.rsplit(".", 2)
        acts.setdefault(attention, {"kind": "kv_cache"})[f"{projection}.{name}"] = t[key].float()
        used.add(key)
    for key, tag in desc.items():  # FA quant (formats.md A.6): <attn>.fa_{q,k,v}.scale [heads, 1], offsets unused
        if key in GLOBAL or tag != "FAQuant":
            continue
        attention, branch, name = key.rsplit(".", 2)
        if name == "scale":
            acts.setdefault(attention + FA3, {"kind": "fa3"})[branch] = t[key].float()
        used.add(key)
    for key, value in desc.items():  # dynamic FA quant: the `<attn>.quant_type` string alone (protocol.md §4.3)
        if not key.endswith(".quant_type") or key.endswith(".indexer.quant_type"):
            continue
        tokens = _fa3_tokens(value)
        if any(t in FA3_RUNTIME for t in tokens):
            acts[key.removesuffix(".quant_type") + FA3] = {"kind": "fa3", **dict(zip(("fa_q", "fa_k", "fa_v"), tokens))}
    for key, value in t.items():
        if key not in used:
            state[key] = value.float() if value.is_floating_point() else value
    return state, acts


def _online_rotation(x: torch.Tensor, matrices: tuple) -> torch.Tensor:
    """protocol.md §4.4: heads_rotation R: x[h', j] = sum_h R[h, h'] x[h, j]; Kronecker pair: X' = R_m^T X R_n."""
    if len(matrices) == 1:
        r = matrices[0]
        heads = x.reshape(*x.shape[:-1], r.shape[0], -1)
        return torch.einsum("...hj,hg->...gj", heads.float(), r).reshape(x.shape).to(x.dtype)
    r_m, r_n = matrices
    grid = x.reshape(*x.shape[:-1], r_m.shape[0], r_n.shape[0])
    return torch.einsum("...ab,ac,bd->...cd", grid.float(), r_m, r_n).reshape(x.shape).to(x.dtype)


def _c8_cache_read(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x [batch, kv_heads, tokens, head_dim], channel h·D + d: int8 on the cache write (with the offset), the
    scale alone on the read, as vLLM-Ascend's C8."""
    heads, dim = x.shape[1], x.shape[3]
    s = scale.reshape(heads, dim)[None, :, None, :]
    o = offset.reshape(heads, dim)[None, :, None, :]
    return torch.clamp(torch.round(x / s + o), -128, 127) * s


class _C8Cache:
    """Given to an attention as its cache: K/V go through the int8 cache on their way to the real one (if any)."""

    def __init__(self, info: dict, inner) -> None:
        self.info, self.inner = info, inner

    def update(self, key_states, value_states, *args, **kwargs):
        i = self.info
        key_states = _c8_cache_read(key_states, i["k_proj.kv_cache_scale"], i["k_proj.kv_cache_offset"])
        value_states = _c8_cache_read(value_states, i["v_proj.kv_cache_scale"], i["v_proj.kv_cache_offset"])
        if self.inner is None:
            return key_states, value_states
        return self.inner.update(key_states, value_states, *args, **kwargs)


def _c8_hook(info: dict):
    def hook(module, args, kwargs):
        inner = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        kwargs["cache"] = _C8Cache(info, inner)  # transformers 5 names the attention's cache argument `cache`
        return args, kwargs

    return hook


def _fa3_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, tokens, dim]: int8 with one scale per head, read back with the scale alone."""
    s = scale.reshape(1, -1, 1, 1)
    return torch.clamp(torch.round(x.float() / s), -128, 127) * s


# A dynamic branch's token -> what the kernel does to x [batch, heads, tokens, dim] along dim; INT8_DYNAMIC is read
# by no engine (formats.md A.6) and stays float
FA3_RUNTIME = {"FP8_DYNAMIC": lambda x: _per_token_fp8(x.float()), "MXFP8_DYNAMIC": lambda x: _mx(x.float(), "e4m3"),
               "MXFP4_DYNAMIC": lambda x: _mx(x.float(), "e2m1")}


def _fa3_tokens(value: str) -> list[str]:
    """Q, K, V tokens of an FA3 quant_type: one token for all three, or '<letters>_<token>' groups in Q, K, V order."""
    token = r"(?:INT8|FP8|MXFP8|MXFP4)(?:_DYNAMIC)?"
    if re.fullmatch(token, value):
        return [value] * 3
    groups = re.findall(rf"([QKV]+)_({token})(?=_[QKV]+_|$)", value)
    tokens = [t for letters, t in groups for _ in letters]
    assert "".join(letters for letters, _ in groups) == "QKV", f"unreadable FA3 quant_type {value!r}"
    return tokens


def _fa3_branch(x: torch.Tensor, info) -> torch.Tensor:
    """A branch as saved: a per-head int8 scale tensor, or a dynamic token."""
    if isinstance(info, torch.Tensor):
        return _fa3_int8(x, info)
    return FA3_RUNTIME.get(info, lambda v: v.float())(x)


def _plain_attention(q, k, v, mask, scaling):
    """softmax(q k^T · scaling + mask) v, every tensor [batch, heads, tokens, dim] with k/v on all heads; mask as
    transformers passes it (None: causal; bool: True attends; float: added). Returns [batch, tokens, heads, dv]."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., : scores.shape[-1]], float("-inf"))
    else:
        scores = scores + mask[..., : scores.shape[-1]]
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).transpose(1, 2)


class _LatentCache:
    """MLA: given to the attention as its cache, keeps the latent (c_kv, k_rot) it writes (no real cache)."""

    def __init__(self, module) -> None:
        self.module = module

    def update(self, key_states, value_states, *args, **kwargs):
        self.module._reference_latent = (key_states, value_states)
        return key_states, value_states

    def update_indexer(self, key, *args, **kwargs):
        return key


def _fa3_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """FA quant as formats.md A.6 describes it: Q, K, V int8 per head (or, dynamic, FP8 per token / MX per block of
    32 along the head dim) before the kernel. MLA (kv_b_proj) attends in
    the absorbed latent space, K = [c_kv; k_rot] and V = c_kv one head, Q_h = [W_UK_h^T q_nope_h; q_rot_h]."""
    info = module._reference_fa3
    if hasattr(module, "kv_b_proj"):
        c_kv, k_rot = module.__dict__.pop("_reference_latent")
        heads, nope = query.shape[1], module.qk_nope_head_dim
        w = module.kv_b_proj.weight.float().reshape(heads, nope + module.v_head_dim, -1)
        q = torch.cat([torch.einsum("bhtn,hnr->bhtr", query[..., :nope].float(), w[:, :nope]), query[..., nope:]], -1)
        k = torch.cat([c_kv, k_rot], -1)
        q, k, v = _fa3_branch(q, info["fa_q"]), _fa3_branch(k, info["fa_k"]), _fa3_branch(c_kv, info["fa_v"])
        out = _plain_attention(q, k.expand(-1, heads, -1, -1), v.expand(-1, heads, -1, -1), attention_mask, scaling)
        return torch.einsum("bthr,hvr->bthv", out, w[:, nope:]).to(query.dtype), None
    groups = query.shape[1] // key.shape[1]
    q, k, v = _fa3_branch(query, info["fa_q"]), _fa3_branch(key, info["fa_k"]), _fa3_branch(value, info["fa_v"])
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _plain_attention(q, k, v, attention_mask, scaling).to(query.dtype), None


def _install_fa3(module, info: dict) -> None:
    import copy

    from transformers import AttentionInterface

    AttentionInterface.register("reference_fa3", _fa3_attention)
    module._reference_fa3 = info
    module.config = copy.copy(module.config)
    module.config._attn_implementation_internal = "reference_fa3"
    if hasattr(module, "kv_b_proj"):
        def hook(m, args, kwargs):
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = _LatentCache(m)
            return args, kwargs

        module.register_forward_pre_hook(hook, with_kwargs=True)


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127
    return torch.clamp(torch.round(x / s), -128, 127) * s


def _integer_linear(x: torch.Tensor, codes: torch.Tensor, s_w: torch.Tensor, bias=None) -> torch.Tensor:
    """formats.md A.4.3's kernel: y = s_t · s_w · Σ_k x_q W_q + b, the integer sums exact (float64 holds them),
    rounded to float32 once, then times s_t, then times s_w."""
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127
    x_q = torch.clamp(torch.round(x / s), -128, 127)
    y = (x_q.double() @ codes.double().T).float() * s * s_w
    return y if bias is None else y + bias


def _per_token_fp8(x: torch.Tensor) -> torch.Tensor:
    """FP8 dynamic: s_t = max|x_t| / 448 (formats.md B.5), elements E4M3 (torch's cast: nearest, ties to even)."""
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 448
    return torch.clamp(x / s, -448, 448).to(torch.float8_e4m3fn).float() * s


E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _nearest_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest grid magnitude, a tie to the even index (the code's mantissa bit 0), saturating at 6."""
    distance = (v.abs().double().clamp(max=6).unsqueeze(-1) - E2M1_GRID).abs()
    distance = distance + 1e-9 * (torch.arange(8) % 2)  # breaks exact ties only: grid gaps are >= 0.5
    return torch.copysign(E2M1_GRID[distance.argmin(dim=-1)].float(), v)


def _mx(x: torch.Tensor, element: str) -> torch.Tensor:
    """OCP MX with blocks of 32 along the last axis: X = 2^(floor(log2 amax) - emax), elements rounded and
    saturated (emax 8 for E4M3, 2 for E2M1)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True).double()
    emax = 8 if element == "e4m3" else 2
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - emax, torch.full_like(amax, -127.0)).clamp(-127, 127)
    scale = torch.pow(2.0, e).float()
    v = blocks / scale
    v = torch.clamp(v, -448, 448).to(torch.float8_e4m3fn).float() if element == "e4m3" else _nearest_e2m1(v)
    return (v * scale).reshape(x.shape)


# activation kind -> what the kernel does to the input at run time
def _per_token_int4(x: torch.Tensor) -> torch.Tensor:
    """W4A4_DYNAMIC (formats.md A.4.7): s_t = max|x_t| / 7, codes round(x / s_t) clamped to -8..7."""
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 7
    return torch.clamp(torch.round(x / s), -8, 7) * s


def _kronecker_quant(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, clip: float) -> torch.Tensor:
    """aclnnFlatQuant: each token as X [a, b], X'' = P1 @ (X @ P2); s_t = max|X''|·clip / 7; int4 codes -8..7."""
    tokens = x.reshape(-1, p1.shape[0], p2.shape[0])
    y = torch.matmul(p1, torch.matmul(tokens, p2)).reshape(x.shape)
    s = y.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) * clip / 7
    return torch.clamp(torch.round(y / s), -8, 7) * s


def _kronecker_quant_mxfp4(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, clip: float) -> torch.Tensor:
    """The same with dst_dtype float4_e2m1: X'' clipped per token to ±clip·max|X''|, then MXFP4 per 32 values."""
    tokens = x.reshape(-1, p1.shape[0], p2.shape[0])
    y = torch.matmul(p1, torch.matmul(tokens, p2)).reshape(x.shape)
    bound = y.abs().amax(dim=-1, keepdim=True) * clip
    return _mx(torch.maximum(torch.minimum(y, bound), -bound), "e2m1")


RUNTIME_QUANT = {"dynamic": _per_token_int8, "dynamic_int4": _per_token_int4, "dynamic_fp8": _per_token_fp8,
                 "dynamic_mxfp8": lambda x: _mx(x, "e4m3"), "dynamic_mxfp4": lambda x: _mx(x, "e2m1")}
MX_ACT_KIND = {"W8A8_MXFP8": "dynamic_mxfp8", "W4A8_MXFP": "dynamic_mxfp8", "W4A4_MXFP4": "dynamic_mxfp4",
               "W4A4_MXFP4_DUALSCALE": "dynamic_mxfp4",
               "W4A16_MXFP4": "float"}


def _mxfp4_dual(x: torch.Tensor, block: int) -> torch.Tensor:
    """DualScale inputs: per token and block of `block`, S = max|x| / 6 (1 for zeros), MXFP4 of x / S, times S."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax > 0, amax / 6, torch.ones_like(amax))
    return (_mx((blocks / s).reshape(x.shape), "e2m1").reshape(blocks.shape) * s).reshape(x.shape)


def _e8m0(byte: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, byte.to(torch.float64) - 127).float()


def _fp4_values(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes -> [N, K] E2M1 values: element 2j in the low nibble, sign in bit 3."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int64)
    magnitude = E2M1_GRID.float()[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


# Families whose published (and written) names differ from transformers' modules. The engine maps them with the
# model's own HF -> vLLM names (formats.md A.2); the reference maps them the other way, to transformers' modules,
# from the published layouts: (pattern, replacement) applied in order to every tensor / layer name.
PUBLISHED_TO_TRANSFORMERS = {
    # MiniMax-M2: the MoE block is `block_sparse_moe`, an expert's projections w1 (gate), w3 (up), w2 (down)
    "minimax_m2": [(r"\.block_sparse_moe\.", ".mlp."), (r"(\.experts\.\d+)\.w1\b", r"\1.gate_proj"),
                   (r"(\.experts\.\d+)\.w3\b", r"\1.up_proj"), (r"(\.experts\.\d+)\.w2\b", r"\1.down_proj")],
    # Step-3.5-Flash: a sparse layer's MoE is `moe`, its router bias `moe.router_bias`, shared expert `share_expert`
    "step3p5": [(r"\.moe\.router_bias$", ".mlp.gate.e_score_correction_bias"),
                (r"\.moe\.share_expert\.", ".mlp.shared_experts."), (r"\.moe\.", ".mlp.")],
    # Qwen2.5-VL as published: the language model at `model.*`, the vision tower at `visual.*` (transformers 5 builds
    # `model.language_model.*` and `model.visual.*`, and renames them so on load); Qwen3-VL is published as built
    "qwen2_5_vl": [(r"^visual\.", "model.visual."),
                   (r"^model\.(?!visual\.|language_model\.)", "model.language_model.")],
    # InternVL3.5 -HF as published (and as transformers 5 saves it): renamed to transformers 5's modules on load
    "internvl": [(r"^vision_tower\.", "model.vision_tower."),
                 (r"^multi_modal_projector\.", "model.multi_modal_projector."),
                 (r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head.")],
    # Kimi-K2.5/K2.6 as Moonshot publishes them (transformers' conversion mapping for kimi_k25; the vision `wqkv` is
    # then split into q/k/v by split_kimi_wqkv)
    "kimi_k25": [(r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\b", "lm_head"),
                 (r"^mm_projector\.proj\.0\b", "model.mm_projector.in_proj"),
                 (r"^mm_projector\.proj\.2\b", "model.mm_projector.out_proj"),
                 (r"^mm_projector\.", "model.mm_projector."),
                 (r"^vision_tower\.patch_embed\.pos_emb\.weight$",
                  "model.vision_tower.patch_embed.pos_emb.position_embeddings"),
                 (r"^vision_tower\.patch_embed\.", "model.vision_tower.patch_embed."),
                 (r"^vision_tower\.encoder\.final_layernorm\.", "model.vision_tower.final_layernorm."),
                 (r"^vision_tower\.encoder\.blocks\.(\d+)\.norm0\b", r"model.vision_tower.layers.\1.norm1"),
                 (r"^vision_tower\.encoder\.blocks\.(\d+)\.norm1\b", r"model.vision_tower.layers.\1.norm2"),
                 (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc0\b", r"model.vision_tower.layers.\1.mlp.fc1"),
                 (r"^vision_tower\.encoder\.blocks\.(\d+)\.mlp\.fc1\b", r"model.vision_tower.layers.\1.mlp.fc2"),
                 (r"^vision_tower\.encoder\.blocks\.(\d+)\.wo\b", r"model.vision_tower.layers.\1.attn.proj"),
                 (r"^vision_tower\.encoder\.blocks\.(\d+)\.wqkv\b", r"model.vision_tower.layers.\1.attn.wqkv")],
    # DeepSeek-V4: DeepSeek's native names (the renames transformers' conversion_mapping applies on load)
    "deepseek_v4": [(r"^embed\b", "model.embed_tokens"), (r"^head\b", "lm_head"), (r"^norm\b", "model.norm"),
                    (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"), (r"^layers\.", "model.layers."),
                    (r"\.attn\.indexer\.weights_proj\b", ".attn.compressor.indexer.scorer.weights_proj"),
                    (r"\.attn\.indexer\.wq_b\b", ".attn.compressor.indexer.q_b_proj"),
                    (r"\.attn\.indexer\.compressor\.", ".attn.compressor.indexer."),
                    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.attn_norm\b", ".input_layernorm"),
                    (r"\.ffn_norm\b", ".post_attention_layernorm"), (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
                    (r"\.attn_sink$", ".sinks"), (r"\.compressor\.(indexer\.)?norm\b", r".compressor.\1kv_norm"),
                    (r"\.ape$", ".position_bias"), (r"\.wq_a\b", ".q_a_proj"), (r"\.wq_b\b", ".q_b_proj"),
                    (r"\.q_norm\b", ".q_a_norm"), (r"\.wkv\b", ".kv_proj"), (r"\.wgate\b", ".gate_proj"),
                    (r"\.wo_a\b", ".o_a_proj"), (r"\.wo_b\b", ".o_b_proj"), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
                    (r"\.w1\b", ".gate_proj"), (r"\.w3\b", ".up_proj"), (r"\.w2\b", ".down_proj")],
    # The Omni thinkers as published (`thinker.*`; transformers' conversion mapping of the thinker class)
    **{t: [(r"^thinker\.visual\.", "model.visual."), (r"^thinker\.audio_tower\.", "model.audio_tower."),
           (r"^thinker\.model\.", "model.language_model."), (r"^thinker\.lm_head\.", "lm_head.")]
       for t in ("qwen2_5_omni", "qwen3_omni_moe")},
}
OMNI_SPEECH_PARTS = ("talker.", "token2wav.", "code2wav.")  # beside the thinker; vLLM's thinker model skips them


def transformers_name(name: str, model_type: str) -> str:
    for pattern, replacement in PUBLISHED_TO_TRANSFORMERS.get(model_type, []):
        name = re.sub(pattern, replacement, name)
    return name


def split_kimi_wqkv(state: dict[str, torch.Tensor], acts: dict[str, dict], heads: int) -> None:
    """Kimi-K2.5's vision `attn.wqkv` rows [q; k; v] into transformers' q_proj/k_proj/v_proj, in place: within each
    head the published q/k rows interleave the rotary pairs ((half, 2)), transformers' hold halves ((2, half)).
    The three read the same input, so a quantized wqkv's activation entry applies to each."""
    def halves(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[0] // heads // 2
        return t.reshape(heads, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)

    for key in [k for k in state if ".attn.wqkv." in k]:
        prefix, _, kind = key.rpartition(".")
        q, k, v = state.pop(key).chunk(3)
        attention = prefix.removesuffix(".wqkv")
        for name, part in (("q_proj", halves(q)), ("k_proj", halves(k)), ("v_proj", v)):
            state[f"{attention}.{name}.{kind}"] = part.contiguous()
    for key in [k for k in acts if k.endswith(".attn.wqkv")]:
        info = acts.pop(key)
        # the integer kernel's codes and scales split by rows as the weights are
        parts = [dict(info) for _ in range(3)]
        if "integer" in info:
            codes, scales = (t.chunk(3) for t in info["integer"])
            for i, reorder in enumerate((halves, halves, lambda t: t)):
                parts[i]["integer"] = (reorder(codes[i]).contiguous(), reorder(scales[i]).contiguous())
        for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
            acts[f"{key.removesuffix('.wqkv')}.{name}"] = part


EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def stack_experts(state: dict[str, torch.Tensor], acts: dict[str, dict]) -> dict[str, dict]:
    """Replace per-expert weights in `state` by the stacked parameters, in place; returns {experts module:
    {"kind": activation kind ("dynamic" or "float"), "integer": stacked (codes, scales) of gate_up and down when
    every expert's weights are per-channel symmetric int codes (the integer kernel), else None}} and drops the
    experts' entries from `acts`."""
    per_layer: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key in [k for k in state if k.endswith(".weight")]:
        m = EXPERT.match(key[: -len(".weight")])
        if m:
            per_layer.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = state.pop(key)
    kinds = {}
    for layer, experts in per_layer.items():
        order = range(len(experts))
        state[f"{layer}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]])
                                                     for e in order])
        state[f"{layer}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
        names = [(e, p) for e in order for p in experts[e]]
        infos = [acts.pop(f"{layer}.{e}.{p}", {"kind": "float"}) for e, p in names]
        assert not any("lowrank" in i for i in infos), f"{layer}: low-rank (_SVD) experts are not modelled here"
        seen = {i["kind"] for i in infos}
        assert len(seen) == 1 and seen != {"static"}, f"{layer}: experts need one dynamic or float activation"
        integer = None
        if all("integer" in i for i in infos):
            codes = dict(zip(names, (i["integer"] for i in infos)))  # (expert, projection) -> (codes, s_w)

            def stacked(projections: tuple[str, ...], part: int) -> torch.Tensor:
                return torch.stack([torch.cat([codes[e, p][part] for p in projections]) for e in order])

            gate_up = ("gate_proj", "up_proj")
            integer = (stacked(gate_up, 0), stacked(gate_up, 1), stacked(("down_proj",), 0), stacked(("down_proj",), 1))
        kinds[layer] = {"kind": seen.pop(), "integer": integer}
    return kinds


def dynamic_experts_forward(module, quantize=_per_token_int8, integer=None):
    """The fused experts' computation with per-token int8 inputs to gate/up and to down, as the kernel does
    (or another run-time activation quantizer; with `integer`, the stacked codes and scales, A.4.3's integer
    kernel on each product). Gate and up are two products, as the per-expert linears of our
    reader compute them: one fused product rounds differently (1 ulp), and on a tiny random MoE such a difference
    flips an activation code in a later layer and moves the logits by 0.4 % (test_vlm_qwen3_5, qwen3_5_moe)."""
    routed, inter = module.down_proj.shape[0], module.down_proj.shape[-1]
    limit = getattr(module, "limit", None)  # Step-3.5's clamped SwiGLU (transformers 5.25: None when off)
    limit = float("inf") if limit is None else limit
    # LongCat's zero-computation experts (indices from `routed` on) return their input, in float
    identities = range(routed, module.gate_up_proj.shape[0]) if hasattr(module, "identity_expert") else ()

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in [*range(routed), *identities]:
            token, slot = (top_k_index == e).nonzero(as_tuple=True)
            if len(token) == 0:
                continue
            if e >= routed:
                y = hidden_states[token]
            elif integer is not None:  # the integer kernel (A.4.3) on each of the expert's three products
                gate_up_codes, gate_up_scale, down_codes, down_scale = (part[e] for part in integer)
                x = hidden_states[token]
                gate = _integer_linear(x, gate_up_codes[:inter], gate_up_scale[:inter])
                up = _integer_linear(x, gate_up_codes[inter:], gate_up_scale[inter:])
                h = module.act_fn(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)
                y = _integer_linear(h, down_codes, down_scale)
            else:
                x = quantize(hidden_states[token])
                gate, up = x @ module.gate_up_proj[e, :inter].T, x @ module.gate_up_proj[e, inter:].T
                h = module.act_fn(gate).clamp(max=limit) * up.clamp(min=-limit, max=limit)
                y = quantize(h) @ module.down_proj[e].T
            out.index_add_(0, token, y * top_k_weights[token, slot].unsqueeze(-1))
        return out

    return forward


# Vision-language model types, rebuilt as transformers' image-text-to-text class (called with input_ids,
# pixel_values and image_grid_thw; the tensors of a vision tower the description marks FLOAT load as they are).
VISION_LANGUAGE = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "internvl", "glm4v_moe",
                   "kimi_k25")
OMNI = ("qwen2_5_omni", "qwen3_omni_moe")  # the thinker (image-text class of config.thinker_config) is rebuilt


class _TextModelWithHead(torch.nn.Module):
    """A transformers text model plus lm_head, for a config transformers has no causal-LM class for."""

    def __init__(self, text_model: torch.nn.Module, config) -> None:
        super().__init__()
        self.model = text_model
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, **kwargs):
        hidden = self.model(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(hidden))


def _transformers_model(path: Path, model_type: str | None) -> torch.nn.Module:
    """The float transformers model for the checkpoint's config.json, never the checkpoint's own code."""
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config

    if model_type == "kimi_k2":  # Kimi-K2 ships DeepSeek-V3's architecture under its own model_type
        data = {k: v for k, v in json.loads((path / "config.json").read_text()).items()
                if k not in ("auto_map", "model_type")}
        return AutoModelForCausalLM.from_config(DeepseekV3Config.from_dict(data), dtype=torch.float32).eval()
    if model_type == "step3p5":  # transformers has Step-3.5's text model (Step3p7TextModel), no causal-LM class
        from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return _TextModelWithHead(Step3p7TextModel(config), config).float().eval()
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if model_type in OMNI:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_config(config.thinker_config, dtype=torch.float32).eval()
    if model_type in VISION_LANGUAGE:  # the image-text class: vision tower, merger, language model and head
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def load_reference_model(path: Path):
    state, acts = dequantized_state(path)
    # formats.md A.6: the DeepSeek-V3.2 indexer's Hadamard matrices are engine-side extras the architecture lacks
    state = {k: v for k, v in state.items() if not k.endswith((".indexer.q_rot", ".indexer.k_rot"))}
    # Qwen3.5's multi-token-prediction module (`mtp.*`): vLLM's main model skips it (its draft model reads it)
    state = {k: v for k, v in state.items() if not k.startswith("mtp.")}
    state = {k: v for k, v in state.items() if not k.startswith(OMNI_SPEECH_PARTS)}
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    state = {transformers_name(k, model_type): v for k, v in state.items()}
    acts = {transformers_name(k, model_type): v for k, v in acts.items()}
    if model_type == "kimi_k25":
        heads = json.loads((path / "config.json").read_text())["vision_config"]["num_attention_heads"]
        split_kimi_wqkv(state, acts, heads)
    expert_kinds = stack_experts(state, acts)
    model = _transformers_model(path, model_type)
    expected = model.state_dict()
    for key in [k for k in state if k.endswith(".experts.gate_up_proj")]:
        missing = expected[key].shape[0] - state[key].shape[0]
        if missing > 0:  # LongCat: transformers keeps gate/up rows for the weightless zero-computation experts
            state[key] = torch.cat([state[key], state[key].new_zeros(missing, *state[key].shape[1:])])
    model.load_state_dict(state, strict=True)
    for prefix, info in acts.items():
        if info["kind"] == "fa3":
            _install_fa3(model.get_submodule(prefix.removesuffix(FA3)), info)
            continue
        module = model.get_submodule(prefix)
        if info["kind"] == "kv_cache":
            module.register_forward_pre_hook(_c8_hook(info), with_kwargs=True)
            continue
        if info["kind"] == "static":
            s, o = info["scale"], info["offset"]
            # formats.md A.4.1: the kernel multiplies by the reciprocal of s_in, then adds the offset, then rounds
            quant = lambda x, s=s, o=o: (torch.clamp(torch.round(x * (1.0 / s) + o), -128, 127) - o) * s
        elif info["kind"] == "dynamic_mxfp4_dual":
            quant = lambda x, d=info["dual_block"]: _mxfp4_dual(x, d)
        elif info["kind"] == "flatquant":
            quant = lambda x, i=info: _kronecker_quant(x, i["p1"], i["p2"], i["clip"])
        elif info["kind"] == "flatquant_mxfp4":
            quant = lambda x, i=info: _kronecker_quant_mxfp4(x, i["p1"], i["p2"], i["clip"])
        else:
            quant = RUNTIME_QUANT.get(info["kind"], lambda x: x)  # "float": a weight-only layer with a low-rank pair
        if "rotate" in info:  # the online rotation comes first; quantization and the low-rank branch read its output
            module.register_forward_pre_hook(lambda m, a, r=info["rotate"]: (_online_rotation(a[0], r),))
        if "integer" in info and "rotate" not in info and "lowrank" not in info:
            module.forward = lambda x, m=module, c=info["integer"]: _integer_linear(x, *c, m.bias)
            continue
        if "lowrank" in info:  # y = q(x) W^T + b + (x l1^T) l2^T: the float branch sees x itself
            l1, l2 = info["lowrank"]
            module.forward = lambda x, m=module, q=quant, l1=l1, l2=l2: (
                torch.nn.functional.linear(q(x), m.weight, m.bias) + (x @ l1.T) @ l2.T)
        else:
            module.register_forward_pre_hook(lambda m, a, q=quant: (q(a[0]),))
    for layer, info in expert_kinds.items():
        if info["kind"] in RUNTIME_QUANT:
            experts = model.get_submodule(layer)
            experts.forward = dynamic_experts_forward(experts, RUNTIME_QUANT[info["kind"]], info["integer"])
    return model
