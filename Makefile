# moezoo: the two entry points of the README.
#   make demo   set up, then fit the default ViT-MoE and its dense twin on digits, print accuracy + routing
#   make test   set up, then run the default test tier
# Both bootstrap .venv from this project's own files: every domain and the dev tools ('.[all,dev]'), at the exact
# versions of constraints.txt (pyproject.toml only declares ranges). System data packages are installed with
# apt-get when it is usable (root); otherwise a message says which features need them.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dataset-fashion-mnist flite espeak-ng pocketsphinx-testdata
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	# The real aerial tree images with boxes for detection: only deepforest's data files are read (no import),
	# so none of its heavy dependencies are installed.
	$(PY) -m pip install -q -c constraints.txt --no-deps deepforest || echo "warning: deepforest could not be installed; its tree images will be unavailable"
	touch $@

system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			echo "installing Debian data packages:$$missing"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
			|| echo "warning: apt-get could not install$$missing; Fashion-MNIST and speech corpora will be unavailable"; \
		fi; \
	else \
		echo "note: apt-get is not usable here (not root or not Debian): install $(APT_PACKAGES) yourself for"; \
		echo "      Fashion-MNIST (dataset-fashion-mnist) and the generated speech corpus (flite, espeak-ng)."; \
	fi

demo: setup system-deps
	$(VENV)/bin/moezoo fit --config configs/vision/digits_moe_vit.yaml --trainer.enable_progress_bar false
	$(VENV)/bin/moezoo fit --config configs/vision/digits_dense_vit.yaml --trainer.enable_progress_bar false
	$(PY) -m moezoo.tasks.report runs/digits_moe_vit runs/digits_dense_vit

test: setup system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check moezoo tasks kernels tests
	$(VENV)/bin/mypy

clean:
	rm -rf runs lightning_logs .pytest_cache
