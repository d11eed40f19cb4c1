"""Moving KV bytes between processes: the Transport interface and its fallback (base.py), NIXL over
UCX (nixl.py, imported only through factory.py), the engine's one-sided client (client.py), leases
on store memory (leases.py) and page-locked host buffers (memory.py)."""
