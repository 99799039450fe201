# hcext_find_torch(<python>): torch's include and library folders, CUDA version and C++ ABI, as
# torch.utils.cpp_extension reports them for that interpreter (find_package(Torch) needs extra
# CUDA hints here and minutes to configure). Sets, in the caller's scope: TORCH_INCLUDE_DIRS,
# TORCH_LIBRARY_DIRS, TORCH_CUDA_VERSION ("" for a CPU-only torch), TORCH_CXX11_ABI (0 or 1).
# Used by the top-level CMakeLists.txt and tests/emu/CMakeLists.txt.
function(hcext_find_torch python)
  execute_process(
    COMMAND ${python} -c
      "import torch, torch.utils.cpp_extension as e; print('|'.join([','.join(e.include_paths()), ','.join(e.library_paths()), torch.version.cuda or 'none', str(int(torch.compiled_with_cxx11_abi()))]))"
    OUTPUT_VARIABLE info OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
  string(REPLACE "|" ";" parts "${info}")
  list(GET parts 0 inc)
  list(GET parts 1 lib)
  list(GET parts 2 cuda)
  list(GET parts 3 abi)
  string(REPLACE "," ";" inc "${inc}")
  string(REPLACE "," ";" lib "${lib}")
  if(cuda STREQUAL "none")
    set(cuda "")
  endif()
  set(TORCH_INCLUDE_DIRS "${inc}" PARENT_SCOPE)
  set(TORCH_LIBRARY_DIRS "${lib}" PARENT_SCOPE)
  set(TORCH_CUDA_VERSION "${cuda}" PARENT_SCOPE)
  set(TORCH_CXX11_ABI "${abi}" PARENT_SCOPE)
endfunction()
