"""Tree-of-Thought search state (pure): which node to expand next, how many children, when to stop,
and which path answers.

A node is one round's text; its path from the root is a chain of rounds (draft, verify, ...), so the
depth of a node is the number of rounds on its path. The root (id 0, depth 0) is the empty transcript;
its children are drafts. Expanding a node samples up to `branching` children in one engine request
whose prompt is prompts.round_messages(conversation, path_texts(node)).
Hard bounds, enforced here and not only by the caller: never more than `max_total_nodes` generated
nodes, never a node deeper than `max_depth`.

Score = confidence (0 when unknown)
+ `agreement_weight` x the share of all generated nodes that reached the same final answer
(self-consistency; a node counts itself, a None answer agrees with nothing). Agreement changes as nodes
arrive, so every score is recomputed after each expansion: an earlier ranking may change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    branching: int = Field(2, ge=1, le=3, description="Children per expansion, sampled in one request.")
    max_depth: int = Field(4, ge=1, le=16, description="Most rounds on a path.")
    max_total_nodes: int = Field(8, ge=1, le=64, description="Generated nodes in all (root excluded).")
    strategy: Literal["best_first", "beam"] = Field(
        "best_first", description="best_first: the best open node next; beam: level by level."
    )
    beam_width: int = Field(2, ge=1, le=3, description="Nodes expanded per level (beam only).")
    min_depth: int = Field(1, ge=1, le=16, description="No confident stop above this depth (min_rounds).")
    exit_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="Stop once a node at min_depth or deeper is this confident."
    )
    agreement_weight: float = Field(
        0.2, ge=0.0, le=1.0, description="Weight of the share of nodes agreeing on the answer."
    )

    @model_validator(mode="after")
    def _depths(self) -> TotConfig:
        if self.min_depth > self.max_depth:
            raise ValueError(f"min_depth {self.min_depth} > max_depth {self.max_depth}")
        return self


class StopReason(StrEnum):
    CONFIDENT = "confident"
    MAX_TOTAL_NODES = "max_total_nodes"
    MAX_DEPTH = "max_depth"  # the only open nodes are at max_depth
    BUDGET_DENIED = "budget_denied"  # depth control granted no node
    FRONTIER_EMPTY = "frontier_empty"  # no open node at all (expansions returned nothing)


@dataclass(frozen=True)
class ChildResult:
    """One sampled child of an expansion, as the caller measured it."""

    text: str
    confidence: float | None
    answer: str | None  # normalised extracted answer (signals.extract_answer)
    completion_tokens: int
    prompt_tokens: int = 0


@dataclass
class Node:
    id: int
    parent: int | None
    depth: int
    text: str = ""
    confidence: float | None = None
    answer: str | None = None
    score: float = 0.0
    tokens: int = 0
    children: list[int] = field(default_factory=list)
    expanded: bool = False
    pruned: bool = False  # left out of its level's beam: never expanded, still a candidate answer
    final: bool = False  # complete (a thinking trace its model closed): never expanded, a candidate answer

    @property
    def open(self) -> bool:
        return not (self.expanded or self.pruned or self.final)


class TotSearch:
    def __init__(self, cfg: TotConfig) -> None:
        self.cfg = cfg
        self.nodes: list[Node] = [Node(0, None, 0)]
        self.stop_reason: StopReason | None = None
        self.expansions = 0  # engine requests made (denied grants are not requests)

    @property
    def generated(self) -> int:
        return len(self.nodes) - 1

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def _stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:  # the first reason wins
            self.stop_reason = reason

    @staticmethod
    def _rank(n: Node) -> tuple[float, int]:
        return (-n.score, n.id)  # best score first, ties to the older node

    def next_expansion(self) -> Node | None:
        """The node to expand next; None once the search is over (stop_reason says why)."""
        if self.done:
            return None
        if self.generated >= self.cfg.max_total_nodes:
            self._stop(StopReason.MAX_TOTAL_NODES)
            return None
        open_ = [n for n in self.nodes if n.open]
        frontier = [n for n in open_ if n.depth < self.cfg.max_depth]
        if not frontier:
            self._stop(StopReason.MAX_DEPTH if open_ else StopReason.FRONTIER_EMPTY)
            return None
        if self.cfg.strategy == "beam":
            return self._beam_next(frontier)
        return min(frontier, key=self._rank)

    def _beam_next(self, frontier: list[Node]) -> Node:
        # Level by level: a level is complete before any of its nodes is expanded (its parents, one
        # level up, were all finished first), so the shallowest level with open nodes is the current
        # one. On the first visit its best `beam_width` nodes form the beam and the rest are pruned at
        # once: the beam is fixed then, so agreement shifting scores while the level is expanded cannot
        # admit more than `beam_width` nodes. Later visits find at most `beam_width` open nodes there,
        # so the pruning below is then a no-op.
        level = min(n.depth for n in frontier)
        peers = sorted((n for n in frontier if n.depth == level), key=self._rank)
        for n in peers[self.cfg.beam_width :]:
            n.pruned = True
        return peers[0]

    def wanted(self, node: Node) -> int:
        """Children to ask for when expanding `node`; 0 means do not expand it."""
        if self.done or not node.open or node.depth >= self.cfg.max_depth:
            return 0
        return max(0, min(self.cfg.branching, self.cfg.max_total_nodes - self.generated))

    def add_children(self, node_id: int, results: list[ChildResult], granted: int) -> int:
        """Record an expansion: `granted` is what depth control allowed (0..wanted; 0 ends the search,
        the budget is spent elsewhere), `results` the children sampled (at most `granted`; fewer when
        the engine returned fewer). Returns the first child's id (ids are consecutive)."""
        if not 0 <= node_id < len(self.nodes):
            raise ValueError(f"no node {node_id}")
        node = self.nodes[node_id]
        if self.done:
            raise ValueError(f"the search is over ({self.stop_reason})")
        if not node.open:
            raise ValueError(f"node {node_id} was already expanded or pruned")
        if node.depth >= self.cfg.max_depth:
            raise ValueError(f"node {node_id} is at max_depth {self.cfg.max_depth}")
        want = self.wanted(node)
        if not 0 <= granted <= want:
            raise ValueError(f"granted {granted} outside 0..{want} for node {node_id}")
        if len(results) > granted:
            raise ValueError(f"{len(results)} children but only {granted} granted")
        first = len(self.nodes)
        if granted == 0:
            self._stop(StopReason.BUDGET_DENIED)  # node stays open: it was never expanded
            return first
        node.expanded = True
        self.expansions += 1
        for r in results:
            child = Node(
                id=len(self.nodes),
                parent=node_id,
                depth=node.depth + 1,
                text=r.text,
                confidence=r.confidence,
                answer=r.answer,
                tokens=r.completion_tokens,
            )
            self.nodes.append(child)
            node.children.append(child.id)
        self._rescore()
        if self._confident(self.nodes[first:]):
            self._stop(StopReason.CONFIDENT)
        return first

    def finish(self, node_id: int) -> None:
        """Mark a generated node complete: it answers as it is and is never expanded."""
        if not 0 < node_id < len(self.nodes):
            raise ValueError(f"no generated node {node_id}")
        self.nodes[node_id].final = True

    def _confident(self, nodes: list[Node]) -> bool:
        threshold = self.cfg.exit_confidence
        if threshold is None:
            return False
        return any(
            n.depth >= self.cfg.min_depth and n.confidence is not None and n.confidence >= threshold
            for n in nodes
        )

    def _rescore(self) -> None:
        gen = self.nodes[1:]
        votes = Counter(n.answer for n in gen if n.answer is not None)
        for n in gen:
            base = n.confidence or 0.0
            agree = votes[n.answer] / len(gen) if n.answer is not None else 0.0
            n.score = base + self.cfg.agreement_weight * agree

    def best(self) -> Node:
        """The answering node: the best score at min_depth or deeper (ties: deeper, then older); when
        no node got that deep, the best of the deepest. The root only when nothing was generated."""
        gen = self.nodes[1:]
        if not gen:
            return self.nodes[0]
        deep = [n for n in gen if n.depth >= self.cfg.min_depth]
        pool = deep or [n for n in gen if n.depth == max(m.depth for m in gen)]
        return min(pool, key=lambda n: (-n.score, -n.depth, n.id))

    def path(self, node_id: int) -> list[int]:
        """Node ids from depth 1 down to `node_id` (root excluded)."""
        out: list[int] = []
        n = self.nodes[node_id]
        while n.parent is not None:
            out.append(n.id)
            n = self.nodes[n.parent]
        return out[::-1]

    def best_path(self) -> list[int]:
        return self.path(self.best().id)

    def path_texts(self, node_id: int) -> list[str]:
        """The earlier-round texts of the prompt that expands `node_id` (round_messages' input)."""
        return [self.nodes[i].text for i in self.path(node_id)]

    def summary(self) -> dict:
        """What the response reports; stop_reason is None while the search is still running."""
        return {
            "nodes": self.generated,
            "depth": max(n.depth for n in self.nodes),
            "branching": self.cfg.branching,
            "strategy": self.cfg.strategy,
            "best_path": self.best_path(),
            "stop_reason": self.stop_reason.value if self.stop_reason else None,
            "expansions": self.expansions,
        }
