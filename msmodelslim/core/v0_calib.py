"""modelslim_v0 `calib_cfg` and `calib_params` -> the modelslim_v1 linear_quant steps (core/v0.py has the whole
file): one qconfig from calib_cfg (bits, dynamic, pdmix, methods, group size), the attention steps it implies,
its rollback names, and one rule per `mix_cfg` entry, in upstream's order."""
from __future__ import annotations

import re
from typing import Optional

from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.core.v0_section import GLOB, Note, V0Section, add_note

# The open work each refusal belongs to (the wording of core/roadmap.py).
KV_WORK = "the attention and KV-cache quantization work"
SPARSE_WORK = "the sparse quantization (W8A8S) work"
W4A4_WORK = "the low-bit activation (W4A4 with rotations) work"
LAST_LINEAR = "lm_head"  # the last nn.Linear of a Hugging Face causal LM: what disable_last_linear keeps float

# Upstream signatures (keyword -> default).
CALIB_CFG = {
    "w_bit": 8, "a_bit": 8, "act_method": 1, "w_method": "MinMax", "disable_names": None, "pr": 1.0,
    "mm_tensor": True, "dev_id": None, "fraction": 0.01, "nonuniform": False, "co_sparse": False, "w_sym": True,
    "is_lowbit": False, "do_smooth": False, "use_sigma": False, "sigma_factor": 3.0, "disable_last_linear": True,
    "use_kvcache_quant": False, "open_outlier": True, "is_dynamic": False, "group_size": 64, "percdamp": 0.01,
    "pdmix": False,
    "use_fa_quant": False, "fa_amp": 0,  # popped by the service before QuantConfig: FA3 quantization
}
CALIB_PARAMS = {"disable_level": "L0", "all_tensors": None, "mix_cfg": None}
_SPARSE_ONLY = ("fraction", "nonuniform", "use_sigma", "sigma_factor", "do_smooth")
_GROUP_SIZES = (32, 64, 128, 256)
_MIX_TYPES = {"w8a8": (8, 8, False), "w8a16": (8, 16, False), "w8a8_dynamic": (8, 8, True)}
_DISABLE_LEVEL = re.compile(r"^L(0|[1-9]\d*)$")


# ---- calib_cfg -> linear_quant ---------------------------------------------------------------------------------
def attention_steps(calib: V0Section, notes: list[Note]) -> list[dict]:
    """use_kvcache_quant -> a dynamic_cache step (int8 per-channel KV cache; symmetric, as upstream sets it when the
    flag is given, and as the engine needs: it dequantizes with the scale only); use_fa_quant -> a fa3_quant step
    (int8 Q/K/V, one static scale per head). fa_amp (upstream rolls that many attention layers back to float by a
    sensitivity search) is refused by name when non-zero."""
    steps: list[dict] = []
    if calib.flag("use_fa_quant"):
        if calib.whole("fa_amp"):
            raise UnsupportedError(
                f"{calib.path}.fa_amp: {calib.raw('fa_amp')} (rolling the most sensitive attention layers back to float "
                f"after FA3 quantization) is not implemented yet (it belongs to {KV_WORK}); use fa_amp: 0, or exclude "
                f"layers in a modelslim_v1 fa3_quant step")
        notes.append(Note(f"{calib.path}.use_fa_quant", "true -> fa3_quant (int8 Q/K/V per head, static, minmax)"))
        steps.append({"type": "fa3_quant",
                      "qconfig": {"dtype": "int8", "scope": "per_head", "symmetric": True, "method": "minmax"}})
    else:
        calib.ignored("fa_amp", "it applies to FA3 quantization (use_fa_quant) only", notes)
    if not calib.flag("use_kvcache_quant"):
        return steps
    notes.append(Note(f"{calib.path}.use_kvcache_quant", "true -> dynamic_cache (int8 per-channel KV cache, symmetric)"))
    return [{"type": "dynamic_cache",
             "qconfig": {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "minmax"}}] + steps


