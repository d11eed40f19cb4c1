"""The KV-state store (docs/kvstore.md).

Pure core here, no ray/torch/vllm: the block index, tiers and retention (core.py), the connector's
scheduler-side planner (planner.py), chunk addresses (chain.py), the load-or-recompute cost model
(cost.py), the wire format (codec.py, digest.py), the sharding ring (ring.py). Around it, one folder
per part: transport/ (moving bytes between processes: NIXL or Ray bytes, leases, host memory),
shard/ (a shard's slot pools and its Ray actor, the keeper that puts one on every node, the
cluster's store client), connector/ (vLLM's KV connector: its vLLM shell, the worker-side data
path, the engine's view of the store)."""
