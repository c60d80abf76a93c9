# The two commands of the README. Each does all set-up itself (scripts/setup.sh is idempotent).
.PHONY: demo test setup

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@.venv/bin/python -m pytest
