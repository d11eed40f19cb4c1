"""vLLM's KV connector: the vLLM shell (vllm_connector.py, the module vLLM loads by path), the
worker-side data path and cache layout (datapath.py, layout.py: no vLLM import), the engine's view
of the store (engine_store.py), its typed settings (config.py) and metrics (metrics.py)."""
