"""Tree-of-Thought search state (pure): expansion order, budgets, stops and the answering path."""

import random

import pytest
from pydantic import ValidationError

from services.reasoning.tot import ChildResult, StopReason, TotConfig, TotSearch


def child(conf, answer=None, tokens=5):
    return ChildResult(f"t{conf}", conf, answer, tokens)


def expand(search, results):
    node = search.next_expansion()
    assert node is not None
    granted = min(len(results), search.wanted(node))
    return node, search.add_children(node.id, results[:granted], granted)


def test_best_first_expands_the_best_open_node_and_reports_its_path():
    s = TotSearch(TotConfig(branching=2, max_depth=3, max_total_nodes=6, agreement_weight=0))
    root, first = expand(s, [child(0.5), child(0.9)])
    assert (root.id, first) == (0, 1)
    node, _ = expand(s, [child(0.6), child(0.7)])
    assert node.id == 2  # 0.9 beats 0.5
    node, _ = expand(s, [child(0.95), child(0.1)])
    assert node.id == 4  # 0.7 (depth 2) beats 0.6 and 0.5
    assert s.next_expansion() is None and s.stop_reason is StopReason.MAX_TOTAL_NODES
    assert s.best().id == 5 and s.best_path() == [2, 4, 5]
    assert s.path_texts(5) == ["t0.9", "t0.7", "t0.95"]
    assert s.summary() | {"best_path": None} == {
        "nodes": 6, "depth": 3, "branching": 2, "strategy": "best_first", "best_path": None,
        "stop_reason": "max_total_nodes", "expansions": 3,
    }


def test_beam_goes_level_by_level_keeping_the_best():
    s = TotSearch(TotConfig(branching=3, max_depth=2, max_total_nodes=20, strategy="beam", beam_width=2,
                            agreement_weight=0))
    expand(s, [child(0.2), child(0.8), child(0.5)])
    order = [expand(s, [child(0.1)])[0].id for _ in range(2)]
    assert order == [2, 3]  # the two best of depth 1; node 1 is pruned
    assert s.next_expansion() is None and s.stop_reason is StopReason.MAX_DEPTH


def test_min_depth_holds_under_maximal_confidence():
    s = TotSearch(TotConfig(branching=1, max_depth=4, max_total_nodes=10, min_depth=3, exit_confidence=0.5))
    for _ in range(2):
        expand(s, [child(1.0)])
        assert not s.done  # confident, but above min_depth
    expand(s, [child(1.0)])
    assert s.stop_reason is StopReason.CONFIDENT and s.best().depth == 3


def test_partial_and_denied_grants():
    s = TotSearch(TotConfig(branching=3, max_depth=3, max_total_nodes=5))
    node = s.next_expansion()
    assert s.wanted(node) == 3
    with pytest.raises(ValueError, match="granted"):
        s.add_children(node.id, [child(0.1)] * 2, 1)
    s.add_children(node.id, [child(0.4)], 1)
    node = s.next_expansion()
    s.add_children(node.id, [], 0)
    assert s.stop_reason is StopReason.BUDGET_DENIED and s.next_expansion() is None
    assert s.best().id == 1  # the best node so far answers


def test_agreement_changes_the_winner():
    s = TotSearch(TotConfig(branching=3, max_depth=1, max_total_nodes=3, agreement_weight=0.5))
    expand(s, [child(0.8, "7"), child(0.7, "5"), child(0.7, "5")])
    assert s.best().answer == "5"  # 0.7 + 0.5 * 2/3 beats 0.8 + 0.5 * 1/3


def test_config_bounds():
    with pytest.raises(ValidationError):
        TotConfig(branching=4)
    with pytest.raises(ValidationError, match="min_depth"):
        TotConfig(max_depth=2, min_depth=3)


def test_random_searches_never_exceed_budgets():
    rng = random.Random(11)
    for _ in range(300):
        cfg = TotConfig(branching=rng.randint(1, 3), max_depth=rng.randint(1, 6),
                        max_total_nodes=rng.randint(1, 20), strategy=rng.choice(["best_first", "beam"]),
                        beam_width=rng.randint(1, 3), exit_confidence=rng.choice([None, 0.9]))
        s = TotSearch(cfg)
        while (node := s.next_expansion()) is not None:
            granted = rng.randint(0, s.wanted(node)) if rng.random() < 0.2 else s.wanted(node)
            kids = [child(rng.random(), rng.choice(["1", "2", None])) for _ in range(granted)]
            s.add_children(node.id, kids, granted)
        assert s.generated <= cfg.max_total_nodes
        assert all(n.depth <= cfg.max_depth for n in s.nodes)
        assert s.summary()["depth"] <= cfg.max_depth and s.done
        assert s.best_path() == s.path(s.best().id)
