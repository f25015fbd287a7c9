"""Fused moment kernels: every gradient moment in as few passes and launches as the device allows.

Four code paths compute the ``[n, 6]`` gradient moments (columns :data:`GRAD_MOMENTS`: sum, sum of
squares, min, max, non-zero count, non-finite count) of a list of gradients:

* **CPU, compiled** (:func:`cpu_kernel`): one C++ function, built once per machine with the system's
  C++ compiler (``torch.utils.cpp_extension``) and cached, reads each gradient **once** for all six
  moments, and is called **once** for all gradients (no per-tensor dispatch). On a CPU the cost of
  monitoring is how many times the gradients are read and how many operator calls are made per
  tensor; this kernel makes both one. Building it takes a minute or more of a compiler, once per
  machine and torch version: ``python -m gradscope.capture.kernels`` (or ``GRADSCOPE_CPU_KERNEL=build``:
  in a background thread on first use). Once built, every process loads it from the cache; until
  then (or when no compiler works) the eager path is used. Nothing starts a compiler implicitly.
* **Accelerators** (:func:`foreach_moments`): multi-tensor ``torch._foreach_*`` operators, a fixed
  number of kernel launches per step whatever the number of tensors (for each dtype present, and
  per 256 MiB of gradients for the temporaries of the sampled moments), and no host sync. The
  non-finite count is a flag taken from the sum of squares (1 for a gradient holding NaN or Inf,
  with no pass of its own; exact while it is 0); once a flush has seen one, sampled steps count
  exactly.
* **CUDA, sampled steps** (:func:`gradscope.capture.triton_moments.triton_moments`): one Triton kernel
  reads each gradient once for all six moments (the multi-tensor operators need 12 passes for them),
  when Triton is installed and the kernel's self-check passes; the multi-tensor path otherwise.
* **Eager fallback** (:meth:`gradscope.stats.moments.MomentPlan.grad_moments`): per-tensor ATen ops.

Nothing here synchronises with an accelerator.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor

from gradscope.capture.triton_moments import dense_layout, triton_moments, triton_pair_sumsq
from gradscope.stats.moments import CORE_MOMENTS, GRAD_MOMENTS, MOMENT_INDEX, MomentPlan

__all__ = [
    "KERNEL_ENV",
    "FusedMoments",
    "cpu_act_screen_kernel",
    "cpu_activation_kernel",
    "cpu_histogram_kernel",
    "cpu_kernel",
    "cpu_kernel_state",
    "cpu_screen_kernel",
    "foreach_moments",
    "grad_moments",
]

#: Environment variable: ``auto`` (default: use the kernel when this machine has it built, never start
#: a compiler implicitly), ``build`` (build it in a background thread on first use when it is not
#: built yet), ``sync`` (build it in the foreground on first use), ``off`` (never use it).
#: ``python -m gradscope.capture.kernels`` builds it once for every later process.
KERNEL_ENV = "GRADSCOPE_CPU_KERNEL"

# One pass per tensor, six moments. Sums accumulate in the input type over blocks of 512 entries
# (vectorised with `omp simd` reductions, no -ffast-math: NaN and Inf keep their meaning) and the
# blocks in float64, so the relative error stays ~1e-10 on millions of entries.
_SOURCE = r"""
#include <cmath>
#include <limits>
#include <algorithm>

namespace {
constexpr int64_t kBlock = 512;

// Whether a tensor's entries fill one block of memory from data_ptr(), in some order: contiguous,
// channels-last, a transpose (torch strides are never negative, so data_ptr() is the lowest address).
// Reductions that do not depend on the order (the moments, the histograms) read it as a flat array.
inline bool flat(const torch::Tensor& t) { return t.layout() == torch::kStrided && t.is_non_overlapping_and_dense(); }

// The dtypes the moment kernel reads: float32 and float64, and bfloat16 and float16 summed in float32.
inline bool moment_dtype(const torch::Tensor& t) {
  const auto d = t.scalar_type();
  return d == torch::kFloat32 || d == torch::kFloat64 || d == torch::kBFloat16 || d == torch::kHalf;
}

// S: the stored type; T: the type the sums run in within a block (float for bfloat16 and float16,
// whose values float holds exactly, as the eager path accumulates them).
template <typename S, typename T = S>
void moments_one(const S* __restrict x, int64_t n, double* out) {
  double sum = 0.0, sumsq = 0.0;
  T mn = std::numeric_limits<T>::infinity(), mx = -std::numeric_limits<T>::infinity();
  int64_t nnz = 0, nonfinite = 0, nan = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min<int64_t>(n, start + kBlock);
    T s = 0, ss = 0, bmn = mn, bmx = mx;
    int32_t bz = 0, bnf = 0, bnan = 0;  // 32-bit lanes within a block vectorise with 32-bit floats
#pragma omp simd reduction(+ : s, ss, bz, bnf, bnan) reduction(min : bmn) reduction(max : bmx)
    for (int64_t i = start; i < end; ++i) {
      const T v = static_cast<T>(x[i]);
      s += v;
      ss += v * v;
      bmn = v < bmn ? v : bmn;
      bmx = v > bmx ? v : bmx;
      bz += v != T(0);
      bnan += v != v;
      bnf += !(v - v == T(0));
    }
    sum += s; sumsq += ss; mn = bmn; mx = bmx; nnz += bz; nonfinite += bnf; nan += bnan;
  }
  if (nan) { mn = std::numeric_limits<T>::quiet_NaN(); mx = mn; }
  if (n == 0) { mn = 0; mx = 0; }
  out[0] = sum; out[1] = sumsq; out[2] = mn; out[3] = mx; out[4] = (double)nnz; out[5] = (double)nonfinite;
}

// The core moments only: the sum of squares, and the exact non-finite count in a second pass that
// runs only when the sum of squares says something is not finite. Other columns are NaN.
template <typename S, typename T = S>
void core_one(const S* __restrict x, int64_t n, double* out) {
  double sumsq = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min<int64_t>(n, start + kBlock);
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = start; i < end; ++i) { const T v = static_cast<T>(x[i]); ss += v * v; }
    sumsq += ss;
  }
  int64_t nonfinite = 0;
  if (!std::isfinite(sumsq)) {
#pragma omp simd reduction(+ : nonfinite)
    for (int64_t i = 0; i < n; ++i) { const T v = static_cast<T>(x[i]); nonfinite += !(v - v == T(0)); }
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  out[0] = nan; out[1] = sumsq; out[2] = nan; out[3] = nan; out[4] = nan; out[5] = (double)nonfinite;
}

// moments_one (full) or core_one of one tensor, by its dtype.
inline void moments_of(const torch::Tensor& x, bool full, double* m) {
  const int64_t n = x.numel();
  switch (x.scalar_type()) {
    case torch::kFloat32:
      full ? moments_one<float>(x.data_ptr<float>(), n, m) : core_one<float>(x.data_ptr<float>(), n, m);
      break;
    case torch::kFloat64:
      full ? moments_one<double>(x.data_ptr<double>(), n, m) : core_one<double>(x.data_ptr<double>(), n, m);
      break;
    case torch::kBFloat16:
      full ? moments_one<at::BFloat16, float>(x.data_ptr<at::BFloat16>(), n, m)
           : core_one<at::BFloat16, float>(x.data_ptr<at::BFloat16>(), n, m);
      break;
    default:
      full ? moments_one<at::Half, float>(x.data_ptr<at::Half>(), n, m)
           : core_one<at::Half, float>(x.data_ptr<at::Half>(), n, m);
  }
}
}  // namespace

// Moments of each tensor xs[k] into row rows[k] (k when rows is empty) of out ([R, C] float64,
// contiguous): moment j goes to column cols[j], or nowhere when cols[j] < 0. `full`: all six
// moments in one pass; otherwise the sum of squares and the non-finite count only. Returns whether
// every entry read was finite (the non-finite count of each tensor is 0, whether or not it is written).
bool moments_into(std::vector<torch::Tensor> xs, torch::Tensor out, std::vector<int64_t> rows,
                  std::vector<int64_t> cols, bool full) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat64 && out.is_contiguous() && out.dim() == 2,
              "moments_into: out must be a contiguous [R, C] float64 CPU tensor");
  TORCH_CHECK(cols.size() == 6, "moments_into: six column indices");
  TORCH_CHECK(rows.empty() || rows.size() == xs.size(), "moments_into: one row per tensor");
  const int64_t R = out.size(0), C = out.size(1);
  for (int64_t c : cols) TORCH_CHECK(c < C, "moments_into: column out of range");
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && flat(x) && moment_dtype(x),
                "moments_into: dense float32/float64/bfloat16/float16 CPU tensors only (contiguous or permuted, "
                "no gaps)");
  }
  double* o = out.data_ptr<double>();
  double m[6];
  bool finite = true;
  for (size_t k = 0; k < xs.size(); ++k) {
    const int64_t r = rows.empty() ? (int64_t)k : rows[k];
    TORCH_CHECK(r >= 0 && r < R, "moments_into: row out of range");
    moments_of(xs[k], full, m);
    double* row = o + r * C;
    for (int j = 0; j < 6; ++j) if (cols[j] >= 0) row[cols[j]] = m[j];
    finite = finite && m[5] == 0.0;
  }
  return finite;
}

