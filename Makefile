# Every install step lives here: a fresh machine needs only python3 (>= 3.10) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
VEIL := $(VENV)/bin/veil
# torch/torchvision pinned to the releases this project is tested with (a CUDA build; runs on CPU too).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint format clean chromium

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## The embedded demo: 2,000 bundled CIFAR-10 images, CPU, a few minutes. The paper's cut, undefended
## (the ceiling), and the private configuration; fresh attackers against both, beside the floor.
DEMO_ATTACK := --attackers simrec,unet --max-epochs 60 --whitebox-images 100 --whitebox-steps 100 --device cpu --no-progress
demo: install
	rm -rf runs/demo
	$(VEIL) train --config configs/demo.yaml --out runs/demo/paper-cut train.defence=none progress=false
	$(VEIL) train --config configs/demo-private.yaml --out runs/demo/private progress=false
	$(VEIL) attack runs/demo/private --ceiling runs/demo/paper-cut $(DEMO_ATTACK)

## The test suite (a few minutes on 2 cores; slow end-to-end tests included).
test: install chromium
	$(PY) -m pytest

## Headless Chromium for the report test (Debian's package); skipped quietly unless we are root.
## Without it, the browser test skips and says why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1)) || \
		echo "make chromium: could not install chromium; the report's browser test will be skipped"; \
	fi

lint: install
	$(VENV)/bin/ruff check src tests

format: install
	$(VENV)/bin/ruff format src tests

clean:
	rm -rf runs build *.egg-info src/*.egg-info .pytest_cache
