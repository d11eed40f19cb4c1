"""Shard actors on a real multi-node Ray cluster (head + 2 nodes on this machine): blocks saved from
the driver are read back through the client; a node removed mid-run turns its shard's sessions into
misses, never errors."""

import random

import pytest
import ray
from ray.cluster_utils import Cluster

from kvstore.shard.client import StoreClient, start_shards
from kvstore.shard.pool import slot_bytes_for
from kvstore.shard.shard import BlockMeta, ShardConfig

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [c.add_node(num_cpus=1, resources={f"kvnode{i}": 1}) for i in range(2)]
    ray.init(address=c.address, namespace="ponder")
    c.wait_for_nodes()
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


def test_shards_serve_blocks_and_a_lost_node_is_a_miss(cluster):
    c, nodes = cluster
    cfg = ShardConfig(ram_slots=64, slot_bytes=slot_bytes_for(2048))
    node_ids = [n.node_id for n in nodes]
    shards = start_shards(cfg, node_ids, "ponder")
    client = StoreClient(shards, timeout_s=10)
    where = {name: ray.get(h.node_id.remote()) for name, h in shards.items()}
    assert sorted(where.values()) == sorted(node_ids)  # one shard on each node (hard affinity)
    rng = random.Random(2)
    sessions = [f"sess-{i}" for i in range(12)]
    blobs = {s: [rng.randbytes(2000) for _ in range(3)] for s in sessions}
    for s in sessions:
        metas = [BlockMeta(f"{s}-b{j}", s, 0) for j in range(3)]
        assert client.put(s, metas, blobs[s]) == 3
    for s in sessions:
        hashes = [f"{s}-b{j}" for j in range(3)]
        assert client.lookup(s, hashes) == 3 and client.get(s, hashes) == blobs[s]
    owners = {s: client.ring.owner(s) for s in sessions}
    assert len(set(owners.values())) == 2  # both shards hold sessions
    c.remove_node(nodes[0])  # the node and its shard are gone mid-run
    lost = {s for s in sessions if owners[s].endswith(nodes[0].node_id[:12])}
    for s in sessions:
        hashes = [f"{s}-b{j}" for j in range(3)]
        got = client.get(s, hashes)
        assert got == ([] if s in lost else blobs[s])  # lost sessions are misses: recompute
    assert client.misses_from_faults == 1 and len(client.shards) == 1
