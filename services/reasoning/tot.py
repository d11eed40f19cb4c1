"""Tree-of-Thought search state (pure): which node to expand next, how many children, when to stop,
and which path answers.

A node is one round's text; its path from the root is a chain of rounds (draft, verify, ...), so the
depth of a node is the number of rounds on its path. The root (id 0, depth 0) is the empty transcript;
its children are drafts. Expanding a node samples up to `branching` children in one engine request.
Hard bounds: never more than `max_total_nodes` generated nodes, never a node deeper than `max_depth`.

Score = confidence (mean with a self-evaluation score when one is given) + `agreement_weight` x the
share of generated nodes that reached the same final answer (self-consistency). Agreement changes as
nodes arrive, so all scores are recomputed after every expansion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    branching: int = Field(2, ge=1, le=3, description="Children per expansion, sampled in one request.")
    max_depth: int = Field(4, ge=1, le=16, description="Rounds on a path.")
    max_total_nodes: int = Field(8, ge=1, le=64, description="Generated nodes in all (root excluded).")
    strategy: Literal["best_first", "beam"] = Field("best_first", description="Expansion order.")
    beam_width: int = Field(2, ge=1, le=3, description="Nodes expanded per level (beam).")
    min_depth: int = Field(1, ge=1, le=16, description="No confident stop above this depth.")
    exit_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="Stop once a node at min_depth or deeper is this confident."
    )
    agreement_weight: float = Field(0.2, ge=0.0, le=1.0, description="Weight of answer agreement.")

    @model_validator(mode="after")
    def _depths(self) -> TotConfig:
        if self.min_depth > self.max_depth:
            raise ValueError(f"min_depth {self.min_depth} > max_depth {self.max_depth}")
        return self


class StopReason(StrEnum):
    CONFIDENT = "confident"
    MAX_TOTAL_NODES = "max_total_nodes"
    MAX_DEPTH = "max_depth"
    BUDGET_DENIED = "budget_denied"
    FRONTIER_EMPTY = "frontier_empty"


@dataclass(frozen=True)
class ChildResult:
    text: str
    confidence: float | None
    answer: str | None
    completion_tokens: int
    prompt_tokens: int = 0
    eval_score: float | None = None


@dataclass
class Node:
    id: int
    parent: int | None
    depth: int
    text: str = ""
    confidence: float | None = None
    answer: str | None = None
    eval_score: float | None = None
    score: float = 0.0
    tokens: int = 0
    children: list[int] = field(default_factory=list)
    expanded: bool = False


class TotSearch:
    def __init__(self, cfg: TotConfig) -> None:
        self.cfg = cfg
        self.nodes: list[Node] = [Node(0, None, 0)]
        self.stop_reason: StopReason | None = None
        self.expansions = 0

    @property
    def generated(self) -> int:
        return len(self.nodes) - 1

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def _stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def _key(self, n: Node) -> tuple[float, int]:
        return (-n.score, n.id)  # best score first, ties to the older node

    def next_expansion(self) -> Node | None:
        """The node to expand next; None once the search is over (stop_reason says why)."""
        if self.done:
            return None
        if self.generated >= self.cfg.max_total_nodes:
            self._stop(StopReason.MAX_TOTAL_NODES)
            return None
        open_ = [n for n in self.nodes if not n.expanded]
        frontier = [n for n in open_ if n.depth < self.cfg.max_depth]
        if not frontier:
            self._stop(StopReason.MAX_DEPTH if open_ else StopReason.FRONTIER_EMPTY)
            return None
        if self.cfg.strategy == "beam":
            return self._beam_next(frontier)
        return min(frontier, key=self._key)

    def _beam_next(self, frontier: list[Node]) -> Node | None:
        # Level by level: the shallowest level with open nodes, its best `beam_width` nodes only.
        level = min(n.depth for n in frontier)
        peers = sorted((n for n in self.nodes if n.depth == level), key=self._key)
        beam = {n.id for n in peers[: self.cfg.beam_width]}
        todo = [n for n in frontier if n.depth == level and n.id in beam]
        if not todo:  # the level's beam is done: the rest of the level is pruned
            for n in frontier:
                if n.depth == level:
                    n.expanded = True
            return self.next_expansion()
        return min(todo, key=self._key)

    def wanted(self, node: Node) -> int:
        return max(0, min(self.cfg.branching, self.cfg.max_total_nodes - self.generated))

    def add_children(self, node_id: int, results: list[ChildResult], granted: int) -> int:
        """Add the children an expansion produced; returns the first child's id. `granted` is what
        depth control allowed (0 ends the search: the budget is spent elsewhere)."""
        node = self.nodes[node_id]
        if node.expanded:
            raise ValueError(f"node {node_id} was already expanded")
        if not 0 <= granted <= self.wanted(node):
            raise ValueError(f"granted {granted} outside 0..{self.wanted(node)}")
        if len(results) > granted:
            raise ValueError(f"{len(results)} children but only {granted} granted")
        node.expanded = True
        first = len(self.nodes)
        if granted == 0:
            self._stop(StopReason.BUDGET_DENIED)
            return first
        self.expansions += 1
        for r in results:
            child = Node(
                len(self.nodes),
                node_id,
                node.depth + 1,
                r.text,
                r.confidence,
                r.answer,
                r.eval_score,
                tokens=r.completion_tokens,
            )
            self.nodes.append(child)
            node.children.append(child.id)
        self._rescore()
        threshold = self.cfg.exit_confidence
        if threshold is not None and any(
            n.depth >= self.cfg.min_depth and n.confidence is not None and n.confidence >= threshold
            for n in self.nodes[first:]
        ):
            self._stop(StopReason.CONFIDENT)
        return first

    def _rescore(self) -> None:
        answers = [n.answer for n in self.nodes[1:] if n.answer is not None]
        total = self.generated
        for n in self.nodes[1:]:
            base = n.confidence or 0.0
            if n.eval_score is not None:
                base = (base + n.eval_score) / 2
            agree = answers.count(n.answer) / total if n.answer is not None and total else 0.0
            n.score = base + self.cfg.agreement_weight * agree

    def best(self) -> Node:
        """The answering node: the best-scoring one at min_depth or deeper; else the deepest best."""
        gen = self.nodes[1:]
        if not gen:
            return self.nodes[0]
        deep = [n for n in gen if n.depth >= self.cfg.min_depth]
        pool = deep or [n for n in gen if n.depth == max(m.depth for m in gen)]
        return min(pool, key=lambda n: (-n.score, -n.depth, n.id))

    def path(self, node_id: int) -> list[int]:
        """Node ids from depth 1 down to `node_id` (root excluded)."""
        out: list[int] = []
        n: Node | None = self.nodes[node_id]
        while n is not None and n.parent is not None:
            out.append(n.id)
            n = self.nodes[n.parent]
        return out[::-1]

    def best_path(self) -> list[int]:
        return self.path(self.best().id)

    def path_texts(self, node_id: int) -> list[str]:
        return [self.nodes[i].text for i in self.path(node_id)]

    def summary(self) -> dict:
        return {
            "nodes": self.generated,
            "depth": max(n.depth for n in self.nodes),
            "branching": self.cfg.branching,
            "strategy": self.cfg.strategy,
            "best_path": self.best_path(),
            "stop_reason": (self.stop_reason or StopReason.FRONTIER_EMPTY).value,
            "expansions": self.expansions,
        }
