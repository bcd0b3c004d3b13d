"""The run's side of the checkpoint tensors the model does not read (model/passthrough.py): say what becomes of
them before any weight is read, refuse a pipeline that would leave them inconsistent, and hand them to the writer
after the last block.

A group no processor changes is copied tensor by tensor: one tensor in memory at a time, whatever the size of
the group (a real MTP layer is ~11 GB). A group some processor changes (`Processor.changes_passthrough`) is read
whole in float32, like one decoder block, transformed, and written back in its stored dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from msmodelslim.core.errors import ProcessingError, UnsupportedError
from msmodelslim.core.logging import get_logger
from msmodelslim.model.passthrough import MTP, UnreadTensors
from msmodelslim.processor.base import Processor

log = get_logger("passthrough")

SHOWN = 4  # names per line in the log (every name at debug level)


def _leaves(processors: list[Processor]) -> Iterator[Processor]:
    """Every processor of the pipeline, the children of `group` steps included."""
    for processor in processors:
        children = getattr(processor, "children", None)
        yield from _leaves(children) if isinstance(children, list) else (processor,)


def _residual_stream_changers(processors: list[Processor]) -> list[Processor]:
    """The processors that change the residual stream, so that the pass-through tensors which read or write it
    (an MTP layer: embed_tokens, eh_proj, its decoder layer, shared_head) must change with it: quarot. It rotates
    the MTP layers its adapter's RotationStructure.mtp describes (processor/quarot/mtp.py); any other MTP layer is
    refused below."""
    from msmodelslim.processor.quarot.processor import QuaRotProcessor

    return [p for p in _leaves(processors) if isinstance(p, QuaRotProcessor)]


def refuse_inconsistent_passthrough(processors: list[Processor], unread: UnreadTensors, model_path: Path) -> None:
    """Before any weight is read: an MTP layer written unchanged next to a rotated model would be garbage."""
    for processor in _residual_stream_changers(processors):
        left = [g for g in unread.mtp_layers() if not processor.changes_passthrough(g)]
        if left:
            layers = ", ".join(f"{g.name}.* ({len(g.tensors)} tensors)" for g in left)
            raise UnsupportedError(
                f"quarot cannot rotate the multi-token-prediction layer yet: {model_path} holds {layers}, which "
                f"reads and writes the residual stream that quarot rotates, so writing it unrotated would break "
                f"speculative decoding. Remove quarot from spec.process, or quantize a copy of the checkpoint "
                f"without the MTP layer (those tensors removed, num_nextn_predict_layers: 0 in config.json)")
        others = [g for g in unread.passthrough if g.kind != MTP and not processor.changes_passthrough(g)]
        if others:
            log.warning("quarot rotates the residual stream, but %s %s not read by the model and %s written "
                        "unrotated", ", ".join(g.name for g in others), "is" if len(others) == 1 else "are",
                        "is" if len(others) == 1 else "are")


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" ... ({len(names)} in all)" if len(names) > SHOWN else "")


def log_unread(unread: UnreadTensors) -> None:
    """Name what the output will hold beyond the model's own tensors, and every input tensor it will not hold."""
    for group in unread.passthrough:
        what = MTP if group.kind == MTP else "not read by the model config.json describes"
        log.info("%s (%s, %d tensor(s)) is written unchanged, tagged FLOAT: %s", group.name, what,
                 len(group.tensors), _names(list(group.tensors)))
    by_reason: dict[str, list[str]] = {}
    for name, reason in unread.consumed.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        log.info("not written: %d tensor(s), %s: %s", len(names), reason, _names(names))
        log.debug("not written (%s): %s", reason, ", ".join(names))


def write_passthrough(adapter, unread: UnreadTensors, processors: list[Processor], writer) -> None:
    """Every pass-through tensor to `writer.add_passthrough`, in its stored dtype (block-FP8 weights dequantized to
    the model dtype), after the processors that change its group transformed it."""
    for group in unread.passthrough:
        changing = [p for p in processors if p.changes_passthrough(group)]
        if not changing:
            for name in group.tensors:  # one tensor in memory at a time
                writer.add_passthrough(name, adapter.read_unread(name).to(adapter.original_dtype(name)))
            continue
        tensors = {}
        for name in group.tensors:
            tensor = adapter.read_unread(name)
            tensors[name] = tensor.float() if tensor.is_floating_point() else tensor
        for processor in changing:
            tensors = processor.transform_passthrough(group, tensors)
        if set(tensors) != set(group.tensors):
            raise ProcessingError(f"transforming the pass-through tensors of {group.name} changed their names "
                                  f"({sorted(set(tensors) ^ set(group.tensors))[:3]}); a processor must return the "
                                  f"names it was given")
        for name in group.tensors:
            tensor = tensors.pop(name)
            writer.add_passthrough(name, tensor.to(adapter.original_dtype(name)) if tensor.is_floating_point()
                                   else tensor)

