"""The quantizer method names a qconfig may ask for, and the `ext` options each one takes (defaults and checks).

quantizer/scheme.py's QConfig validates against these; the methods themselves live in their own modules
(quantizer/gptq.py, ssz.py, lowbit_sparse.py, mx_methods.py, fouroversix.py, dualscale.py).
"""
from __future__ import annotations

IMPLEMENTED_METHODS = ("minmax", "none", "histogram", "ssz", "gptq", "lowbit_sparse", "mse_round", "ceil_x",
                       "fouroversix", "dualscale")
WEIGHT_METHODS = ("minmax", "ssz", "gptq", "lowbit_sparse", "mse_round", "ceil_x", "fouroversix", "dualscale")
# MX weight methods (quantizer/mx_methods.py, quantizer/fouroversix.py): the dtype each one is for
MX_WEIGHT_METHODS = {"mse_round": "mxfp8", "ceil_x": "mxfp4", "fouroversix": "mxfp4"}
ACT_METHODS = ("minmax", "histogram", "none", "dualscale")
# ext keys each method accepts, with their defaults (group_size belongs to scope per_group).
METHOD_EXT = {
    "ssz": {"step": 50},
    # gptaq_alpha > 0: GPTAQ's asymmetric calibration (quantizer/gptaq.py); 0 is plain GPTQ. clip_search: integer
    # ranges from quantizer/clip_search.py
    "gptq": {"percdamp": 0.01, "block_size": 128, "act_order": False, "gptaq_alpha": 0.0, "clip_search": False},
    # W8A8S (quantizer/lowbit_sparse.py): the bulk on a w_bit grid, outliers (fraction, or sigma) kept in int8
    "lowbit_sparse": {"w_bit": 4, "fraction": 0.01, "use_sigma": False, "sigma_factor": 3.0, "nonuniform": False},
    "mse_round": {},
    "fouroversix": {},
    "dualscale": {"dual_block_size": 512},  # required (no default upstream); 512 only names the usual value
    "ceil_x": {"ceil_x_value": 7.25, "enable_search": False, "search_min": 6.0, "search_max": 12.0,
               "search_step": 0.25},
}


def check_positive_ext(method: str, ext: dict, skip: tuple[str, ...] = ()) -> None:
    """The usual ext options: booleans, or positive numbers of the default's type (`skip`: checked elsewhere)."""
    for key, default in METHOD_EXT.get(method, {}).items():
        if key in skip:
            continue
        value = ext.get(key, default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"ext.{key} must be true or false")
        elif isinstance(value, bool) or not isinstance(value, type(default)) or value <= 0:
            raise ValueError(f"ext.{key} must be a positive {type(default).__name__} (default {default})")


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"ext.{name} must be a number from {low} to {high}, got {value!r}")
    return float(value)


def _check_lowbit_sparse_ext(method: str, ext: dict) -> None:
    """lowbit_sparse's own ranges: fraction may be 0, sigma_factor an integer (upstream writes 3), w_bit 2..7."""
    options = {**METHOD_EXT[method], **ext}
    w_bit = options["w_bit"]
    if isinstance(w_bit, bool) or not isinstance(w_bit, int) or not 2 <= w_bit <= 7:
        raise ValueError(f"ext.w_bit (bits of the bulk grid inside int8) must be an integer from 2 to 7, got {w_bit!r}")
    _number(options["fraction"], "fraction", 0.0, 0.5)
    sigma = _number(options["sigma_factor"], "sigma_factor", 0.0, 100.0)
    if sigma == 0:
        raise ValueError("ext.sigma_factor must be positive")
    for flag in ("use_sigma", "nonuniform"):
        if not isinstance(options[flag], bool):
            raise ValueError(f"ext.{flag} must be true or false")
    if options["nonuniform"]:
        raise ValueError("ext.nonuniform: true (the established tool's non-uniform 'power' grid for sparse "
                         "quantization) is not implemented yet; use nonuniform: false, the uniform int grid")


def _check_ceil_x_ext(method: str, ext: dict) -> None:
    """ceil_x's divisors lie in [6, 12] (the established bounds); a search needs search_max > search_min."""
    options = {**METHOD_EXT[method], **ext}
    for key in ("ceil_x_value", "search_min", "search_max"):
        _number(options[key], key, 6.0, 12.0)
    _number(options["search_step"], "search_step", 1e-6, 6.0)
    if not isinstance(options["enable_search"], bool):
        raise ValueError("ext.enable_search must be true or false")
    if options["enable_search"] and options["search_max"] <= options["search_min"]:
        raise ValueError(f"ext.search_max ({options['search_max']}) must be greater than ext.search_min "
                         f"({options['search_min']})")


def _check_dualscale_ext(method: str, ext: dict) -> None:
    """dual_block_size is required (the established quantizer reads it without a default): a positive multiple
    of the MX block 32, so that the E8M0 blocks nest in the dual ones."""
    size = ext.get("dual_block_size")
    if size is None:
        raise ValueError("method dualscale needs ext.dual_block_size, the elements per float32 dual scale along the "
                         "input axis, a multiple of 32 (e.g. ext: {dual_block_size: 512})")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 32:
        raise ValueError(f"ext.dual_block_size must be a positive multiple of 32 (e.g. 512), got {size!r}")


def _check_gptq_ext(method: str, ext: dict) -> None:
    check_positive_ext(method, ext, skip=("gptaq_alpha",))
    _number(ext.get("gptaq_alpha", 0.0), "gptaq_alpha", 0.0, 1.0)


# methods whose ext the positive-number rule does not fit (all of it, or some keys)
EXT_CHECKS = {"gptq": _check_gptq_ext, "lowbit_sparse": _check_lowbit_sparse_ext, "ceil_x": _check_ceil_x_ext,
              "dualscale": _check_dualscale_ext}
