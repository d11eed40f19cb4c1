"""`ponder status` rendering (pure) and its fast failure on a bad address."""

import pytest

from cluster.status import check_reachable, render

SNAPSHOT = {
    "nodes": [{"node_id": "abc", "address": "10.0.0.1", "alive": True, "cpus": 2.0, "gpus": 0}],
    "workers": [{"replica": "r1", "ongoing_requests": 3}, {"replica": "r2", "error": "RayActorError"}],
    "kv_shards": [
        {
            "shard": "abc",
            "blocks": 5,
            "bytes_stored": 3 << 20,
            "sessions": 2,
            "pinned": 0,
            "rejected": 1,
            "slots_used": {"ram": 5},
            "slots_total": {"ram": 100, "disk": 400},
        },
        {"shard": "def", "error": "GetTimeoutError"},
    ],
    "depth_control": {
        "starts": 2,
        "peak_tot_nodes_in_flight": 4,
        "decisions": {"ceiling": 7, "confidence": 3},
        "budgets": {
            "sessions": 1,
            "max_sessions": 1024,
            "deep_sessions_in_flight": 1,
            "max_deep_sessions": 8,
            "tot_nodes_in_flight": 2,
            "max_tot_nodes_in_flight": 64,
            "sessions_waiting_for_nodes": 0,
            "degraded_admissions": 5,
        },
        "depth_value": {
            "math": {
                "medium": {
                    "rounds": {"round_2": {"change_rate": 0.12}, "round_3": {"change_rate": 0.0}},
                    "effective_max_rounds": 2,
                    "reason": "round 3 changed 0.0% of answers over 60 requests (<= 2%)",
                }
            }
        },
    },
}


def test_render_shows_every_part_and_the_unreachable_ones():
    text = render(SNAPSHOT)
    assert "Nodes (1 alive)" in text
    assert "r1  3 requests in flight" in text and "r2  error: RayActorError" in text
    assert "5 blocks, 3.0 MiB, 2 sessions; ram 5/100 slots, disk 0/400 slots; 0 pinned, 1 declined" in text
    assert "def  error: GetTimeoutError" in text
    assert "deep 1/8" in text and "ToT nodes 2/64 (peak 4)" in text and "ceiling 7, confidence 3" in text
    assert "depth value math/medium: ceiling 2 (round 3 changed 0.0% of answers over 60 requests" in text
    assert "answers changed by round: 2 12%, 3 0%" in text
    text = render({**SNAPSHOT, "depth_control": {"error": "ActorDiedError"}})
    assert "Depth control: unreachable (ActorDiedError)" in text


def test_bad_addresses_fail_fast():
    with pytest.raises(ConnectionError):
        check_reachable("no-port")
    with pytest.raises(OSError):
        check_reachable("127.0.0.1:9", timeout_s=1)
    check_reachable("auto")  # resolved by ray.init itself
