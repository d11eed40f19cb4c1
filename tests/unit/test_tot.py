"""Tree-of-Thought search state (pure): expansion order, budgets, stops, scoring and the answering path.

Trees are worked by hand: node ids are given in creation order (root 0, then 1, 2, ...).
"""

import random
from collections import Counter

import pytest
from pydantic import ValidationError

from services.reasoning.tot import ChildResult, StopReason, TotConfig, TotSearch


def child(conf, answer=None, label=None, tokens=5):
    return ChildResult(label or f"t{conf}", conf, answer, tokens, prompt_tokens=7)


def expand(search, results, granted=None):
    """Expand the node the search picks with `results`; returns (node, first child id)."""
    node = search.next_expansion()
    assert node is not None
    granted = len(results) if granted is None else granted
    return node, search.add_children(node.id, results, granted)


def cfg(**kw):
    return TotConfig(**({"agreement_weight": 0.0} | kw))


# --- config -------------------------------------------------------------------------------------


def test_config_defaults():
    c = TotConfig()
    assert (c.branching, c.max_depth, c.max_total_nodes, c.strategy) == (2, 4, 8, "best_first")
    assert (c.beam_width, c.min_depth, c.exit_confidence, c.agreement_weight) == (2, 1, None, 0.2)


@pytest.mark.parametrize(
    "bad",
    [
        {"branching": 0},
        {"branching": 4},
        {"max_depth": 0},
        {"max_depth": 17},
        {"max_total_nodes": 0},
        {"max_total_nodes": 65},
        {"beam_width": 4},
        {"min_depth": 0},
        {"exit_confidence": 1.01},
        {"agreement_weight": -0.1},
        {"strategy": "dfs"},
        {"fanout": 2},
    ],
)
def test_config_bounds(bad):
    with pytest.raises(ValidationError):
        TotConfig(**bad)


def test_config_depths_and_frozen():
    with pytest.raises(ValidationError, match="min_depth 3 > max_depth 2"):
        TotConfig(max_depth=2, min_depth=3)
    assert TotConfig(max_depth=2, min_depth=2).min_depth == 2
    with pytest.raises(ValidationError):
        TotConfig().branching = 3


# --- expansion order ----------------------------------------------------------------------------


def test_root_is_expanded_first_with_an_empty_transcript():
    s = TotSearch(cfg(branching=3))
    root = s.next_expansion()
    assert (root.id, root.depth, root.parent) == (0, 0, None)
    assert s.path_texts(0) == [] and s.wanted(root) == 3
    assert s.next_expansion() is root  # asking again changes nothing


def test_best_first_expands_the_best_open_node_at_any_depth():
    s = TotSearch(cfg(branching=2, max_depth=3, max_total_nodes=6))
    assert expand(s, [child(0.5), child(0.9)])[1] == 1  # nodes 1, 2
    node, first = expand(s, [child(0.6), child(0.7)])
    assert (node.id, first) == (2, 3)  # 0.9 beats 0.5; children 3, 4 at depth 2
    node, _ = expand(s, [child(0.95), child(0.1)])
    assert node.id == 4  # 0.7 at depth 2 beats the older 0.6 and 0.5
    assert s.nodes[5].depth == 3 and s.nodes[5].parent == 4
    assert s.next_expansion() is None and s.stop_reason is StopReason.MAX_TOTAL_NODES
    assert s.best().id == 5 and s.best_path() == [2, 4, 5]
    assert s.path_texts(5) == ["t0.9", "t0.7", "t0.95"]


def test_best_first_ties_go_to_the_older_node():
    s = TotSearch(cfg(branching=3, max_depth=2, max_total_nodes=9))
    expand(s, [child(0.5), child(0.5), child(0.5)])
    assert [expand(s, [child(0.1)])[0].id for _ in range(3)] == [1, 2, 3]


def test_beam_goes_level_by_level_keeping_the_best():
    s = TotSearch(cfg(branching=3, max_depth=3, max_total_nodes=30, strategy="beam", beam_width=2))
    expand(s, [child(0.2), child(0.8), child(0.5)])  # 1, 2, 3
    node, _ = expand(s, [child(0.1), child(0.9), child(0.3)])  # 4, 5, 6
    assert node.id == 2
    # Best-first would now take node 5 (0.9); the beam finishes level 1 first.
    node, _ = expand(s, [child(0.95), child(0.2), child(0.4)])  # 7, 8, 9
    assert node.id == 3
    assert s.nodes[1].pruned and not s.nodes[1].expanded and s.wanted(s.nodes[1]) == 0
    with pytest.raises(ValueError, match="already expanded or pruned"):
        s.add_children(1, [child(0.5)], 1)
    assert [expand(s, [child(0.0)])[0].id for _ in range(2)] == [7, 5]  # the best two of level 2
    assert {n.id for n in s.nodes if n.pruned} == {1, 4, 6, 8, 9}
    assert s.next_expansion() is None and s.stop_reason is StopReason.MAX_DEPTH


