"""The dry-run estimate as `quant --dry_run` prints it and `api.quantize` returns it (measured by app/estimate.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunEstimate:
    """Peak RSS, output bytes per saver, the receiving disk's free space and wall time, with what they assume."""

    peak_rss_bytes: int
    output_bytes: dict[str, int]  # per saver type
    free_bytes: int
    receiving_directory: Path
    seconds: float
    seconds_by_phase: dict[str, float]
    timed_block: str
    timed_batches: int
    batches: int
    blocks: int
    assumptions: list[str] = field(default_factory=list)
    measured_in_seconds: float = 0.0  # how long the estimate itself took

    @property
    def total_output_bytes(self) -> int:
        return sum(self.output_bytes.values())

    @property
    def disk_has_room(self) -> bool:
        return self.free_bytes >= self.total_output_bytes

    def lines(self) -> list[str]:
        """The estimate as printed by `quant --dry_run` (every line says it is an estimate)."""
        outputs = ", ".join(f"{saver} {_size(size)}" for saver, size in self.output_bytes.items())
        room = "has room" if self.disk_has_room else "does NOT have room"
        phases = ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in self.seconds_by_phase.items())
        lines = [
            f"ESTIMATES for the real run (not measurements; from timing block {self.timed_block} on "
            f"{self.timed_batches} of {self.batches} calibration batches, in {self.measured_in_seconds:.1f} s):",
            f"  peak RAM (RSS): {_size(self.peak_rss_bytes)}",
            f"  output on disk: {_size(self.total_output_bytes)} ({outputs}); {self.receiving_directory} "
            f"{room} ({_size(self.free_bytes)} free)",
            f"  wall time: {_duration(self.seconds)} ({phases}; {self.blocks} blocks)",
            "  assuming:",
        ]
        return lines + [f"    - {a}" for a in self.assumptions]

    def as_dict(self) -> dict:
        return {"peak_rss_bytes": self.peak_rss_bytes, "output_bytes": dict(self.output_bytes),
                "free_bytes": self.free_bytes, "disk_has_room": self.disk_has_room, "seconds": self.seconds,
                "seconds_by_phase": dict(self.seconds_by_phase), "assumptions": list(self.assumptions)}


def _size(size: float) -> str:
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    return f"{size / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"
