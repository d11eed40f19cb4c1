"""Sharded, tiered KV-state store (issue 4, in progress): a pure core (core.py: block index, tier
directory, reasoning-aware retention; ring.py: consistent-hash sharding), slot pools (pool.py), shards
(shard.py) and their Ray actors and client (client.py). The vLLM KV connector is not built yet: the
serving path still relies on vLLM's own prefix cache inside one worker."""
