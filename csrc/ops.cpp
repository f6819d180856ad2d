// The op library's front: schemas (TORCH_LIBRARY), the argument checks every device kernel runs
// first, and the autograd kernels. Device kernels register themselves from csrc/cpu/ and
// csrc/cuda/ with TORCH_LIBRARY_IMPL; the dispatcher picks the device.
//
// Autograd is registered here in C++ rather than from Python: on a 2-core CPU a Python-level
// autograd.Function adds about 60 us per forward+backward, more than the whole fused op costs at
// N = 128 (see README, "Design choices"). The formula is still a registered op (dmi_backward),
// and the fake kernels that torch.compile needs are registered from Python (dmi_ext/_ops.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <sstream>

#include "dmi.h"

namespace dmi_ext {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool is_supported_input_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

Layout check_inputs(const at::Tensor& input, const at::Tensor& target) {
  TORCH_CHECK_TYPE(is_supported_input_dtype(input.scalar_type()),
                   "dmi_ext: argument 'input' must be float16, bfloat16, float32 or float64, got ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                   "dmi_ext: argument 'target' must hold int64 or int32 class labels, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(input.device() == target.device(),
                    "dmi_ext: arguments 'input' and 'target' must be on the same device, got "
                    "input on ",
                    input.device(), " and target on ", target.device());
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3,
                    "dmi_ext: argument 'input' must have shape (N, C) or (B, N, C), got shape ",
                    shape_str(input));
  const int64_t C = input.size(-1);
  const int64_t N = input.size(-2);
  TORCH_CHECK_VALUE(C >= 2, "dmi_ext: argument 'input' has C = ", C,
                    " classes (its last dimension); DMI needs C >= 2");
  TORCH_CHECK_VALUE(N >= 1, "dmi_ext: argument 'input' has N = 0 rows (shape ", shape_str(input),
                    "); the joint matrix of no rows is undefined");
  Layout L{1, 1, N, C, false};
  if (input.dim() == 2 && target.dim() == 1) {
    TORCH_CHECK_VALUE(target.size(0) == N, "dmi_ext: argument 'target' has shape ",
                      shape_str(target), " but 'input' has shape ", shape_str(input),
                      ": expected target of shape (", N, ",) or (M, ", N, ")");
    L.single = true;
  } else if (input.dim() == 2 && target.dim() == 2) {
    TORCH_CHECK_VALUE(target.size(1) == N, "dmi_ext: argument 'target' has shape ",
                      shape_str(target), " but 'input' has shape ", shape_str(input),
                      ": expected target of shape (", N, ",) or (M, ", N, ")");
    TORCH_CHECK_VALUE(target.size(0) >= 1, "dmi_ext: argument 'target' has M = 0 label sources");
    L.sources = target.size(0);
  } else if (input.dim() == 3 && target.dim() == 2) {
    TORCH_CHECK_VALUE(target.size(0) == input.size(0) && target.size(1) == N,
                      "dmi_ext: argument 'target' has shape ", shape_str(target),
                      " but 'input' has shape ", shape_str(input), ": expected target of shape (",
                      input.size(0), ", ", N, ")");
    TORCH_CHECK_VALUE(input.size(0) >= 1, "dmi_ext: argument 'input' has B = 0 matrices");
    L.slices = input.size(0);
  } else {
    TORCH_CHECK_VALUE(false, "dmi_ext: argument 'target' has shape ", shape_str(target),
                      ", which does not pair with input of shape ", shape_str(input),
                      ": use (N, C) with (N,) or (M, N), or (B, N, C) with (B, N)");
  }
  return L;
}

void check_eps(double eps) {
  TORCH_CHECK_VALUE(eps >= 0.0 && eps < std::numeric_limits<double>::infinity(),
                    "dmi_ext: argument 'eps' must be finite and >= 0, got ", eps);
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= kReductionNone && reduction <= kReductionSum,
                    "dmi_ext: argument 'reduction' must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
}

void check_joint(const at::Tensor& sums, const at::Tensor& counts) {
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kDouble,
                   "dmi_ext: argument 'sums' must be float64, got ", sums.scalar_type());
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong,
                   "dmi_ext: argument 'counts' must be int64, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(sums.device() == counts.device(),
                    "dmi_ext: arguments 'sums' and 'counts' must be on the same device, got ",
                    sums.device(), " and ", counts.device());
  TORCH_CHECK_VALUE(sums.dim() >= 2 && sums.size(-1) == sums.size(-2) && sums.size(-1) >= 2,
                    "dmi_ext: argument 'sums' must have shape (..., C, C) with C >= 2, got ",
                    shape_str(sums));
  TORCH_CHECK_VALUE(counts.sizes() == sums.sizes().slice(0, sums.dim() - 2),
                    "dmi_ext: argument 'counts' has shape ", shape_str(counts),
                    " but 'sums' has shape ", shape_str(sums), ": expected counts of shape ",
                    sums.sizes().slice(0, sums.dim() - 2));
}

