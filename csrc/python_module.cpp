// The Python module dmi_ext._C: importing it loads the op library (the TORCH_LIBRARY blocks run
// at load time) and tells Python how it was built. TORCH_EXTENSION_NAME is set by
// torch.utils.cpp_extension: _C for pip builds, a unique name for the JIT build of a checkout.
#include <torch/extension.h>

#include "dmi.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dmi_ext op library: registers torch.ops.dmi_ext.*";
  m.attr("fused_max_classes") = dmi_ext::kFusedMaxClasses;
#ifdef DMI_EXT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
