# The two commands of the README: `make demo` (set up, run the pipeline on embedded defaults) and
# `make test` (set up, lint, type-check, run the whole suite). CI runs `make test` via .ci/run.
.PHONY: setup test demo demo-s3 lint bench

setup:
	bash scripts/setup.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

test: setup lint
	.venv/bin/python -m pytest

demo: setup
	.venv/bin/p2p demo

# The same pipeline with raw photos, dataset and checkpoints on a local SeaweedFS S3 server.
demo-s3: setup
	.venv/bin/p2p demo --s3

bench: setup
	.venv/bin/python -m bench.train_step
	.venv/bin/python -m bench.dataset_build
	.venv/bin/python -m bench.train_throughput
