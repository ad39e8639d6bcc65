# The commands of the README (plus `make ablation`, the ablation table in benchmarks/). Both install what they need first (idempotent; pip caches wheels).
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test test-all ablation wheelhouse

# torch first, pinned, so nothing pulls the multi-GB CUDA build on a CPU machine. The stamp file makes a
# repeated `make test` skip pip's ten seconds of checking; a changed pyproject.toml or Makefile installs again.
# The stamp lives inside the Python environment (named after this checkout), so a rebuilt or other
# environment, which has no samf installed, has no stamp either.
# An editable install points at one checkout: when samf resolves elsewhere (installed from another
# checkout since), this checkout's stamp is stale and is removed, so the install runs again.
INSTALLED := $(shell $(PY) -c "import hashlib, importlib.util, os, sys; \
  stamp = os.path.join(sys.prefix, '.samf-installed-' + hashlib.sha1(os.getcwd().encode()).hexdigest()[:10]); \
  spec = importlib.util.find_spec('samf'); \
  here = spec is not None and os.path.realpath(list(spec.submodule_search_locations)[0]) == os.path.realpath(os.getcwd()); \
  here or not os.path.exists(stamp) or os.remove(stamp); print(stamp)")

install: $(INSTALLED)

# llama-cpp-python is the portable wheel CMakeLists.txt's build makes (every x86-64 CPU variant, chosen at load
# time; docs/install.md), the same one `make wheelhouse` ships: compiled once per machine (about 8 min on 2
# cores, cached in ~/.cache/samf-native by its options), never by pip with -march=native.
$(INSTALLED): pyproject.toml Makefile CMakeLists.txt deploy/wheelhouse.py
	$(PIP) install --quiet torch==2.13.0
	wheel=$$(nice -n 10 $(PY) deploy/wheelhouse.py llama-wheel) && \
	  $(PIP) install --quiet --no-deps --force-reinstall "$$wheel"
	$(PIP) install --quiet -e ".[train,export,eval,serve,openvino,test]"
	touch $@

demo: install
	samf demo

# Two pytest-xdist workers, each test file on one of them (its module fixtures are built once): the service and
# DICOM tests mostly wait on timers and sockets, so a second worker fills the cores while they do. The recipe
# fixtures (tests/conftest.py) are built once and shared by both workers. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
FAST_TESTS = $(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile

test: install
	$(PY) -m ruff check .
	$(FAST_TESTS)

# The whole suite, what CI runs (2 cores): the fast set as `make test` runs it (in one process: 198 s instead of
# 115 s); the fuzz suite's 517 slow cases spread case by case over the workers (each a short CLI run: 136 s
# instead of 213 s); then the other slow tests (multi-rank runs, the demo, the ablation grid) in one process, each
# free to use every core.
test-all: install
	$(PY) -m ruff check .
	$(FAST_TESTS)
	$(PY) -m pytest -m slow -q -n $(TEST_WORKERS) tests/test_fuzz.py
	$(PY) -m pytest -m slow -q --ignore=tests/test_fuzz.py

ablation: install
	samf-train ablate --out samf-ablation

# The air-gapped install (docs/install.md): dist/wheelhouse/ with every wheel the runtime and the service need,
# hash-locked, and its install.sh. EXTRAS=train makes the research variant (torch CPU) in dist/wheelhouse-train/.
EXTRAS ?= serve
WHEELHOUSE ?= dist/wheelhouse$(if $(filter train,$(subst $(comma), ,$(EXTRAS))),-train,)
comma := ,
wheelhouse:
	$(PY) deploy/wheelhouse.py build --extras "$(EXTRAS)" --out $(WHEELHOUSE)
