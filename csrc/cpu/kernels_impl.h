// CPU kernels: one at::parallel_for pass per op, vectorised with at::vec.
//
// Each thread walks its chunk in blocks of kBlock elements, loaded into opmath
// Vectorized registers (16-bit values widened to float once), runs the shared
// element rule from element_math.h on whole vectors, and stores each output once.
// The few elements after the last full block run the same rule on scalars.
//
// This header is compiled once per CPU capability (kernels.cpp: baseline
// x86-64 / any CPU; kernels_avx2.cpp: AVX2+FMA+F16C), as ATen does with its own
// kernels: at::vec::Vectorized maps onto the instruction set the translation unit
// is compiled for, and the baseline build leaves most arithmetic scalar.  Everything
// here is in an anonymous namespace, so the two copies never clash; the including
// file names the function that returns this copy's kernel table (RF_CPU_TABLE).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sqrt.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "../element_math.h"

namespace reptile_fused {

template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static inline V sqrt(const V& x) { return x.sqrt(); }
  static inline V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static inline V neg(const V& x) { return x.neg(); }
  static inline V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  // x / c for x a square root (0, a normal number, inf or NaN) and c > 0 fixed over the
  // pass, rounded as the divide rounds it, in a multiply and two fused multiply-adds
  // (Markstein's theorem): q = x * inv_c is within an ulp of x / c, the remainder
  // x - q * c is exact, and q + remainder * inv_c rounds to the correctly rounded
  // quotient.  Adam would otherwise use the divider twice per element, and the divider,
  // more than memory, bounds its step on buffers that fit in cache.  An infinite x leaves
  // a NaN remainder, where q is the quotient; the remainder computed negated keeps
  // -0 / c = -0.  The baseline build's fmadd rounds twice, so there it divides.
  // tests/ops/test_adam_step.py compares every float32 significand with the divide.
  static inline V div_fixed(const V& x, const V& c, const V& inv_c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    const V q = x * inv_c;
    const V minus_remainder = at::vec::fmadd(q, c, x.neg());
    return V::blendv(at::vec::fnmadd(minus_remainder, inv_c, q), q, minus_remainder.isnan());
#else
    return x / c;
#endif
  }
};

namespace {

using at::vec::Vectorized;

// Loads and stores of one block of kBlock elements as K opmath vectors, for buffers
// of the storage type scalar_t or of the opmath type (the task accumulator).
template <typename scalar_t>
struct Block {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  static constexpr int K = 2;  // two vectors per block: enough independent work to hide latency
  static constexpr int64_t kBlock = K * Vec::size();

  template <typename T>
  static inline void load(const T* p, Vec (&out)[K]) {
    if constexpr (std::is_same_v<T, opmath_t>) {
      for (int k = 0; k < K; ++k) out[k] = Vec::loadu(p + k * Vec::size());
    } else {
      static_assert(Vectorized<T>::size() == 2 * Vec::size(), "a 16-bit vector widens into two float vectors");
      for (int k = 0; k < K; k += 2) {
        auto [lo, hi] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p + k * Vec::size()));
        out[k] = lo;
        out[k + 1] = hi;
      }
    }
  }

  template <typename T>
  static inline void store(T* p, const Vec (&in)[K]) {
    if constexpr (std::is_same_v<T, opmath_t>) {
      for (int k = 0; k < K; ++k) in[k].store(p + k * Vec::size());
    } else {
      for (int k = 0; k < K; k += 2) at::vec::convert_from_float<T>(in[k], in[k + 1]).store(p + k * Vec::size());
    }
  }

  // First-order MAML's update of a step: u <- (the block just stored at p, back in
  // opmath) - old.  Reading back what was stored gives the parameter's actual move, a
  // 16-bit store's rounding included; the block is still in L1, so no pass is added.
  static inline void store_update(opmath_t* u, const scalar_t* p, const Vec (&old)[K]) {
    Vec now[K];
    load(p, now);
    for (int k = 0; k < K; ++k) now[k] = now[k] - old[k];
    store(u, now);
  }
};

