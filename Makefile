# The two commands of the README. Each does all set-up itself (scripts/setup.sh is idempotent) and installs only the
# extras it needs: the demo the package with its `full` extra, the tests `full` and `test` (pyproject.toml).
.PHONY: demo test setup

setup:
	@bash scripts/setup.sh full,test

demo:
	@bash scripts/setup.sh full
	@bash scripts/demo.sh

test:
	@bash scripts/setup.sh full,test
	@.venv/bin/python -m pytest
