# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing;
# `make test` adds the test and lint tools of requirements-dev.txt.

ifeq ($(OS),Windows_NT)
  VENV_PY := .venv/Scripts/python.exe
  PYTHON ?= python
else
  VENV_PY := .venv/bin/python
  PYTHON ?= python3
endif

STAMP := .venv/.installed
DEV_STAMP := .venv/.installed-dev
# pip compiles each package's files on one core; compiling the venv afterwards on every core
# takes half the time (files that do not compile, like torch's Python 3.12 helpers, are
# skipped, as pip skips them)
COMPILE := $(VENV_PY) -c "import compileall; compileall.compile_dir('.venv', quiet=2, workers=0)"
DEMO_OUT := build/demo
DEMO_RUN := runs/demo

.PHONY: venv demo test lint serve bench encoders clean

venv: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv .venv
	$(VENV_PY) -m pip install --upgrade --quiet pip
	$(VENV_PY) -m pip install --quiet --no-compile -r requirements.txt
	$(COMPILE)
	$(VENV_PY) -c "import pathlib; pathlib.Path('$(STAMP)').touch()"

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(VENV_PY) -m pip install --quiet --no-compile -r requirements-dev.txt
	$(COMPILE)
	$(VENV_PY) -c "import pathlib; pathlib.Path('$(DEV_STAMP)').touch()"

demo: $(STAMP)
	$(VENV_PY) preprocessing.py --source csv --data "demo data" --encoders "preprocessing encoders" --out $(DEMO_OUT)
	$(VENV_PY) train.py --preset demo --data $(DEMO_OUT) --run-dir $(DEMO_RUN)
	$(VENV_PY) train.py --recommend $(DEMO_RUN)/best.pt --sequence "demo data/sequence.csv" --catalog "demo data" --k 10

test: $(DEV_STAMP)
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m mypy
	$(VENV_PY) -m pytest

lint: $(DEV_STAMP)
	$(VENV_PY) -m ruff check .
	$(VENV_PY) -m mypy

serve: $(STAMP)
	$(VENV_PY) -m gunicorn --config gunicorn.conf.py "flask_app:create_app()"

encoders: $(STAMP)
	$(VENV_PY) preprocessing.py --source csv --data "demo data" --refit-encoders "preprocessing encoders" --out $(DEMO_OUT)

bench: $(STAMP)
	$(VENV_PY) benchmarks/bench_train.py --preset full --batch-size 16 --threads 1
	$(VENV_PY) benchmarks/bench_infer.py --preset full --threads 1
	$(VENV_PY) benchmarks/bench_quality.py

clean:
	$(VENV_PY) -c "import shutil; [shutil.rmtree(p, ignore_errors=True) for p in ('build', 'runs')]"
