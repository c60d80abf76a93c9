# The two commands of the README. Each does all set-up itself (scripts/setup.sh is idempotent).
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
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@.venv/bin/python -m pytest