// First-order MAML's optional update buffer(s), or nullptr (opmath_t: the parameter's opmath type).
template <typename opmath_t>
inline opmath_t* update_ptr(const std::optional<at::Tensor>& update) {
  return update.has_value() ? update->data_ptr<opmath_t>() : nullptr;
}

// Elements per thread below which splitting costs more than it saves (ATen's value).
constexpr int64_t kGrain = 32768;

// Runs range(begin, end) over [0, numel) split across threads, each range at least
// kMin elements.  grain_div lowers the grain for ops that touch many streams per
// element, so a medium buffer still uses every thread.
template <int64_t kMin, typename RangeFn>
void parallel_ranges(int64_t numel, int64_t grain_div, const RangeFn& range) {
  if (numel == 0) return;
  at::parallel_for(0, numel, std::max<int64_t>(kGrain / grain_div, kMin), range);
}

// Runs block(i) for every full block and element(i) for the rest (parallel_ranges).
template <int64_t kBlock, typename BlockFn, typename ElemFn>
void parallel_blocks(int64_t numel, int64_t grain_div, const BlockFn& block, const ElemFn& element) {
  parallel_ranges<kBlock>(numel, grain_div, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kBlock <= end; i += kBlock) block(i);
    for (; i < end; ++i) element(i);
  });
}

template <typename V, typename S>
inline V broadcast(double x) {
  return V(static_cast<S>(x));
}

// ---------------------------------------------------------------- sgd_step_
// The whole blocks of [i, stop); returns where they end.  A function of its own with
// restrict pointers and local copies of the coefficients (as adam_fused_blocks), so the
// loop keeps them in registers instead of reloading them after every store.
template <typename scalar_t, bool kUpdate>
int64_t sgd_blocks(scalar_t* __restrict__ p_ptr, const scalar_t* __restrict__ g_ptr, scalar_t* __restrict__ buf_ptr,
                   at::opmath_type<scalar_t>* __restrict__ u_ptr, int64_t i, int64_t stop,
                   const SgdCoef<Vectorized<at::opmath_type<scalar_t>>>& coef) {
  using B = Block<scalar_t>;
  using Vec = typename B::Vec;
  const auto run = [&](const SgdCoef<Vec>& c) __attribute__((always_inline)) {
    // On a first step the buffer holds nothing yet (maybe uninitialised memory).
    const bool read_buf = c.has_momentum && !c.first_step, write_buf = c.has_momentum;
    for (; i + B::kBlock <= stop; i += B::kBlock) {
      Vec p[B::K], g[B::K], buf[B::K], old[B::K];
      B::load(p_ptr + i, p);
      B::load(g_ptr + i, g);
      if (read_buf) B::load(buf_ptr + i, buf);
      if constexpr (kUpdate) std::copy_n(p, B::K, old);
      for (int k = 0; k < B::K; ++k) sgd_element(p[k], g[k], buf[k], c);
      B::store(p_ptr + i, p);
      if (write_buf) B::store(buf_ptr + i, buf);
      if constexpr (kUpdate) B::store_update(u_ptr + i, p_ptr + i, old);
    }
  };
  // The common case, heavy-ball momentum after the first step, with its flags as
  // constants: the loop then has no branch but its own.
  if (coef.has_momentum && !coef.first_step && !coef.nesterov && !coef.has_weight_decay && !coef.maximize) {
    SgdCoef<Vec> plain = coef;
    plain.has_momentum = true;
    plain.first_step = plain.nesterov = plain.has_weight_decay = plain.maximize = false;
    run(plain);
  } else {
    run(coef);
  }
  return i;
}