def test_beam_is_fixed_when_its_level_starts_even_if_agreement_reorders_it():
    s = TotSearch(
        TotConfig(
            branching=3, max_depth=3, max_total_nodes=20, strategy="beam", beam_width=2, agreement_weight=0.3
        )
    )
    expand(s, [child(0.50, "x"), child(0.49, "y"), child(0.48, "z")])  # 1, 2, 3: beam {1, 2}
    node, _ = expand(s, [child(0.0, "z"), child(0.0, "z")], granted=2)
    assert node.id == 1
    assert s.nodes[3].score > s.nodes[2].score  # z now has 3 of 5 votes: 0.66 vs 0.55
    assert s.next_expansion().id == 2 and s.nodes[3].pruned  # the beam holds, 3 stays out


# --- budgets and grants -------------------------------------------------------------------------


def test_wanted_shrinks_to_the_node_budget():
    s = TotSearch(cfg(branching=3, max_depth=4, max_total_nodes=5))
    root = s.next_expansion()
    assert s.wanted(root) == 3
    expand(s, [child(0.1), child(0.2), child(0.3)])
    assert s.wanted(s.next_expansion()) == 2
    expand(s, [child(0.4), child(0.5)])
    assert s.generated == 5 and s.next_expansion() is None
    assert s.stop_reason is StopReason.MAX_TOTAL_NODES and s.wanted(s.nodes[5]) == 0


def test_partial_grants_and_their_checks():
    s = TotSearch(cfg(branching=3, max_depth=3, max_total_nodes=5))
    node = s.next_expansion()
    with pytest.raises(ValueError, match="2 children but only 1 granted"):
        s.add_children(node.id, [child(0.1)] * 2, 1)
    with pytest.raises(ValueError, match="granted 4 outside 0..3"):
        s.add_children(node.id, [child(0.1)], 4)
    with pytest.raises(ValueError, match="granted -1"):
        s.add_children(node.id, [], -1)
    assert s.generated == 0 and not s.nodes[0].expanded  # a refused call changes nothing
    assert s.add_children(node.id, [child(0.4)], 1) == 1
    assert s.generated == 1 and s.nodes[0].children == [1] and s.expansions == 1
    # Granted 2, but the engine returned one sample: fewer results than granted are accepted.
    node = s.next_expansion()
    assert s.add_children(node.id, [child(0.2)], 2) == 2 and s.generated == 2


def test_a_denied_grant_stops_and_the_best_so_far_answers():
    s = TotSearch(cfg(branching=2, max_depth=3, max_total_nodes=8))
    expand(s, [child(0.4), child(0.6)])
    node = s.next_expansion()
    assert node.id == 2
    s.add_children(node.id, [], 0)
    assert s.stop_reason is StopReason.BUDGET_DENIED and s.next_expansion() is None
    assert s.expansions == 1 and s.best().id == 2 and s.best_path() == [2]
    with pytest.raises(ValueError, match="search is over"):
        s.add_children(1, [child(0.9)], 1)


def test_a_denied_root_leaves_only_the_root():
    s = TotSearch(cfg())
    s.add_children(s.next_expansion().id, [], 0)
    assert s.best().id == 0 and s.best_path() == [] and s.summary()["nodes"] == 0


def test_no_node_deeper_than_max_depth():
    s = TotSearch(cfg(branching=1, max_depth=2, max_total_nodes=10))
    expand(s, [child(0.5)])
    expand(s, [child(0.5)])
    assert s.next_expansion() is None and s.stop_reason is StopReason.MAX_DEPTH
    leaf = s.nodes[2]
    assert leaf.depth == 2 and s.wanted(leaf) == 0


def test_adding_under_a_max_depth_node_is_refused():
    s = TotSearch(cfg(branching=1, max_depth=1, max_total_nodes=4))
    expand(s, [child(0.5)])
    with pytest.raises(ValueError, match="max_depth 1"):
        s.add_children(1, [child(0.5)], 0)
    with pytest.raises(ValueError, match="no node 9"):
        s.add_children(9, [], 0)
    with pytest.raises(ValueError, match="no node -1"):
        s.add_children(-1, [], 0)


