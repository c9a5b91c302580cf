// Per-element update rules shared by the CPU loop and the CUDA kernel.
//
// Every rule is a template over the value type V it computes in: the opmath
// scalar (float for float/half/bfloat16 buffers, double for double) in the CUDA
// kernel and in the CPU loop's tail, and at::vec::Vectorized<opmath> in the CPU
// loop's body.  Writing each rule once is what makes the CPU tests a check of the
// arithmetic the GPU runs.  The rules only use + - * / and the few functions in
// Math<V>, so the CPU file adds a Math specialisation for Vectorized.
//
// The operation order follows reptile_fused/reference.py (torch.optim's
// foreach=False arithmetic), and each `x.add(y, alpha=a)` / `lerp` is the fused
// multiply-add that torch's vectorised CPU kernels and its CUDA kernels compute for
// it (as is Adam's `addcmul_`), so float32/float64 SGD and Adam steps match
// torch.optim.SGD / torch.optim.Adam bit for bit on AVX2 CPUs.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RF_HD __host__ __device__
#else
#define RF_HD
#endif

namespace reptile_fused {

// Functions beyond arithmetic operators, per value type.  NaN-propagating max,
// like torch.maximum (amsgrad).  div_fixed(x, c, inv_c) is x / c for a divisor that
// is the same over a whole pass (inv_c: 1 / c rounded); the scalar types divide, and
// the CPU's vectors compute the same quotient without the divider (kernels_impl.h).
template <typename V>
struct Math;

template <>
struct Math<float> {
  static RF_HD inline float sqrt(float x) { return ::sqrtf(x); }
  static RF_HD inline float max(float a, float b) { return (a != a || a > b) ? a : b; }
  static RF_HD inline float neg(float x) { return -x; }
  static RF_HD inline float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
  static RF_HD inline float div_fixed(float x, float c, float /*inv_c*/) { return x / c; }
};

template <>
struct Math<double> {
  static RF_HD inline double sqrt(double x) { return ::sqrt(x); }
  static RF_HD inline double max(double a, double b) { return (a != a || a > b) ? a : b; }
  static RF_HD inline double neg(double x) { return -x; }
  static RF_HD inline double fma(double a, double b, double c) { return ::fma(a, b, c); }
  static RF_HD inline double div_fixed(double x, double c, double /*inv_c*/) { return x / c; }
};

// ---------------------------------------------------------------- SGD
// Coefficients in the value type; flags decide branches that are uniform over a
// buffer, so they never diverge within a warp or a vector.
template <typename V>
struct SgdCoef {
  V minus_lr, momentum, one_minus_dampening, weight_decay;
  bool has_momentum, has_weight_decay, nesterov, maximize, first_step;
};

RF_HD inline SgdCoef<double> sgd_coef(double lr, double momentum, double dampening, double weight_decay,
                                      bool nesterov, bool maximize, bool first_step) {
  return {-lr, momentum, 1.0 - dampening, weight_decay, momentum != 0.0, weight_decay != 0.0, nesterov, maximize,
          first_step};
}

// param p, gradient g (by value: the decayed/negated gradient is local), momentum
// buffer buf (unused when has_momentum is false).
template <typename V>
RF_HD inline void sgd_element(V& p, V g, V& buf, const SgdCoef<V>& c) {
  if (c.maximize) g = Math<V>::neg(g);
  if (c.has_weight_decay) g = Math<V>::fma(p, c.weight_decay, g);  // g.add(p, alpha=wd)
  if (c.has_momentum) {
    if (c.first_step) {
      buf = g;
    } else {
      buf = Math<V>::fma(g, c.one_minus_dampening, buf * c.momentum);  // buf.mul_(m).add_(g, alpha=1-d)
    }
    g = c.nesterov ? Math<V>::fma(buf, c.momentum, g) : buf;  // g.add(buf, alpha=m)
  }
  p = Math<V>::fma(g, c.minus_lr, p);  // p.add_(g, alpha=-lr)
}

// The coefficients in value type V (scalar type S), rounded from the double the
// caller holds exactly as torch rounds a Python scalar to the opmath type.
template <typename V, typename S>
RF_HD inline SgdCoef<V> cast_coef(const SgdCoef<double>& c) {
  return {V(S(c.minus_lr)), V(S(c.momentum)), V(S(c.one_minus_dampening)), V(S(c.weight_decay)),
          c.has_momentum, c.has_weight_decay, c.nesterov, c.maximize, c.first_step};
}

// ---------------------------------------------------------------- Adam
template <typename V>
struct AdamCoef {
  V one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  V step_size;  // lr / (1 - beta1^step)
  V bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  V inv_bias_correction2_sqrt;  // 1 / bias_correction2_sqrt, rounded in the value type (Math::div_fixed)
  bool lerp_low;  // which of torch.lerp's two formulas the weight 1 - beta1 selects
  bool has_weight_decay, amsgrad, maximize;
};

// lerp_low is decided on the rounded weight, as torch's lerp kernels decide it on their opmath scalar.
template <typename V, typename S>
RF_HD inline AdamCoef<V> cast_coef(const AdamCoef<double>& c) {
  return {V(S(c.one_minus_beta1)), V(S(c.beta2)), V(S(c.one_minus_beta2)), V(S(c.eps)), V(S(c.weight_decay)),
          V(S(c.step_size)), V(S(c.bias_correction2_sqrt)), V(S(1) / S(c.bias_correction2_sqrt)),
          ::fabs(double(S(c.one_minus_beta1))) < 0.5,
          c.has_weight_decay, c.amsgrad, c.maximize};
}

// All Adam coefficients from the op's arguments, in double as the reference computes
// them in Python.  The CUDA kernel calls this once per thread when lr or step are
// device tensors, so a replayed CUDA graph picks up their new values.
RF_HD inline AdamCoef<double> adam_coef(double lr, double step, double beta1, double beta2, double eps,
                                        double weight_decay, bool amsgrad, bool maximize) {
  const double bias_correction1 = 1.0 - ::pow(beta1, step);
  const double bias_correction2 = 1.0 - ::pow(beta2, step);
  const double w = 1.0 - beta1;
  const double bias_correction2_sqrt = ::sqrt(bias_correction2);
  return {w,           beta2, 1.0 - beta2, eps, weight_decay, lr / bias_correction1, bias_correction2_sqrt,
          1.0 / bias_correction2_sqrt, ::fabs(w) < 0.5, weight_decay != 0.0, amsgrad, maximize};
}

// torch.lerp(start, end, w) in the form of torch's vectorised kernel: one fused
// multiply-add from whichever end the weight is closer to.
template <typename V>
RF_HD inline V lerp_element(V start, V end, V w, bool low, V one) {
  return low ? Math<V>::fma(w, end - start, start) : Math<V>::fma(w - one, end - start, end);
}

// The moment updates of one Adam step (g is the raw gradient; vmax is read and
// written only when amsgrad is set).  Returns the second moment whose square root
// the denominator takes.
template <typename V>
RF_HD inline V adam_moments(V p, V g, V& m, V& v, V& vmax, const AdamCoef<V>& c, V one) {
  if (c.maximize) g = Math<V>::neg(g);
  if (c.has_weight_decay) g = Math<V>::fma(p, c.weight_decay, g);  // g.add(p, alpha=wd)
  m = lerp_element(m, g, c.one_minus_beta1, c.lerp_low, one);
  v = v * c.beta2;
  // v.addcmul_(g, g, value=1-b2): torch's kernels compute (value * g) * g + v as one fused multiply-add.
  v = Math<V>::fma(c.one_minus_beta2 * g, g, v);
  if (c.amsgrad) {
    vmax = Math<V>::max(vmax, v);
    return vmax;
  }
  return v;
}

// The parameter update from the first moment and the square root of the second:
// p.addcdiv_(m, sqrt(v) / bias_correction2_sqrt + eps, value=-step_size).
template <typename V>
RF_HD inline void adam_param(V& p, V m, V root, const AdamCoef<V>& c) {
  const V denom = Math<V>::div_fixed(root, c.bias_correction2_sqrt, c.inv_bias_correction2_sqrt) + c.eps;
  p = p - c.step_size * m / denom;
}

template <typename V>
RF_HD inline void adam_element(V& p, V g, V& m, V& v, V& vmax, const AdamCoef<V>& c, V one) {
  const V second = adam_moments(p, g, m, v, vmax, c, one);
  adam_param(p, m, Math<V>::sqrt(second), c);
}

// torch.optim.Adam(fused=True) on the CPU (aten/src/ATen/native/cpu/FusedAdamKernel.cpp)
// runs adam_element above on whole at::vec vectors, with a correctly rounded square
// root, and each tensor's last numel % W elements (W: the elements of one vector) in a
// scalar loop that the compiler contracts differently: the second moment there is
// fma(v, beta2, ((1 - beta2) * g) * g), not fma((1 - beta2) * g, g, v * beta2), and
// amsgrad's max is std::max (which keeps the old maximum when v is NaN).  Measured
// against torch 2.14's AVX2 build for float32 and float64 (tests/optimizer/test_torch_conformance.py).
template <typename V>
RF_HD inline V adam_moments_fused_tail(V p, V g, V& m, V& v, V& vmax, const AdamCoef<V>& c, V one) {
  if (c.maximize) g = Math<V>::neg(g);
  if (c.has_weight_decay) g = Math<V>::fma(p, c.weight_decay, g);
  m = lerp_element(m, g, c.one_minus_beta1, c.lerp_low, one);
  v = Math<V>::fma(v, c.beta2, c.one_minus_beta2 * g * g);
  if (c.amsgrad) {
    vmax = (vmax < v) ? v : vmax;
    return vmax;
  }
  return v;
}

template <typename V>
RF_HD inline void adam_element_fused_tail(V& p, V g, V& m, V& v, V& vmax, const AdamCoef<V>& c, V one) {
  const V second = adam_moments_fused_tail(p, g, m, v, vmax, c, one);
  adam_param(p, m, Math<V>::sqrt(second), c);
}

// ---------------------------------------------------------------- Reptile
// End of a task: the accumulator (opmath) gains the adapted weights; the caller
// stores the anchor back into the parameter.
template <typename V>
RF_HD inline void task_end_element(V& acc, V p) {
  acc = acc + p;
}

// anchor + meta_lr * (total / n - anchor): the meta step for meta_update_ (total
// is the task accumulator) and batched_meta_update_ (total is the row sum).  The
// last multiply-add is one fused multiply-add, written out so that no compiler's
// contraction choice decides it; the reference computes the same with
// torch.add(anchor, total / n - anchor, alpha=meta_lr), which torch's CPU and CUDA
// kernels compute as that fused multiply-add.
template <typename V>
RF_HD inline V meta_element(V anchor, V total, V meta_lr, V n) {
  return Math<V>::fma(meta_lr, total / n - anchor, anchor);
}

}  // namespace reptile_fused