def sparse_part(calib: V0Section, notes: list[Note]) -> Optional[dict]:
    """The sparse (W8A8S) reading of calib_cfg: the qconfig of linear_quant's weight method lowbit_sparse
    (quantizer/lowbit_sparse.py), or None when calib_cfg asks for no sparse quantization.

    Upstream's QuantConfig turns sparse quantization on with `co_sparse` (w_bit and a_bit are then forced to 4
    and 8), or with `is_lowbit` at w_bit 4 / a_bit 8 without `is_dynamic` (the low-bit sparse algorithm, which
    switches co_sparse off). Its knobs: fraction, use_sigma, sigma_factor, nonuniform, do_smooth, open_outlier,
    act_method (1 minmax, 2 histogram; 3 is refused upstream with is_lowbit). The low-bit path is the one
    implemented here; co_sparse alone is upstream's other sparse algorithm, refused by name."""
    co_sparse, lowbit = calib.flag("co_sparse"), calib.flag("is_lowbit")
    w4a8 = (calib.whole("w_bit"), calib.whole("a_bit")) == (4, 8)
    if co_sparse and not lowbit:
        raise UnsupportedError(f"{calib.path}: co_sparse: true without is_lowbit (upstream's co-sparse algorithm) is "
                               f"not implemented yet (it belongs to {SPARSE_WORK}); is_lowbit: true at w_bit 4 / "
                               f"a_bit 8 gives this project's W8A8S (weight method lowbit_sparse)")
    if not (lowbit and w4a8 and not calib.flag("is_dynamic")):
        return None
    if calib.flag("do_smooth"):
        raise UnsupportedError(f"{calib.path}.do_smooth: the sparse path's own smoothing is not implemented; use "
                               f"anti_cfg for outlier suppression")
    ext = {"w_bit": 4, "fraction": calib.number("fraction"), "use_sigma": calib.flag("use_sigma"),
           "sigma_factor": calib.number("sigma_factor"), "nonuniform": calib.flag("nonuniform")}
    notes.append(Note(f"{calib.path}.is_lowbit", f"true at w_bit 4 / a_bit 8 -> W8A8S: weight method lowbit_sparse "
                                                 f"{ext}, static int8 activations"))
    calib.ignored("co_sparse", "the low-bit path switches it off, as upstream", notes)
    calib.ignored("open_outlier", "the low-bit sparse path keeps its outliers by fraction/sigma", notes)
    weight = {"dtype": "int8", "scope": "per_channel", "symmetric": True, "method": "lowbit_sparse", "ext": ext}
    return {"act": _act(calib, 8, False, notes), "weight": weight}


def _weight_method(calib: V0Section, static_w8a8: bool, notes: Optional[list[Note]]) -> str:
    name = calib.text("w_method")
    if name == "MinMax":
        method = "minmax"
    elif name == "GPTQ":
        if static_w8a8:
            raise ConfigError(f"{calib.path}.w_method: GPTQ does not support static W8A8 (as upstream); use MinMax, "
                              f"or is_dynamic: true")
        method = "gptq"
    elif name == "HQQ":
        raise UnsupportedError(f"{calib.path}.w_method: HQQ (half-quadratic weight quantization) is not implemented "
                               f"in this version; use MinMax or GPTQ")
    elif name == "NF":
        raise UnsupportedError(f"{calib.path}.w_method: NF (NF4 normal-float weights) is not implemented in this "
                               f"version; use MinMax or GPTQ")
    else:
        raise ConfigError(f"{calib.path}.w_method: {name!r} is not one of MinMax, GPTQ, HQQ, NF")
    add_note(notes, "calib_cfg.w_method", f"{name} -> weight method {method}")
    return method


