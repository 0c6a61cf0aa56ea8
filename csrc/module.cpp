// The spacedkd_fast._C extension module. Importing it runs the static TORCH_LIBRARY
// registrations of the ops; its only Python entry point is build_info().
#include <pybind11/pybind11.h>

#include "row_stats.h"

#ifndef SPACEDKD_VERSION  // normally from the generated spacedkd_build_config.h
#define SPACEDKD_VERSION "unknown"
#endif
#ifndef SPACEDKD_TORCH_VERSION
#define SPACEDKD_TORCH_VERSION "unknown"
#endif
#ifndef SPACEDKD_CUDA_ARCH_LIST
#define SPACEDKD_CUDA_ARCH_LIST ""
#endif
#ifndef SPACEDKD_CUDA_VERSION
#define SPACEDKD_CUDA_VERSION ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "spacedkd_fast compiled ops (registered under torch.ops.spacedkd)";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["version"] = SPACEDKD_VERSION;
        info["torch_version"] = SPACEDKD_TORCH_VERSION;
#ifdef SPACEDKD_WITH_CUDA
        info["cuda"] = true;
#else
        info["cuda"] = false;
#endif
        info["cuda_version"] = SPACEDKD_CUDA_VERSION;
        info["cuda_arch_list"] = SPACEDKD_CUDA_ARCH_LIST;
        // The column layout of kd_loss_forward's row_stats: Python's one source for it.
        py::tuple row_stats(static_cast<size_t>(spacedkd::kNumRowStats));
        for (int k = 0; k < spacedkd::kNumRowStats; ++k) row_stats[k] = spacedkd::kRowStatNames[k];
        info["row_stats"] = row_stats;
        return info;
      },
      "How this extension was built: package version, the torch it was compiled against, "
      "whether CUDA kernels were compiled, and for which architectures; and the column names "
      "of kd_loss_forward's row_stats output.");
}
