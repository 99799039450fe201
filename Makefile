# Developer entry points. Each target sets up what it needs on a fresh machine:
# a virtual environment with the pinned requirements (.ci/venv.sh, kept outside the clone
# and reused while requirements-torch.txt is unchanged), then the build.
#
#   make demo    set up, build, run the main job (python -m hcext.demo: residual vs HC vs mHC)
#   make test    set up, build (CPU + CUDA kernels when a CUDA toolkit is present), build and
#                run the C++ test of the math headers (ctest), check the CUDA kernels' stack budget
#                (ptxas -v, when nvcc is present), run pytest, then make test-emu
#   make test-emu  the CUDA path without a GPU: build the emulated grid (tests/emu/CMakeLists.txt:
#                the CUDA kernels as host C++, one fiber per CUDA thread), run its C++ test under
#                ThreadSanitizer, then the Python suite's emulated tests (tests/emu/ and every
#                family test's `emu` device) with the glue and kernels under AddressSanitizer
#   make bench   set up, build, run every benchmark (python -m benchmarks: JSON in benchmarks/results/,
#                then benchmarks/RESULTS.md and the README table regenerated)
#   make cmake   the whole library through CMake as well (IDEs, sanitizers; not needed otherwise)
#   make gpu-check  on a machine with a GPU: build for its arch with the machine's own python and torch,
#                then benchmarks/gpu_check.py (CUDA tests with HCEXT_REQUIRE_CUDA=1, compute-sanitizer, limits,
#                repeatability, CUDA graphs, GPU benchmarks) -> benchmarks/results/gpu-check-<device>.{json,md}
#   make mutation-test  plant each bug of tests/mutation/mutants.py, rebuild (CPU kernels, ccache), run
#                the tests that must catch it, write tests/mutation/results.md (tens of minutes; not in CI)
#
# The build is in place (hcext/_C*.so, objects in build/): every source compiles once per
# clone. A later target reuses it (setuptools skips an extension newer than its sources and
# headers; when one changed, ninja recompiles only what depends on it), so `make test` then
# `make demo` compiles nothing the second time. Python imports hcext from the clone.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c
VENV_PY = "$$(bash .ci/venv.sh)/bin/python"

.PHONY: setup build ctest ptxas-check cmake test test-emu demo bench mutation-test gpu-check clean

setup:
	bash .ci/venv.sh

build:
	source .ci/env.sh
	py=$(VENV_PY)
	start=$$(date +%s)
	echo "building hcext._C in place (compiler output: build-setup.log)"
	"$$py" setup.py build_ext --inplace > build-setup.log 2>&1 || { tail -n 60 build-setup.log; exit 1; }
	"$$py" -c "import hcext; print('hcext build:', hcext.build_info())"
	echo "build took $$(( $$(date +%s) - start )) s"

# The C++ unit test of the shared math headers: no torch, compiles in seconds.
ctest:
	source .ci/env.sh
	py=$(VENV_PY)
	start=$$(date +%s)
	PATH="$$(dirname "$$py"):$$PATH" cmake -S . -B build-cmake -G Ninja -DHCEXT_BUILD_EXTENSION=OFF > build-cmake.log 2>&1 \
	  || { cat build-cmake.log; exit 1; }
	PATH="$$(dirname "$$py"):$$PATH" cmake --build build-cmake --target test_math
	PATH="$$(dirname "$$py"):$$PATH" ctest --test-dir build-cmake --output-on-failure
	echo "C++ header test took $$(( $$(date +%s) - start )) s"

cmake:
	source .ci/env.sh
	py=$(VENV_PY)
	start=$$(date +%s)
	PATH="$$(dirname "$$py"):$$PATH" cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE="$$py" \
	  -DHCEXT_BUILD_EXTENSION=ON $${CUDA_HOME:+-DCMAKE_CUDA_COMPILER=$$CUDA_HOME/bin/nvcc} > build-cmake.log 2>&1 \
	  || { cat build-cmake.log; exit 1; }
	cmake --build build-cmake
	ctest --test-dir build-cmake --output-on-failure
	echo "cmake build + ctest took $$(( $$(date +%s) - start )) s"

