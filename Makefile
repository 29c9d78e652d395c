# Set-up and entry points. Each target creates .venv (CPU build of torch) and builds the native
# module on first use, and rebuilds it when csrc/ or the build files change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.safegene-built
NATIVE_INPUTS := requirements.txt requirements-data.txt setup.py pyproject.toml CMakeLists.txt $(shell find csrc -type f)

.PHONY: demo study test fuzz bench table doctor clean

## demo: the main job: SafeGene vs the baselines on the embedded model family (built on first use)
demo: $(STAMP)
	$(PY) -m safegene_fast demo

## study: the study on SmolLM2-135M-Instruct (family built on first use, ~80 min on 2 cores)
study: $(STAMP)
	$(PY) -m safegene_fast study --out safegene-study --json-out bench/results/smollm2_study.json
	cp safegene-study/study.png bench/results/smollm2_study.png

## table: benchmark table of the fused kernels and rsvd on generated data
table: $(STAMP)
	$(PY) bench/bench_table.py

## test: the whole test suite (CPU; CUDA tests skip without a GPU)
test: $(STAMP)
	$(PY) -m pytest python_tests -q

## fuzz: the reader's fuzz tests with 20000 examples each instead of CI's 300 (about 10 min)
fuzz: $(STAMP)
	SAFEGENE_FUZZ_EXAMPLES=20000 $(PY) -m pytest python_tests/test_bad_input.py -q -k "lies or near_miss"

## bench: pytest-benchmark for every op
bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only

## doctor: what was built
doctor: $(STAMP)
	$(PY) -m safegene_fast doctor

$(STAMP): $(NATIVE_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

clean:
	rm -rf build $(VENV) safegene_fast/_C*.so *.egg-info
