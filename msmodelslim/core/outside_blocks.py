"""The tensors outside the decoder blocks (embeddings, final norm, head): which there are, which are tied, and
writing them after the blocks, one table in memory at a time when the adapter released them for the walk."""
from __future__ import annotations

import torch
from torch import nn


def is_under(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def outside_entries(model: nn.Module, block_names: list[str]) -> list[tuple[str, str]]:
    """(name, source) of every state-dict tensor outside the blocks (embeddings, final norm, head), in order; a
    tied table appears under two names, the second with the first as its source. Equal addresses mean tying only
    here, where every tensor compared is alive at once (across released blocks an address is reused by unrelated
    tensors): so this is taken while they are all in memory."""
    first_name: dict[int, str] = {}
    entries = []
    for name, tensor in model.state_dict().items():
        if is_under(name, block_names):
            continue
        alive = tensor.numel() and not tensor.is_meta  # an unread (meta) tensor has no address to compare
        entries.append((name, first_name.setdefault(tensor.data_ptr(), name) if alive else name))
    return entries


def _outside_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(owner), leaf)


def write_outside_blocks(model: nn.Module, block_names: list[str], entries: list[tuple[str, str]], writer,
                          adapter, released: bool) -> None:
    """Write the non-block tensors (`entries` from `outside_entries`). When the adapter `released` them for the
    walk, each table is read back from the checkpoint, written with its tied aliases and dropped again, so
    that only one of them is in memory at a time."""
    by_source: dict[str, list[str]] = {}
    for name, source in entries:
        by_source.setdefault(source, []).append(name)
    for source, names in by_source.items():
        tensor = _outside_tensor(model, source)
        if released and tensor.is_meta:
            adapter.load_outside(model, [source], as_stored=True)  # only written, in its checkpoint dtype
            tensor = _outside_tensor(model, source)
        writer.add_float(source, tensor)
        for alias in names[1:]:
            writer.add_tied(alias, source, tensor)
        del tensor
        if released:
            adapter.release_outside(model, block_names)
