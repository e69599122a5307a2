# Two commands on a fresh machine: `make demo` and `make test`. `make docs` builds the site into site/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
DATA_DIR ?= data
FMNIST_DEB := /usr/share/datasets/fashion-mnist
# An explicit --data-dir is the only place normsam looks, so the demo names Debian's copy when `make data`
# used it (and DATA_DIR was not set by hand).
DEMO_DATA_DIR = $(if $(and $(filter file,$(origin DATA_DIR)),$(wildcard $(FMNIST_DEB)/train-images-idx3-ubyte.gz)),$(FMNIST_DEB),$(DATA_DIR))

.PHONY: demo test test-slow test-all install data bench docs docs-serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when pyproject.toml changes; the package is editable, so code changes need nothing.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

# Fashion-MNIST: Debian's package when we are root on Debian, otherwise torchvision's download into $(DATA_DIR).
data: install
	@if [ -f $(FMNIST_DEB)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: using $(FMNIST_DEB)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then \
		apt-get install -y dataset-fashion-mnist; \
	else \
		$(BIN)/normsam download fashion-mnist --data-dir $(DATA_DIR); \
	fi

# The main job: SGD vs SAM-all vs SAM-ON on Fashion-MNIST (a few minutes on 2 cores).
demo: data
	$(BIN)/normsam compare --data-dir $(DEMO_DATA_DIR) --out runs/compare

# The documentation site (mkdocs-material + mkdocstrings; sources in docs/, mkdocs.yml): references generated
# from the code, every warning an error (broken links and anchors included).
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

docs: install
	$(MKDOCS) build --strict --site-dir site

docs-serve: install
	$(MKDOCS) serve

# The tests, and the site's strict build (its code blocks run in tests/test_docs.py).
test: install
	$(MKDOCS) build --strict --quiet --site-dir site
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: install
	$(BIN)/python -m pytest -m slow -q

test-all: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache
