"""The control plane: the depth-control actor (tier plans, verdicts, budgets, reviews, feedback,
domain thresholds), its durable SQLite state, and the client routers call it through."""
