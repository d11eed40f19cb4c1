"""Sharded, tiered KV-state store (issue 4). Nothing here yet: the vertical slice relies on vLLM's own
prefix cache inside one worker."""