def test_an_expansion_that_returns_nothing_can_empty_the_frontier():
    s = TotSearch(cfg(branching=2))
    expand(s, [], granted=2)
    assert s.next_expansion() is None and s.stop_reason is StopReason.FRONTIER_EMPTY
    assert s.expansions == 1 and s.best().id == 0


# --- confident stop and min_depth ---------------------------------------------------------------


def test_min_depth_holds_under_maximal_confidence():
    s = TotSearch(cfg(branching=1, max_depth=4, max_total_nodes=20, min_depth=3, exit_confidence=0.5))
    for depth in (1, 2):
        expand(s, [child(1.0)])
        assert not s.done and s.nodes[depth].depth == depth  # fully confident, but above min_depth
    expand(s, [child(1.0)])
    assert s.stop_reason is StopReason.CONFIDENT and s.next_expansion() is None
    assert s.best().depth == 3 and len(s.best_path()) == 3


def test_confidence_below_the_threshold_or_no_threshold_never_stops_early():
    s = TotSearch(cfg(branching=1, max_depth=3, max_total_nodes=3, exit_confidence=0.9))
    for _ in range(3):
        expand(s, [child(0.89)])
    assert s.next_expansion() is None and s.stop_reason is StopReason.MAX_TOTAL_NODES
    s = TotSearch(cfg(branching=1, max_depth=3, max_total_nodes=9, exit_confidence=None))
    for _ in range(3):
        expand(s, [child(1.0)])
    assert s.next_expansion() is None and s.stop_reason is StopReason.MAX_DEPTH


def test_a_none_confidence_never_counts_as_confident():
    s = TotSearch(cfg(branching=1, exit_confidence=0.0))
    expand(s, [child(None)])
    assert not s.done
    expand(s, [child(0.0)])
    assert s.stop_reason is StopReason.CONFIDENT


# --- scoring ------------------------------------------------------------------------------------


def test_agreement_changes_the_winner():
    results = [child(0.8, "7"), child(0.7, "5"), child(0.7, "5")]
    s = TotSearch(TotConfig(branching=3, max_depth=1, max_total_nodes=3, agreement_weight=0.5))
    expand(s, results)
    assert s.nodes[1].score == pytest.approx(0.8 + 0.5 / 3)
    assert s.nodes[2].score == pytest.approx(0.7 + 0.5 * 2 / 3)
    assert s.best().id == 2  # the first of the agreeing pair
    plain = TotSearch(cfg(branching=3, max_depth=1, max_total_nodes=3))
    expand(plain, results)
    assert plain.best().id == 1


def test_scores_are_recomputed_as_nodes_arrive():
    s = TotSearch(TotConfig(branching=2, max_depth=3, max_total_nodes=8, agreement_weight=0.4))
    expand(s, [child(0.5, "a"), child(0.5, "b")])
    assert s.nodes[1].score == pytest.approx(0.5 + 0.4 * 1 / 2)
    expand(s, [child(0.1, "a"), child(0.1, None)])  # expands node 1 (tie -> older)
    assert s.nodes[1].score == pytest.approx(0.5 + 0.4 * 2 / 4)  # gained a vote, lost a share
    assert s.nodes[2].score == pytest.approx(0.5 + 0.4 * 1 / 4)
    assert s.nodes[4].score == pytest.approx(0.1)  # no answer: no agreement


def test_best_prefers_min_depth_then_deeper_then_older():
    s = TotSearch(cfg(branching=2, max_depth=3, max_total_nodes=8, min_depth=1))
    expand(s, [child(0.5), child(0.3)])  # 1, 2
    expand(s, [child(0.5), child(0.5)])  # under 1: 3, 4 at depth 2
    assert s.best().id == 3  # ties with node 1: deeper wins; ties with 4: older wins
    s = TotSearch(cfg(branching=2, max_depth=4, max_total_nodes=8, min_depth=3))
    expand(s, [child(0.9), child(0.2)])
    expand(s, [child(0.1), child(0.3)])  # under 1: 3, 4 at depth 2
    s.add_children(s.next_expansion().id, [], 0)
    assert s.best().id == 4  # nothing reached depth 3: the best of the deepest, not the 0.9 draft
    assert s.best_path() == [1, 4] and s.path_texts(4) == ["t0.9", "t0.3"]


def test_summary():
    s = TotSearch(cfg(branching=2, max_depth=3, max_total_nodes=4, strategy="beam", beam_width=1))
    assert s.summary() == {
        "nodes": 0,
        "depth": 0,
        "branching": 2,
        "strategy": "beam",
        "best_path": [],
        "stop_reason": None,
        "expansions": 0,
    }
    expand(s, [child(0.3), child(0.6)])
    expand(s, [child(0.2), child(0.9)])
    assert s.next_expansion() is None
    assert s.summary() == {
        "nodes": 4,
        "depth": 2,
        "branching": 2,
        "strategy": "beam",
        "best_path": [2, 4],
        "stop_reason": "max_total_nodes",
        "expansions": 2,
    }


