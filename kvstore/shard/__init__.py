"""A store shard: the pure core with real bytes in RAM and disk slot pools (shard.py, pool.py), the
shard as a Ray actor with metrics (actor.py), shard placement and the cluster's client (client.py)."""