def _weight(calib: V0Section, w_bit: int, a_bit: int, dynamic: bool, per_group: bool,
            notes: Optional[list[Note]]) -> dict:
    w_sym = calib.flag("w_sym")
    if a_bit == 8 and not w_sym:
        raise ConfigError(f"{calib.path}.w_sym: false needs a_bit 16 (upstream requires symmetric weights with "
                          f"8-bit activations)")
    if w_bit == 4 and not w_sym:
        raise UnsupportedError(f"{calib.path}.w_sym: false at w_bit 4 (asymmetric int4 weights) is not implemented "
                               f"in this version: its W4A16 kernels take symmetric int4 weights")
    method = _weight_method(calib, a_bit == 8 and not dynamic, notes)
    weight: dict = {"dtype": f"int{w_bit}", "scope": "per_group" if per_group else "per_channel",
                    "symmetric": w_sym, "method": method}
    ext: dict = {}
    if per_group:
        group_size = calib.whole("group_size")
        if group_size not in _GROUP_SIZES:
            sizes = ", ".join(map(str, _GROUP_SIZES))
            raise ConfigError(f"{calib.path}.group_size: {group_size} is not one of {sizes}")
        ext["group_size"] = group_size
        add_note(notes, "calib_cfg.is_lowbit", f"true with open_outlier false -> weight scope per_group "
                                            f"(group_size {group_size}); mm_tensor does not apply")
    else:
        if calib.flag("mm_tensor"):
            raise UnsupportedError(
                f"{calib.path}.mm_tensor: true (one weight scale per tensor; upstream's default when mm_tensor is not "
                f"written) is not implemented in this version; set mm_tensor: false for per-channel weights, as "
                f"every upstream practice does")
        add_note(notes, "calib_cfg.mm_tensor", "false -> weight scope per_channel")
        calib.ignored("group_size", "it applies to per-group weights only (is_lowbit with open_outlier false)", notes)
    if method == "gptq" and calib.given("percdamp"):
        percdamp = calib.number("percdamp")
        if not 0 < percdamp <= 1:
            raise ConfigError(f"{calib.path}.percdamp: {percdamp} is outside (0, 1]")
        ext["percdamp"] = percdamp
        add_note(notes, "calib_cfg.percdamp", f"{percdamp} -> weight ext percdamp")
    elif method != "gptq":
        calib.ignored("percdamp", "it applies to w_method GPTQ only", notes)
    if ext:
        weight["ext"] = ext
    add_note(notes, "calib_cfg.w_sym", f"{str(w_sym).lower()} -> weight symmetric: {str(w_sym).lower()}")
    return weight


def _act(calib: V0Section, a_bit: int, dynamic: bool, notes: Optional[list[Note]]) -> Optional[dict]:
    pdmix = calib.flag("pdmix")
    if pdmix and (a_bit != 8 or dynamic):
        raise ConfigError(f"{calib.path}.pdmix: true needs static W8A8 (a_bit 8, is_dynamic false), as upstream")
    if a_bit == 16:
        calib.ignored("act_method", "activations stay in float at a_bit 16", notes)
        calib.ignored("pr", "activations stay in float at a_bit 16", notes)
        return None
    if dynamic:
        add_note(notes, "calib_cfg.is_dynamic", "true -> act int8 per_token symmetric (measured at run time)")
        calib.ignored("act_method", "per-token ranges are measured at run time", notes)
        calib.ignored("pr", "per-token ranges are measured at run time", notes)
        return {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}
    if calib.number("pr") != 1.0:
        raise UnsupportedError(f"{calib.path}.pr: {calib.raw('pr')} (QDrop: activations randomly left unquantized "
                               f"during calibration) is not implemented in this version; use pr: 1.0")
    if calib.given("pr"):
        add_note(notes, "calib_cfg.pr", "1.0 -> every calibration activation quantized (no QDrop), as here")
    act_method = calib.whole("act_method")
    if act_method == 3:
        raise UnsupportedError(
            f"{calib.path}.act_method: 3 (the per-layer choice between histogram and min-max by each input's "
            f"max/std ratio) is not implemented in this version; use act_method 1 (min-max) or 2 (histogram)")
    if act_method not in (1, 2):
        raise ConfigError(f"{calib.path}.act_method: {act_method} is not one of 1 (min-max), 2 (histogram), 3 (mix)")
    method = "minmax" if act_method == 1 else "histogram"
    if pdmix and method == "histogram":
        raise UnsupportedError(f"{calib.path}: pdmix with act_method 2 (histogram ranges for the static half of "
                               f"PD-mix) is not implemented in this version; use act_method 1 with pdmix")
    scope = "pd_mix" if pdmix else "per_tensor"
    add_note(notes, "calib_cfg.is_dynamic", "false -> act int8 asymmetric, static ranges from calibration")
    if pdmix:
        add_note(notes, "calib_cfg.pdmix", "true -> act scope pd_mix (W8A8_MIX: static on decode, per-token elsewhere)")
    add_note(notes, "calib_cfg.act_method", f"{act_method} -> act method {method}")
    return {"dtype": "int8", "scope": scope, "symmetric": False, "method": method}


