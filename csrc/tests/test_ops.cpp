// C++ tests of the op library through the dispatcher, without Python: the LU stage on matrices
// with known determinants and inverses, the joint stage on hand-computed cases, the fused op
// against the stages, the backward gather, and an error for a bad label. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>

namespace {

using Tensor = at::Tensor;
using Four = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Five = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool close(const Tensor& a, const Tensor& b, double tol = 1e-12) {
  return a.sizes() == b.sizes() && at::allclose(a.to(at::kDouble), b.to(at::kDouble), tol, tol);
}

bool near(double a, double b, double tol = 1e-12) { return std::abs(a - b) <= tol * (1 + std::abs(b)); }

const auto& lu_loss_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dmi_ext::lu_loss", "")
                       .typed<Four(const Tensor&, const Tensor&, bool, double)>();
  return op;
}
const auto& joint_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dmi_ext::joint", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, bool,
                                                         int64_t, bool)>();
  return op;
}
const auto& dmi_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dmi_ext::dmi", "")
                       .typed<Five(const Tensor&, const Tensor&, bool, bool, double, int64_t,
                                   int64_t, bool, bool, bool)>();
  return op;
}
const auto& backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dmi_ext::dmi_backward", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     bool, int64_t, int64_t, const std::optional<Tensor>&)>();
  return op;
}

Tensor mat(std::initializer_list<double> v, int64_t C) {
  return at::tensor(std::vector<double>(v), at::kDouble).view({C, C});
}

Four lu_of(const Tensor& U, int64_t count = 1, bool normalize = false, double eps = 0.0) {
  return lu_loss_op().call(U, at::scalar_tensor(count, at::kLong), normalize, eps);
}

void test_lu_known_determinants() {
  {  // diagonal: det 24, U^{-T} = diag(1/2, 1/3, 1/4)
    auto [loss, lad, sing, table] = lu_of(mat({2, 0, 0, 0, 3, 0, 0, 0, 4}, 3));
    check(near(lad.item<double>(), std::log(24.0)), "diag(2,3,4): log|det| = log 24");
    check(near(loss.item<double>(), -std::log(24.0)), "diag(2,3,4): loss = -log 24");
    check(close(table, -mat({0.5, 0, 0, 0, 1.0 / 3, 0, 0, 0, 0.25}, 3)), "diag: table = -U^-T");
    check(!sing.item<bool>(), "diag: not singular");
  }
  {  // needs a row swap: [[1,2],[3,4]], det -2, U^{-1} = [[-2,1],[1.5,-0.5]]
    auto [loss, lad, sing, table] = lu_of(mat({1, 2, 3, 4}, 2));
    check(near(lad.item<double>(), std::log(2.0)), "[[1,2],[3,4]]: log|det| = log 2");
    check(close(table, -mat({-2, 1.5, 1, -0.5}, 2)), "[[1,2],[3,4]]: table = -U^-T");
  }
  {  // a permutation times 3: |det| = 27 with pivoting on every column
    auto [loss, lad, sing, table] = lu_of(mat({0, 0, 3, 3, 0, 0, 0, 3, 0}, 3));
    check(near(lad.item<double>(), std::log(27.0)), "3 * permutation: log|det| = log 27");
  }
  {  // exactly singular: second row twice the first
    auto [loss, lad, sing, table] = lu_of(mat({1, 2, 2, 4}, 2));
    check(sing.item<bool>(), "[[1,2],[2,4]]: singular");
    check(std::isinf(loss.item<double>()) && loss.item<double>() > 0, "singular, eps 0: loss +inf");
    check(at::count_nonzero(table).item<int64_t>() == 0, "singular: zero gradient table");
    auto [loss_eps, lad2, sing2, table2] = lu_of(mat({1, 2, 2, 4}, 2), 1, false, 1e-3);
    check(near(loss_eps.item<double>(), -std::log(1e-3)), "singular, eps 1e-3: loss -log(eps)");
  }
  {  // eps weights the gradient by |det| / (|det| + eps)
    auto [loss, lad, sing, table] = lu_of(mat({2, 0, 0, 0.5}, 2), 1, false, 1.0);
    check(near(loss.item<double>(), -std::log(2.0)), "det 1, eps 1: loss = -log 2");
    check(close(table, -0.5 * mat({0.5, 0, 0, 2}, 2)), "det 1, eps 1: table = -U^-T / 2");
  }
  {  // normalisation by the kept count: U = sums / 4
    auto [loss, lad, sing, table] = lu_of(mat({4, 0, 0, 8}, 2), 4, true);
    check(near(lad.item<double>(), std::log(2.0)), "sums diag(4,8), n 4: log|det U| = log 2");
    check(close(table, -0.25 * mat({1, 0, 0, 0.5}, 2)), "normalised: table = -U^-T / n");
  }
  for (int64_t C : {100, 200}) {  // in-kernel LU (100) and LAPACK (200): triangular, known det
    Tensor U = at::triu(at::rand({C, C}, at::kDouble)) * 0.1;
    U.diagonal().copy_(at::arange(1, C + 1, at::kDouble) / C);
    auto [loss, lad, sing, table] = lu_of(U);
    const double expected = at::log(at::arange(1, C + 1, at::kDouble) / C).sum().item<double>();
    check(near(lad.item<double>(), expected, 1e-10),
          "triangular C=" + std::to_string(C) + ": log|det| = sum log diag");
    check(close(at::matmul(table.t(), U), -at::eye(C, at::kDouble), 1e-9),
          "triangular C=" + std::to_string(C) + ": table^T U = -I");
  }
}