Layout check_forward(const at::Tensor& input, const at::Tensor& target, double eps,
                     int64_t reduction) {
  const Layout L = check_inputs(input, target);
  check_eps(eps);
  check_reduction(reduction);
  return L;
}

// The placeholder a forward returns when it keeps no probabilities is exactly shape (0,); asked
// by dimensions first, so that symbolic shapes (torch.compile) are not forced to a value.
bool has_probs(const std::optional<at::Tensor>& probs) {
  return probs.has_value() && probs->defined() &&
         !(probs->dim() == 1 && probs->sym_size(0) == 0);
}

Layout check_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                      const at::Tensor& target, const at::Tensor& grad_table, int64_t reduction,
                      const std::optional<at::Tensor>& probs) {
  const Layout L = check_inputs(input, target);
  check_reduction(reduction);
  const int64_t G = L.matrices(), C = L.classes;
  TORCH_CHECK_TYPE(grad_table.scalar_type() == at::kDouble,
                   "dmi_ext: argument 'grad_table' must be float64, got ",
                   grad_table.scalar_type());
  TORCH_CHECK_VALUE(grad_table.numel() == G * C * C && grad_table.size(-1) == C,
                    "dmi_ext: argument 'grad_table' has shape ", shape_str(grad_table),
                    ", expected (", G, ", ", C, ", ", C, ")");
  // The kernels scale in float64 from a float32 or float64 upstream (the loss dtypes).
  TORCH_CHECK_TYPE(grad_loss.scalar_type() == at::kFloat || grad_loss.scalar_type() == at::kDouble,
                   "dmi_ext: argument 'grad_loss' must be float32 or float64 (the loss dtypes), "
                   "got ", grad_loss.scalar_type());
  const int64_t expected = reduction == kReductionNone ? G : 1;
  TORCH_CHECK_VALUE(grad_loss.numel() == expected, "dmi_ext: argument 'grad_loss' has ",
                    grad_loss.numel(), " elements, expected ", expected);
  TORCH_CHECK_VALUE(grad_loss.device() == input.device() && grad_table.device() == input.device(),
                    "dmi_ext: arguments 'grad_loss', 'grad_table' and 'input' must be on the same "
                    "device, got ", grad_loss.device(), ", ", grad_table.device(), " and ",
                    input.device());
  if (has_probs(probs)) {
    const at::ScalarType want = loss_dtype(input.scalar_type());
    TORCH_CHECK_TYPE(probs->scalar_type() == want, "dmi_ext: argument 'probs' must be ", want,
                     " for ", input.scalar_type(), " input (the forward's saved softmax), got ",
                     probs->scalar_type());
    TORCH_CHECK_VALUE(probs->sym_sizes() == input.sym_sizes(),
                      "dmi_ext: argument 'probs' has shape ",
                      shape_str(*probs), ", expected input's shape ", shape_str(input));
    TORCH_CHECK_VALUE(probs->device() == input.device(),
                      "dmi_ext: arguments 'probs' and 'input' must be on the same device, got ",
                      probs->device(), " and ", input.device());
  }
  return L;
}

Strides strides_of(const at::Tensor& input, const at::Tensor& target, const Layout& layout) {
  Strides s;
  s.input_slice = input.dim() == 3 ? input.stride(0) : 0;
  s.input_row = input.stride(-2);
  s.input_class = input.stride(-1);
  s.target_matrix = layout.single ? 0 : target.stride(0);
  s.target_row = target.stride(-1);
  return s;
}