// moments_into over the gradients of a fixed list of parameters (p.grad()) into rows 0..n-1, the
// gradients read in C++: in Python, gathering `p.grad` and `p.requires_grad` of every parameter costs
// a fraction of a microsecond per parameter, every step, and so does converting a list of tensors
// at each call; a ParamSet converts its list once. `moments_into` writes only when every parameter
// requires grad and has a gradient this kernel reads (a dense float32/float64/bfloat16/float16 CPU
// tensor, contiguous or channels-last, not a tensor subclass): it returns 1 when every gradient entry
// was finite, 2 when one was not; otherwise it returns 0 having written nothing, and the caller
// gathers the gradients itself (or calls moments_present, below, when some have no gradient).
struct ParamSet {
  std::vector<torch::Tensor> params;
  std::vector<torch::Tensor> grads;
  explicit ParamSet(std::vector<torch::Tensor> ps) : params(std::move(ps)) { grads.reserve(params.size()); }
  int64_t moments_into(torch::Tensor out, std::vector<int64_t> cols, bool full) {
    grads.clear();
    for (const auto& p : params) {
      if (!p.requires_grad() || p.key_set().has(c10::DispatchKey::Python)) return 0;
      const torch::Tensor& g = p.grad();
      if (!g.defined() || !g.device().is_cpu() || !flat(g) ||
          g.key_set().has(c10::DispatchKey::Python) || !moment_dtype(g))
        return 0;
      grads.push_back(g);
    }
    if (out.dim() != 2 || out.size(0) < (int64_t)grads.size()) return 0;
    const bool finite = ::moments_into(grads, out, {}, cols, full);
    grads.clear();  // no reference to a gradient outlives the call
    return finite ? 1 : 2;
  }
  // Where some parameters have no gradient this step (the experts a router did not pick, a branch not
  // taken, frozen ones): each gradient present is read into its parameter's row, the rows of the others
  // are left as they are. Returns (status, present, frozen): status as moments_into (0, nothing written,
  // when a gradient present is one this kernel does not read), the indices read, and those of the
  // parameters that do not require grad; both lists empty when they are those of the previous call
  // (a partly frozen model: the same at every step, so no list is made).
  std::vector<int64_t> last_present, last_frozen;
  bool seen = false;
  std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>> moments_present(torch::Tensor out,
                                                                                  std::vector<int64_t> cols,
                                                                                  bool full) {
    std::vector<int64_t> present, frozen;
    if (out.dim() != 2 || out.size(0) < (int64_t)params.size()) return {0, present, frozen};
    grads.clear();
    for (size_t k = 0; k < params.size(); ++k) {
      const auto& p = params[k];
      if (p.key_set().has(c10::DispatchKey::Python)) { grads.clear(); return {0, {}, {}}; }
      if (!p.requires_grad()) { frozen.push_back((int64_t)k); continue; }
      const torch::Tensor& g = p.grad();
      if (!g.defined()) continue;
      if (!g.device().is_cpu() || !flat(g) || g.key_set().has(c10::DispatchKey::Python) || !moment_dtype(g)) {
        grads.clear();
        return {0, {}, {}};
      }
      grads.push_back(g);
      present.push_back((int64_t)k);
    }
    const bool finite = ::moments_into(grads, out, present, cols, full);
    grads.clear();
    const int64_t status = finite ? 1 : 2;
    if (seen && present == last_present && frozen == last_frozen) return {status, {}, {}};
    seen = true;
    last_present = present;
    last_frozen = frozen;
    return {-status, present, frozen};  // negative: new lists
  }
};

// -- activation statistics (gradscope.capture.activations) ------------------------------------------
namespace {
// Whether an activation output counts as inactive (its local gradient is zero or nearly so); the
// thresholds are cast to the output's type first, as torch compares a tensor with a Python number.
template <typename T, int K>
inline bool inactive(T v, T a, T b) {
  if (K == 0) return v <= a;                  // relu family: v <= 0
  if (K == 1) return std::abs(v) > a;         // tanh: |v| > a
  if (K == 2) return v < a || v > b;          // sigmoid: v < a or v > b
  return v <= a || v >= b;                    // hardtanh, hardsigmoid: at the clamp
}

// S: the stored type; T: the type compared in (float for bfloat16 and float16, which it holds exactly).
template <typename S, typename T, int K>
void act_counts(const S* __restrict x, int64_t outer, int64_t units, int64_t inner, T a, T b,
                int64_t* __restrict cnt) {
  if (inner == 1) {  // [rows, units]: count per column, vectorised across the units
    std::vector<int32_t> part(units, 0);
    int64_t rows_in_part = 0;
    for (int64_t o = 0; o < outer; ++o) {
      const S* row = x + o * units;
#pragma omp simd
      for (int64_t u = 0; u < units; ++u) part[u] += inactive<T, K>(static_cast<T>(row[u]), a, b) ? 1 : 0;
      if (++rows_in_part == (int64_t(1) << 30)) {  // 32-bit lanes: fold before they could overflow
        for (int64_t u = 0; u < units; ++u) { cnt[u] += part[u]; part[u] = 0; }
        rows_in_part = 0;
      }
    }
    for (int64_t u = 0; u < units; ++u) cnt[u] += part[u];
    return;
  }
  for (int64_t o = 0; o < outer; ++o) {  // [N, C, L]: count over each contiguous run of L
    for (int64_t u = 0; u < units; ++u) {
      const S* run = x + (o * units + u) * inner;
      int64_t c = 0;
      for (int64_t start = 0; start < inner; start += (int64_t(1) << 30)) {
        const int64_t end = std::min<int64_t>(inner, start + (int64_t(1) << 30));
        int32_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = start; i < end; ++i) s += inactive<T, K>(static_cast<T>(run[i]), a, b) ? 1 : 0;
        c += s;
      }
      cnt[u] += c;
    }
  }
}

template <typename S, typename T = S>
void act_dispatch(const S* x, int64_t outer, int64_t units, int64_t inner, int64_t kind, double a, double b,
                  int64_t* cnt) {
  // the thresholds rounded to the stored type, as torch rounds a Python number compared with a tensor
  const T ta = static_cast<T>(static_cast<S>(a)), tb = static_cast<T>(static_cast<S>(b));
  switch (kind) {
    case 0: act_counts<S, T, 0>(x, outer, units, inner, ta, tb, cnt); break;
    case 1: act_counts<S, T, 1>(x, outer, units, inner, ta, tb, cnt); break;
    case 2: act_counts<S, T, 2>(x, outer, units, inner, ta, tb, cnt); break;
    default: act_counts<S, T, 3>(x, outer, units, inner, ta, tb, cnt); break;
  }
}
}  // namespace

// Activation statistics of one output y (contiguous float32/float64/bfloat16/float16 CPU, read as
// [outer, units, inner])
// into row `row` of out ([R, 3] float64, contiguous), in one pass: the fraction of inactive entries
// (column 0 for the relu family, kind 0; column 2 otherwise) and, when `per_unit`, the fraction of
// units inactive for every sample and position (column 1; NaN otherwise). Fractions are float32
// divisions, as the eager path computes them. kind: 0 v <= a; 1 |v| > a; 2 v < a or v > b;
// 3 v <= a or v >= b.
void activation_into(torch::Tensor y, int64_t outer, int64_t units, int64_t inner, int64_t kind, double a,
                     double b, bool per_unit, torch::Tensor out, int64_t row) {
  TORCH_CHECK(y.device().is_cpu() && y.layout() == torch::kStrided && y.is_contiguous() && moment_dtype(y),
              "activation_into: a contiguous float32/float64/bfloat16/float16 CPU tensor only");
  TORCH_CHECK(outer >= 0 && units > 0 && inner > 0 && outer * units * inner == y.numel(),
              "activation_into: outer * units * inner must be the tensor's size");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat64 && out.is_contiguous() &&
                  out.dim() == 2 && out.size(1) == 3,
              "activation_into: out must be a contiguous [R, 3] float64 CPU tensor");
  TORCH_CHECK(row >= 0 && row < out.size(0), "activation_into: row out of range");
  std::vector<int64_t> cnt(units, 0);
  switch (y.scalar_type()) {
    case torch::kFloat32: act_dispatch<float>(y.data_ptr<float>(), outer, units, inner, kind, a, b, cnt.data()); break;
    case torch::kFloat64: act_dispatch<double>(y.data_ptr<double>(), outer, units, inner, kind, a, b, cnt.data()); break;
    case torch::kBFloat16:
      act_dispatch<at::BFloat16, float>(y.data_ptr<at::BFloat16>(), outer, units, inner, kind, a, b, cnt.data());
      break;
    default: act_dispatch<at::Half, float>(y.data_ptr<at::Half>(), outer, units, inner, kind, a, b, cnt.data());
  }
  const int64_t samples = outer * inner;
  int64_t total = 0, dead = 0;
  for (int64_t u = 0; u < units; ++u) { total += cnt[u]; dead += cnt[u] == samples; }
  const float frac = static_cast<float>(total) / static_cast<float>(std::max<int64_t>(y.numel(), 1));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  double* o = out.data_ptr<double>() + row * 3;
  o[0] = kind == 0 ? (double)frac : nan;
  o[1] = per_unit ? (double)(static_cast<float>(dead) / static_cast<float>(units)) : nan;
  o[2] = kind == 0 ? nan : (double)frac;
}

// The weights' side of the update ratio on a sampled step, two passes instead of five. Before the
// optimizer step: copy each weight src[k] into dst[k] and write its sum of squares (one read, one
// write, where a copy and a separate sum of squares read the weights twice). After it: the sum of
// squares of before - after without writing the difference (two reads, where a subtraction in place
// and a sum of squares read three times and write once). Sums as in core_one (blocks in the input
// type, float for bfloat16 and float16; float64 across blocks), the difference rounded to the input
// type as torch's subtraction rounds it.
// Every tensor is checked before anything is written.
namespace {
void check_pairs(const std::vector<torch::Tensor>& as, const std::vector<torch::Tensor>& bs, const torch::Tensor& out,
                 const std::vector<int64_t>& rows, int64_t col, const char* what) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat64 && out.is_contiguous() && out.dim() == 2,
              what, ": out must be a contiguous [R, C] float64 CPU tensor");
  TORCH_CHECK(as.size() == bs.size(), what, ": two lists of the same length");
  TORCH_CHECK(rows.empty() || rows.size() == as.size(), what, ": one row per tensor");
  TORCH_CHECK(col >= 0 && col < out.size(1), what, ": column out of range");
  for (size_t k = 0; k < as.size(); ++k) {
    const auto& a = as[k];
    const auto& b = bs[k];
    for (const auto* t : {&a, &b})
      TORCH_CHECK(t->device().is_cpu() && flat(*t) && !t->key_set().has(c10::DispatchKey::Python) && moment_dtype(*t),
                  what, ": dense float32/float64/bfloat16/float16 CPU tensors only (contiguous or permuted, no gaps)");
    // entry i of one is entry i of the other only when both lay their entries out alike
    TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && a.strides() == b.strides(), what,
                ": pairs of one dtype, shape and layout");
    const int64_t r = rows.empty() ? (int64_t)k : rows[k];
    TORCH_CHECK(r >= 0 && r < out.size(0), what, ": row out of range");
  }
}

// S: the stored type; T: the type of the arithmetic (float for bfloat16 and float16, as in moments_one).
template <typename S, typename T = S>
double copy_sumsq_one(const S* __restrict x, S* __restrict y, int64_t n) {
  double sumsq = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min<int64_t>(n, start + kBlock);
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = start; i < end; ++i) { const S v = x[i]; y[i] = v; const T t = static_cast<T>(v); ss += t * t; }
    sumsq += ss;
  }
  return sumsq;
}

// The difference is rounded to the stored type, as torch's subtraction of two such tensors rounds it.
template <typename S, typename T = S>
double diff_sumsq_one(const S* __restrict a, const S* __restrict b, int64_t n) {
  double sumsq = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min<int64_t>(n, start + kBlock);
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = start; i < end; ++i) {
      const T d = static_cast<T>(static_cast<S>(static_cast<T>(a[i]) - static_cast<T>(b[i])));
      ss += d * d;
    }
    sumsq += ss;
  }
  return sumsq;
}
}  // namespace

