// The test-only operator library hcext_emu: the schemas of hcext (the same define_<family>_ops),
// whose CPU kernels are hcext's CUDA glue (csrc/<family>/<family>_cuda.cpp, compiled with
// HCEXT_EMU) running the CUDA kernels in the emulated grid (cuda_emu.h). tests/emu/emulated.py
// routes hcext's own ops to it for CPU tensors. The Python module exposes the emulator's
// controls.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "hc/hc_ops.h"
#include "mhc/mhc_ops.h"
#include "sinkhorn/sinkhorn_ops.h"
#include "streams/streams_ops.h"

TORCH_LIBRARY(hcext_emu, m) {
  hcext::define_sinkhorn_ops(m);
  hcext::define_streams_ops(m);
  hcext::define_mhc_ops(m);
  hcext::define_hc_ops(m);
}

PYBIND11_MODULE(_emu, mod) {
  mod.doc() = "hcext's CUDA path in the emulated grid (ops as torch.ops.hcext_emu.*, CPU tensors)";
  mod.def("set_schedule_seed", &hcext_emu::set_schedule_seed,
          "0: blocks and threads in order; other: shuffled block order and thread interleaving");
  mod.def("schedule_seed", &hcext_emu::schedule_seed);
  mod.def("executed_kernels", &hcext_emu::executed_kernels, "kernel name -> launches since import");
  mod.def("last_error_message", []() { return std::string(hcext_emu::last_error_message()); });
#if defined(__SANITIZE_ADDRESS__)
  mod.attr("address_sanitizer") = true;
#else
  mod.attr("address_sanitizer") = false;
#endif
}