void throw_bad_label(const Layout& L, int64_t matrix, int64_t row, int64_t label,
                     int64_t ignore_index) {
  const std::string position = L.single ? c10::str("[", row, "]")
                                        : c10::str("[", matrix, ", ", row, "]");
  C10_THROW_ERROR(IndexError,
                  c10::str("dmi_ext: argument 'target' holds the label ", label, " at ", position,
                           ", outside [0, ", L.classes, ") and not ignore_index (", ignore_index,
                           ")"));
}

void throw_not_probability(const Layout& L, int64_t slice, int64_t row, double row_sum,
                           double row_min) {
  C10_THROW_ERROR(ValueError,
                  c10::str("dmi_ext: argument 'input' is not a probability vector at row ", row,
                           (L.slices > 1 ? c10::str(" of slice ", slice) : std::string()),
                           " (sum ", row_sum, ", min ", row_min,
                           ") but from_logits=False; pass logits with from_logits=True, or "
                           "validate=False to skip this check"));
}

at::ScalarType loss_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> matrix_shape(const Layout& layout) {
  if (layout.single) return {};
  return {layout.matrices()};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The backward op, typed once; called from the autograd kernels below. Outside create_graph it
// skips its own autograd kernel (the double-backward guard), which would only add overhead.
at::Tensor call_dmi_backward(const at::Tensor& grad_loss, const at::Tensor& input,
                             const at::Tensor& target, const at::Tensor& grad_table,
                             bool from_logits, int64_t ignore_index, int64_t reduction,
                             const std::optional<at::Tensor>& probs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dmi_ext::dmi_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, bool,
                                               int64_t, int64_t,
                                               const std::optional<at::Tensor>&)>();
  if (!at::GradMode::is_enabled()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(grad_loss, input, target, grad_table, from_logits, ignore_index, reduction,
                   probs);
  }
  return op.call(grad_loss, input, target, grad_table, from_logits, ignore_index, reduction,
                 probs);
}

// dmi_backward_into: the gradient written over the saved probabilities (see DMIBackward::apply).
void call_dmi_backward_into(const at::Tensor& grad_loss, const at::Tensor& input,
                            const at::Tensor& target, const at::Tensor& grad_table,
                            int64_t ignore_index, int64_t reduction, at::Tensor& probs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dmi_ext::dmi_backward_into", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, int64_t, at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  op.call(grad_loss, input, target, grad_table, ignore_index, reduction, probs);
}

// Whether the backward may write the gradient over the saved probabilities: a plain dense tensor
// (not a fake or functional one being traced: those take the functional op) of the gradient's
// dtype, which the node was told it releases after this call, held by nothing else.
bool may_overwrite(const at::Tensor& probs, const at::Tensor& input) {
  constexpr auto traced = c10::DispatchKeySet({c10::DispatchKey::Python,
                                               c10::DispatchKey::Functionalize});
  return probs.defined() && !probs.key_set().has_any(traced) && probs.numel() > 0 &&
         probs.scalar_type() == input.scalar_type() && probs.is_contiguous() &&
         probs.use_count() == 1 && probs.has_storage() && probs.storage().use_count() == 1;
}

const c10::TypedOperatorHandle<DmiOutputs(const at::Tensor&, const at::Tensor&, bool, bool,
                                          double, int64_t, int64_t, bool, bool, bool)>&
dmi_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dmi_ext::dmi", "")
          .typed<DmiOutputs(const at::Tensor&, const at::Tensor&, bool, bool, double, int64_t,
                            int64_t, bool, bool, bool)>();
  return op;
}

