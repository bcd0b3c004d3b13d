"""An independent ascendv1 reader for tests, written from the format notes (formats.md §C.3) with plain torch.

It shares no code with msmodelslim: it turns every quantized layer back into a float weight and bias, loads the
result into the Hugging Face architecture with strict=True, and installs activation fake-quant hooks that mimic
the serving kernels. MoE experts, saved one tensor set per expert (formats.md A.5), are stacked back into the
fused `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] parameters of the Hugging Face module; with dynamic
activations that module's forward is replaced by one that quantizes each expert's inputs per token.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

GLOBAL = {"version", "model_quant_type", "metadata", "group_size", "optional", "kv_cache_type", "kv_quant_type"}


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
    """(float state dict, {layer prefix: activation info}) from an ascendv1 directory."""
    desc = json.loads((path / "quant_model_description.json").read_text())
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
            acts[p] = {"kind": "dynamic"}
            used |= {f"{p}.{s}" for s in ("weight", "input_scale", "input_offset", "deq_scale", "quant_bias",
                                          "weight_scale", "weight_offset")}
        elif tag in ("W8A8_DYNAMIC", "W8A16"):
            q = t[f"{p}.weight"].float()
            w = (q - _expand(t[f"{p}.weight_offset"], q.shape[1])) * _expand(t[f"{p}.weight_scale"], q.shape[1])
            b = t.get(f"{p}.bias")
            if tag == "W8A8_DYNAMIC":
                acts[p] = {"kind": "dynamic"}
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale", "weight_offset")}
        elif tag == "W4A8_DYNAMIC":
            q = _unpack_rows(t[f"{p}.weight"])
            w = q * t[f"{p}.weight_scale"].float()
            b = t.get(f"{p}.bias")
            acts[p] = {"kind": "dynamic"}
            used |= {f"{p}.{s}" for s in ("weight", "weight_scale", "weight_offset", "scale_bias")}
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
    for key, value in t.items():
        if key not in used:
            state[key] = value.float() if value.is_floating_point() else value
    return state, acts


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


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127
    return torch.clamp(torch.round(x / s), -128, 127) * s


EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def stack_experts(state: dict[str, torch.Tensor], acts: dict[str, dict]) -> dict[str, str]:
    """Replace per-expert weights in `state` by the stacked parameters, in place; returns {experts module:
    activation kind} ("dynamic" or "float") and drops the experts' entries from `acts`."""
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
        seen = {acts.pop(f"{layer}.{e}.{p}", {"kind": "float"})["kind"] for e in order for p in experts[e]}
        assert len(seen) == 1 and seen != {"static"}, f"{layer}: experts need one dynamic or float activation"
        kinds[layer] = seen.pop()
    return kinds


def dynamic_experts_forward(module):
    """The fused experts' computation with per-token int8 inputs to gate/up and to down, as the kernel does."""
    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        inter = module.down_proj.shape[-1]
        for e in range(module.gate_up_proj.shape[0]):
            token, slot = (top_k_index == e).nonzero(as_tuple=True)
            if len(token) == 0:
                continue
            h = _per_token_int8(hidden_states[token]) @ module.gate_up_proj[e].T
            h = module.act_fn(h[:, :inter]) * h[:, inter:]
            y = _per_token_int8(h) @ module.down_proj[e].T
            out.index_add_(0, token, y * top_k_weights[token, slot].unsqueeze(-1))
        return out

    return forward


def load_reference_model(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    state, acts = dequantized_state(path)
    # formats.md A.6: the DeepSeek-V3.2 indexer's Hadamard matrices are engine-side extras the architecture lacks
    state = {k: v for k, v in state.items() if not k.endswith((".indexer.q_rot", ".indexer.k_rot"))}
    expert_kinds = stack_experts(state, acts)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(state, strict=True)
    for prefix, info in acts.items():
        module = model.get_submodule(prefix)
        if info["kind"] == "kv_cache":
            module.register_forward_pre_hook(_c8_hook(info), with_kwargs=True)
            continue
        if info["kind"] == "static":
            s, o = info["scale"], info["offset"]
            hook = lambda m, a, s=s, o=o: ((torch.clamp(torch.round(a[0] / s + o), -128, 127) - o) * s,)
        else:
            hook = lambda m, a: (_per_token_int8(a[0]),)
        module.register_forward_pre_hook(hook)
    for layer, kind in expert_kinds.items():
        if kind == "dynamic":
            experts = model.get_submodule(layer)
            experts.forward = dynamic_experts_forward(experts)
    return model
