"""The HTTP ingress (the Router deployment's replicas): the OpenAI-compatible app and its routes,
request schemas and errors, API keys and limits, response shaping, metrics."""
