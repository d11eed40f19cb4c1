"""The reasoning worker (the ReasoningWorker deployment's replicas, GPU in production): the
deployment, the engine protocol and its vLLM implementation, engine settings, and the Serve request
router that keeps a session's rounds on the worker holding its prefix (affinity)."""