void sgd_step_cpu(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
                  double lr, const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool first_step,
                  const std::optional<at::Tensor>& update) {
  const bool has_momentum = momentum != 0.0;
  check_sgd_buffers(param, grad, momentum_buffer, has_momentum, update, c10::DeviceType::CPU);
  const double lr_value = make_scalar(lr, lr_tensor, param, "lr").value;
  const SgdCoef<double> coef = sgd_coef(lr_value, momentum, dampening, weight_decay, nesterov, maximize, first_step);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sgd_step_cpu", [&] {
    using B = Block<scalar_t>;
    using opmath_t = typename B::opmath_t;
    using Vec = typename B::Vec;
    const auto cv = cast_coef<Vec, opmath_t>(coef);
    const auto cs = cast_coef<opmath_t, opmath_t>(coef);
    scalar_t* p_ptr = param.data_ptr<scalar_t>();
    const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
    scalar_t* buf_ptr = has_momentum ? momentum_buffer->data_ptr<scalar_t>() : nullptr;
    opmath_t* u_ptr = update_ptr<opmath_t>(update);
    with_flag(u_ptr != nullptr, [&](auto has_update) {
      constexpr bool kUpdate = decltype(has_update)::value;
      parallel_ranges<B::kBlock>(param.numel(), kUpdate ? 4 : 3, [&](int64_t begin, int64_t end) {
        int64_t i = sgd_blocks<scalar_t, kUpdate>(p_ptr, g_ptr, buf_ptr, u_ptr, begin, end, cv);
        for (; i < end; ++i) {
          const opmath_t old = p_ptr[i];
          opmath_t p = old;
          opmath_t buf = (has_momentum && !first_step) ? opmath_t(buf_ptr[i]) : opmath_t(0);
          sgd_element<opmath_t>(p, opmath_t(g_ptr[i]), buf, cs);
          p_ptr[i] = static_cast<scalar_t>(p);
          if (has_momentum) buf_ptr[i] = static_cast<scalar_t>(buf);
          if constexpr (kUpdate) u_ptr[i] = opmath_t(p_ptr[i]) - old;
        }
      });
    });
  });
}

// ---------------------------------------------------------------- adam_step_
// Two arithmetics, one per torch.optim.Adam implementation a user can name on the CPU.
//
// For-loop (torch.optim.Adam(foreach=False), also what foreach=True computes on the
// CPU): the square root is taken by torch's own sqrt kernel, chunk by chunk while the
// chunk is in cache: on some CPUs (MKL's vector math) torch's float32/float64 sqrt is
// not correctly rounded, and the for-loop Adam uses it, so an exact sqrt here would
// differ from torch in the last bit of about one element in a hundred.
//
// Fused (torch.optim.Adam(fused=True)): one pass, a correctly rounded vector square
// root, each tensor's scalar tail by its own rule (element_math.h), so it runs at the
// memory's speed.
constexpr int64_t kSqrtChunk = 32768;

// The vector width, in bytes, of the at::vec kernels torch dispatches to on this CPU:
// torch's fused Adam computes each tensor's last numel % (this / element size)
// elements in its scalar loop.  (This copy of the kernels may be compiled for a
// narrower vector than torch's own choice, AVX512, so it is not sizeof(Vectorized).)
inline int64_t torch_vector_bytes() {
  static const int64_t bytes = at::get_cpu_capability() == "AVX512" ? 64 : 32;
  return bytes;
}

// How torch's fused Adam computes each element of a flat buffer: by the vector rule, in
// a tensor's scalar tail, or not at all (outside every tensor: padding is left as it
// is, and its update, when recorded, is 0).
enum class FusedRule : uint8_t { kVector, kTail, kSkip };

struct FusedPiece {
  int64_t start;  // the piece runs to the next piece's start (the last one to the buffer's end)
  FusedRule rule;
};

// The pieces of a buffer of numel elements, in order.  spans: (offset, numel) pairs of
// the tensors it packs (absent: the whole buffer is one tensor); width: the elements of
// one of torch's vectors, so a tensor's scalar tail is its last numel % width elements.
inline std::vector<FusedPiece> fused_pieces(at::OptionalIntArrayRef spans, int64_t numel, int64_t width) {
  std::vector<FusedPiece> pieces;
  const auto add = [&](int64_t offset, int64_t n) {
    const int64_t r = n % width;
    if (n > r) pieces.push_back({offset, FusedRule::kVector});
    if (r != 0) pieces.push_back({offset + n - r, FusedRule::kTail});
  };
  if (!spans.has_value()) {
    add(0, numel);
    return pieces;
  }
  const auto s = *spans;
  TORCH_CHECK(s.size() % 2 == 0, "adam_step_: spans must hold (offset, numel) pairs, got ", s.size(), " values");
  int64_t previous_end = 0;
  for (size_t k = 0; k < s.size(); k += 2) {
    const int64_t offset = s[k], n = s[k + 1];
    TORCH_CHECK(offset >= previous_end && n >= 0 && offset + n <= numel,
                "adam_step_: spans must be (offset, numel) pairs of tensors in buffer order, inside the buffer of ",
                numel, " elements; got (", offset, ", ", n, ") after a tensor ending at ", previous_end);
    if (offset > previous_end) pieces.push_back({previous_end, FusedRule::kSkip});
    add(offset, n);
    previous_end = offset + n;
  }
  if (previous_end < numel) pieces.push_back({previous_end, FusedRule::kSkip});
  return pieces;
}

