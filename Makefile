# Two commands on a fresh machine: `make demo` and `make test`. Each sets everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup data demo demo-all test test-world lint docs clean report-shot

setup: $(STAMP)

# pip (not uv/poetry) so torch comes from the machine's local index, pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package (MIT). Only root can apt-get; others are told what to supply.
data:
	@if [ -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ] || [ -n "$$DIFFDISTILL_FMNIST" ]; then \
	  echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) && \
	  echo "Fashion-MNIST: installed to $(FMNIST_DIR)"; \
	else \
	  echo "Fashion-MNIST is missing. Run 'sudo apt-get install dataset-fashion-mnist' or set"; \
	  echo "DIFFDISTILL_FMNIST to a folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"; exit 1; \
	fi

demo: setup data
	$(VENV)/bin/diffdistill demo --jobs 2

demo-all: setup data
	$(VENV)/bin/diffdistill demo --all --jobs 2

# The whole suite, the shipped-world checks included (`make test-world`: those alone). Tests
# run one torch thread each (tests/conftest.py), so TEST_JOBS workers (pytest-xdist) use that
# many cores; the 25 slowest tests are listed at the end.
# The documentation site is built last (a few seconds): a broken link fails `make test` too.
TEST_JOBS ?= 2
test: setup data
	$(PY) -m pytest -q -n $(TEST_JOBS) --durations=25 tests
	$(MAKE) --no-print-directory docs

test-world: setup data
	$(PY) -m pytest -q tests -m world_assets

lint: setup
	$(VENV)/bin/ruff check diffdistill trainers eval tests

# The documentation site (mkdocs.yml, docs/) into build/site; --strict: a broken link, a
# missing anchor or a page left out of the nav is an error.
docs: setup
	$(VENV)/bin/mkdocs build --strict --quiet
	@echo "docs: build/site/index.html"

# Look at runs/demo/report.html as a person would: headless Chromium (Debian's package, not
# installed by `make test`) screenshots it at desktop and phone widths.
REPORT ?= runs/demo/report.html
report-shot:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2400 \
	  --screenshot=$(basename $(REPORT))-desktop.png file://$(abspath $(REPORT))
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=390,2400 \
	  --screenshot=$(basename $(REPORT))-phone.png file://$(abspath $(REPORT))
	@echo "wrote $(basename $(REPORT))-desktop.png and $(basename $(REPORT))-phone.png"

clean:
	rm -rf $(VENV) build *.egg-info runs
