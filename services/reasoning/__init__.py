"""Pure reasoning cores: no ray, vllm or torch imports. Unit-tested without an engine."""