// One pass per pair of tensors: `one(a, b, n)` returns the pair's sum into out[rows[k], col].
template <typename One>
void pairs_into(std::vector<torch::Tensor>& as, std::vector<torch::Tensor>& bs, torch::Tensor& out,
                const std::vector<int64_t>& rows, int64_t col, const char* what, One one) {
  check_pairs(as, bs, out, rows, col, what);
  double* o = out.data_ptr<double>();
  const int64_t C = out.size(1);
  for (size_t k = 0; k < as.size(); ++k) {
    const int64_t r = rows.empty() ? (int64_t)k : rows[k];
    double v;
    switch (as[k].scalar_type()) {
      case torch::kFloat32: v = one.template operator()<float>(as[k], bs[k]); break;
      case torch::kFloat64: v = one.template operator()<double>(as[k], bs[k]); break;
      case torch::kBFloat16: v = one.template operator()<at::BFloat16, float>(as[k], bs[k]); break;
      default: v = one.template operator()<at::Half, float>(as[k], bs[k]);
    }
    o[r * C + col] = v;
  }
}

struct CopySumsq {  // dst <- src, and the sum of squares of src
  template <typename S, typename T = S>
  double operator()(torch::Tensor& x, torch::Tensor& y) const {
    return copy_sumsq_one<S, T>(x.data_ptr<S>(), y.data_ptr<S>(), x.numel());
  }
};

struct DiffSumsq {  // the sum of squares of a - b
  template <typename S, typename T = S>
  double operator()(torch::Tensor& a, torch::Tensor& b) const {
    return diff_sumsq_one<S, T>(a.data_ptr<S>(), b.data_ptr<S>(), a.numel());
  }
};

void copy_sumsq_into(std::vector<torch::Tensor> srcs, std::vector<torch::Tensor> dsts, torch::Tensor out,
                     std::vector<int64_t> rows, int64_t col) {
  pairs_into(srcs, dsts, out, rows, col, "copy_sumsq_into", CopySumsq{});
}

void diff_sumsq_into(std::vector<torch::Tensor> as, std::vector<torch::Tensor> bs, torch::Tensor out,
                     std::vector<int64_t> rows, int64_t col) {
  pairs_into(as, bs, out, rows, col, "diff_sumsq_into", DiffSumsq{});
}

// The live screen's common block (gradscope.capture.live.LiveScreen): rows [first, first + n) of the
// CPU buffer `storage` ([capacity, R] float64), the sum of squares of parameter p at column
// col + p * n_cols. Parameters without a level (inv[p] NaN) are left out, and at least one must have
// one. Each entry's ratio to its level (q = x * inv[p]) must be NaN-free and, for the positive ones,
// within the parameter's band: [1 / band, band], or, for a parameter whose gradient is noisy,
// |log10 q| <= min(max(factor * dev[p], log10 band), wide) (zeros are a unit silent for the batch:
// left out). When every entry is, the level moves by the weighted log-ratios, level[p] += sum_r w[r]
// log10 q, inv[p] = 0.1 ** level[p], the mean deviation by the other weights, dev[p] = dev[p] (1 -
// sum_r dw[r]) + sum_r dw[r] min(|log10 q|, log10 band) (over the positive ratios), and the result is
// true; otherwise nothing is written and it is false (the caller takes its full path). Two reads of
// n x P numbers, the same arithmetic as the NumPy path.
bool screen_block(torch::Tensor storage, int64_t first, int64_t n, int64_t col, int64_t n_cols,
                  torch::Tensor level, torch::Tensor inv, torch::Tensor weights, double band, torch::Tensor dev,
                  torch::Tensor dev_weights, double factor, double wide) {
  for (const auto* t : {&storage, &level, &inv, &weights, &dev, &dev_weights})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat64 && t->is_contiguous(),
                "screen_block: contiguous float64 CPU tensors only");
  TORCH_CHECK(storage.dim() == 2, "screen_block: storage must be [capacity, R]");
  const int64_t P = level.numel();
  TORCH_CHECK(inv.numel() == P && weights.numel() >= n, "screen_block: inv [P], weights [>= n]");
  TORCH_CHECK(dev.numel() == P && dev_weights.numel() >= n, "screen_block: dev [P], dev_weights [>= n]");
  TORCH_CHECK(first >= 0 && n >= 0 && first + n <= storage.size(0), "screen_block: rows out of range");
  TORCH_CHECK(P == 0 || (col >= 0 && n_cols > 0 && col + (P - 1) * n_cols < storage.size(1)),
              "screen_block: column out of range");
  TORCH_CHECK(band > 1.0, "screen_block: band must be above 1");
  const int64_t R = storage.size(1);
  const double* x = storage.data_ptr<double>() + first * R + col;
  const double* iv = inv.data_ptr<double>();
  const double* w = weights.data_ptr<double>() + (weights.numel() - n);  // the newest row has the last weight
  double* dv = dev.data_ptr<double>();
  const double narrow = std::log10(band);
  int64_t known = 0;
  for (int64_t p = 0; p < P; ++p) {
    if (std::isnan(iv[p])) continue;  // no level yet (its gradient was always 0 or missing): not judged
    ++known;
    for (int64_t r = 0; r < n; ++r) {
      const double q = x[r * R + p * n_cols] * iv[p];
      if (!(q >= 0.0)) return false;  // NaN (and a negative sum of squares, which cannot be)
      if (q > 0.0 && (q > band || q * band < 1.0)) {  // outside the common band: the parameter's own
        const double own = std::min(std::max(factor * dv[p], narrow), wide);
        if (!(std::abs(std::log10(q)) <= own)) return false;
      }
    }
  }
  if (!known) return false;
  double* lv = level.data_ptr<double>();
  double* ivw = inv.data_ptr<double>();
  const double* dw = dev_weights.data_ptr<double>() + (dev_weights.numel() - n);
  for (int64_t p = 0; p < P; ++p) {
    if (std::isnan(iv[p])) continue;
    double move = 0.0, kept = 0.0, spread = 0.0;
    for (int64_t r = 0; r < n; ++r) {
      const double q = x[r * R + p * n_cols] * iv[p];
      if (q > 0.0) {
        const double y = std::log10(q);
        move += w[r] * y;
        kept += dw[r];
        spread += dw[r] * std::min(std::abs(y), narrow);
      }
    }
    lv[p] += move;
    ivw[p] = std::pow(0.1, lv[p]);
    dv[p] = dv[p] * (1.0 - kept) + spread;
  }
  return true;
}

// Histograms of groups of tensors (a layer's gradients, or its weights) for TensorBoard, the row of
// gradscope.sinks.histograms: bins + 1 edges, bins counts, the sum and the sum of squares. Group g is
// tensors[group_end[g - 1] .. group_end[g]). Two reads per group: its extremes, then each value
// placed among the edges (e_k = lo + (hi - lo) * k / bins in float64, e_0 = lo, e_bins = hi) by
// comparison, so the counts are exactly numpy.histogram(x, bins=edges) of the edges written (the last
// bucket holds x == hi); sums in float64. A constant group: every edge at its value, all of it in the
// last bucket (TensorBoard's convention). A group holding NaN or Inf, or nothing: a NaN row.
namespace {
// S: the stored type; T: the type compared in (float for bfloat16 and float16, which it holds exactly).
template <typename S, typename T = S>
void extremes(const S* x, int64_t n, double& lo, double& hi, bool& bad) {
  T mn = std::numeric_limits<T>::infinity(), mx = -std::numeric_limits<T>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const T v = static_cast<T>(x[i]);
    nan |= v != v;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  bad |= nan;
  lo = std::min(lo, (double)mn);
  hi = std::max(hi, (double)mx);
}

template <typename S>
void place(const S* x, int64_t n, double lo, double hi, const double* e, int64_t bins, double* counts,
           double& sum, double& sumsq) {
  const double scale = bins / (hi - lo);
  std::vector<int64_t> c(bins, 0);
  double s = 0.0, ss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    s += v;
    ss += v * v;
    const double f = (v - lo) * scale;  // a first guess (inf or NaN for a subnormal range: clamped)
    int64_t k = f >= (double)(bins - 1) ? bins - 1 : (f > 0.0 ? (int64_t)f : 0);
    while (k > 0 && v < e[k]) --k;
    while (k < bins - 1 && v >= e[k + 1]) ++k;
    ++c[k];
  }
  for (int64_t k = 0; k < bins; ++k) counts[k] += (double)c[k];
  sum += s;
  sumsq += ss;
}
}  // namespace

void histograms_into(std::vector<torch::Tensor> tensors, std::vector<int64_t> group_end, int64_t bins,
                     torch::Tensor out) {
  TORCH_CHECK(bins >= 1, "histograms_into: bins >= 1");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == torch::kFloat64 && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == (int64_t)group_end.size() && out.size(1) == 2 * bins + 3,
              "histograms_into: out must be a contiguous [G, 2 * bins + 3] float64 CPU tensor");
  int64_t prev = 0;
  for (const int64_t end : group_end) {
    TORCH_CHECK(end >= prev && end <= (int64_t)tensors.size(), "histograms_into: group ends out of order");
    prev = end;
  }
  for (const auto& t : tensors)
    TORCH_CHECK(t.device().is_cpu() && flat(t) && !t.key_set().has(c10::DispatchKey::Python) && moment_dtype(t),
                "histograms_into: dense float32/float64/bfloat16/float16 CPU tensors only (contiguous or permuted, "
                "no gaps)");
  const int64_t W = 2 * bins + 3;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  double* o = out.data_ptr<double>();
  int64_t start = 0;
  for (size_t g = 0; g < group_end.size(); ++g) {
    double* row = o + (int64_t)g * W;
    const int64_t end = group_end[g];
    double lo = std::numeric_limits<double>::infinity(), hi = -std::numeric_limits<double>::infinity();
    bool bad = false;
    int64_t numel = 0;
    for (int64_t k = start; k < end; ++k) {
      const auto& t = tensors[k];
      numel += t.numel();
      switch (t.scalar_type()) {
        case torch::kFloat32: extremes<float>(t.data_ptr<float>(), t.numel(), lo, hi, bad); break;
        case torch::kFloat64: extremes<double>(t.data_ptr<double>(), t.numel(), lo, hi, bad); break;
        case torch::kBFloat16: extremes<at::BFloat16, float>(t.data_ptr<at::BFloat16>(), t.numel(), lo, hi, bad); break;
        default: extremes<at::Half, float>(t.data_ptr<at::Half>(), t.numel(), lo, hi, bad);
      }
    }
    if (bad || numel == 0 || !std::isfinite(lo) || !std::isfinite(hi)) {
      std::fill(row, row + W, nan);
      start = end;
      continue;
    }
    double* e = row;
    double* counts = row + bins + 1;
    std::fill(counts, counts + bins, 0.0);
    double sum = 0.0, sumsq = 0.0;
    if (lo == hi) {  // one distinct value
      std::fill(e, e + bins + 1, lo);
      counts[bins - 1] = (double)numel;
      sum = lo * (double)numel;  // every value is lo: no second read
      sumsq = lo * lo * (double)numel;
    } else {
      e[0] = lo;
      for (int64_t k = 1; k < bins; ++k) e[k] = std::min(hi, std::max(lo, lo + (hi - lo) * k / bins));
      e[bins] = hi;
      for (int64_t k = start; k < end; ++k) {
        const auto& t = tensors[k];
        switch (t.scalar_type()) {
          case torch::kFloat32: place<float>(t.data_ptr<float>(), t.numel(), lo, hi, e, bins, counts, sum, sumsq); break;
          case torch::kFloat64: place<double>(t.data_ptr<double>(), t.numel(), lo, hi, e, bins, counts, sum, sumsq); break;
          case torch::kBFloat16:
            place<at::BFloat16>(t.data_ptr<at::BFloat16>(), t.numel(), lo, hi, e, bins, counts, sum, sumsq);
            break;
          default: place<at::Half>(t.data_ptr<at::Half>(), t.numel(), lo, hi, e, bins, counts, sum, sumsq);
        }
      }
    }
    row[2 * bins + 1] = sum;
    row[2 * bins + 2] = sumsq;
    start = end;
  }
}