// The whole blocks of [i, stop) by the fused vector rule; returns where they end.  A
// function of its own with restrict pointers and local copies of the coefficients, so
// the loop keeps them in registers instead of reloading them after every store.
template <typename scalar_t, bool kUpdate>
int64_t adam_fused_blocks(scalar_t* __restrict__ p_ptr, const scalar_t* __restrict__ g_ptr,
                          scalar_t* __restrict__ m_ptr, scalar_t* __restrict__ v_ptr,
                          scalar_t* __restrict__ vmax_ptr, at::opmath_type<scalar_t>* __restrict__ u_ptr, int64_t i,
                          int64_t stop, const AdamCoef<Vectorized<at::opmath_type<scalar_t>>>& coef) {
  using B = Block<scalar_t>;
  using Vec = typename B::Vec;
  const Vec one(1);
  const auto run = [&](const AdamCoef<Vec>& c) __attribute__((always_inline)) {
    for (; i + B::kBlock <= stop; i += B::kBlock) {
      Vec p[B::K], g[B::K], m[B::K], v[B::K], vmax[B::K], old[B::K];
      B::load(p_ptr + i, p);
      B::load(g_ptr + i, g);
      B::load(m_ptr + i, m);
      B::load(v_ptr + i, v);
      if (c.amsgrad) B::load(vmax_ptr + i, vmax);
      if constexpr (kUpdate) std::copy_n(p, B::K, old);
      Vec second[B::K];
      for (int k = 0; k < B::K; ++k) second[k] = adam_moments(p[k], g[k], m[k], v[k], vmax[k], c, one);
      B::store(m_ptr + i, m);
      B::store(v_ptr + i, v);
      if (c.amsgrad) B::store(vmax_ptr + i, vmax);
      for (int k = 0; k < B::K; ++k) adam_param(p[k], m[k], Math<Vec>::sqrt(second[k]), c);
      B::store(p_ptr + i, p);
      if constexpr (kUpdate) B::store_update(u_ptr + i, p_ptr + i, old);
    }
  };
  // The common cases, no weight decay, no maximize and a weight 1 - beta1 below 0.5, with
  // amsgrad or without, get their flags as constants: a loop with no branch but its own.
  if (!coef.has_weight_decay && !coef.maximize && coef.lerp_low) {
    AdamCoef<Vec> plain = coef;
    plain.has_weight_decay = plain.maximize = false;
    plain.lerp_low = true;
    if (coef.amsgrad) {
      plain.amsgrad = true;
      run(plain);
    } else {
      plain.amsgrad = false;
      run(plain);
    }
  } else {
    run(coef);
  }
  return i;
}