# The CUDA kernels' registers, stack and spills (ptxas -v, sm_90; the full table in
# build-ptxas.log), failing when a kernel's per-thread stack exceeds the documented budget
# (benchmarks/ptxas_report.py). Skipped without nvcc.
ptxas-check:
	source .ci/env.sh
	py=$(VENV_PY)
	if [ -z "$${CUDA_HOME:-}" ]; then echo "ptxas check: no CUDA toolkit, skipped"; exit 0; fi
	"$$py" -m benchmarks.ptxas_report > build-ptxas.log

test: build ctest ptxas-check
	py=$(VENV_PY)
	"$$py" -m pytest tests -q
	$(MAKE) --no-print-directory test-emu

# The families whose ops have CUDA kernels: their tests also run on the `emu` device.
EMU_FAMILY_TESTS = tests/test_streams.py tests/test_sinkhorn.py tests/test_mhc.py tests/test_mhc_post_pre.py \
	tests/test_mhc_shifted.py tests/test_hc.py tests/test_mhc_passes.py

# Needs the CUDA toolkit's headers only (no GPU, no nvcc run). The sanitizer runtimes are
# preloaded (python itself is not instrumented); libstdc++ with them, so that ASan can
# intercept C++ exceptions thrown by torch. --capture=sys: pytest captures Python's output only,
# so that a sanitizer's or the emulator's report (written to file descriptor 2 just before the
# process stops) reaches the terminal. Slow tests (inductor compiles) are left out.
test-emu: build
	source .ci/env.sh
	py=$(VENV_PY)
	if [ -z "$${CUDA_HOME:-}" ]; then echo "test-emu: no CUDA toolkit headers (CUDA_HOME)"; exit 1; fi
	start=$$(date +%s)
	echo "building the emulated CUDA backend (compiler output: build-emu.log)"
	{ PATH="$$(dirname "$$py"):$$PATH" cmake -S tests/emu -B build-emu -G Ninja -DPython3_EXECUTABLE="$$py" \
	    -DCUDA_HOME="$$CUDA_HOME" && cmake --build build-emu; } > build-emu.log 2>&1 || { tail -n 60 build-emu.log; exit 1; }
	echo "emulated backend built in $$(( $$(date +%s) - start )) s"
	ctest --test-dir build-emu --output-on-failure
	HCEXT_EMU_BUILD="$$PWD/build-emu" \
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  "$$py" -m pytest tests/emu $(EMU_FAMILY_TESTS) -k emu -m "not slow" -q -p no:cacheprovider --capture=sys
	echo "test-emu took $$(( $$(date +%s) - start )) s"

demo: build
	py=$(VENV_PY)
	"$$py" -m pip install -q -r requirements-demo.txt  # plots and the progress bar (optional extras)
	"$$py" -m hcext.demo

bench: build
	py=$(VENV_PY)
	"$$py" -m pip install -q -r requirements-demo.txt  # the report's charts
	"$$py" -m benchmarks

# GPU machines come with their own python and torch (a CUDA build): no venv, build in place
# for the local arch.
gpu-check:
	source .ci/env.sh
	py=$${PYTHON:-python3}
	"$$py" -m pip install -q pybind11 ninja pytest numpy
	arch=$$("$$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
	HCEXT_USE_CUDA=1 TORCH_CUDA_ARCH_LIST="$$arch" "$$py" setup.py build_ext --inplace > build-setup.log 2>&1 \
	  || { tail -n 60 build-setup.log; exit 1; }
	"$$py" -m benchmarks.gpu_check

mutation-test: build
	source .ci/env.sh
	py=$(VENV_PY)
	"$$py" -m tests.mutation.run

clean:
	rm -rf build build-cmake build-cmake.log build-setup.log build-ptxas.log build-emu build-emu.log hcext/_C*.so *.egg-info