// The live screen's activation check (LiveScreen._activations): at each sampled row r (in order) of
// the CPU buffer `storage`, module j is flagged when its dead fraction (column a + j * n_act_cols +
// dead_col) reaches dead_thr[j] or its saturated fraction (sat_col) reaches sat_thr[j] (an infinite
// threshold: not judged; NaN, a module that did not run, is never flagged). True when a module is
// flagged that was not at the previous sampled row; prev[j] ends as the last row's flags.
bool act_screen(torch::Tensor storage, std::vector<int64_t> rows, int64_t a, int64_t n_act_cols, int64_t dead_col,
                int64_t sat_col, torch::Tensor dead_thr, torch::Tensor sat_thr, torch::Tensor quiet, int64_t rearm) {
  for (const auto* t : {&storage, &dead_thr, &sat_thr})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat64 && t->is_contiguous(),
                "act_screen: contiguous float64 CPU tensors only");
  TORCH_CHECK(quiet.device().is_cpu() && quiet.scalar_type() == torch::kInt32 && quiet.is_contiguous(),
              "act_screen: quiet must be a contiguous int32 CPU tensor");
  TORCH_CHECK(storage.dim() == 2, "act_screen: storage must be [capacity, R]");
  const int64_t A = quiet.numel();
  TORCH_CHECK(dead_thr.numel() == A && sat_thr.numel() == A, "act_screen: one threshold per module");
  TORCH_CHECK(dead_col >= 0 && sat_col >= 0 && dead_col < n_act_cols && sat_col < n_act_cols,
              "act_screen: column out of range");
  TORCH_CHECK(A == 0 || (a >= 0 && a + A * n_act_cols <= storage.size(1)), "act_screen: modules out of range");
  TORCH_CHECK(rearm >= 0 && rearm < (int64_t{1} << 30), "act_screen: rearm out of range");
  for (const int64_t r : rows) TORCH_CHECK(r >= 0 && r < storage.size(0), "act_screen: row out of range");
  const int64_t R = storage.size(1);
  const double* st = storage.data_ptr<double>();
  const double* dt = dead_thr.data_ptr<double>();
  const double* tt = sat_thr.data_ptr<double>();
  int32_t* q = quiet.data_ptr<int32_t>();
  const int32_t full = static_cast<int32_t>(rearm);
  bool fresh = false;
  for (const int64_t r : rows) {
    const double* x = st + r * R + a;
    for (int64_t j = 0; j < A; ++j) {
      const bool jd = !std::isinf(dt[j]), js = !std::isinf(tt[j]);
      if (!jd && !js) continue;  // a module no rule judges
      const double d = x[j * n_act_cols + dead_col], s = x[j * n_act_cols + sat_col];
      if ((jd && d >= dt[j]) || (js && s >= tt[j])) {  // flagged
        fresh |= q[j] >= full;
        q[j] = 0;
      } else if ((jd && std::isnan(d)) || (js && std::isnan(s))) {
        continue;  // the module did not run at this row: nothing learnt
      } else if ((!jd || d < 0.5 * dt[j]) && (!js || s < 0.5 * tt[j])) {
        q[j] = full;  // clearly below: re-armed at once
      } else if (q[j] < full) {
        ++q[j];
      }
    }
  }
  return fresh;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("act_screen", &act_screen);
  m.def("histograms_into", &histograms_into);
  m.def("screen_block", &screen_block);
  m.def("activation_into", &activation_into);
  m.def("moments_into", &moments_into);
  m.def("copy_sumsq_into", &copy_sumsq_into);
  m.def("diff_sumsq_into", &diff_sumsq_into);
  py::class_<ParamSet>(m, "ParamSet")
      .def(py::init<std::vector<torch::Tensor>>())
      .def("moments_into", &ParamSet::moments_into)
      .def("moments_present", &ParamSet::moments_present);
}
"""

_lock = threading.Lock()
_state: dict[str, Any] = {
    "state": "unbuilt",
    "fn": None,
    "param_set": None,
    "act": None,
    "copy_sumsq": None,
    "diff_sumsq": None,
    "screen": None,
    "histograms": None,
    "act_screen": None,
    "error": None,
}


def _clear_stale_lock(name: str) -> None:
    """Remove a build lock left by a process that exited mid-build (a daemon thread dies with it).

    torch's builder waits on that file forever; a build takes minutes, so a lock older than 15
    minutes belongs to no live build.
    """
    import time

    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    try:
        if time.time() - os.path.getmtime(lock) > 15 * 60:
            os.remove(lock)
    except OSError:
        pass


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: the kernel is built for this CPU (-march=native), and cached per flags."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _name() -> str:
    digest = hashlib.sha1((_SOURCE + torch.__version__ + _cpu_flags()).encode()).hexdigest()[:12]
    return f"gradscope_moments_{digest}"


def _built() -> bool:
    """Whether this machine's extension cache holds the built kernel (loading it compiles nothing)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        name = _name()
        folder = _get_build_directory(name, verbose=False)
        return os.path.exists(os.path.join(folder, f"{name}.so"))
    except Exception:
        return False


def _load_built() -> None:
    """Import the kernel this machine already built: no compiler, no build lock, no ninja."""
    try:
        from torch.utils.cpp_extension import _get_build_directory, _import_module_from_library

        name = _name()
        module = _import_module_from_library(name, _get_build_directory(name, verbose=False), True)
        _check_and_keep(module)
    except Exception as exc:
        _state.update(state="failed", error=f"{type(exc).__name__}: {exc}")


