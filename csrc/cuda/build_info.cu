// Build facts only nvcc knows, for sparsestart._C.build_info() (csrc/ops.cpp):
// the architectures this compilation produces code for and nvcc's version. Host
// code only (no kernels); declared in kernels.h.

#include "kernels.h"

#define SPARSESTART_STR_(...) #__VA_ARGS__
#define SPARSESTART_STR(...) SPARSESTART_STR_(__VA_ARGS__)

namespace sparsestart {
namespace cuda {

const char* compiled_arch_list() {
#ifdef __CUDA_ARCH_LIST__  // nvcc >= 11.5: e.g. 800,900 for -gencode sm_80 and sm_90
  return SPARSESTART_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown (nvcc older than 11.5)";
#endif
}

const char* nvcc_version() {
  return SPARSESTART_STR(__CUDACC_VER_MAJOR__) "." SPARSESTART_STR(__CUDACC_VER_MINOR__) "." SPARSESTART_STR(
      __CUDACC_VER_BUILD__);
}

}  // namespace cuda
}  // namespace sparsestart