# --- randomized invariants ----------------------------------------------------------------------


def _random_cfg(rng):
    max_depth = rng.randint(1, 6)
    return TotConfig(
        branching=rng.randint(1, 3),
        max_depth=max_depth,
        max_total_nodes=rng.randint(1, 24),
        strategy=rng.choice(["best_first", "beam"]),
        beam_width=rng.randint(1, 3),
        min_depth=rng.randint(1, max_depth),
        exit_confidence=rng.choice([None, 0.8, 0.95, 1.0]),
        agreement_weight=rng.choice([0.0, 0.2, 1.0]),
    )


def _expected_score(s, n):
    gen = s.nodes[1:]
    votes = Counter(m.answer for m in gen if m.answer is not None)
    base = n.confidence or 0.0
    return base + s.cfg.agreement_weight * (votes[n.answer] / len(gen) if n.answer is not None else 0.0)


def _step(rng, s, node):
    """One random expansion; checks the choice was the best open node and the confident stop."""
    c = s.cfg
    open_ = [n for n in s.nodes if n.open and n.depth < c.max_depth]
    if c.strategy == "best_first":
        assert node is min(open_, key=lambda n: (-n.score, n.id))
    else:
        assert node.depth == min(n.depth for n in open_)
    wanted = s.wanted(node)
    assert 1 <= wanted <= c.branching and node.depth < c.max_depth
    granted = rng.randint(0, wanted) if rng.random() < 0.2 else wanted
    kids = [
        child(rng.choice([None, rng.random(), 1.0]), rng.choice(["1", "2", None]))
        for _ in range(rng.randint(max(0, granted - 1), granted))
    ]
    first = s.add_children(node.id, kids, granted)
    new = s.nodes[first:]
    confident = c.exit_confidence is not None and any(
        n.depth >= c.min_depth and n.confidence is not None and n.confidence >= c.exit_confidence for n in new
    )
    if granted == 0:
        assert s.stop_reason is StopReason.BUDGET_DENIED
    else:
        assert (s.stop_reason is StopReason.CONFIDENT) == confident


def test_random_searches_keep_every_invariant():
    rng = random.Random(20240611)
    reasons = Counter()
    for _ in range(1500):
        s = TotSearch(_random_cfg(rng))
        c = s.cfg
        while (node := s.next_expansion()) is not None:
            _step(rng, s, node)
        reasons[s.stop_reason] += 1
        assert s.done and s.generated <= c.max_total_nodes
        assert all(n.depth <= c.max_depth for n in s.nodes)
        assert [n.id for n in s.nodes] == list(range(len(s.nodes)))
        for n in s.nodes[1:]:
            assert n.depth == s.nodes[n.parent].depth + 1 and n.id in s.nodes[n.parent].children
            assert n.score == pytest.approx(_expected_score(s, n))
        assert all(len(n.children) <= c.branching for n in s.nodes)
        assert s.expansions == sum(n.expanded for n in s.nodes)
        if c.strategy == "beam":
            per_level = Counter(n.depth for n in s.nodes if n.expanded)
            assert all(k <= c.beam_width for d, k in per_level.items() if d > 0)
        if s.stop_reason is StopReason.MAX_DEPTH:
            assert all(n.depth == c.max_depth for n in s.nodes if n.open)
        best = s.best()
        deep = [n for n in s.nodes[1:] if n.depth >= c.min_depth]
        assert best.depth >= c.min_depth if deep else best.depth == max(n.depth for n in s.nodes)
        assert len(s.best_path()) == best.depth and s.summary()["best_path"] == s.best_path()
        assert s.summary()["depth"] <= c.max_depth and s.summary()["nodes"] == s.generated
    assert set(reasons) == set(StopReason)  # every way of stopping was exercised


def test_a_finished_node_is_never_expanded_but_may_answer():
    s = TotSearch(cfg(branching=2, max_depth=3, max_total_nodes=8))
    s.add_children(0, [ChildResult("a", 0.9, "4", 5), ChildResult("b", 0.2, "5", 5)], 2)
    s.finish(1)  # the best node, complete
    assert s.next_expansion().id == 2 and s.best().id == 1
    s.add_children(2, [ChildResult("c", 0.1, None, 5)], 1)
    with pytest.raises(ValueError, match="already expanded"):
        s.add_children(1, [], 1)
    with pytest.raises(ValueError, match="no generated node"):
        s.finish(0)