def _check_and_keep(module: Any) -> None:
    fn = module.moments_into
    check = torch.zeros(1, 6, dtype=torch.float64)  # a wrong build must never be used
    finite = fn([torch.tensor([1.0, -2.0, 0.0])], check, [], list(range(6)), True)
    core = torch.zeros(2, 6, dtype=torch.float64)
    not_finite = fn([torch.tensor([1.0]), torch.tensor([1.0, float("inf")])], core, [], [-1, 1, -1, -1, -1, 5], False)
    # sync point: CPU tensors only; the self-check of a freshly loaded kernel, once per process.
    got = [check.tolist(), finite, not_finite, core[:, 5].tolist()]
    if got != [[[-1.0, 5.0, -2.0, 1.0, 2.0, 0.0]], True, False, [0.0, 1.0]]:
        raise RuntimeError(f"self-check gave {got}")
    act = module.activation_into
    check = torch.zeros(1, 3, dtype=torch.float64)
    # [2 samples, 2 units]: 2 of 4 entries <= 0, unit 0 inactive for both samples (dead)
    act(torch.tensor([[0.0, 1.0], [-1.0, 2.0]]), 2, 2, 1, 0, 0.0, 0.0, True, check, 0)
    # sync point: CPU tensors only; the self-check of a freshly loaded kernel, once per process.
    got = check.tolist()
    if got[0][:2] != [0.5, 0.5] or got[0][2] == got[0][2]:
        raise RuntimeError(f"activation self-check gave {got}")
    pair = torch.zeros(1, 2, dtype=torch.float64)
    src, dst = torch.tensor([3.0, -4.0]), torch.zeros(2)
    module.copy_sumsq_into([src], [dst], pair, [], 0)
    module.diff_sumsq_into([src], [torch.tensor([1.0, -1.0])], pair, [], 1)
    # sync point: CPU tensors only; the self-check of a freshly loaded kernel, once per process.
    got = pair.tolist() + dst.tolist()
    if got != [[25.0, 13.0], 3.0, -4.0]:
        raise RuntimeError(f"update self-check gave {got}")
    level, inv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    dev, dev_w = torch.ones(2, dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    block = torch.tensor([[100.0, 0.0, 1.0, 0.0], [1000.0, 0.0, 10.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    ok = module.screen_block(block, 0, 2, 0, 2, level, inv, w, 1e4, dev, dev_w, 4.0, 4.0)
    one = torch.ones(2, dtype=torch.float64)
    # 1000 > 10, and beyond the own band of parameter 0 too: min(max(1.5 * 1, 1), 2) = 1.5 < 3
    bad = module.screen_block(
        block, 0, 2, 0, 2, torch.zeros(2, dtype=torch.float64), one, one, 10.0, one, one, 1.5, 2.0
    )
    # sync point: CPU tensors only; the self-check of a freshly loaded kernel, once per process.
    got = [ok, bad, *level.tolist(), *dev.tolist()]
    # level: 0.25 * 2 + 0.75 * 3, 0.25 * 0 + 0.75 * 1; dev: 1 * 0.25 + 0.5 * 2 + 0.25 * 3, 0.25 + 0.5 * 0 + 0.25 * 1
    if got != [True, False, 2.75, 0.75, 2.0, 0.5]:
        raise RuntimeError(f"screen self-check gave {got}")
    hist = torch.zeros(2, 7, dtype=torch.float64)
    # [0, 1, 1, 3] in 2 buckets of [0, 1.5, 3]; a constant group [2, 2]: every edge at 2, both in the last
    module.histograms_into(
        [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])], [2, 3], 2, hist
    )
    # sync point: CPU tensors only; the self-check of a freshly loaded kernel, once per process.
    got = hist.tolist()
    if got != [[0.0, 1.5, 3.0, 3.0, 1.0, 5.0, 11.0], [2.0, 2.0, 2.0, 0.0, 2.0, 4.0, 8.0]]:
        raise RuntimeError(f"histogram self-check gave {got}")
    # two modules, rows 0 and 1: module 0 dead (0.9 >= 0.5) at row 1 only, module 1 saturated at both;
    # rows 2 then 1: module 0 just below its threshold (0.4, one quiet row, rearm 2) then flagged again:
    # not fresh; module 1 far below (0.1 < 0.25: re-armed at once) then flagged again: fresh
    rows = torch.tensor([[0.1, 0.0, 0.0, 0.7], [0.9, 0.0, 0.0, 0.8], [0.4, 0.0, 0.0, 0.1]], dtype=torch.float64)
    quiet = torch.full((2,), 2, dtype=torch.int32)
    inf = float("inf")
    thr_dead, thr_sat = torch.tensor([0.5, inf], dtype=torch.float64), torch.tensor([inf, 0.5], dtype=torch.float64)
    first = module.act_screen(rows, [0], 0, 2, 0, 1, thr_dead, thr_sat, quiet, 2)
    again = module.act_screen(rows, [0], 0, 2, 0, 1, thr_dead, thr_sat, quiet, 2)
    later = module.act_screen(rows, [1], 0, 2, 0, 1, thr_dead, thr_sat, quiet, 2)
    dip = module.act_screen(rows, [2, 1], 0, 2, 0, 1, thr_dead, thr_sat, quiet, 2)
    # sync point: CPU tensors only; the self-check of a freshly loaded kernel, once per process.
    got = [first, again, later, dip, *quiet.tolist()]
    if got != [True, False, True, True, 0, 0]:
        raise RuntimeError(f"activation screen self-check gave {got}")
    _state.update(
        state="ready",
        act_screen=module.act_screen,
        histograms=module.histograms_into,
        screen=module.screen_block,
        fn=fn,
        param_set=module.ParamSet,
        act=act,
        copy_sumsq=module.copy_sumsq_into,
        diff_sumsq=module.diff_sumsq_into,
    )


def _build() -> None:
    try:
        from torch.utils.cpp_extension import load_inline

        name = _name()
        _clear_stale_lock(name)
        os.environ.setdefault("MAX_JOBS", "1")  # one compiler process: training keeps the other cores
        module = load_inline(
            name,
            cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-fopenmp-simd", "-march=native"],
            verbose=False,
        )
        _check_and_keep(module)
    except Exception as exc:  # no compiler, no headers, a failed build: the eager path stays
        _state.update(state="failed", error=f"{type(exc).__name__}: {exc}")


def grad_moments(grads: list[Tensor], full: bool = True) -> Tensor:
    """``[len(grads), 6]`` float64 moments (:data:`GRAD_MOMENTS`) with the compiled kernel, NaN where not taken.

    Raises:
        RuntimeError: the kernel is not available (see :func:`cpu_kernel_state`), or a tensor is not a
            dense float32/float64/bfloat16/float16 CPU tensor (contiguous, or permuted such as channels-last).
    """
    fn = cpu_kernel()
    if fn is None:
        raise RuntimeError(f"gradscope's CPU moment kernel is {cpu_kernel_state()}: {_state['error'] or 'not built'}.")
    out = torch.full((len(grads), _GRAD_COLS), float("nan"), dtype=torch.float64)
    fn(grads, out, [], [0, 1, 2, 3, 4, 5] if full else [-1, 1, -1, -1, -1, 5], full)
    return out


def cpu_kernel_state() -> str:
    """``unbuilt``, ``absent`` (not built on this machine), ``building``, ``ready``, ``failed`` or ``off``."""
    if os.environ.get(KERNEL_ENV, "auto").lower() in ("off", "0", "false", "no"):
        return "off"
    return str(_state["state"])


_KernelFn = Callable[[list[Tensor], Tensor, list[int], list[int], bool], bool]
_ActivationFn = Callable[[Tensor, int, int, int, int, float, float, bool, Tensor, int], None]


_ScreenFn = Callable[[Tensor, int, int, int, int, Tensor, Tensor, Tensor, float, Tensor, Tensor, float, float], bool]


def cpu_screen_kernel() -> _ScreenFn | None:
    """The compiled CPU kernel's live screen, or None while the kernel is not available (see :func:`cpu_kernel`).

    Returns:
        ``fn(storage, first, n, col, n_cols, level, inv, weights, band, dev, dev_weights, factor, wide) ->
        bool``: the common block of :class:`gradscope.capture.live.LiveScreen` in one call: the sums of
        squares of rows ``first .. first + n - 1`` of ``storage`` (a contiguous ``[capacity, R]`` float64
        CPU tensor: the buffer), parameter ``p`` at column ``col + p * n_cols``. True, with ``level``,
        ``inv`` and ``dev`` (the mean deviation from the level) moved as the NumPy path moves them,
        when every ratio to the level is NaN-free and the positive ones lie within the parameter's
        band (``[1 / band, band]``, or ``|log10 ratio| <= min(max(factor * dev[p], log10 band), wide)``);
        False, with nothing written, otherwise. ``weights``, ``dev_weights``: the moving averages'
        weights, the newest row's last.
    """
    return _state["screen"] if cpu_kernel() is not None else None


_HistogramFn = Callable[[list[Tensor], list[int], int, Tensor], None]


def cpu_histogram_kernel() -> _HistogramFn | None:
    """The compiled CPU kernel's histograms, or None while the kernel is not available (see :func:`cpu_kernel`).

    Returns:
        ``fn(tensors, group_end, bins, out)``: one row of :func:`gradscope.sinks.histograms.histogram_rows`
        per group ``tensors[group_end[g - 1]:group_end[g]]`` into ``out`` (a contiguous ``[G, 2 * bins + 3]``
        float64 CPU tensor), reading each tensor twice (its extremes, then each value placed among the
        edges by comparison: the counts are exactly ``numpy.histogram(x, bins=edges)`` of the edges
        written). Dense float32/float64/bfloat16/float16 CPU tensors only (contiguous, or permuted such
        as channels-last: read in memory order); anything else raises before anything is written.
    """
    return _state["histograms"] if cpu_kernel() is not None else None


_ActScreenFn = Callable[[Tensor, list[int], int, int, int, int, Tensor, Tensor, Tensor, int], bool]


def cpu_act_screen_kernel() -> _ActScreenFn | None:
    """The compiled CPU kernel's activation screen, or None while the kernel is not available (see :func:`cpu_kernel`).

    Returns:
        ``fn(storage, rows, a, n_act_cols, dead_col, sat_col, dead_thr, sat_thr, quiet, rearm) -> bool``:
        at each row of ``rows`` of ``storage`` (the CPU buffer), module ``j``'s statistics at column
        ``a + j * n_act_cols``, flagged when its dead fraction reaches ``dead_thr[j]`` or its saturated
        fraction ``sat_thr[j]`` (float64; infinite: not judged). ``quiet`` (int32 ``[A]``, updated in
        place) counts each module's rows since it was last flagged, up to ``rearm``: a flag is *fresh*
        (the return value is True) only at a module whose count has reached ``rearm``. A row clearly
        below the thresholds (under half of each) sets the count to ``rearm`` at once; a row where the
        module did not run (NaN) changes nothing. :meth:`gradscope.capture.live.LiveScreen._activations`
        is the same rule in NumPy.
    """
    return _state["act_screen"] if cpu_kernel() is not None else None


def cpu_activation_kernel() -> _ActivationFn | None:
    """The compiled CPU kernel's activation statistics, or None while the kernel is not available (see :func:`cpu_kernel`).

    Returns:
        ``fn(y, outer, units, inner, kind, a, b, per_unit, out, row)``: the statistics of one activation
        output ``y`` (a contiguous float32/float64/bfloat16/float16 CPU tensor read as
        ``[outer, units, inner]``; half precision compared in float32, which holds it exactly), read
        once, into row ``row`` of ``out`` (a contiguous ``[R, 3]`` float64 CPU tensor: the buffer's
        activation block): the fraction of inactive entries (column 0 for ``kind`` 0, the relu
        family; column 2 otherwise), and with ``per_unit`` the fraction of units inactive for every
        sample and position (column 1); NaN elsewhere. Inactive: ``kind`` 0 ``v <= a``, 1 ``|v| > a``,
        2 ``v < a or v > b``, 3 ``v <= a or v >= b``, the thresholds in ``y``'s dtype (as torch
        compares a tensor with a number); fractions are float32 divisions of exact counts. Anything
        else raises before anything is written. Used by :mod:`gradscope.capture.activations`.
    """
    return _state["act"] if cpu_kernel() is not None else None


def cpu_kernel(*, start: bool = True) -> _KernelFn | None:
    """The compiled CPU moment kernel, or None while it is not (yet) available.

    By default (``auto``) the first call loads the kernel when this machine has it built, and
    otherwise gives up for the life of the process; ``GRADSCOPE_CPU_KERNEL=build`` starts the build in
    a background thread, ``=sync`` builds it now. Built kernels are cached on disk by
    ``torch.utils.cpp_extension``, so later processes only load them.

    Args:
        start: start the build when it has not started yet.

    Returns:
        ``fn(grads, out, rows, cols, full)``: the moments (:data:`GRAD_MOMENTS` order) of ``grads[k]``
        into row ``rows[k]`` (``k`` when ``rows`` is empty) of ``out`` (a contiguous ``[R, C]`` float64
        CPU tensor: the device buffer's row itself), moment ``j`` into column ``cols[j]`` (none when
        negative). ``full=False`` takes the sum of squares and the non-finite count only (a second
        pass only when the sum of squares is not finite). Dense float32/float64/bfloat16/float16 CPU
        tensors only (contiguous, or permuted such as channels-last: read in memory order); anything
        else raises before anything is written. Returns whether every entry read was finite.
    """
    state = _state["state"]
    if state == "ready":
        return _state["fn"]  # (the environment is read before the first load only: this runs every step)
    if state != "unbuilt" or not start:
        return None
    mode = os.environ.get(KERNEL_ENV, "auto").lower()
    if mode in ("off", "0", "false", "no"):
        return None
    if mode not in ("build", "sync") and not _built():
        _state["state"] = "absent"  # checked once per process: the eager path from now on
        return None  # never start a compiler implicitly (tests, fresh machines)
    with _lock:
        if _state["state"] != "unbuilt":
            return _state["fn"]
        _state["state"] = "building"
    if mode == "sync":
        _build()
        return _state["fn"]
    if mode != "build":  # auto, with the kernel built: import it
        _load_built()
        return _state["fn"]
    threading.Thread(target=_build, name="gradscope-kernel-build", daemon=True).start()
    return None


# -- accelerators: multi-tensor operators ------------------------------------------------------------
#: Largest group of gradients whose temporaries (``g * 0``, ``-g``, ``max(g, 0)``) exist at once.
_CHUNK_BYTES = 256 * 2**20


def _chunks(grads: Sequence[Tensor]) -> list[list[Tensor]]:
    out: list[list[Tensor]] = [[]]
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if out[-1] and size + nbytes > _CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(g)
        size += nbytes
    return out


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_NUMELS: dict[tuple, Tensor] = {}


def _put_column(view: Tensor, col: int, value: Tensor, rows: Tensor | None) -> None:
    """``view[rows, col] = value`` (every row when ``rows`` is None), converted to the view's dtype."""
    dest = view[:, col]
    if rows is None:
        dest.copy_(value)
    else:
        dest.index_copy_(0, rows, value.to(dest.dtype))


def _dtype_groups(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def _numels(gs: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``[len(gs)]`` element counts on the tensors' device, made once per set of sizes (no copy per step)."""
    key = (gs[0].device, dtype, tuple(g.numel() for g in gs))
    out = _NUMELS.get(key)
    if out is None:
        if len(_NUMELS) >= 16:
            _NUMELS.clear()
        host = torch.tensor(key[2], dtype=dtype)
        # (a copy from pageable memory would wait for the device: pinned, it does not)
        out = _NUMELS[key] = (
            host.pin_memory().to(gs[0].device, non_blocking=True) if gs[0].is_cuda else host.to(gs[0].device)
        )
    return out


def foreach_moments(
    grads: Sequence[Tensor], wanted: frozenset[str] | set[str], *, exact_nonfinite: bool = True
) -> dict[str, Tensor]:
    """Gradient moments of same-dtype tensors with multi-tensor operators: a fixed number of launches.

    Only operators with a multi-tensor kernel on CUDA are used (``_foreach_norm`` has one for the
    L1, L2 and max norms only; an L0 norm falls back to one launch per tensor):

    * ``sumsq``: the sum of squares (``_foreach_powsum``), accumulated in float32 (float64 gradients
      in float64).
    * ``nnz``: ``sign(g)`` is 1 or -1 for a non-zero entry and 0 for a zero, its L1 norm counts the
      former. ``sign(NaN)`` is 0, so a NaN entry counts as zero here.
    * ``nonfinite``, exact (``exact_nonfinite``): ``exp(g * 0)`` is 1 for a finite entry and NaN
      otherwise, ``sign`` of it 1 or 0, and its L1 norm counts the finite entries; the count is
      ``numel`` minus that where the sum of squares is not finite, and exactly 0 where it is (a
      float32 count is exact up to 2**24 entries, so the subtraction alone could be off by a few on
      a larger tensor). Three elementwise operators and one reduction over the gradients.
    * ``nonfinite`` as a flag (not ``exact_nonfinite``): 1 where the sum of squares is NaN or Inf,
      else 0, with no pass of its own. A float32 sum of squares also overflows for finite entries
      above about 1e19, which are flagged too.

    Args:
        grads: gradients of one dtype on one device (any shapes).
        wanted: moment names (of ``sum``, ``sumsq``, ``min``, ``max``, ``nnz``, ``nonfinite``).
        exact_nonfinite: count the non-finite entries (see above) or flag them from ``sumsq``.

    Returns:
        moment name -> ``[len(grads)]`` tensor (accumulation dtype) on the gradients' device.
    """
    gs = list(grads)
    acc = _acc(gs[0].dtype)
    out: dict[str, Tensor] = {}
    if "sumsq" in wanted or "nonfinite" in wanted:
        out["sumsq"] = torch.stack(torch._foreach_powsum(gs, 2, dtype=acc))
    if "max" in wanted:
        out["max"] = torch.stack(torch._foreach_max(gs)).to(acc)
    need_chunks = {"min", "sum", "nnz"} & set(wanted) or ("nonfinite" in wanted and exact_nonfinite)
    chunks = _chunks(gs) if need_chunks else []
    parts: dict[str, list[Tensor]] = {m: [] for m in ("min", "sum", "nnz", "nonfinite")}
    for c in chunks:  # the temporaries of one chunk (at most _CHUNK_BYTES) at a time
        if "min" in wanted:
            parts["min"].append(torch.stack(torch._foreach_max(torch._foreach_neg(c))))
        if "sum" in wanted:
            # sum(g) = 2 sum(max(g, 0)) - sum(|g|): no multi-tensor signed sum exists.
            parts["sum"].append(torch.stack(torch._foreach_powsum(torch._foreach_clamp_min(c, 0.0), 1, dtype=acc)))
        if "nnz" in wanted:
            parts["nnz"].append(torch.stack(torch._foreach_norm(torch._foreach_sign(c), 1, dtype=acc)))
        if "nonfinite" in wanted and exact_nonfinite:
            t = torch._foreach_mul(c, 0.0)
            torch._foreach_exp_(t)
            torch._foreach_sign_(t)
            parts["nonfinite"].append(torch.stack(torch._foreach_norm(t, 1, dtype=acc)))  # finite entries
    if "min" in wanted:
        out["min"] = -torch.cat(parts["min"]).to(acc)
    if "sum" in wanted:
        out["sum"] = 2 * torch.cat(parts["sum"]) - torch.stack(torch._foreach_powsum(gs, 1, dtype=acc))
    if "nnz" in wanted:
        out["nnz"] = torch.cat(parts["nnz"])
    if "nonfinite" in wanted:
        flag = ~torch.isfinite(out["sumsq"])
        if exact_nonfinite:
            numel = _numels(gs, acc)
            out["nonfinite"] = torch.where(flag, numel - torch.cat(parts["nonfinite"]), 0.0)
        else:
            out["nonfinite"] = flag.to(acc)
    return out


#: The gradient dtypes the compiled CPU kernel's moments read (half precision summed in float32).
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _kernel_reads(g: Tensor) -> int:
    """How the compiled CPU kernel reads ``g``: 1 directly, 2 through its values, 0 not at all.

    1: a plain, dense CPU tensor of :data:`_KERNEL_DTYPES` (the kernel's own check, in Python); 2: a
    sparse COO one of those dtypes.
    """
    if type(g) is not Tensor or g.device.type != "cpu" or g.dtype not in _KERNEL_DTYPES:
        return 0
    if g.layout == torch.sparse_coo:
        return 2
    return int(g.layout == torch.strided and dense_layout(g))


def _read_sparse(
    fn: _KernelFn, grads: Sequence[Tensor], out: Tensor, rows: Sequence[int], cols: list[int], full: bool
) -> bool:
    """The kernel's moments of sparse COO gradients into rows ``rows`` of ``out`` (``k`` when empty).

    Read over their coalesced values (an embedding's backward repeats a row once per lookup: summed
    here). The entries a gradient does not store are zeros: they add nothing to the sums, and bound its min
    and max by 0, as the eager path measures them. Returns whether every entry read was finite;
    raises, having written nothing, when the kernel cannot read the values.
    """
    values = [g.coalesce().values() for g in grads]
    finite = bool(fn(values, out, list(rows), cols, full))
    host = None
    for r, v, g in zip(rows or range(len(grads)), values, grads):
        if v.numel() < g.numel():  # entries not stored
            host = out.numpy() if host is None else host  # (a CPU tensor: the same memory)
            for c, bound in ((MOMENT_INDEX["min"], min), (MOMENT_INDEX["max"], max)):
                x = float(host[r, c])  # (host memory; NaN: not taken this step, or NaN read)
                if x == x:
                    host[r, c] = bound(x, 0.0)
    return finite


# -- choosing the path --------------------------------------------------------------------------------
_GRAD_COLS = len(GRAD_MOMENTS)


class FusedMoments:
    """The ``[n, n_cols]`` float64 moments block of a plan, by the fastest path that applies.

    ``path``: ``"auto"`` (the compiled kernel on a CPU once it is built, the multi-tensor path on
    accelerators, with the Triton kernel of :mod:`gradscope.capture.triton_moments` for the sampled
    steps on CUDA when it is available), ``"kernel"``, ``"foreach"`` (the accelerator path, on any
    device: the op-count test forces it on CPU tensors), ``"triton"`` (forced: on CPU tensors through
    Triton's interpreter, for tests), or ``"eager"``. On the compiled CPU kernel, a gradient it cannot
    read (complex, a view with gaps, a DTensor) goes to the eager path alone, and a sparse one is
    read through its coalesced values; on the multi-tensor path, gradients of several
    dtypes are grouped by dtype, and a sparse or complex one goes to the eager path alone
    (:meth:`_split`). What no fused path takes (a DTensor) sends the step to the eager path.

    Args:
        plan: the moment plan (columns, custom statistics, the moments wanted per step kind).
        path: see above.
    """

    def __init__(self, plan: MomentPlan, *, path: str = "auto") -> None:
        if path not in ("auto", "kernel", "foreach", "triton", "eager"):
            raise ValueError(f"FusedMoments: path must be auto, kernel, foreach, triton or eager, got {path!r}.")
        self.plan = plan
        self.path = path
        #: The path the last call took (``kernel``, ``foreach`` or ``eager``): for tests and benchmarks.
        self.last_path = ""
        #: After :meth:`write` or :meth:`write_params` returned True: whether every gradient entry they
        #: read was finite (the kernel knows it from the counts it wrote, at no extra cost).
        self.last_finite = True
        #: Whether a recorded gradient has held NaN/Inf (set by the recorder when rows reach the host).
        #: Until then the multi-tensor path takes the non-finite count as a flag from the sum of squares
        #: (exact while it is 0); from then on sampled steps count exactly (three more passes).
        self.nonfinite_seen = False
        self._tails: dict[tuple[int, torch.device], Tensor] = {}
        self._cols: dict[bool, tuple[list[int], bool]] = {}
        self._param_set: tuple[list[Tensor], Any] | None = None  # (the list, the kernel's copy of it)
        #: After :meth:`write_params` returned True: the indices of the parameters it read, or None when
        #: it read every one; :attr:`last_frozen` then lists those that do not require grad.
        self.last_present: list[int] | None = None
        self.last_frozen: list[int] = []
        # the whole list read with gradients missing (moments_present): tried first while it is needed
        self._sparse = False
        self._present: tuple[list[int], list[int]] | None = None  # its last lists (None: every gradient)
        self._rows: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}  # row indices on the device
        #: The last step's gradients were read in parts (:meth:`_split`): the next one starts there.
        self._mixed = False

    def __call__(self, grads: Sequence[Tensor], params: Sequence[Tensor], *, sampled: bool) -> Tensor:
        """Moments of ``grads`` (one device) as :meth:`MomentPlan.grad_moments` returns them.

        The fused path of the device for every gradient it reads; when one cannot be read, the step
        is split (:meth:`_split`): the fused path for the others, the eager path for that one alone.
        The next step starts with the split (``_mixed``) instead of a failing fused call.
        """
        if self._mixed:
            split = self._split(grads, params, sampled)
            if split is not None:
                return split
            self._mixed = False
        block = self._fused(grads, params, sampled)
        if block is not None:
            return block
        split = self._split(grads, params, sampled)
        if split is not None:
            self._mixed = True
            return split
        self.last_path = "eager"
        return self.plan.grad_moments(grads, params, sampled=sampled)

    def _fused(self, grads: Sequence[Tensor], params: Sequence[Tensor], sampled: bool) -> Tensor | None:
        """The whole block by the device's fused path; None when a gradient stops it (nothing written)."""
        device = grads[0].device
        path = self._path_on(device)
        block: Tensor | None = None
        if path in ("foreach", "triton") and any(g.dtype != grads[0].dtype for g in grads):
            return self._by_dtype(grads, params, sampled)
        if path == "kernel":
            block = self._kernel(grads, sampled)
        elif path in ("foreach", "triton"):
            # every moment of a sampled step in one pass on CUDA (on CPU tensors, forced, Triton's interpreter)
            if path == "triton" or (sampled and device.type == "cuda"):
                block = self._triton(grads, sampled)
                path = "triton" if block is not None else "foreach"
            if block is None:
                block = self._foreach(grads, sampled)
        if block is None:
            return None
        self.last_path = path
        return self._with_tail(block, grads, params)

    def _with_tail(self, block: Tensor, grads: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """``block`` (the gradient moments) with the parameter columns (NaN) and the custom statistics."""
        n, device = len(grads), block.device
        if self.plan.custom:
            tail = torch.cat([self._tail(n, device)[:, :2], self.plan.custom_columns(grads, params, device)], dim=1)
        else:
            tail = self._tail(n, device)
        return torch.cat([block, tail], dim=1)

    def _path_on(self, device: torch.device) -> str:
        """The path for tensors on ``device``: ``auto`` is the compiled kernel on a CPU, the multi-tensor path elsewhere."""
        if self.path == "auto":
            return "kernel" if device.type == "cpu" else "foreach"
        return self.path

    @property
    def flags_nonfinite(self) -> bool:
        """Whether the last capture took an accelerator path.

        There ordinary rows hold a non-finite *flag* (1 per tensor holding NaN/Inf), not a count of entries.
        """
        return self.last_path in ("foreach", "triton")

    def _by_dtype(self, grads: Sequence[Tensor], params: Sequence[Tensor], sampled: bool) -> Tensor | None:
        """Moments of gradients of several dtypes (a float32 norm among bfloat16 weights); None as :meth:`_fused`.

        Each dtype's block on its own, then one ``index_copy_`` each into the rows: launches per dtype
        present, not per tensor.
        """
        groups = _dtype_groups(grads)
        device = grads[0].device
        out = torch.empty(len(grads), self.plan.n_cols, dtype=torch.float64, device=device)
        paths = []
        for rows in groups:
            block = self._fused([grads[i] for i in rows], [params[i] for i in rows], sampled)
            if block is None:
                return None
            paths.append(self.last_path)
            out.index_copy_(0, self.rows_tensor(rows, device), block)
        # the path of the whole call: the slowest any group took
        self.last_path = "foreach" if "foreach" in paths else paths[0]
        return out

    def _split(self, grads: Sequence[Tensor], params: Sequence[Tensor], sampled: bool) -> Tensor | None:
        """The fused path for what it reads, the eager path for the rest (None: nothing to split).

        On the compiled CPU kernel, dense gradients (float32, float64, bfloat16, float16) are read
        directly and a sparse one (an ``nn.Embedding(sparse=True)``) through its coalesced values
        (:meth:`_sparse_kernel`); on the multi-tensor path, every strided, real, non-empty gradient.
        Any other gradient among them (complex, a view with gaps on the CPU, sparse or empty on an
        accelerator) costs the eager path for that tensor alone: a fixed number of operators, not a
        pass per tensor of the step. ``last_path`` is ``eager`` when anything went the eager way.
        """
        device = grads[0].device
        path = self._path_on(device)
        if path == "kernel":
            if cpu_kernel() is None:
                return None  # (not built, or off: nothing reads any of them)
            kinds = [_kernel_reads(g) for g in grads]  # 1: directly, 2: sparse values, 0: not at all
        elif path in ("foreach", "triton"):
            # (an empty gradient too: _foreach_max has no maximum of zero elements)
            kinds = [int(g.layout == torch.strided and not g.is_complex() and g.numel() > 0) for g in grads]
        else:
            return None
        if len(set(kinds)) == 1 and kinds[0] != 2:
            return None  # (all readable: the fused path failed for another reason; none: the eager path)
        out = torch.empty(len(grads), self.plan.n_cols, dtype=torch.float64, device=device)
        paths = []
        for kind in (1, 2, 0):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if not rows:
                continue
            gs, ps = [grads[i] for i in rows], [params[i] for i in rows]
            block = None
            if kind == 1:
                block = self._fused(gs, ps, sampled)
                taken = self.last_path
            elif kind == 2:
                sparse = self._sparse_kernel(gs, sampled)
                block, taken = (None, "") if sparse is None else (self._with_tail(sparse, gs, ps), "kernel")
            if block is None:
                block, taken = self.plan.grad_moments(gs, ps, sampled=sampled), "eager"
            paths.append(taken)
            out.index_copy_(0, self.rows_tensor(rows, device), block.to(device))
        self.last_path = "eager" if "eager" in paths else paths[0]
        return out

    def _sparse_kernel(self, grads: Sequence[Tensor], sampled: bool) -> Tensor | None:
        """Moments of sparse COO gradients with the kernel, over their coalesced values (:func:`_read_sparse`)."""
        fn = cpu_kernel()
        if fn is None:
            return None
        block = torch.full((len(grads), _GRAD_COLS), float("nan"), dtype=torch.float64)
        cols, full = self._columns(sampled)
        try:
            _read_sparse(fn, grads, block, [], cols, full)
        except (RuntimeError, TypeError, ValueError):  # (the kernel checks its tensors before writing)
            return None
        return block

    def sumsq(self, tensors: Sequence[Tensor]) -> Tensor:
        """``[len(tensors)]`` float64 sums of squares (weights, updates), by the same choice of path."""
        device = tensors[0].device
        path = self._path_on(device)
        if path == "kernel":
            fn = cpu_kernel()
            if fn is not None:
                out = torch.empty(len(tensors), 1, dtype=torch.float64)
                try:
                    fn(list(tensors), out, [], [-1, 0, -1, -1, -1, -1], False)
                    return out[:, 0]
                except (RuntimeError, TypeError, ValueError):
                    pass
        elif path == "foreach" and len({t.dtype for t in tensors}) == 1:
            try:
                acc = _acc(tensors[0].dtype)
                return torch.stack(torch._foreach_powsum(list(tensors), 2, dtype=acc)).to(torch.float64)
            except (RuntimeError, TypeError, NotImplementedError):
                pass
        return MomentPlan.param_sumsq(tensors)

    def write(
        self, grads: list[Tensor], params: Sequence[Tensor], view: Tensor, rows: list[int], *, sampled: bool
    ) -> bool:
        """The compiled CPU kernel's path: moments straight into the buffer rows ``view[rows]``.

        One C++ call reads each gradient once and writes the row: no temporary tensors, no copies.
        Columns the step does not take are left as they are (NaN: the row was cleared when claimed).

        Returns:
            False when the path does not apply (not a CPU kernel path, not built yet, a gradient it
            cannot read): nothing was written, use :meth:`__call__`.
        """
        if self.path not in ("auto", "kernel") or view.device.type != "cpu":
            return False
        fn = cpu_kernel()
        if fn is None:
            return False
        cols, full = self._columns(sampled)
        if self._mixed:  # the last step had a gradient the kernel reads in parts: straight to them
            finite = self._write_parts(fn, grads, view, rows, cols, full)
            if finite is None:
                return False
        else:
            try:
                finite = fn(grads, view, rows, cols, full)
            except (RuntimeError, TypeError, ValueError):  # checked before anything is written
                finite = self._write_parts(fn, grads, view, rows, cols, full)
                if finite is None:
                    return False
                self._mixed = True
        self.last_finite = bool(finite)
        if self.plan.custom:
            custom = self.plan.custom_columns(grads, params, view.device).to(view.dtype)
            dest = view[:, len(MOMENT_INDEX) :]
            if rows:
                dest.index_copy_(0, torch.tensor(rows, dtype=torch.long), custom)
            else:
                dest.copy_(custom)
        self.last_path = "kernel"
        return True

    def _write_parts(
        self, fn: _KernelFn, grads: list[Tensor], view: Tensor, rows: list[int], cols: list[int], full: bool
    ) -> bool | None:
        """:meth:`write` of gradients the kernel reads in two parts, each straight into its rows of ``view``.

        Dense gradients are read directly, sparse COO ones (an ``nn.Embedding(sparse=True)``) through
        their coalesced values. The entries a sparse gradient does not store count as zeros: they add
        nothing to the sums, and bound its min and max by 0, as the eager path measures them.

        Returns:
            Whether every entry read was finite; None, having written nothing, when a gradient is read
            by neither (complex, a view with gaps): :meth:`__call__` splits those off to the eager
            path. Clears the ``_mixed`` hint when no gradient is sparse any more.
        """
        sparse = [k for k, g in enumerate(grads) if g.layout == torch.sparse_coo]
        try:
            if not sparse:
                finite = fn(grads, view, rows, cols, full)
                self._mixed = False  # every gradient dense and read: the next step takes the one call
                return bool(finite)
            if any(grads[k].dtype not in _KERNEL_DTYPES for k in sparse):
                return None  # (complex values: the kernel would decline them after the dense part was written)
            at = rows or range(len(grads))
            finite = True
            if len(sparse) < len(grads):  # first: the kernel checks every dense gradient before writing
                dense = [k for k in range(len(grads)) if k not in sparse]
                finite = bool(fn([grads[k] for k in dense], view, [at[k] for k in dense], cols, full))
            finite = _read_sparse(fn, [grads[k] for k in sparse], view, [at[k] for k in sparse], cols, full) and finite
        except (RuntimeError, TypeError, ValueError):  # (the kernel checks its tensors before writing)
            return None
        return finite

    def _columns(self, sampled: bool) -> tuple[list[int], bool]:
        """The kernel's column of each moment (-1: not taken) for a step, and whether it takes all six."""
        got = self._cols.get(sampled)
        if got is None:
            wanted = self.plan.wanted(sampled)
            got = self._cols[sampled] = (
                [MOMENT_INDEX[m] if m in wanted else -1 for m in GRAD_MOMENTS],
                bool(wanted - CORE_MOMENTS),
            )
        return got

    def __getstate__(self) -> dict[str, Any]:
        # The kernel's copy of the parameter list is neither copied nor pickled: made again on use.
        return {**self.__dict__, "_param_set": None}

    def write_params(self, params: list[Tensor], view: Tensor, *, sampled: bool) -> bool:
        """The compiled CPU kernel's path with the gradients read in C++: moments of ``p.grad`` into ``view``.

        The common step (every parameter trainable, with a plain float32/float64 CPU gradient) costs one
        call, however many parameters: no Python loop over them. ``params`` is handed to the kernel
        once (a list of the same tensors, in the same order, at every call: the layout's). Custom
        statistics need the gradients in Python, so they take :meth:`write`.

        Some parameters without a gradient (frozen ones, experts a router did not pick, a branch not
        taken) are left out in the same one call: :attr:`last_present` then lists the rows written and
        :attr:`last_frozen` the parameters that do not require grad.

        Returns:
            False, having written nothing, when the path does not apply (a gradient the kernel cannot
            read, the kernel not built): use :meth:`write`.
        """
        self.last_present, self.last_frozen = None, []
        if self.plan.custom or self.path not in ("auto", "kernel"):
            return False
        held = self._param_set
        if held is None or held[0] is not params:
            # (checked once per parameter list: the buffer's device does not change, nor does the kernel)
            if view.device.type != "cpu" or cpu_kernel() is None:
                return False
            try:
                held = self._param_set = (params, _state["param_set"](list(params)))
            except (RuntimeError, TypeError, ValueError):
                return False
        cols, full = self._columns(sampled)
        status = 0
        if not self._sparse:
            try:
                status = held[1].moments_into(view, cols, full)
            except (RuntimeError, TypeError, ValueError):  # checked before anything is written
                return False
        if not status:
            # Some parameters have no gradient this step (a mixture of experts' unpicked experts, a branch
            # not taken), or are frozen: the gradients present, read in the same one call. While steps
            # need it, it is tried first (a router picks other experts at every step).
            try:
                status, present, frozen = held[1].moments_present(view, cols, full)
            except (RuntimeError, TypeError, ValueError):
                status = 0
            if not status:
                self._sparse = False
                return False
            if status < 0:  # other tensors than at the previous call (the same lists keep their identity)
                status = -status
                self._present = (present, frozen) if len(present) < len(params) else None
            self._sparse = self._present is not None
            self.last_path = "kernel"
            self.last_finite = status == 1
            if self._present is not None:
                self.last_present, self.last_frozen = self._present
            return True
        self.last_path = "kernel"
        self.last_finite = status == 1
        self.last_present = None
        return True

    def copy_sumsq(self, src: list[Tensor], dst: list[Tensor], view: Tensor, col: int) -> bool:
        """``dst[k] <- src[k]`` and ``sum(src[k]**2)`` into ``view[k, col]``, one read of each weight; False if it does not apply.

        The weight snapshot of the update ratio and the weights' sum of squares (``psumsq``) of a sampled
        step in one pass: the compiled CPU kernel, or on CUDA the Triton kernel
        (:func:`gradscope.capture.triton_moments.triton_pair_sumsq`). Nothing is written when it returns False.
        """
        if self._pair_on_device(view):
            sums = triton_pair_sumsq(src, dst, copy=True, interpret=view.device.type == "cpu")
            if sums is None:
                return False
            view[:, col].copy_(sums)
            return True
        if self.path not in ("auto", "kernel") or view.device.type != "cpu" or cpu_kernel() is None:
            return False
        try:
            _state["copy_sumsq"](src, dst, view, [], col)
        except (RuntimeError, TypeError, ValueError):  # checked before anything is written
            return False
        return True

    def diff_sumsq(self, before: list[Tensor], after: list[Tensor], view: Tensor, rows: list[int], col: int) -> bool:
        """``sum((before[k] - after[k])**2)`` into ``view[rows[k], col]``, nothing else written; False if it does not apply."""
        if self._pair_on_device(view):
            sums = triton_pair_sumsq(before, after, copy=False, interpret=view.device.type == "cpu")
            if sums is None:
                return False
            dest = view[:, col]
            if rows:
                dest.index_copy_(0, self.rows_tensor(rows, view.device), sums)
            else:
                dest.copy_(sums)
            return True
        if self.path not in ("auto", "kernel") or view.device.type != "cpu" or cpu_kernel() is None:
            return False
        try:
            _state["diff_sumsq"](before, after, view, rows, col)
        except (RuntimeError, TypeError, ValueError):  # checked before anything is written
            return False
        return True

    def write_sumsq(self, tensors: list[Tensor], view: Tensor, rows: list[int], col: int) -> bool:
        """Sums of squares of ``tensors`` into ``view[rows, col]`` with the CPU kernel; False if it does not apply."""
        if self.path not in ("auto", "kernel") or view.device.type != "cpu":
            return False
        fn = cpu_kernel()
        if fn is None:
            return False
        try:
            fn(tensors, view, rows, [-1, col, -1, -1, -1, -1], False)
        except (RuntimeError, TypeError, ValueError):
            return False
        return True

    def write_core(self, grads: list[Tensor], view: Tensor, rows: list[int] | None = None) -> bool:
        """An ordinary step on the multi-tensor path: the sum of squares and the non-finite flag straight into ``view``.

        ``view`` is the step's buffer row (every other column NaN since it was claimed); gradient ``k``
        goes to row ``rows[k]`` (``k`` when ``rows`` is None: every tensor has one; frozen parameters
        and those without a gradient have none). One ``_foreach_powsum``, its ``stack``, and for the
        flag ``(s - s) != 0`` (0 for a finite sum of squares, NaN otherwise), each written into its
        column: about half the operators (and kernel launches) of building a block and copying it in;
        per dtype present (then each into its rows). False, nothing written, where it does not apply
        (another path, a custom statistic, a sampled step's moments).
        """
        if not grads or self.plan.custom or self._mixed or len(grads) != (view.shape[0] if rows is None else len(rows)):
            return False  # (mixed: a gradient this path cannot take, which __call__ splits off)
        device = grads[0].device
        path = self._path_on(device)
        wanted = self.plan.wanted(False) & set(GRAD_MOMENTS)
        if path != "foreach" or not wanted or not wanted <= CORE_MOMENTS or view.device != device:
            return False
        groups = _dtype_groups(grads)
        try:  # (per dtype present: a float32 norm among bfloat16 weights is a second group)
            sums = [
                torch.stack(torch._foreach_powsum([grads[i] for i in group], 2, dtype=_acc(grads[group[0]].dtype)))
                for group in groups
            ]
        except (RuntimeError, TypeError, NotImplementedError):  # sparse, complex, empty tensors
            return False
        for group, sumsq in zip(groups, sums):
            if rows is None and len(groups) == 1:
                where = None
            else:  # (the rows of the tensors of this dtype; cached on the device, made once per set)
                where = self.rows_tensor(group if rows is None else [rows[i] for i in group], device)
            if "sumsq" in wanted:
                _put_column(view, MOMENT_INDEX["sumsq"], sumsq, where)
            if "nonfinite" in wanted:  # a flag: 1 for a gradient holding NaN or Inf (exact while 0)
                _put_column(view, MOMENT_INDEX["nonfinite"], (sumsq - sumsq).ne(0.0), where)
        self.last_path = "foreach"
        return True

    def _pair_on_device(self, view: Tensor) -> bool:
        """Whether the weights' side goes to the Triton kernel: on CUDA by default, on CPU tensors when forced."""
        return (self.path in ("auto", "foreach") and view.device.type == "cuda") or self.path == "triton"

    def rows_tensor(self, rows: list[int], device: torch.device) -> Tensor:
        """``rows`` as a long tensor on ``device``, kept per set of rows (up to 64 sets, then made afresh).

        On CUDA it is copied from pinned memory without waiting: ``torch.tensor(rows, device=...)`` copies
        pageable memory, a host sync, and a set of rows that changes at every step (the experts a router
        picked) would make one per step.
        """
        key = (tuple(rows), device)
        t = self._rows.get(key)
        if t is None:
            if len(self._rows) > 64:
                self._rows.clear()
            host = torch.tensor(rows, dtype=torch.long)
            if device.type == "cuda":
                t = host.pin_memory().to(device, non_blocking=True)
            else:
                t = host if device.type == "cpu" else host.to(device)
            self._rows[key] = t
        return t

    def _tail(self, n: int, device: torch.device) -> Tensor:
        key = (n, device)
        t = self._tails.get(key)
        if t is None:
            if len(self._tails) > 64:
                self._tails.clear()
            t = torch.full((n, self.plan.n_cols - _GRAD_COLS), float("nan"), dtype=torch.float64, device=device)
            self._tails[key] = t
        return t

    def _kernel(self, grads: Sequence[Tensor], sampled: bool) -> Tensor | None:
        fn = cpu_kernel()
        if fn is None:
            return None
        wanted = self.plan.wanted(sampled)
        block = torch.full((len(grads), _GRAD_COLS), float("nan"), dtype=torch.float64)
        cols = [MOMENT_INDEX[m] if m in wanted else -1 for m in GRAD_MOMENTS]
        try:
            fn(list(grads), block, [], cols, bool(wanted - CORE_MOMENTS))
        except (RuntimeError, TypeError, ValueError):  # sparse, complex, gaps between entries, DTensor
            return None
        return block

    def _triton(self, grads: Sequence[Tensor], sampled: bool) -> Tensor | None:
        wanted = self.plan.wanted(sampled) & set(GRAD_MOMENTS)
        if not wanted - CORE_MOMENTS:
            return None  # the sum of squares (and the flag from it): one multi-tensor pass already
        block = triton_moments(grads, interpret=grads[0].device.type == "cpu")
        if block is None:
            return None
        skip = [MOMENT_INDEX[m] for m in GRAD_MOMENTS if m not in wanted]
        if skip:  # moments this step does not take are NaN, as on the other paths
            block[:, skip] = float("nan")
        return block

    def _foreach(self, grads: Sequence[Tensor], sampled: bool) -> Tensor | None:
        wanted = self.plan.wanted(sampled) & set(GRAD_MOMENTS)
        if not wanted:
            return None
        gs = list(grads)
        dtypes = {g.dtype for g in gs}
        if len(dtypes) != 1:
            return None  # (mixed dtypes reach here grouped, by __call__)
        try:
            # a flag from the sum of squares; the exact count on sampled steps once NaN/Inf has been seen
            cols = foreach_moments(gs, wanted, exact_nonfinite=sampled and self.nonfinite_seen)
        except (RuntimeError, TypeError, NotImplementedError):  # sparse, complex, empty tensors
            return None
        n = len(gs)
        nan = self._tail(n, gs[0].device)[:, 0]
        taken = [cols[m].to(torch.float64) if m in cols and m in wanted else nan for m in GRAD_MOMENTS]
        return torch.stack(taken, dim=1)


if __name__ == "__main__":  # python -m gradscope.capture.kernels: build the CPU kernel once for this machine
    os.environ[KERNEL_ENV] = "sync"
    cpu_kernel()
    print(f"gradscope CPU moment kernel: {cpu_kernel_state()}" + (f" ({_state['error']})" if _state["error"] else ""))
