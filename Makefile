# Quick start: `make demo` (build + generate on the tiny model), `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch; any torch >= 2.4 works (a CUDA build on GPU machines).
TORCH ?= torch==2.13.0
TINY ?= build/tiny

.PHONY: venv demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,rtx,serve]"
	$(PIP) install -q --no-deps "insightface==2.1" "open_clip_torch==3.3.0"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m export.build --model tiny --out $(TINY)
	$(PY) -c "from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save('$(TINY)/astronaut.png')"
	$(PY) -m runtime generate --build $(TINY) --face $(TINY)/astronaut.png --prompt "a portrait photo, studio light" \
		--steps 8 --width 256 --height 256 --out $(TINY)/instantid.png

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV)