template <typename scalar_t, bool kUpdate>
void adam_fused_loop(scalar_t* p_ptr, const scalar_t* g_ptr, scalar_t* m_ptr, scalar_t* v_ptr, scalar_t* vmax_ptr,
                     at::opmath_type<scalar_t>* u_ptr, int64_t numel, const AdamCoef<double>& coef, bool amsgrad,
                     const std::vector<FusedPiece>& pieces) {
  using B = Block<scalar_t>;
  using opmath_t = typename B::opmath_t;
  const auto cv = cast_coef<typename B::Vec, opmath_t>(coef);
  const auto cs = cast_coef<opmath_t, opmath_t>(coef);
  const opmath_t one(1);
  // Elements [i, stop) by the vector rule: whole blocks, then the same rule on scalars.
  const auto vector_rule = [&](int64_t i, int64_t stop) {
    i = adam_fused_blocks<scalar_t, kUpdate>(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, u_ptr, i, stop, cv);
    for (; i < stop; ++i) {
      const opmath_t old = p_ptr[i];
      opmath_t p = old, m = m_ptr[i], v = v_ptr[i];
      opmath_t vmax = amsgrad ? opmath_t(vmax_ptr[i]) : opmath_t(0);
      adam_element<opmath_t>(p, opmath_t(g_ptr[i]), m, v, vmax, cs, one);
      p_ptr[i] = static_cast<scalar_t>(p);
      m_ptr[i] = static_cast<scalar_t>(m);
      v_ptr[i] = static_cast<scalar_t>(v);
      if (amsgrad) vmax_ptr[i] = static_cast<scalar_t>(vmax);
      if constexpr (kUpdate) u_ptr[i] = opmath_t(p_ptr[i]) - old;
    }
  };
  // Elements [i, stop) of a tensor's scalar tail.
  const auto tail_rule = [&](int64_t i, int64_t stop) {
    for (; i < stop; ++i) {
      const opmath_t old = p_ptr[i];
      opmath_t p = old, m = m_ptr[i], v = v_ptr[i];
      opmath_t vmax = amsgrad ? opmath_t(vmax_ptr[i]) : opmath_t(0);
      adam_element_fused_tail<opmath_t>(p, opmath_t(g_ptr[i]), m, v, vmax, cs, one);
      p_ptr[i] = static_cast<scalar_t>(p);
      m_ptr[i] = static_cast<scalar_t>(m);
      v_ptr[i] = static_cast<scalar_t>(v);
      if (amsgrad) vmax_ptr[i] = static_cast<scalar_t>(vmax);
      if constexpr (kUpdate) u_ptr[i] = opmath_t(p_ptr[i]) - old;
    }
  };
  if (pieces.empty()) return;
  parallel_ranges<B::kBlock>(numel, 6, [&](int64_t begin, int64_t end) {
    // The piece holding begin, then each next piece up to end.
    auto it = std::upper_bound(pieces.begin(), pieces.end(), begin,
                               [](int64_t x, const FusedPiece& piece) { return x < piece.start; });
    size_t k = size_t(it - pieces.begin()) - 1;
    for (int64_t i = begin; i < end; ++k) {
      const int64_t stop = std::min(k + 1 < pieces.size() ? pieces[k + 1].start : numel, end);
      switch (pieces[k].rule) {
        case FusedRule::kVector: vector_rule(i, stop); break;
        case FusedRule::kTail: tail_rule(i, stop); break;
        case FusedRule::kSkip:
          if constexpr (kUpdate) std::fill(u_ptr + i, u_ptr + stop, opmath_t(0));
          break;
      }
      i = stop;
    }
  });
}

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq, double step,
                   const std::optional<at::Tensor>& step_tensor, double lr, const std::optional<at::Tensor>& lr_tensor,
                   double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                   const std::optional<at::Tensor>& update, bool fused, at::OptionalIntArrayRef spans) {
  check_adam_buffers(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad, update, c10::DeviceType::CPU);
  const auto dt = param.scalar_type();
  const ScalarArg step_arg = make_scalar(step, step_tensor, param, "step");
  check_step(step_arg);
  const double step_value = step_arg.value;
  const double lr_value = make_scalar(lr, lr_tensor, param, "lr").value;
  const AdamCoef<double> coef =
      adam_coef(lr_value, step_value, beta1, beta2, eps, weight_decay, amsgrad, maximize);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "adam_step_cpu", [&] {
    using B = Block<scalar_t>;
    using opmath_t = typename B::opmath_t;
    using Vec = typename B::Vec;
    scalar_t* p_ptr = param.data_ptr<scalar_t>();
    const scalar_t* g_ptr = grad.const_data_ptr<scalar_t>();
    scalar_t* m_ptr = exp_avg.data_ptr<scalar_t>();
    scalar_t* v_ptr = exp_avg_sq.data_ptr<scalar_t>();
    scalar_t* vmax_ptr = amsgrad ? max_exp_avg_sq->data_ptr<scalar_t>() : nullptr;
    opmath_t* u_ptr = update_ptr<opmath_t>(update);
    const int64_t numel = param.numel();
    if (fused) {
      const auto pieces = fused_pieces(spans, numel, torch_vector_bytes() / int64_t(sizeof(scalar_t)));
      with_flag(u_ptr != nullptr, [&](auto has_update) {
        adam_fused_loop<scalar_t, decltype(has_update)::value>(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, u_ptr, numel,
                                                               coef, amsgrad, pieces);
      });
      return;
    }
    if (numel == 0) return;
    const auto cv = cast_coef<Vec, opmath_t>(coef);
    const auto cs = cast_coef<opmath_t, opmath_t>(coef);
    const Vec one_v(opmath_t(1));
    const auto opmath_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<opmath_t>::value);
    // The parameter update reads the first moment in opmath: for float32/float64 that is
    // the stored exp_avg itself, re-read while in cache; 16-bit moments are stored rounded,
    // so their opmath values are kept beside the square roots.
    constexpr bool kKeepM = !std::is_same_v<scalar_t, opmath_t>;
    with_flag(u_ptr != nullptr, [&](auto has_update) {
      constexpr bool kUpdate = decltype(has_update)::value;
      parallel_ranges<kSqrtChunk>(numel, 6, [&](int64_t begin, int64_t end) {
        // Per chunk, in cache: the second moment, then its square root (and 16-bit m in opmath).
        std::vector<opmath_t> root(kSqrtChunk), m_op(kKeepM ? kSqrtChunk : 0);
        for (int64_t start = begin; start < end; start += kSqrtChunk) {
          const int64_t len = std::min(kSqrtChunk, end - start);
          const opmath_t* m_read = kKeepM ? m_op.data() : reinterpret_cast<const opmath_t*>(m_ptr + start);
          int64_t j = 0;
          for (; j + B::kBlock <= len; j += B::kBlock) {
            const int64_t i = start + j;
            Vec p[B::K], g[B::K], m[B::K], v[B::K], vmax[B::K], second[B::K];
            B::load(p_ptr + i, p);
            B::load(g_ptr + i, g);
            B::load(m_ptr + i, m);
            B::load(v_ptr + i, v);
            if (amsgrad) B::load(vmax_ptr + i, vmax);
            for (int k = 0; k < B::K; ++k) second[k] = adam_moments(p[k], g[k], m[k], v[k], vmax[k], cv, one_v);
            B::store(m_ptr + i, m);
            B::store(v_ptr + i, v);
            if (amsgrad) B::store(vmax_ptr + i, vmax);
            if constexpr (kKeepM) B::store(m_op.data() + j, m);
            B::store(root.data() + j, second);
          }
          for (; j < len; ++j) {
            const int64_t i = start + j;
            opmath_t m = m_ptr[i], v = v_ptr[i];
            opmath_t vmax = amsgrad ? opmath_t(vmax_ptr[i]) : opmath_t(0);
            root[j] = adam_moments<opmath_t>(opmath_t(p_ptr[i]), opmath_t(g_ptr[i]), m, v, vmax, cs, opmath_t(1));
            if constexpr (kKeepM) m_op[j] = m;
            m_ptr[i] = static_cast<scalar_t>(m);
            v_ptr[i] = static_cast<scalar_t>(v);
            if (amsgrad) vmax_ptr[i] = static_cast<scalar_t>(vmax);
          }
          at::Tensor r = at::from_blob(root.data(), {len}, opmath_options);
          at::sqrt_out(r, r);
          // The parameter moves here, so this loop records the update.
          j = 0;
          for (; j + B::kBlock <= len; j += B::kBlock) {
            const int64_t i = start + j;
            Vec p[B::K], m[B::K], rt[B::K], old[B::K];
            B::load(p_ptr + i, p);
            B::load(m_read + j, m);
            B::load(root.data() + j, rt);
            if constexpr (kUpdate) std::copy_n(p, B::K, old);
            for (int k = 0; k < B::K; ++k) adam_param(p[k], m[k], rt[k], cv);
            B::store(p_ptr + i, p);
            if constexpr (kUpdate) B::store_update(u_ptr + i, p_ptr + i, old);
          }
          for (; j < len; ++j) {
            const int64_t i = start + j;
            const opmath_t old = p_ptr[i];
            opmath_t p = old;
            adam_param<opmath_t>(p, m_read[j], root[j], cs);
            p_ptr[i] = static_cast<scalar_t>(p);
            if constexpr (kUpdate) u_ptr[i] = opmath_t(p_ptr[i]) - old;
          }
        }
      });
    });
  });
}

