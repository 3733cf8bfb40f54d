# Set-up commands for a fresh machine (Python 3.11, CPU). `make demo` and `make test` create .venv,
# install torch 2.13.0 (CPU wheel) when the environment has no torch, install regrow, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# timm's real model definitions are the test zoo (tests/test_zoo.py). Installed without its dependencies: it
# requires torchvision, whose PyPI build needs CUDA libraries and does not load beside the CPU torch; the tests
# use a stand-in for it (tests/stubs) when the real one cannot be imported. Its other needs come with [hf].
TIMM_VERSION ?= 1.0.31
# torchvision's real model definitions join the zoo too (tests/test_zoo_torchvision.py): the wheel that matches the
# CPU torch, unpacked with --target outside the import path, because its compiled operators need CUDA libraries;
# the tests import its model code without them (tests/conftest.py:import_torchvision_models).
TORCHVISION_VERSION ?= 0.28.0

.PHONY: install demo test bench clean gpu-wheels

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -e ".[test,hf]"
	$(BIN)/pip install --no-deps "timm==$(TIMM_VERSION)"
	$(BIN)/pip install --no-deps --upgrade --target $(VENV)/torchvision-models "torchvision==$(TORCHVISION_VERSION)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/regrow demo

# The suite on TEST_WORKERS processes (pytest-xdist); tests/conftest.py gives each its share of the cores. Work
# stealing keeps both workers busy to the end. On this 2-core machine: 375 s in the clean-clone CI run at 3214884
# (1128 passed; 333 s at 48c4d85 with 1108). The tests that start processes fork them from one that has done the
# imports (tests/forked.py, and a forkserver for the distributed tests): 616-739 s in the four CI runs before.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Published results (benchmarks/results/): Fashion-MNIST from the Debian package dataset-fashion-mnist.
# Several hours on 2 CPU cores; each study can also be run alone, e.g. python -m benchmarks.unstructured.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.unstructured --jobs 2
	$(BIN)/python -m benchmarks.structural
	$(BIN)/python -m benchmarks.overhead
	$(BIN)/python -m benchmarks.recovery_methods --jobs 2
	$(BIN)/python -m benchmarks.paired_gaps
	$(BIN)/python -m benchmarks.recovery_settings --seeds 2 --jobs 2
	$(BIN)/python -m benchmarks.allocation
	$(BIN)/python -m benchmarks.augment
	$(BIN)/python -m benchmarks.structural_speed
	$(BIN)/python -m benchmarks.memory

# regrow's own dependencies that the GPU machine's image lacks (it has torch, torchvision and timm), as wheels for
# its Python 3.12 in .whl/, which benchmarks/gpu_checks.sh installs; carry .whl to that machine with the repository.
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 torch-pruning==1.6.1
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs .pytest_cache
