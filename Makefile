# The two commands of the README. Each does all set-up itself (scripts/setup.sh is idempotent) and installs only the
# extras it needs: the demo the package with its `full` extra, the tests `full` and `test` (pyproject.toml).
.PHONY: demo test setup native

# Optional: the C kernels of mtser/trainer/native (`_<name>.so` next to each `<name>.c`; run before `pip install .`
# so a wheel carries them, or in an editable checkout). No -march: on x86-64 the kernels carry their own AVX2 + FMA
# clones, picked at load by the CPU's features. Without them the trainer runs the PyTorch path (slower on the CPU).
NATIVE_CFLAGS ?= -O3 -fopenmp -fPIC -shared -std=c11 -Wno-psabi
NATIVE_LIBS := $(patsubst mtser/trainer/native/%.c,mtser/trainer/native/_%.so,$(wildcard mtser/trainer/native/*.c))

native: $(NATIVE_LIBS)

mtser/trainer/native/_%.so: mtser/trainer/native/%.c
	$(CC) $(NATIVE_CFLAGS) -o $@ $<

setup:
	@bash scripts/setup.sh full,test

demo:
	@bash scripts/setup.sh full
	@bash scripts/demo.sh

test:
	@bash scripts/setup.sh full,test
	@.venv/bin/python -m pytest