// ---------------------------------------------------------------- task_end_
void task_end_cpu(const at::Tensor& param, const at::Tensor& anchor, const at::Tensor& acc,
                  const std::optional<at::Tensor>& update) {
  check_task_buffers(param, anchor, acc, c10::DeviceType::CPU);
  check_update(update, param);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "task_end_cpu", [&] {
    using B = Block<scalar_t>;
    using opmath_t = typename B::opmath_t;
    using Vec = typename B::Vec;
    scalar_t* p_ptr = param.data_ptr<scalar_t>();
    const scalar_t* a_ptr = anchor.const_data_ptr<scalar_t>();
    opmath_t* acc_ptr = acc.data_ptr<opmath_t>();
    const opmath_t* u_ptr = update_ptr<opmath_t>(update);
    with_flag(u_ptr != nullptr, [&](auto has_update) {
      constexpr bool kUpdate = decltype(has_update)::value;
      parallel_blocks<B::kBlock>(
          param.numel(), 3,
          [&](int64_t i) {
            // The task's end point: the adapted weights, or (first-order MAML) anchor +
            // update, rounded in opmath before it is added; param is then not read.
            Vec end[B::K], s[B::K];
            if constexpr (kUpdate) {
              Vec u[B::K];
              B::load(a_ptr + i, end);
              B::load(u_ptr + i, u);
              for (int k = 0; k < B::K; ++k) end[k] = end[k] + u[k];
            } else {
              B::load(p_ptr + i, end);
            }
            B::load(acc_ptr + i, s);
            for (int k = 0; k < B::K; ++k) task_end_element(s[k], end[k]);
            B::store(acc_ptr + i, s);
            std::copy_n(a_ptr + i, B::kBlock, p_ptr + i);
          },
          [&](int64_t i) {
            opmath_t s = acc_ptr[i];
            const opmath_t end = kUpdate ? opmath_t(a_ptr[i]) + u_ptr[i] : opmath_t(p_ptr[i]);
            task_end_element<opmath_t>(s, end);
            acc_ptr[i] = s;
            p_ptr[i] = a_ptr[i];
          });
    });
  });
}