// Fused forward: L = reduce(-log(|det U_g| + eps)); backward through the grad table. The
// backward node is written like PyTorch's generated ones (a Node with SavedVariables), not as a
// torch::autograd::Function: that one keeps its scalars in a string-keyed IValue map, wraps all
// four outputs and copies the gradients into and out of an AutogradContext, which at N = 128 cost
// as much as the kernels (issue 23). The saved tensors behave as any op's: saved-tensor hooks
// apply, and an in-place change of the input or a second backward raises PyTorch's own error.
// From logits it also keeps the forward's probabilities where the device saved them (the CPU), so
// that the backward does not compute the softmax a second time (issue 23); when the graph is not
// retained, the gradient is written over them: an N x C buffer fewer, and one that is already
// paged in (a fresh one page-faults, about a quarter of the backward at N = 8192, C = 100).
struct DMIBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable input_, target_, table_, probs_;
  bool from_logits_ = true;
  int64_t ignore_index_ = -100;
  int64_t reduction_ = kReductionMean;
  bool released_after_apply_ = false;  // the engine's promise: no second backward through here

  std::string name() const override { return "DMIBackward"; }

  void will_release_variables() override { released_after_apply_ = true; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    target_.reset_data();
    table_.reset_data();
    probs_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    at::Tensor grad_input;
    if (grads[0].defined()) {
      at::Tensor probs = probs_.unpack();
      const at::Tensor input = input_.unpack();
      if (released_after_apply_ && probs.defined()) {
        probs_.reset_data();  // drop the node's reference: then ours may be the only one
        if (may_overwrite(probs, input)) {
          call_dmi_backward_into(grads[0], input, target_.unpack(), table_.unpack(),
                                 ignore_index_, reduction_, probs);
          return {probs};
        }
      }
      grad_input = call_dmi_backward(grads[0], input, target_.unpack(), table_.unpack(),
                                     from_logits_, ignore_index_, reduction_, probs);
    }
    return {grad_input};
  }
};

// Joint sums: dsums_g/dP_i = one-hot, so the backward is the same gather with the incoming
// gradient of the sums as the table and a scale of 1.
class JointFunction : public torch::autograd::Function<JointFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& target, bool from_logits, int64_t ignore_index,
                               bool validate) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("dmi_ext::joint", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, bool, int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [sums, counts] = op.call(input, target, from_logits, ignore_index, validate);
    ctx->save_for_backward({input, target});
    ctx->saved_data["from_logits"] = from_logits;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({counts});
    ctx->set_materialize_grads(false);
    return {sums, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_input;
    if (grads[0].defined()) {
      const at::Tensor one = at::ones({}, grads[0].options());
      grad_input = call_dmi_backward(one, saved[0], saved[1], grads[0].to(at::kDouble),
                                     ctx->saved_data["from_logits"].toBool(),
                                     ctx->saved_data["ignore_index"].toInt(), kReductionSum,
                                     std::nullopt);
    }
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The backward op itself is not differentiable again; say so when someone tries.
class BackwardFunction : public torch::autograd::Function<BackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_loss,
                            const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& grad_table, bool from_logits,
                            int64_t ignore_index, int64_t reduction,
                            const std::optional<at::Tensor>& probs) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_dmi_backward(grad_loss, input, target, grad_table, from_logits, ignore_index,
                             reduction, probs);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "dmi_ext: double backward through dmi_loss (a gradient of its gradient, e.g. "
                "create_graph=True followed by another backward) is not supported");
  }
};

