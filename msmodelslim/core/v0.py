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
translated document, which is valid input for --config_path. The calib_cfg/calib_params half lives in
core/v0_calib.py, the checked reading of one section in core/v0_section.py.
"""
from __future__ import annotations

from typing import Any, Optional

from msmodelslim.core.errors import ConfigError, UnsupportedError
from msmodelslim.core.v0_calib import (CALIB_CFG, CALIB_PARAMS, attention_steps, disable_level, linear_qconfig,
                                       mix_rules, quant_step, rollback, sparse_part)
from msmodelslim.core.v0_section import Note, Translation, V0Section

__all__ = ["Note", "Translation", "translate_document", "translate_v0"]

DEFAULT_CALIB_DATASET = "teacher_qualification.jsonl"  # the established v0 service's default

# Upstream signatures (keyword -> default); calib_cfg's and calib_params' are in core/v0_calib.py.
_ANTI_CFG = {"w_bit": 8, "a_bit": 8, "anti_method": "m2", "dev_id": None, "w_sym": True,
             "disable_anti_names": None, "flex_config": None}
_ANTI_PARAMS = {"norm_class_name": None}
_SAVE_PARAMS = {"part_file_size": None, "safetensors_name": None}
_SPEC_KEYS = ("anti_cfg", "anti_params", "calib_cfg", "calib_params", "calib_save_params", "batch_size",
              "anti_dataset", "calib_dataset")


# ---- anti_cfg -> smoothing -------------------------------------------------------------------------------------
def _smoothing_step(anti: V0Section, base: dict, notes: list[Note]) -> dict:
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


def _flex_config(anti: V0Section, method: str, notes: list[Note]) -> dict:
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
    params = V0Section("spec.calib_save_params", spec.get("calib_save_params"), _SAVE_PARAMS, "Calibrator.save")
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
    calib = V0Section("spec.calib_cfg", spec.get("calib_cfg"), CALIB_CFG, "QuantConfig")
    params = V0Section("spec.calib_params", spec.get("calib_params"), CALIB_PARAMS, "Calibrator")
    anti = None if spec.get("anti_cfg") is None else V0Section("spec.anti_cfg", spec["anti_cfg"], _ANTI_CFG,
                                                              "AntiOutlierConfig")
    anti_params = V0Section("spec.anti_params", spec.get("anti_params"), _ANTI_PARAMS, "AntiOutlier")
    attention = attention_steps(calib, notes)
    base = sparse_part(calib, notes) or linear_qconfig(calib, calib.whole("w_bit"), calib.whole("a_bit"),
                                                  calib.flag("is_dynamic"), notes)
    calib.ignored("dev_id", "--device chooses the device", notes)
    rollback_names = rollback(calib, notes)
    disable_level(params, notes)
    quant = quant_step(mix_rules(params, calib, base, notes), rollback_names)
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
