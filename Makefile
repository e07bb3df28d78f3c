# moezoo: the two entry points of the README.
#   make demo   set up, then fit the default ViT-MoE and its dense twin on digits, print accuracy + routing
#   make test   set up, then run the default test tier
# Both bootstrap .venv from this project's own files: every domain and the dev tools ('.[all,dev]'), at the exact
# versions of constraints.txt (pyproject.toml only declares ranges). System data packages are installed with
# apt-get when it is usable (root); otherwise a message says which features need them.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the speech corpus's five TTS engines and the voices it uses (moezoo.tasks.speech.corpus.VOICES); Pico
# (libttspico-*) and MBROLA (mbrola*) are in Debian's contrib and non-free components
SPEECH_PACKAGES := flite espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts \
	festvox-itapc16k festvox-italp16k libttspico-utils libttspico-data mbrola \
	mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 \
	mbrola-de1 mbrola-de2 mbrola-de3 mbrola-de4 mbrola-de5 mbrola-de6 mbrola-de7 \
	mbrola-fr1 mbrola-fr2 mbrola-fr3 mbrola-fr4 mbrola-fr5 mbrola-fr6 mbrola-fr7
APT_PACKAGES := dataset-fashion-mnist pocketsphinx-testdata $(SPEECH_PACKAGES)
# When apt finds no candidate for a missing package on Debian, system-deps adds the release's contrib and non-free
# components in a sources file of its own (written once) and updates the package lists again.
APT_SOURCES_DIR ?= /etc/apt/sources.list.d
OS_RELEASE ?= /etc/os-release
NONFREE_SOURCES := $(APT_SOURCES_DIR)/moezoo-contrib-non-free.sources
DEBIAN_KEYRING := /usr/share/keyrings/debian-archive-keyring.gpg
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
			apt-get update -qq || echo "warning: apt-get update failed"; \
			has() { apt-cache policy "$$1" 2>/dev/null | grep -q 'Candidate: [^(]'; }; \
			unknown=""; for p in $$missing; do has $$p || unknown="$$unknown $$p"; done; \
			ID=""; VERSION_CODENAME=""; [ -r $(OS_RELEASE) ] && . $(OS_RELEASE); \
			if [ -n "$$unknown" ] && [ "$$ID" = debian ] && [ -n "$$VERSION_CODENAME" ] && [ ! -e $(NONFREE_SOURCES) ]; then \
				echo "adding Debian's contrib and non-free components ($(NONFREE_SOURCES)) for:$$unknown"; \
				{ printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: contrib non-free\n' "$$VERSION_CODENAME"; \
				  if [ -f $(DEBIAN_KEYRING) ]; then echo "Signed-By: $(DEBIAN_KEYRING)"; fi; } > $(NONFREE_SOURCES); \
				apt-get update -qq || echo "warning: apt-get update failed"; \
			fi; \
			install=""; absent=""; for p in $$missing; do if has $$p; then install="$$install $$p"; else absent="$$absent $$p"; fi; done; \
			[ -z "$$absent" ] || echo "warning: apt-get cannot find$$absent (Pico and MBROLA need Debian's contrib and non-free components); the speech corpus engines that need them will be unavailable"; \
			if [ -n "$$install" ]; then \
				echo "installing Debian data packages:$$install"; \
				(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$install >/dev/null) \
				|| echo "warning: apt-get could not install$$install; Fashion-MNIST and speech corpora will be unavailable"; \
			fi; \
		fi; \
	else \
		echo "note: apt-get is not usable here (not root or not Debian): install $(APT_PACKAGES) yourself for"; \
		echo "      Fashion-MNIST (dataset-fashion-mnist) and the generated speech corpus ($(SPEECH_PACKAGES))."; \
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
