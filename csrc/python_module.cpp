// The Python module dmi_ext._C: importing it loads the op library (the TORCH_LIBRARY blocks run
// at load time) and tells Python how it was built. TORCH_EXTENSION_NAME is set by
// torch.utils.cpp_extension: _C for pip builds, a unique name for the JIT build of a checkout.
//
// It also binds the fused op directly (dmi_loss, dmi_loss_info), for dmi_ext.dmi_loss's common
// call: plain tensors, no torch function mode, not under torch.compile (dmi_ext/functional.py
// checks; anything else goes through torch.ops.dmi_ext.dmi). It is the same dispatcher call as
// torch.ops', minus the boxing of every argument into IValues and the wrapping of four outputs:
// at N = 128 that path cost about a fifth of a forward + backward (issue 23). Errors and warnings
// are translated as torch's own bindings translate them, and the GIL is released while it runs.
#include <torch/csrc/Exceptions.h>
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
  m.def("dmi_loss",
        torch::wrap_pybind_function_no_gil(
            [](const at::Tensor& input, const at::Tensor& target, bool from_logits,
               bool normalize, double eps, int64_t ignore_index, int64_t reduction,
               bool validate) {
              return std::get<0>(dmi_ext::call_dmi(input, target, from_logits, normalize, eps,
                                                   ignore_index, reduction, validate));
            }),
        "torch.ops.dmi_ext.dmi.default(..., need_grad_table=False)[0]");
  m.def("dmi_loss_info",
        torch::wrap_pybind_function_no_gil(
            [](const at::Tensor& input, const at::Tensor& target, bool from_logits,
               bool normalize, double eps, int64_t ignore_index, int64_t reduction,
               bool validate) {
              auto out = dmi_ext::call_dmi(input, target, from_logits, normalize, eps,
                                           ignore_index, reduction, validate);
              return std::make_tuple(std::get<0>(out), std::get<1>(out), std::get<2>(out));
            }),
        "torch.ops.dmi_ext.dmi.default(..., need_grad_table=False)[:3]");
}