// ---------------------------------------------------------------- meta_update_
void meta_update_cpu(const at::Tensor& param, const at::Tensor& anchor, const at::Tensor& acc, double meta_lr,
                     const std::optional<at::Tensor>& meta_lr_tensor, double n,
                     const std::optional<at::Tensor>& n_tensor) {
  check_task_buffers(param, anchor, acc, c10::DeviceType::CPU);
  const double lr_value = make_scalar(meta_lr, meta_lr_tensor, param, "meta_lr").value;
  const ScalarArg n_arg = make_scalar(n, n_tensor, param, "n");
  check_task_count(n_arg);
  const double n_value = n_arg.value;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "meta_update_cpu", [&] {
    using B = Block<scalar_t>;
    using opmath_t = typename B::opmath_t;
    using Vec = typename B::Vec;
    const Vec lr_v = broadcast<Vec, opmath_t>(lr_value), n_v = broadcast<Vec, opmath_t>(n_value);
    const opmath_t lr_s = static_cast<opmath_t>(lr_value), n_s = static_cast<opmath_t>(n_value);
    scalar_t* p_ptr = param.data_ptr<scalar_t>();
    const scalar_t* a_ptr = anchor.const_data_ptr<scalar_t>();
    opmath_t* acc_ptr = acc.data_ptr<opmath_t>();
    parallel_blocks<B::kBlock>(
        param.numel(), 3,
        [&](int64_t i) {
          Vec a[B::K], s[B::K], out[B::K];
          B::load(a_ptr + i, a);
          B::load(acc_ptr + i, s);
          for (int k = 0; k < B::K; ++k) {
            out[k] = meta_element(a[k], s[k], lr_v, n_v);
            s[k] = Vec(opmath_t(0));
          }
          B::store(p_ptr + i, out);
          B::store(acc_ptr + i, s);
        },
        [&](int64_t i) {
          p_ptr[i] = static_cast<scalar_t>(meta_element<opmath_t>(a_ptr[i], acc_ptr[i], lr_s, n_s));
          acc_ptr[i] = opmath_t(0);
        });
  });
}

