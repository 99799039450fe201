# Sourced by the Makefile targets: compiler cache and CUDA toolkit settings shared by
# setup.py and CMake builds. ccache keeps repeated builds cheap; its cache lives outside the
# clone and is keyed on paths relative to the clone, so fresh clones hit it too.
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$(pwd)}"
export CCACHE_NOHASHDIR=1
export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-5G}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda-13.0
fi
