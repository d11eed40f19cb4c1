# The two commands of the README. Both set up what is missing first and are quick the second time.
.PHONY: serve test setup lint bench-overhead

serve: setup  ## install what is missing, provision the default model, serve on http://127.0.0.1:8000
	.venv/bin/ponder serve $(ARGS)

test:  ## run the whole test suite (what CI runs)
	bash scripts/test.sh $(ARGS)

setup:
	bash scripts/bootstrap.sh

lint: setup
	.venv/bin/ruff check .

bench-overhead: setup
	.venv/bin/ponder bench overhead --json bench/results/overhead.json
