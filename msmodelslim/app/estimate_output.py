"""Output size of the real run, for the dry-run estimate (app/estimate.py): the timed block is written by each
saver into a throwaway writer, giving the bytes per weight element of each scheme; the other blocks and the
outside-block tensors are extrapolated from their shapes and stored dtypes (safetensors headers, nothing read).
And how long writing that output takes once it outgrows what the kernel keeps unwritten (`writing_seconds`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from msmodelslim.format.hf_files import COPIED_SUFFIXES, quantized_and_float_modules
from msmodelslim.model.checkpoint import _byte_spans


def checkpoint_bytes(adapter, names: list[str]) -> int:
    """Stored bytes of checkpoint tensors, from the safetensors headers (nothing read)."""
    checkpoint = adapter.checkpoint
    spans: dict[str, dict[str, tuple[int, int]]] = {}
    total = 0
    for name in names:
        file = checkpoint.file_of(name)
        if file is None:
            continue
        if file not in spans:
            spans[file] = _byte_spans(Path(checkpoint.path) / file)
        start, end = spans[file].get(name, (0, 0))
        total += end - start
    return total


def dtype_bytes(dtype: Optional[torch.dtype]) -> int:
    return torch.empty((), dtype=dtype or torch.float32).element_size()


def outside_bytes(model: nn.Module, block_names: list[str], adapter, tied_aliases: bool) -> int:
    """The non-block tensors as written (original dtype); a tied table's alias counts when the format repeats it."""
    seen: set[int] = set()
    total = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if any(name.startswith(b + ".") for b in block_names):
            continue
        alias = id(tensor) in seen
        seen.add(id(tensor))
        if alias and not tied_aliases:
            continue
        dtype = adapter.original_dtype(name) if tensor.is_floating_point() else tensor.dtype
        total += tensor.numel() * dtype_bytes(dtype)
    return total


def side_file_bytes(model_path: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_path).iterdir() if p.is_file() and p.name.endswith(COPIED_SUFFIXES))


@dataclass
class BlockBytes:
    """What one format writes for the timed block: bytes per weight element of each scheme, the rest per element."""

    per_element: dict[str, float]  # scheme -> output bytes / input weight elements of its linears
    other_per_element: float  # the block's tensors that are not linears (norms, ...): bytes per element
    total: int
    tensors: int  # how many tensors the block became
    shard_limit: int  # the writer's shard size (0: one file)
    shard_reserve: int  # header space each shard reserves in front of its data (format/shards.py)


def linears_of(block_name: str, plan: dict[str, str]) -> list[str]:
    return [n for n in plan if n.startswith(block_name + ".")]


def measure_block_bytes(writer, block_name: str, block: nn.Module, skeleton_block: nn.Module,
                         plan: dict[str, str]) -> BlockBytes:
    """Write the processed block linear by linear (and its other tensors) into a throwaway `writer`."""
    by_scheme: dict[str, list[int]] = {}
    linears = linears_of(block_name, plan)
    for name in linears:
        relative = name[len(block_name) + 1 :]
        before = writer.shards.total_bytes
        writer.add_module_tree(name, block.get_submodule(relative))
        elements = skeleton_block.get_submodule(relative).weight.numel()
        counts = by_scheme.setdefault(plan[name], [0, 0])
        counts[0] += writer.shards.total_bytes - before
        counts[1] += elements
    before = writer.shards.total_bytes
    other_elements = 0  # below: the block's own float tensors (norms), as add_module_tree writes them
    for name, module in quantized_and_float_modules(block_name, block):
        if name in plan or any(name.startswith(n + ".") for n in linears):
            continue
        for tensor_name, tensor in list(module.named_parameters(recurse=False)) + [
                (b, t) for b, t in module.named_buffers(recurse=False)
                if t is not None and b not in module._non_persistent_buffers_set]:
            writer.add_float(f"{name}.{tensor_name}", tensor)
            other_elements += tensor.numel()
    other = writer.shards.total_bytes - before
    writer.shards.flush()  # closed, as a real run's shards are by the end
    per_element = {scheme: b / max(e, 1) for scheme, (b, e) in by_scheme.items()}
    return BlockBytes(per_element, other / max(other_elements, 1), writer.shards.total_bytes, len(writer.shards.names),
                       writer.shards.limit, writer.shards.reserve)


JSON_BYTES_PER_TENSOR = 120  # a tensor's entries in the index (and ascendv1's description), measured ~60-110


def file_bytes(data: int, tensors: int, measured: BlockBytes) -> int:
    """Shard files for `data` bytes of tensors: each shard's reserved header in front, and the JSON files."""
    shards = 1 if not measured.shard_limit else max(1, -(-data // measured.shard_limit))
    return data + shards * (8 + measured.shard_reserve) + tensors * JSON_BYTES_PER_TENSOR


def block_output_bytes(block_name: str, skeleton: nn.Module, plan: dict[str, str], measured: BlockBytes,
                        original_bytes: int) -> int:
    """One block's output bytes from its weight elements; a scheme the timed block lacks counts as stored float
    (`original_bytes` per element: an upper bound)."""
    block = skeleton.get_submodule(block_name)
    total = 0
    linear_elements = 0
    for name in linears_of(block_name, plan):
        linear = block.get_submodule(name[len(block_name) + 1 :])
        linear_elements += sum(t.numel() for t in linear.state_dict().values())  # its bias is in the ratio
        total += linear.weight.numel() * measured.per_element.get(plan[name], original_bytes)
    other = sum(t.numel() for t in block.state_dict().values()) - linear_elements
    return int(total + other * measured.other_per_element)


def writing_seconds(cached_s: float, disk_s: float, output_bytes: int, synced: bool) -> float:
    """The output's writing time. Writes land in the page cache (`cached_s`: the measured block's rate, scaled to
    the output) until the kernel's budget of unwritten data fills, and from then on go at the disk's speed
    (`disk_s`: the block written and fsynced, scaled); resume checkpoints (`synced`) fsync every block's shards,
    so with them all of it goes at the disk's speed. Counted as if the shard writer's thread did not overlap the
    work: on the 7B shape it hid about a third of the writing (docs/benchmarks.md)."""
    through = output_bytes if synced else max(output_bytes - dirty_page_budget(), 0)
    return max(cached_s, disk_s * through / max(output_bytes, 1))


def dirty_page_budget() -> int:
    """Bytes of written data Linux lets pile up unwritten before it throttles a writer to the disk: vm.dirty_bytes,
    else vm.dirty_ratio percent of the available memory (about what the kernel counts); 0 where unknown."""
    try:
        fixed = int(Path("/proc/sys/vm/dirty_bytes").read_text())
        if fixed:
            return fixed
        ratio = int(Path("/proc/sys/vm/dirty_ratio").read_text())
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(line.split()[1]) << 10 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration):
        return 0
    return available * ratio // 100