// ---------------------------------------------------------------- batched_meta_update_
void batched_meta_update_cpu(const at::Tensor& theta, const at::Tensor& tasks, double meta_lr,
                             const std::optional<at::Tensor>& meta_lr_tensor, bool write_back,
                             const std::optional<at::Tensor>& updates) {
  check_batched_buffers(theta, tasks, c10::DeviceType::CPU);
  check_batched_updates(updates, theta, tasks);
  const double lr_value = make_scalar(meta_lr, meta_lr_tensor, theta, "meta_lr").value;
  const int64_t rows = tasks.size(0);
  const int64_t P = theta.numel();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "batched_meta_update_cpu", [&] {
    using B = Block<scalar_t>;
    using opmath_t = typename B::opmath_t;
    using Vec = typename B::Vec;
    const Vec lr_v = broadcast<Vec, opmath_t>(lr_value), n_v = broadcast<Vec, opmath_t>(double(rows));
    const opmath_t lr_s = static_cast<opmath_t>(lr_value), n_s = static_cast<opmath_t>(rows);
    scalar_t* t_ptr = theta.data_ptr<scalar_t>();
    scalar_t* rows_ptr = tasks.data_ptr<scalar_t>();
    const opmath_t* u_ptr = update_ptr<opmath_t>(updates);
    with_flag(u_ptr != nullptr, [&](auto has_updates) {
      constexpr bool kUpdates = decltype(has_updates)::value;
      parallel_blocks<B::kBlock>(
          P, rows + 1,
          [&](int64_t i) {
            Vec total[B::K], row[B::K], t[B::K];
            B::load(t_ptr + i, t);
            // Row r counts as its adapted copy or (first-order MAML) as theta + updates[r],
            // rounded in opmath before it is summed; the rows are then not read.
            const auto load_row = [&](int64_t r, Vec (&out)[B::K]) {
              if constexpr (kUpdates) {
                B::load(u_ptr + r * P + i, out);
                for (int k = 0; k < B::K; ++k) out[k] = t[k] + out[k];
              } else {
                B::load(rows_ptr + r * P + i, out);
              }
            };
            // Row 0 first, then each later row in order: the summation order of the contract.
            load_row(0, total);
            for (int64_t r = 1; r < rows; ++r) {
              load_row(r, row);
              for (int k = 0; k < B::K; ++k) total[k] = total[k] + row[k];
            }
            for (int k = 0; k < B::K; ++k) t[k] = meta_element(t[k], total[k], lr_v, n_v);
            B::store(t_ptr + i, t);
            // The rows get the stored (rounded) theta, as the reference's copy does.
            if (write_back)
              for (int64_t r = 0; r < rows; ++r) std::copy_n(t_ptr + i, B::kBlock, rows_ptr + r * P + i);
          },
          [&](int64_t i) {
            const opmath_t t = t_ptr[i];
            const auto row = [&](int64_t r) {
              return kUpdates ? t + u_ptr[r * P + i] : opmath_t(rows_ptr[r * P + i]);
            };
            opmath_t total = row(0);
            for (int64_t r = 1; r < rows; ++r) total = total + row(r);
            const scalar_t out = static_cast<scalar_t>(meta_element<opmath_t>(t, total, lr_s, n_s));
            t_ptr[i] = out;
            if (write_back)
              for (int64_t r = 0; r < rows; ++r) rows_ptr[r * P + i] = out;
          });
    });
  });
}

}  // namespace

const CpuKernels* RF_CPU_TABLE() {
  static const CpuKernels table{&sgd_step_cpu, &adam_step_cpu, &task_end_cpu, &meta_update_cpu,
                                &batched_meta_update_cpu};
  return &table;
}

}  // namespace reptile_fused
