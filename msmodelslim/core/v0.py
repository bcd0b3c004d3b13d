"""`apiversion: modelslim_v0` recipes, translated into the modelslim_v1 pipeline: pure data, no maths.

The established tool hands a v0 file to its legacy engine as Python keyword arguments: `spec.anti_cfg` to
`AntiOutlierConfig`, `calib_cfg` to `QuantConfig`, `calib_params` to `Calibrator`, `calib_save_params` to
`Calibrator.save`. So an unknown key is a TypeError there, and is refused here by name. This module reads the
same keys with the same defaults and writes the v1 pipeline that does the same work:

    anti_cfg.anti_method  m1 -> smooth_quant (alpha 0.5)    m3 -> awq (norm-linear)    m4 -> iter_smooth
                          m6 -> flex_smooth_quant (flex_config alpha/beta; unset = searched)
                          disable_anti_names -> the smoothing step's exclude (m3, m4, m6; m1 ignores them)
    calib_cfg             w_bit, a_bit, is_dynamic, pdmix, mm_tensor, w_sym, w_method, act_method, group_size
                          -> one linear_quant qconfig; disable_names + disable_last_linear -> exclude
    calib_params.mix_cfg  {name or glob: w8a8 | w8a16 | w8a8_dynamic | float}, exact names first, then globs
                          in order, first match wins -> one linear_quant per entry, inside a group, each
                          excluding the entries before it (exclude wins in v1, so the order survives)
    calib_save_params     part_file_size -> ascendv1_saver part_file_size (absent: 0, one file, as upstream)
    calib_dataset         -> spec.dataset (upstream's default: teacher_qualification.jsonl)

Everything else the legacy engine does that this version cannot is refused by name before any weight is read.
Every mapped key leaves a Note: app/quantize.py logs them when the recipe runs, and `--dry_run` prints the
translated document, which is valid input for --config_path.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from msmodelslim.core.errors import ConfigError, UnsupportedError

DEFAULT_CALIB_DATASET = "teacher_qualification.jsonl"  # the established v0 service's default
# The open work each refusal belongs to (the wording of core/roadmap.py).
KV_WORK = "the attention and KV-cache quantization work"
SPARSE_WORK = "the sparse quantization (W8A8S) work"
W4A4_WORK = "the low-bit activation (W4A4 with rotations) work"
LAST_LINEAR = "lm_head"  # the last nn.Linear of a Hugging Face causal LM: what disable_last_linear keeps float

# Upstream signatures (keyword -> default). The service passes dev_type itself, so a file that sets it fails
# upstream with "got multiple values"; here it is told that --device chooses the device.
_ANTI_CFG = {"w_bit": 8, "a_bit": 8, "anti_method": "m2", "dev_id": None, "w_sym": True,
             "disable_anti_names": None, "flex_config": None}
_ANTI_PARAMS = {"norm_class_name": None}
_CALIB_CFG = {
    "w_bit": 8, "a_bit": 8, "act_method": 1, "w_method": "MinMax", "disable_names": None, "pr": 1.0,
    "mm_tensor": True, "dev_id": None, "fraction": 0.01, "nonuniform": False, "co_sparse": False, "w_sym": True,
    "is_lowbit": False, "do_smooth": False, "use_sigma": False, "sigma_factor": 3.0, "disable_last_linear": True,
    "use_kvcache_quant": False, "open_outlier": True, "is_dynamic": False, "group_size": 64, "percdamp": 0.01,
    "pdmix": False,
    "use_fa_quant": False, "fa_amp": 0,  # popped by the service before QuantConfig: FA3 quantization
}
_CALIB_PARAMS = {"disable_level": "L0", "all_tensors": None, "mix_cfg": None}
_SAVE_PARAMS = {"part_file_size": None, "safetensors_name": None}
_SPEC_KEYS = ("anti_cfg", "anti_params", "calib_cfg", "calib_params", "calib_save_params", "batch_size",
              "anti_dataset", "calib_dataset")
_SET_BY_SERVICE = {"dev_type": "the device comes from --device", "model": "the model comes from --model_path",
                   "calib_data": "calibration data comes from calib_dataset", "cfg": "it is built from calib_cfg",
                   "output_path": "the output goes to --save_path", "json_name": "the description file name is fixed",
                   "save_type": "the output format is ascendV1"}

_SPARSE_ONLY = ("fraction", "nonuniform", "use_sigma", "sigma_factor", "do_smooth")
_GLOB = re.compile(r"[*?\[\]]")
_GROUP_SIZES = (32, 64, 128, 256)
_MIX_TYPES = {"w8a8": (8, 8, False), "w8a16": (8, 16, False), "w8a8_dynamic": (8, 8, True)}
_DISABLE_LEVEL = re.compile(r"^L(0|[1-9]\d*)$")


@dataclass(frozen=True)
class Note:
    """What one v0 key became, e.g. `v0 anti_cfg.anti_method m4 -> iter_smooth`."""

    key: str
    text: str
    warning: bool = False  # the key is ignored, or means a little less than upstream: logged as a warning

    def __str__(self) -> str:
        return f"v0 {self.key} {self.text}"


@dataclass
class Translation:
    """A v0 file as a modelslim_v1 document, with one note per mapped key."""

    document: dict
    notes: list[Note]

    def to_yaml(self) -> str:
        """The document as YAML (leaf lists and mappings inline), valid input for --config_path."""
        return yaml.safe_dump(self.document, sort_keys=False, allow_unicode=True, default_flow_style=None, width=120)

    def log(self, logger: logging.Logger) -> None:
        for note in self.notes:
            (logger.warning if note.warning else logger.info)("%s", note)


class _Section:
    """One v0 keyword-argument mapping, checked against the upstream signature (`defaults`) and read with its
    defaults; every error names the key by its path in the file."""

    def __init__(self, path: str, data: Any, defaults: dict[str, Any], takes: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: must be a mapping of {takes} arguments, not {type(data).__name__}")
        for key in data:
            if key in _SET_BY_SERVICE:
                raise ConfigError(f"{path}.{key}: not allowed in a modelslim_v0 file ({_SET_BY_SERVICE[key]})")
            if key not in defaults:
                raise ConfigError(f"{path}.{key}: unknown modelslim_v0 key ({takes} takes {', '.join(defaults)})")
        self.path, self.data, self.defaults = path, data, defaults

    def given(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        value = self.data.get(key)
        return self.defaults[key] if value is None else value

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path}.{key}: expected true or false, got {value!r}")
        return value

    def whole(self, key: str) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path}.{key}: expected a whole number, got {value!r}")
        return value

    def number(self, key: str) -> float:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.path}.{key}: expected a number, got {value!r}")
        return float(value)

    def text(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise ConfigError(f"{self.path}.{key}: expected a string, got {value!r}")
        return value

    def names(self, key: str) -> list[str]:
        """Exact module names (upstream rejects a name the model lacks, so a wildcard never worked there)."""
        value = self.raw(key) or []
        if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
            raise ConfigError(f"{self.path}.{key}: expected a list of module names")
        for name in value:
            if _GLOB.search(name) or "{" in name or "}" in name:
                raise ConfigError(f"{self.path}.{key}: {name!r} is not a module name; modelslim_v0 takes exact names "
                                  f"here (write patterns in calib_params.mix_cfg, or in a modelslim_v1 config)")
        return list(dict.fromkeys(value))

    def ignored(self, key: str, why: str, notes: Optional[list[Note]]) -> None:
        """A key set to a non-default value that has no effect in this recipe (as upstream): a warning note."""
        if notes is not None and self.given(key) and self.data[key] != self.defaults[key]:
            notes.append(Note(f"{self.path.removeprefix('spec.')}.{key}", f"{self.data[key]!r} ignored: {why}", True))


def _note(notes: Optional[list[Note]], key: str, text: str) -> None:
    if notes is not None:
        notes.append(Note(key, text))


# ---- calib_cfg -> linear_quant ---------------------------------------------------------------------------------
def _attention_steps(calib: _Section, notes: list[Note]) -> list[dict]:
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


def _sparse_part(calib: _Section, notes: list[Note]) -> Optional[dict]:
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


def _weight_method(calib: _Section, static_w8a8: bool, notes: Optional[list[Note]]) -> str:
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
    _note(notes, "calib_cfg.w_method", f"{name} -> weight method {method}")
    return method


def _weight(calib: _Section, w_bit: int, a_bit: int, dynamic: bool, per_group: bool,
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
        _note(notes, "calib_cfg.is_lowbit", f"true with open_outlier false -> weight scope per_group "
                                            f"(group_size {group_size}); mm_tensor does not apply")
    else:
        if calib.flag("mm_tensor"):
            raise UnsupportedError(
                f"{calib.path}.mm_tensor: true (one weight scale per tensor; upstream's default when mm_tensor is not "
                f"written) is not implemented in this version; set mm_tensor: false for per-channel weights, as "
                f"every upstream practice does")
        _note(notes, "calib_cfg.mm_tensor", "false -> weight scope per_channel")
        calib.ignored("group_size", "it applies to per-group weights only (is_lowbit with open_outlier false)", notes)
    if method == "gptq" and calib.given("percdamp"):
        percdamp = calib.number("percdamp")
        if not 0 < percdamp <= 1:
            raise ConfigError(f"{calib.path}.percdamp: {percdamp} is outside (0, 1]")
        ext["percdamp"] = percdamp
        _note(notes, "calib_cfg.percdamp", f"{percdamp} -> weight ext percdamp")
    elif method != "gptq":
        calib.ignored("percdamp", "it applies to w_method GPTQ only", notes)
    if ext:
        weight["ext"] = ext
    _note(notes, "calib_cfg.w_sym", f"{str(w_sym).lower()} -> weight symmetric: {str(w_sym).lower()}")
    return weight


def _act(calib: _Section, a_bit: int, dynamic: bool, notes: Optional[list[Note]]) -> Optional[dict]:
    pdmix = calib.flag("pdmix")
    if pdmix and (a_bit != 8 or dynamic):
        raise ConfigError(f"{calib.path}.pdmix: true needs static W8A8 (a_bit 8, is_dynamic false), as upstream")
    if a_bit == 16:
        calib.ignored("act_method", "activations stay in float at a_bit 16", notes)
        calib.ignored("pr", "activations stay in float at a_bit 16", notes)
        return None
    if dynamic:
        _note(notes, "calib_cfg.is_dynamic", "true -> act int8 per_token symmetric (measured at run time)")
        calib.ignored("act_method", "per-token ranges are measured at run time", notes)
        calib.ignored("pr", "per-token ranges are measured at run time", notes)
        return {"dtype": "int8", "scope": "per_token", "symmetric": True, "method": "minmax"}
    if calib.number("pr") != 1.0:
        raise UnsupportedError(f"{calib.path}.pr: {calib.raw('pr')} (QDrop: activations randomly left unquantized "
                               f"during calibration) is not implemented in this version; use pr: 1.0")
    if calib.given("pr"):
        _note(notes, "calib_cfg.pr", "1.0 -> every calibration activation quantized (no QDrop), as here")
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
    _note(notes, "calib_cfg.is_dynamic", "false -> act int8 asymmetric, static ranges from calibration")
    if pdmix:
        _note(notes, "calib_cfg.pdmix", "true -> act scope pd_mix (W8A8_MIX: static on decode, per-token elsewhere)")
    _note(notes, "calib_cfg.act_method", f"{act_method} -> act method {method}")
    return {"dtype": "int8", "scope": scope, "symmetric": False, "method": method}


def _qconfig(calib: _Section, w_bit: int, a_bit: int, dynamic: bool, notes: Optional[list[Note]]) -> dict:
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
    _note(notes, "calib_cfg.w_bit/a_bit", f"{w_bit}/{a_bit} -> int{w_bit} weights, "
                                          f"{'float' if a_bit == 16 else 'int8'} activations")
    weight = _weight(calib, w_bit, a_bit, dynamic, per_group, notes)
    act = _act(calib, a_bit, dynamic, notes)
    return {"weight": weight} if act is None else {"act": act, "weight": weight}


def _rollback(calib: _Section, notes: list[Note]) -> list[str]:
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
def _disable_level(params: _Section, notes: list[Note]) -> None:
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


def _mix_rules(params: _Section, calib: _Section, base: dict, notes: list[Note]) -> list[tuple[str, Optional[dict]]]:
    """[(pattern, qconfig or None for float)] in upstream's priority: exact names, then globs in file order,
    then the base recipe for every other linear."""
    mix = params.raw("mix_cfg") or {}
    if not isinstance(mix, dict):
        raise ConfigError(f"{params.path}.mix_cfg: expected a mapping of layer name or glob -> quantization type")
    is_exact = lambda key: isinstance(key, str) and not _GLOB.search(key)  # noqa: E731
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
                qconfig = _qconfig(calib, *_MIX_TYPES[kind], notes=None)
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


def _quant_step(rules: list[tuple[str, Optional[dict]]], rollback: list[str]) -> Optional[dict]:
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


# ---- anti_cfg -> smoothing -------------------------------------------------------------------------------------
def _smoothing_step(anti: _Section, base: dict, notes: list[Note]) -> dict:
    method = anti.text("anti_method")
    if method not in ("m1", "m2", "m3", "m4", "m5", "m6"):
        raise ConfigError(f"{anti.path}.anti_method: {method!r} is not one of m1, m2, m3, m4, m5, m6")
    # AntiOutlierConfig's own checks (its bits describe the quantization the suppression prepares for)
    w_bit, a_bit, w_sym = anti.whole("w_bit"), anti.whole("a_bit"), anti.flag("w_sym")
    if w_bit not in (4, 8):
        raise ConfigError(f"{anti.path}.w_bit: {w_bit} is not 4 or 8")
    if a_bit != 8 and not (a_bit == 16 and method == "m3"):
        raise ConfigError(f"{anti.path}.a_bit: {a_bit} needs anti_method m3 (otherwise a_bit is 8)")
    if not w_sym and method != "m3":
        raise ConfigError(f"{anti.path}.w_sym: false needs anti_method m3")
    anti.ignored("dev_id", "--device chooses the device", notes)
    if method == "m2":
        raise UnsupportedError(
            f"{anti.path}.anti_method: m2 (outlier suppression with a per-channel shift folded into a norm bias; "
            f"upstream's default when anti_method is not written) is not implemented in this version: the serving "
            f"engines' RMSNorm has no bias. Use m4 (iter_smooth), m1 (smooth_quant), m3 (awq) or m6 "
            f"(flex_smooth_quant)")
    if method == "m5":
        raise UnsupportedError(f"{anti.path}.anti_method: m5 (CBQ) is not implemented in this version; use m4, m1, m3 "
                               f"or m6")
    flex = _flex_config(anti, method, notes)
    exclude = anti.names("disable_anti_names")
    if method == "m1":
        anti.ignored("disable_anti_names", "upstream's m1 smooths every norm-linear subgraph", notes)
        exclude = []
        step: dict = {"type": "smooth_quant", "alpha": 0.5}
        notes.append(Note("anti_cfg.anti_method", "m1 -> smooth_quant (alpha 0.5, norm-linear subgraphs)"))
    elif method == "m3":
        weight = {k: v for k, v in base["weight"].items() if k not in ("method", "ext")}
        weight["method"] = "minmax"  # candidates are scored by round to nearest at the real bits
        if base["weight"]["scope"] == "per_group":
            weight["ext"] = {"group_size": base["weight"]["ext"]["group_size"]}
        step = {"type": "awq", "weight_qconfig": weight, "enable_subgraph_type": ["norm-linear"]}
        notes.append(Note("anti_cfg.anti_method", "m3 -> awq (norm-linear subgraphs), scored with calib_cfg's weight "
                                                  "scheme"))
        if (anti.given("w_bit") and w_bit != int(base["weight"]["dtype"][3:])) or \
                (anti.given("w_sym") and w_sym != base["weight"]["symmetric"]):
            notes.append(Note("anti_cfg.w_bit/w_sym", f"{w_bit}/{str(w_sym).lower()} differ from calib_cfg: awq scores "
                                                      f"with the weight scheme that is deployed", True))
    elif method == "m4":
        step = {"type": "iter_smooth"}
        notes.append(Note("anti_cfg.anti_method", "m4 -> iter_smooth (norm-linear, v-o and up-down subgraphs)"))
    else:
        step = {"type": "flex_smooth_quant", **flex}
        searched = [k for k in ("alpha", "beta") if k not in flex]
        act = base.get("act")
        if searched and act is not None and act["scope"] in ("per_tensor", "pd_mix"):
            step["act_scope"] = "per_tensor"  # the search scores against the static activations that follow
        notes.append(Note("anti_cfg.anti_method", "m6 -> flex_smooth_quant"
                          + (f" ({', '.join(searched)} searched)" if searched else "")))
    if exclude:
        step["exclude"] = exclude
        notes.append(Note("anti_cfg.disable_anti_names", f"({len(exclude)} names) -> {step['type']} exclude (their "
                                                         f"subgraphs are not smoothed)"))
    return step


def _flex_config(anti: _Section, method: str, notes: list[Note]) -> dict:
    raw = anti.data.get("flex_config")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{anti.path}.flex_config: expected a mapping with alpha and/or beta")
    unknown = [k for k in raw if k not in ("alpha", "beta")]
    if unknown:
        raise ConfigError(f"{anti.path}.flex_config.{unknown[0]}: unknown key (flex_config takes alpha, beta)")
    if method != "m6":
        notes.append(Note("anti_cfg.flex_config", "ignored: it applies to anti_method m6 only", True))
        return {}
    out = {}
    for key, value in raw.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{anti.path}.flex_config.{key}: expected a number in [0, 1] or null (searched)")
        out[key] = float(value)
        notes.append(Note(f"anti_cfg.flex_config.{key}", f"{value} -> flex_smooth_quant {key}"))
    return out


# ---- datasets, saver -------------------------------------------------------------------------------------------
def _needs_data(process: list[dict]) -> bool:
    """Whether the translated steps read calibration data: smoothing, static activations, GPTQ."""
    for step in process:
        if step["type"] == "group":
            if _needs_data(step["configs"]):
                return True
        elif step["type"] != "linear_quant":
            return True
        elif step["qconfig"].get("act", {}).get("scope") in ("per_tensor", "pd_mix") or \
                step["qconfig"]["weight"]["method"] == "gptq":
            return True
    return False


def _dataset(spec: dict, smoothing: Optional[dict], quant: Optional[dict], notes: list[Note]) -> Optional[str]:
    calib = spec.get("calib_dataset", DEFAULT_CALIB_DATASET)
    anti = spec.get("anti_dataset")
    for key, value in (("calib_dataset", calib), ("anti_dataset", anti)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"spec.{key}: expected a dataset name or path")
    if anti is not None and smoothing is None:
        notes.append(Note("anti_dataset", f"{anti!r} ignored: there is no anti_cfg", True))
        anti = None
    quant_needs = quant is not None and _needs_data([quant])
    if anti is not None and anti != calib:
        if calib is not None and quant_needs:
            raise UnsupportedError(
                f"spec.anti_dataset: {anti!r} differs from calib_dataset {calib!r}; a separate dataset for the outlier "
                f"suppression is not implemented in this version (every step of a run calibrates on spec.dataset). "
                f"Remove anti_dataset to smooth on calib_dataset, or set calib_dataset to the same file")
        notes.append(Note("anti_dataset", f"{anti} -> spec.dataset (only the outlier suppression reads data)"))
        return anti
    if calib is None:
        if smoothing is not None or quant_needs:
            raise ConfigError("spec.calib_dataset: null means no calibration data (data-free), but this recipe's "
                              "outlier suppression or static activations need it; name a dataset")
        notes.append(Note("calib_dataset", "null -> no calibration data (data-free recipe)"))
        return None
    origin = "" if "calib_dataset" in spec else " (upstream's default)"
    notes.append(Note("calib_dataset", f"{calib}{origin} -> spec.dataset"
                      + (" (also for the outlier suppression)" if anti is not None else "")))
    return calib


def _saver(spec: dict, notes: list[Note]) -> dict:
    params = _Section("spec.calib_save_params", spec.get("calib_save_params"), _SAVE_PARAMS, "Calibrator.save")
    if params.given("safetensors_name"):
        raise UnsupportedError(f"{params.path}.safetensors_name: the output file names are fixed by the ascendv1 "
                               f"saver in this version; remove it")
    if params.raw("part_file_size") is None:
        notes.append(Note("calib_save_params.part_file_size", "absent -> ascendv1_saver part_file_size 0 (one file, "
                                                              "as upstream writes without it)"))
        return {"type": "ascendv1_saver", "part_file_size": 0}
    size = params.whole("part_file_size")
    if size < 1:
        raise ConfigError(f"{params.path}.part_file_size: {size} must be at least 1 (GB); leave it out for one file")
    notes.append(Note("calib_save_params.part_file_size", f"{size} -> ascendv1_saver part_file_size {size}"))
    return {"type": "ascendv1_saver", "part_file_size": size}


# ---- the whole file --------------------------------------------------------------------------------------------
def translate_v0(spec: Any) -> tuple[dict, list[Note]]:
    """(modelslim_v1 spec, notes) for a modelslim_v0 spec; ConfigError for a wrong key or value, UnsupportedError
    naming what this version lacks. Reads no weights and no data."""
    if not isinstance(spec, dict):
        raise ConfigError("spec: must be a mapping (anti_cfg, calib_cfg, calib_params, ...)")
    for key in spec:
        if key not in _SPEC_KEYS:
            raise ConfigError(f"spec.{key}: unknown modelslim_v0 key (a modelslim_v0 spec takes "
                              f"{', '.join(_SPEC_KEYS)})")
    notes: list[Note] = []
    calib = _Section("spec.calib_cfg", spec.get("calib_cfg"), _CALIB_CFG, "QuantConfig")
    params = _Section("spec.calib_params", spec.get("calib_params"), _CALIB_PARAMS, "Calibrator")
    anti = None if spec.get("anti_cfg") is None else _Section("spec.anti_cfg", spec["anti_cfg"], _ANTI_CFG,
                                                              "AntiOutlierConfig")
    anti_params = _Section("spec.anti_params", spec.get("anti_params"), _ANTI_PARAMS, "AntiOutlier")
    attention = _attention_steps(calib, notes)
    base = _sparse_part(calib, notes) or _qconfig(calib, calib.whole("w_bit"), calib.whole("a_bit"),
                                                  calib.flag("is_dynamic"), notes)
    calib.ignored("dev_id", "--device chooses the device", notes)
    rollback = _rollback(calib, notes)
    _disable_level(params, notes)
    quant = _quant_step(_mix_rules(params, calib, base, notes), rollback)
    smoothing = None if anti is None else _smoothing_step(anti, base, notes)
    if anti is None and anti_params.data:
        notes.append(Note("anti_params", "ignored: there is no anti_cfg", True))
    anti_params.ignored("norm_class_name", "this project's model adapters name the norms", notes)
    process = [s for s in (smoothing, quant) if s is not None] + attention
    if not process:
        raise ConfigError("spec: every linear is kept in float (mix_cfg maps all to float); nothing to quantize")
    out: dict = {"process": process, "save": [_saver(spec, notes)]}
    dataset = _dataset(spec, smoothing, quant, notes)
    if dataset is not None:
        out["dataset"] = dataset
    if "batch_size" in spec:
        size = spec["batch_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"spec.batch_size: expected a whole number >= 1, got {size!r}")
        notes.append(Note("batch_size", f"{size} ignored: upstream batched only the outlier suppression's data with "
                                        f"it; this project batches equal-length samples without padding"))
    return out, notes


def translate_document(data: dict) -> Translation:
    """A whole modelslim_v0 file (apiversion, metadata, spec) as a modelslim_v1 document. `metadata` is kept as
    it is, so practice lookup (label, verified_model_types, verified_tags) works the same for both."""
    spec, notes = translate_v0(data.get("spec"))
    document: dict = {"apiversion": "modelslim_v1"}
    if "metadata" in data:
        document["metadata"] = data["metadata"]
    document["spec"] = spec
    return Translation(document, notes)