def linear_qconfig(calib: V0Section, w_bit: int, a_bit: int, dynamic: bool,
                   notes: Optional[list[Note]]) -> dict:
    """The linear_quant qconfig upstream's QuantConfig means at these bits (the base recipe, or a mix_cfg type
    derived from it as upstream's LayerConfigManager derives it: same keys, other bits)."""
    where = calib.path
    if a_bit == 4:
        raise UnsupportedError(f"{where}: W4A4 (a_bit 4) is not implemented yet (it belongs to {W4A4_WORK})")
    if (w_bit, a_bit) not in ((8, 8), (8, 16), (4, 16), (4, 8)):
        raise ConfigError(f"{where}: w_bit {w_bit} with a_bit {a_bit} is not a modelslim_v0 scheme "
                          f"(w_bit 4 or 8, a_bit 8 or 16)")
    if dynamic and a_bit == 16:
        raise ConfigError(f"{where}.is_dynamic: true needs a_bit 8 (a_bit 16 keeps activations in float)")
    lowbit, outlier = calib.flag("is_lowbit"), calib.flag("open_outlier")
    per_group = lowbit and not outlier and (a_bit == 16 or (w_bit, a_bit) == (4, 8))
    if (w_bit, a_bit) == (4, 8):
        if not (dynamic and per_group):
            raise ConfigError(f"{where}: w_bit 4 with a_bit 8 is upstream's sparse W8A8S (co_sparse, or is_lowbit "
                              f"without is_dynamic) or W4A8_DYNAMIC (is_dynamic with is_lowbit, open_outlier: false "
                              f"and a group_size)")
        raise UnsupportedError(f"{where}: W4A8_DYNAMIC with per-group int4 weights is not implemented in this "
                               f"version (its W4A8_DYNAMIC has per-channel int4 weights); write a modelslim_v1 config "
                               f"with weight scope per_channel for that")
    if lowbit and not per_group:
        raise UnsupportedError(
            f"{where}.is_lowbit: upstream's low-bit automatic accuracy tuning (is_lowbit with open_outlier true, "
            f"or at W8A8) is not implemented in this version; drop is_lowbit, or set open_outlier: false with a "
            f"group_size for per-group weights at a_bit 16")
    if not lowbit:
        calib.ignored("open_outlier", "it applies with is_lowbit only", notes)
    for key in _SPARSE_ONLY:
        calib.ignored(key, "it applies to sparse quantization only", notes)
    add_note(notes, "calib_cfg.w_bit/a_bit", f"{w_bit}/{a_bit} -> int{w_bit} weights, "
                                          f"{'float' if a_bit == 16 else 'int8'} activations")
    weight = _weight(calib, w_bit, a_bit, dynamic, per_group, notes)
    act = _act(calib, a_bit, dynamic, notes)
    return {"weight": weight} if act is None else {"act": act, "weight": weight}


def rollback(calib: V0Section, notes: list[Note]) -> list[str]:
    """disable_names and the last linear: kept in float, excluded from every quantization rule."""
    names = calib.names("disable_names")
    if names:
        notes.append(Note("calib_cfg.disable_names", f"({len(names)} exact module names) -> exclude of every "
                                                     f"quantization rule (kept in float)"))
    if not calib.flag("disable_last_linear"):
        raise UnsupportedError(f"{calib.path}.disable_last_linear: false (quantize the last linear, {LAST_LINEAR}) is "
                               f"not implemented: this version quantizes the decoder-layer linears only; leave it true")
    notes.append(Note("calib_cfg.disable_last_linear", f"true -> '{LAST_LINEAR}' in exclude (the last linear stays "
                                                       f"float)"))
    return list(dict.fromkeys([*names, LAST_LINEAR]))


