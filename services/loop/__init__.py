"""The reasoning loop, run inside the router for each request: the orchestrator (a chain of rounds),
Tree-of-Thought over the engine, resuming a round on another worker, the tokenizer, the loop's event
types. No Ray or vLLM import: the router, the benchmarks and the tests drive the same code."""
