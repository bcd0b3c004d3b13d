"""The subgraphs an adapter describes (`ModelStructure.smooth_subgraphs`), resolved on one decoder block.

A `*` in a name stands for every routed expert index of the block (the expert list is the module named before
the `*`, e.g. `mlp.experts`, an `UnfusedExperts`). Targets with `*` expand in place inside ONE subgraph (a
norm that feeds every expert takes one scale); a source with `*` gives one subgraph per expert (each expert's
up -> down). A subgraph whose modules the block lacks is skipped there: dense and MoE layers of one model
share one structure. A target ending in `?` is optional: it joins the subgraph only in blocks that have it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from msmodelslim.core.errors import UnsupportedError
from msmodelslim.model.interface import EVERY_EXPERT, OPTIONAL, SmoothSubgraph
from msmodelslim.model.skeleton_edits import has_module


@dataclass(frozen=True)
class BlockSubgraph:
    """One subgraph of one block, names relative to the block with `*` resolved; `expert` is the routed
    expert index when the subgraph belongs to a single expert (its statistics come from that expert's
    tokens only, and may be empty)."""

    kind: str
    source: str
    targets: tuple[str, ...]
    layout: str = "gqa"
    expert: Optional[int] = None


def _expert_count(block: nn.Module, name: str) -> Optional[int]:
    """How many experts the list before the `*` of `name` holds; None when the block has no such list."""
    head, star, _ = name.partition(f".{EVERY_EXPERT}")
    if not star or name.count(EVERY_EXPERT) != 1:
        raise UnsupportedError(f"smoothing subgraph name {name!r}: '{EVERY_EXPERT}' must appear once, as a "
                               f"whole name part (experts.{EVERY_EXPERT}.up_proj)")
    if not has_module(block, head):
        return None
    experts = block.get_submodule(head)
    if not isinstance(experts, nn.ModuleList):
        raise UnsupportedError(f"{head} is a {type(experts).__name__}, not a list of per-expert modules: smoothing "
                               f"scales each expert's linears, so the adapter must unfuse the experts "
                               f"(MoeAdapter.prepare_skeleton)")
    return len(experts)


def _every(name: str, count: int) -> list[str]:
    return [name.replace(EVERY_EXPERT, str(e)) for e in range(count)] if EVERY_EXPERT in name else [name]


def resolve(graph: SmoothSubgraph, block: nn.Module) -> list[BlockSubgraph]:
    """The subgraph's instances in this block (none when a module it names is absent; an optional target, named
    with a trailing `?`, is left out where the block lacks it)."""
    targets = tuple(t.removesuffix(OPTIONAL) for t in graph.targets
                    if not t.endswith(OPTIONAL) or has_module(block, t.removesuffix(OPTIONAL)))
    graph = SmoothSubgraph(graph.kind, graph.source, targets, graph.layout)
    names = (graph.source, *graph.targets)
    counts = {_expert_count(block, n) for n in names if EVERY_EXPERT in n}
    if None in counts:
        return []
    if len(counts) > 1:
        raise UnsupportedError(f"smoothing subgraph {graph.source} -> {', '.join(graph.targets)} names expert "
                               f"lists of different lengths {sorted(counts)}")
    count = counts.pop() if counts else 0
    if EVERY_EXPERT in graph.source:
        found = [BlockSubgraph(graph.kind, graph.source.replace(EVERY_EXPERT, str(e)),
                               tuple(t.replace(EVERY_EXPERT, str(e)) for t in graph.targets), graph.layout, e)
                 for e in range(count)]
    else:
        targets = tuple(name for t in graph.targets for name in _every(t, count))
        found = [BlockSubgraph(graph.kind, graph.source, targets, graph.layout)]
    if not all(has_module(block, n) for g in found for n in (g.source, *g.targets)):
        return []
    return found


def block_subgraphs(structure: tuple[SmoothSubgraph, ...], block: nn.Module, block_name: str) -> list[BlockSubgraph]:
    """Every described subgraph present in the block. A source feeding two subgraphs would leave one of them
    incomplete (its scale would reach readers the other does not compensate), so it is refused."""
    found = [g for graph in structure for g in resolve(graph, block)]
    seen: dict[str, BlockSubgraph] = {}
    for g in found:
        if g.source in seen:
            raise UnsupportedError(f"{block_name}.{g.source} is the source of two smoothing subgraphs "
                                   f"({', '.join(seen[g.source].targets)} and {', '.join(g.targets)}); the "
                                   f"adapter must list every reader of it in one subgraph")
        seen[g.source] = g
    return found