# ---- calib_params -> rules -------------------------------------------------------------------------------------
def disable_level(params: V0Section, notes: list[Note]) -> None:
    level = params.text("disable_level")
    if not _DISABLE_LEVEL.match(level):
        raise ConfigError(f"{params.path}.disable_level: {level!r} is not L0, L1, L2, ...")
    if level != "L0":
        raise UnsupportedError(
            f"{params.path}.disable_level: {level} (automatic fallback of the {level[1:]} linears whose calibration "
            f"inputs have the largest max/std ratio) is not implemented in this version; use L0 and list the layers "
            f"to keep in float in calib_cfg.disable_names")
    if params.given("disable_level"):
        notes.append(Note("calib_params.disable_level", "L0 -> no automatic fallback"))
    if params.data.get("all_tensors"):
        raise ConfigError(f"{params.path}.all_tensors: tensors cannot be given in a YAML file (a Python API "
                          f"argument upstream); remove it")


def mix_rules(params: V0Section, calib: V0Section, base: dict, notes: list[Note]) -> list[tuple[str, Optional[dict]]]:
    """[(pattern, qconfig or None for float)] in upstream's priority: exact names, then globs in file order,
    then the base recipe for every other linear."""
    mix = params.raw("mix_cfg") or {}
    if not isinstance(mix, dict):
        raise ConfigError(f"{params.path}.mix_cfg: expected a mapping of layer name or glob -> quantization type")
    is_exact = lambda key: isinstance(key, str) and not GLOB.search(key)  # noqa: E731
    exact = [(k, v) for k, v in mix.items() if is_exact(k)]
    globs = [(k, v) for k, v in mix.items() if not is_exact(k)]
    rules: list[tuple[str, Optional[dict]]] = []
    w_bit = calib.whole("w_bit")
    for key, kind in exact + globs:
        where = f"{params.path}.mix_cfg.{key}"
        if not isinstance(key, str) or not key or "{" in key or "}" in key:
            raise ConfigError(f"{where}: expected a module name or an fnmatch glob (*, ?, [...]; braces are literal "
                              f"in modelslim_v0 but alternatives in modelslim_v1, so they are not accepted)")
        if kind == "float":
            qconfig = None
        elif kind == "w4a8_dynamic":
            raise UnsupportedError(f"{where}: w4a8_dynamic exists upstream only for DeepSeek-V2 W4A8 recipes "
                                   f"(per-group int4); it is not implemented in this version")
        elif kind in _MIX_TYPES:
            if w_bit != 8:
                raise ConfigError(f"{where}: {kind} is derived from a w_bit 8 calib_cfg upstream; this calib_cfg has "
                                  f"w_bit {w_bit}")
            try:
                qconfig = linear_qconfig(calib, *_MIX_TYPES[kind], notes=None)
            except (ConfigError, UnsupportedError) as exc:
                raise type(exc)(f"{where}: {kind} cannot be derived from calib_cfg: {exc}") from None
        else:
            raise ConfigError(f"{where}: {kind!r} is not one of float, w8a8, w8a16, w8a8_dynamic, w4a8_dynamic")
        rules.append((key, qconfig))
        earlier = ", excluding the entries before it (first match wins)" if len(rules) > 1 else ""
        target = "float (excluded from the rules after it)" if qconfig is None else \
            f"linear_quant include ['{key}']{earlier}"
        notes.append(Note(f"calib_params.mix_cfg '{key}'", f"{kind} -> {target}"))
    if not any(pattern == "*" for pattern, _ in rules):  # a catch-all entry leaves nothing for the base recipe
        rules.append(("*", base))
    return rules


def quant_step(rules: list[tuple[str, Optional[dict]]], rollback: list[str]) -> Optional[dict]:
    """One linear_quant per non-float rule; each excludes the float layers and every rule before it, so the
    first match wins as upstream; several rules share one calibration forward in a group."""
    steps, before = [], list(rollback)
    for pattern, qconfig in rules:
        if qconfig is not None:
            steps.append({"type": "linear_quant", "qconfig": qconfig, "include": [pattern], "exclude": list(before)})
        before.append(pattern)
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else {"type": "group", "configs": steps}
