# The two commands of the README's quick start. Run from the repository root.
PYTHON ?= python3
DEMO_DATA ?= demo_data
DEMO_OUT ?= demo_output

.PHONY: demo test install install-test

install:
	$(PYTHON) -m pip install -r requirements.txt

install-test:
	$(PYTHON) -m pip install -r requirements-test.txt

# Generate the synthetic motion videos -> extract frames -> train T2L on a tiny random CLIP -> test, then print
# the results table. Everything lands in $(DEMO_DATA)/ and $(DEMO_OUT)/ (both ignored by git).
demo: install
	$(PYTHON) scripts/run_demo.py --data $(DEMO_DATA) --out $(DEMO_OUT)

# The whole test suite (what CI runs: .ci/run).
test: install-test
	$(PYTHON) -m pytest -q
