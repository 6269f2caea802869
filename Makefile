# The two commands of the README. Each does its own set-up first (infra/setup.sh is idempotent).
.PHONY: setup run test lint bench

setup:
	bash infra/setup.sh

run: setup
	.venv/bin/sop run

test: setup
	.venv/bin/ruff check .
	.venv/bin/pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check .
