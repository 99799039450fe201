// The hcext operator library, declared here once. Each op family writes its schemas (and
// its composite public ops) next to its checks and driver, in csrc/<family>/<family>_ops.h,
// registered below; it registers its kernels per backend with TORCH_LIBRARY_IMPL in
// <family>_cpu.cpp and <family>_cuda.cpp. Fake kernels and autograd are registered in
// Python (hcext/ops/<family>.py). The pybind11 module only reports build information;
// ops go through the dispatcher.

#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "hc/hc_ops.h"
#include "mhc/mhc_ops.h"
#include "sinkhorn/sinkhorn_ops.h"
#include "streams/streams_ops.h"

#include <string>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif
#ifdef HCEXT_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION: the toolkit the kernels were compiled with
#endif

// setup.py passes TORCH_CUDA_ARCH_LIST with commas as separators: stringify it whole.
#define HCEXT_STRINGIFY_ALL(...) #__VA_ARGS__
#define HCEXT_STRINGIFY(...) HCEXT_STRINGIFY_ALL(__VA_ARGS__)
#ifndef HCEXT_CUDA_ARCH_LIST_TOKENS
#define HCEXT_CUDA_ARCH_LIST_TOKENS none
#endif

TORCH_LIBRARY(hcext, m) {
  m.set_python_module("hcext.ops");  // the fake kernels (torch.compile needs them)
  hcext::define_sinkhorn_ops(m);
  hcext::define_streams_ops(m);
  hcext::define_mhc_ops(m);
  hcext::define_hc_ops(m);
}

TORCH_LIBRARY_IMPL(hcext, CompositeImplicitAutograd, m) {
  hcext::register_mhc_composites(m);
  hcext::register_hc_composites(m);
}

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "hcext native library (ops are registered as torch.ops.hcext.*)";
  mod.def("build_info", []() {
    pybind11::dict info;
    pybind11::list backends;
    backends.append("cpu");
#ifdef HCEXT_WITH_CUDA
    backends.append("cuda");
#endif
    info["backends"] = backends;
    info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
#ifdef HCEXT_WITH_CUDA
    info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
    info["cuda_version"] = pybind11::none();
#endif
#ifdef HCEXT_WITH_CUDA
    info["cuda_arch_list"] = std::string(HCEXT_STRINGIFY(HCEXT_CUDA_ARCH_LIST_TOKENS));
#else
    info["cuda_arch_list"] = pybind11::none();
#endif
#ifdef NDEBUG
    info["debug"] = false;
#else
    info["debug"] = true;
#endif
    return info;
  });
}
