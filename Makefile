# Everything a newcomer needs, on a fresh CPU-only machine:
#   make train   builds the extension into .venv and runs the main job
#   make test    builds the extension into .venv and runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# Tests run torchvision's own video models (pure-Python files; --no-deps keeps the CPU torch).
TORCHVISION_PIN ?= torchvision==0.28.0
NVCC ?= nvcc
CUDA_HOME ?= /usr/local/cuda
NVCC_FLAGS := -c -std=c++17 -Xptxas -v
CU_SOURCES := $(wildcard csrc/cuda/*.cu)
STAMP := $(VENV)/.sideways-installed
# The Triton of the GPU image (torch 2.11's): gpu-check compiles the kernels with it too, in a
# venv of its own (Triton alone: the check needs no torch).
TRITON_DEVICE_PIN ?= triton==3.6.0
TRITON_VENV ?= .venv-triton36

.PHONY: install test train bench cmake-check nvcc-check gpu-check clean

install: $(STAMP)

# Rebuilt whenever the build files or any C++/CUDA source change.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.* csrc/*/*.*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,triton,train]"
	$(PY) -m pip install -q --no-deps "$(TORCHVISION_PIN)"
	touch $@

test: install
	$(PY) -m pytest python_tests -q $(PYTEST_ARGS)

train: install
	$(PY) -m sideways_kernels.train $(TRAIN_ARGS)

bench: install
	$(PY) -m pytest bench -q --benchmark-only --benchmark-save=cpu --benchmark-columns=min,median,max,rounds

# The same op library through CMake's find_package(Torch), loaded and run once.
cmake-check: install
	mkdir -p build
	cmake -S . -B build-cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	cmake --build build-cmake -j2 >> build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	$(PY) bench/cmake_smoke.py build-cmake/libsideways_ops.so

# Every CUDA kernel compiles for Hopper (sm_90a) and Ampere (sm_80); registers and spills in
# build/nvcc.log. Fails on a spill, or on sm_90a code without cp.async copies or tensor-core mma.
nvcc-check: install
	@if command -v $(NVCC) > /dev/null; then \
	  mkdir -p build; rm -f build/nvcc.log; \
	  for f in $(CU_SOURCES); do \
	    echo "nvcc $$f (sm_90a, sm_80, and sm_90a's PTX: three compiles side by side)"; \
	    $(NVCC) $(NVCC_FLAGS) -gencode=arch=compute_90a,code=sm_90a $$f -o build/sideways_nvcc90.o > build/nvcc90.log 2>&1 & p90=$$!; \
	    $(NVCC) $(NVCC_FLAGS) -gencode=arch=compute_80,code=sm_80 $$f -o build/sideways_nvcc80.o > build/nvcc80.log 2>&1 & p80=$$!; \
	    $(NVCC) -ptx -std=c++17 -gencode=arch=compute_90a,code=sm_90a $$f -o build/sideways_nvcc.ptx > build/nvccptx.log 2>&1 & pptx=$$!; \
	    ok=1; wait $$p90 || ok=0; wait $$p80 || ok=0; wait $$pptx || ok=0; \
	    cat build/nvcc90.log build/nvcc80.log build/nvccptx.log >> build/nvcc.log; \
	    [ $$ok = 1 ] || { cat build/nvcc.log; exit 1; }; \
	    for insn in cp.async mma; do \
	      grep -q "$$insn" build/sideways_nvcc.ptx || { echo "$$f: no $$insn in its sm_90a PTX"; exit 1; }; \
	      echo "  $$insn: $$(grep -c "$$insn" build/sideways_nvcc.ptx) PTX lines"; \
	    done; \
	  done; \
	  grep -E "registers|spill" build/nvcc.log | sort | uniq -c; \
	  if grep -qE "[1-9][0-9]* bytes spill" build/nvcc.log; then echo "a CUDA kernel spills registers"; exit 1; fi; \
	  echo "g++ -fsyntax-only csrc/cuda/*.cpp (the torch bindings, against torch's and CUDA's headers)"; \
	  for f in $(wildcard csrc/cuda/*.cpp); do \
	    $(CXX) -fsyntax-only -std=c++20 $$($(PY) -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))') \
	      -I$(CUDA_HOME)/include -Icsrc/cuda $$f || exit 1; \
	  done; \
	else echo "nvcc not found: CUDA sources not compiled"; fi

# Every Triton kernel x config compiled for sm_90a and sm_80 without a GPU, with this venv's
# Triton and with the GPU image's: fails on a spill, shared memory over the limit, 16-bit Hopper
# code without wgmma, or a box kernel without TMA or its persistent loop (bench/gpu_check.py).
$(TRITON_VENV)/.installed:
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q "$(TRITON_DEVICE_PIN)"
	touch $@

gpu-check: install $(TRITON_VENV)/.installed
	$(PY) bench/gpu_check.py
	$(TRITON_VENV)/bin/python bench/gpu_check.py --arch 90  # the device image's Triton, on its architecture

clean:
	rm -rf build build-cmake *.egg-info sideways_kernels/*.so $(TRITON_VENV)