void test_joint_hand_case() {
  // Probabilities, labels [0, 1, 0, ignored]: U row 0 = p0 + p2, row 1 = p1.
  Tensor p = at::tensor({0.2, 0.8, 0.6, 0.4, 0.5, 0.5, 0.9, 0.1}, at::kDouble).view({4, 2});
  Tensor y = at::tensor({0, 1, 0, -100}, at::kLong);
  auto [sums, counts] = joint_op().call(p, y, false, -100, true);
  check(close(sums, mat({0.7, 1.3, 0.6, 0.4}, 2)), "joint of probabilities, by hand");
  check(counts.item<int64_t>() == 3, "joint: 3 kept rows");
  // Logits: softmax([0, log 3]) = [1/4, 3/4].
  Tensor z = at::tensor({0.0, std::log(3.0), std::log(3.0), 0.0}, at::kFloat).view({2, 2});
  auto [s2, c2] = joint_op().call(z, at::tensor({1, 0}, at::kInt), true, -100, true);
  check(close(s2, mat({0.75, 0.25, 0.25, 0.75}, 2), 1e-7), "joint of float32 logits, by hand");
  // M = 2 label sources over the same rows.
  Tensor y2 = at::tensor({0, 1, 0, -100, 1, 1, 0, 0}, at::kLong).view({2, 4});
  auto [s3, c3] = joint_op().call(p, y2, false, -100, true);
  check(close(s3[1], mat({1.4, 0.6, 0.8, 1.2}, 2)), "joint of source 2, by hand");
  check(c3[1].item<int64_t>() == 4, "joint of source 2: 4 kept rows");
}

void test_fused_and_backward() {
  Tensor p = at::tensor({0.2, 0.8, 0.6, 0.4, 0.5, 0.5, 0.9, 0.1}, at::kDouble).view({4, 2});
  Tensor y = at::tensor({0, 1, 0, -100}, at::kLong);
  auto [loss, lad, sing, table, none] =
      dmi_op().call(p, y, false, true, 0.0, -100, 1, true, true, true);
  check(none.numel() == 0, "probabilities as input: nothing saved for the backward");
  // U = [[0.7, 1.3], [0.6, 0.4]] / 3, det = (0.28 - 0.78) / 9.
  check(near(loss.item<double>(), -std::log(0.5 / 9)), "fused loss on the hand case");
  auto [sums, counts] = joint_op().call(p, y, false, -100, true);
  auto [l2, lad2, s2, t2] = lu_loss_op().call(sums, counts, true, 0.0);
  check(close(loss, l2) && close(table, t2.unsqueeze(0)), "fused op = joint then lu_loss");
  Tensor grad =
      backward_op().call(at::ones({}, at::kDouble), p, y, table, false, -100, 1, std::nullopt);
  check(close(grad[0], table[0][0]) && close(grad[1], table[0][1]) && close(grad[2], table[0][0]),
        "backward gathers row target_i of the table");
  check(at::count_nonzero(grad[3]).item<int64_t>() == 0, "backward: ignored row gets 0");
  // From logits: the saved softmax, and a backward from it gives the recomputed gradient bit for bit.
  Tensor z = at::randn({37, 5});
  Tensor yz = at::randint(0, 5, {37}, at::kLong);
  auto [lz, ladz, sz, tz, pz] = dmi_op().call(z, yz, true, true, 0.0, -100, 1, true, true, true);
  check(close(pz, at::softmax(z, -1), 1e-6), "saved probabilities = softmax(z)");
  const Tensor one = at::ones({}, at::kFloat);
  check(at::equal(backward_op().call(one, z, yz, tz, true, -100, 1, pz),
                  backward_op().call(one, z, yz, tz, true, -100, 1, std::nullopt)),
        "backward from saved probabilities = backward recomputing them, bitwise");
}

void test_bad_label_raises() {
  Tensor z = at::randn({4, 3});
  bool raised = false;
  try {
    dmi_op().call(z, at::tensor({0, 1, 5, 2}, at::kLong), true, true, 0.0, -100, 1, true, true,
                  false);
  } catch (const c10::IndexError& e) {
    raised = std::string(e.what_without_backtrace()).find("label 5") != std::string::npos;
  }
  check(raised, "label 5 with C = 3 raises IndexError naming the label");
}

}  // namespace

int main() {
  test_lu_known_determinants();
  test_joint_hand_case();
  test_fused_and_backward();
  test_bad_label_raises();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
