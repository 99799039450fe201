# Developer entry points. Each target sets up what it needs on a fresh machine:
# a virtual environment with the pinned requirements (.ci/venv.sh, kept outside the clone
# and reused while requirements-torch.txt is unchanged), then the build.
#
#   make demo    set up, build, run the main job (python -m hcext.demo: residual vs HC vs mHC)
#   make test    set up, build (CPU + CUDA kernels when a CUDA toolkit is present), build the
#                CMake target and its C++ test, run ctest and pytest
#   make bench   set up, build, run every benchmark (python -m benchmarks: JSON in benchmarks/results/,
#                then benchmarks/RESULTS.md and the README table regenerated)
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c
VENV_PY = "$$(bash .ci/venv.sh)/bin/python"

.PHONY: setup build cmake test demo bench clean

setup:
	bash .ci/venv.sh

build:
	source .ci/env.sh
	py=$(VENV_PY)
	start=$$(date +%s)
	"$$py" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
	"$$py" -c "import hcext; print('hcext build:', hcext.build_info())"
	echo "build took $$(( $$(date +%s) - start )) s"

cmake:
	source .ci/env.sh
	py=$(VENV_PY)
	start=$$(date +%s)
	PATH="$$(dirname "$$py"):$$PATH" cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE="$$py" \
	  $${CUDA_HOME:+-DCMAKE_CUDA_COMPILER=$$CUDA_HOME/bin/nvcc} > build-cmake.log 2>&1 || { cat build-cmake.log; exit 1; }
	cmake --build build-cmake
	ctest --test-dir build-cmake --output-on-failure
	echo "cmake build + ctest took $$(( $$(date +%s) - start )) s"

test: build cmake
	py=$(VENV_PY)
	"$$py" -m pytest tests -q

demo: build
	py=$(VENV_PY)
	"$$py" -m pip install -q -r requirements-demo.txt  # plots and the progress bar (optional extras)
	"$$py" -m hcext.demo

bench: build
	py=$(VENV_PY)
	"$$py" -m pip install -q -r requirements-demo.txt  # the report's charts
	"$$py" -m benchmarks

clean:
	rm -rf build build-cmake build-cmake.log hcext/_C*.so *.egg-info
