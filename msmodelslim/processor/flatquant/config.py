"""`type: flatquant` settings (protocol.md §2.4): which linears get a learned transform. Every training setting is
fixed, as in the established tool, and setting one in YAML is an error naming it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msmodelslim.processor.matching import Pattern


@dataclass(frozen=True)
class FlatQuantSettings:
    """The established tool's fixed training knobs (protocol.md §2.4), with FlatQuant's own defaults for the rest:
    learnable activation and weight clipping, clipping learned at ten times the transforms' rate, cosine decay."""

    seed: int = 0
    epochs: int = 10
    cali_bsz: int = 4  # calibration samples per optimizer step
    flat_lr: float = 1e-3
    a_bits: int = 4
    w_bits: int = 4
    diag_init: str = "one_style"  # the per-channel scaling starts at ones (see processor.py: it stays there)
    tran_type: str = "svd"  # each Kronecker factor is U·diag(σ)·Vᵀ with U, V orthogonal (Cayley map)
    clip_init: float = 4.0  # clipping logits start at sigmoid(4) = 0.982 of the range
    clip_lr_factor: float = 10.0
    final_lr_factor: float = 1e-3  # cosine annealing ends at flat_lr · this


SPEC_KNOBS = ("seed", "epochs", "cali_bsz", "flat_lr", "a_bits", "w_bits", "diag_init", "tran_type")  # protocol.md
FIXED_KNOBS = frozenset(asdict(FlatQuantSettings())) | {"lwc", "lac", "add_diag", "diag_alpha", "warmup",
                                                        "cali_trans", "nsamples", "deactive_amp"}


class FlatQuantConfig(BaseModel):
    """`type: flatquant`: learn FlatQuant's Kronecker transform and clipping for the selected linears, block by block
    (processor/flatquant/processor.py); the linear_quant after it quantizes them to W4A4_DYNAMIC."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["flatquant"]
    include: list[Pattern] = Field(default_factory=lambda: ["*"])
    exclude: list[Pattern] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _fixed_knobs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            knobs = sorted(set(data) & FIXED_KNOBS)
            if knobs:
                settings = FlatQuantSettings()
                fixed = ", ".join(f"{k} {getattr(settings, k)}" for k in SPEC_KNOBS)
                raise ValueError(f"flatquant's training settings are fixed ({fixed}, as in the established tool) "
                                 f"and cannot be set in YAML; remove {', '.join(knobs)}")
        return data