// U_g = s_g * sums_g, so dL_g/dsums_g = s_g * dL_g/dU_g: the grad table, scaled by the incoming
// gradient of each matrix's loss.
class LuLossFunction : public torch::autograd::Function<LuLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& sums,
                               const at::Tensor& counts, bool normalize, double eps) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("dmi_ext::lu_loss", "")
                               .typed<LossOutputs(const at::Tensor&, const at::Tensor&, bool,
                                                  double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lad, singular, table] = op.call(sums, counts, normalize, eps);
    ctx->save_for_backward({table});
    ctx->mark_non_differentiable({lad, singular, table});
    ctx->set_materialize_grads(false);
    return {loss, lad, singular, table};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_sums;
    if (grads[0].defined()) {
      const at::Tensor table = ctx->get_saved_variables()[0];
      grad_sums = grads[0].unsqueeze(-1).unsqueeze(-1) * table;
    }
    return {grad_sums, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

LossOutputs lu_loss_autograd(const at::Tensor& sums, const at::Tensor& counts, bool normalize,
                             double eps) {
  auto out = LuLossFunction::apply(sums, counts, normalize, eps);
  return {out[0], out[1], out[2], out[3]};
}

// A call that no gradient can follow (grad mode off, or an input that does not require grad) goes
// straight to the device kernel, which then skips the inverse unless need_grad_table asks for it
// (and saves no probabilities unless save_probs asks). When a gradient can follow, the kernel is
// asked for both: the table always, the probabilities from logits.
DmiOutputs dmi_autograd(const at::Tensor& input, const at::Tensor& target, bool from_logits,
                        bool normalize, double eps, int64_t ignore_index, int64_t reduction,
                        bool validate, bool need_grad_table, bool save_probs) {
  if (!at::GradMode::is_enabled() || !input.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return dmi_op().call(input, target, from_logits, normalize, eps, ignore_index, reduction,
                         validate, need_grad_table, save_probs);
  }
  DmiOutputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = dmi_op().call(input, target, from_logits, normalize, eps, ignore_index, reduction,
                        validate, true, from_logits);
  }
  // Only the loss is differentiable (log|det|, the singular flags, the table and the saved
  // probabilities are not), and only through input: one edge, to input's gradient.
  auto node = c10::make_intrusive<DMIBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  node->input_ = torch::autograd::SavedVariable(input, false);
  node->target_ = torch::autograd::SavedVariable(target, false);
  node->table_ = torch::autograd::SavedVariable(std::get<3>(out), false);
  if (has_probs(std::get<4>(out)))
    node->probs_ = torch::autograd::SavedVariable(std::get<4>(out), false);
  node->from_logits_ = from_logits;
  node->ignore_index_ = ignore_index;
  node->reduction_ = reduction;
  torch::autograd::set_history(std::get<0>(out), node);
  return out;
}

std::tuple<at::Tensor, at::Tensor> joint_autograd(const at::Tensor& input,
                                                  const at::Tensor& target, bool from_logits,
                                                  int64_t ignore_index, bool validate) {
  auto out = JointFunction::apply(input, target, from_logits, ignore_index, validate);
  return {out[0], out[1]};
}

at::Tensor dmi_backward_autograd(const at::Tensor& grad_loss, const at::Tensor& input,
                                 const at::Tensor& target, const at::Tensor& grad_table,
                                 bool from_logits, int64_t ignore_index, int64_t reduction,
                                 const std::optional<at::Tensor>& probs) {
  return BackwardFunction::apply(grad_loss, input, target, grad_table, from_logits, ignore_index,
                                 reduction, probs);
}

}  // namespace

DmiOutputs call_dmi(const at::Tensor& input, const at::Tensor& target, bool from_logits,
                    bool normalize, double eps, int64_t ignore_index, int64_t reduction,
                    bool validate) {
  return dmi_op().call(input, target, from_logits, normalize, eps, ignore_index, reduction,
                       validate, false, false);
}

TORCH_LIBRARY(dmi_ext, m) {
  m.def(
      "joint(Tensor input, Tensor target, bool from_logits, int ignore_index, bool validate)"
      " -> (Tensor sums, Tensor counts)");
  m.def(
      "lu_loss(Tensor sums, Tensor counts, bool normalize, float eps)"
      " -> (Tensor loss, Tensor logabsdet, Tensor singular, Tensor grad_table)");
  m.def(
      "dmi(Tensor input, Tensor target, bool from_logits, bool normalize, float eps,"
      " int ignore_index, int reduction, bool validate, bool need_grad_table=True,"
      " bool save_probs=False)"
      " -> (Tensor loss, Tensor logabsdet, Tensor singular, Tensor grad_table, Tensor probs)");
  m.def(
      "dmi_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor grad_table,"
      " bool from_logits, int ignore_index, int reduction, Tensor? probs=None) -> Tensor");
  // The same gradient from logits, written over `probs` (the forward's saved softmax, of input's
  // shape and dtype) instead of a new tensor; what the fused op's backward node calls when it
  // owns the last reference to them.
  m.def(
      "dmi_backward_into(Tensor grad_loss, Tensor input, Tensor target, Tensor grad_table,"
      " int ignore_index, int reduction, Tensor(a!) probs) -> ()");
}

TORCH_LIBRARY_IMPL(dmi_ext, Autograd, m) {
  m.impl("dmi", &dmi_autograd);
  m.impl("joint", &joint_autograd);
  m.impl("lu_loss", &lu_loss_autograd);
  m.impl("dmi_backward", &dmi_backward_autograd);
}

}  // namespace dmi_ext
