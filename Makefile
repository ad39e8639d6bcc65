# The two commands of the README. Both install what they need first (idempotent; pip caches wheels).
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test test-all

# torch first, pinned, so nothing pulls the multi-GB CUDA build on a CPU machine.
install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[train,export,test]"

demo: install
	samf demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow" -q

test-all: install
	$(PY) -m pytest -q
