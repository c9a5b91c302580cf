// CUDA kernels: one grid-stride kernel launch per op and flat buffer.
//
// Each thread handles 16 bytes of the storage dtype at a time (one 128-bit load or
// store per buffer) when every buffer is 16-byte aligned, and single elements
// otherwise; the last numel % VEC elements run the same rule on single elements.
// Per element it calls the rules of element_math.h, the code the CPU tests check.
//
// Graph safety: kernels go on the current stream, nothing is allocated, nothing
// synchronises with the host, and scalars given as device tensors (lr, meta_lr, n,
// step) are read inside the kernel, so a captured graph replays with their
// current values.  Only c10/cuda headers are used: ATen/cuda/CUDAContext.h pulls
// in cuSPARSE headers that some toolkits lack.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

#include "../checks.h"
#include "../element_math.h"
#include "../grid.h"

namespace reptile_fused {
namespace {

constexpr int kThreads = grid::kThreads;
constexpr int kMaxDevices = 64;

// N elements moved as one access: one 128-bit transaction when N * sizeof(T) == 16
// (two for float accumulators next to 16-bit parameters, hence the cap).
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

__device__ __forceinline__ double load_scalar(const ScalarArg& s) {
  if (s.ptr == nullptr) return s.value;
  switch (s.kind) {
    case 0: return static_cast<double>(*static_cast<const float*>(s.ptr));
    case 1: return *static_cast<const double*>(s.ptr);
    case 2: return static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(s.ptr)));
    default: return static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(s.ptr)));
  }
}

inline bool aligned16(const void* p) { return grid::aligned16(reinterpret_cast<std::uintptr_t>(p)); }

// First-order MAML's optional update buffer(s) of a scalar_t op, in its opmath type, or nullptr.
template <typename scalar_t>
at::opmath_type<scalar_t>* update_ptr(const std::optional<at::Tensor>& update) {
  return update.has_value() ? update->data_ptr<at::opmath_type<scalar_t>>() : nullptr;
}

// SM count per device, asked once (not a stream operation, so capture-safe anyway).
int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Grid-stride over [0, numel): VEC-wide accesses, then a single-element tail (the
// index arithmetic is grid.h's, which a CPU test runs over an emulated grid).  The op
// computes its per-thread coefficients once (prepare), reading device scalars.
template <int VEC, typename Op>
__global__ void __launch_bounds__(kThreads) flat_kernel(const Op op, int64_t numel) {
  const auto coef = op.prepare();
  const grid::Thread t = grid::thread_of(blockIdx.x, blockDim.x, gridDim.x, threadIdx.x);
  grid::for_each<VEC>(numel, t, [&](int64_t i, auto width) { op.template apply<decltype(width)::value>(i, coef); });
}

// Launches flat_kernel on the current stream: 16-byte accesses when `aligned`.
template <typename scalar_t, typename Op>
void launch(const Op& op, int64_t numel, bool aligned, const at::Tensor& like) {
  if (numel == 0) return;
  constexpr int kVec = grid::vec_of(sizeof(scalar_t));
  const c10::cuda::CUDAGuard guard(like.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index());
  // Enough resident threads to saturate memory (8 blocks of 256 per SM), no more:
  // the grid-stride loop covers the rest.
  const int blocks = static_cast<int>(grid::blocks_for(numel, aligned, kVec, sm_count(like.device().index())));
  if (aligned) {
    flat_kernel<kVec><<<blocks, kThreads, 0, stream>>>(op, numel);
  } else {
    flat_kernel<1><<<blocks, kThreads, 0, stream>>>(op, numel);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// First-order MAML's update of a step: the stored (rounded) new value minus the old
// one, both in opmath.
template <int N, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void store_update(opmath_t* u, const Pack<scalar_t, N>& now,
                                             const Pack<scalar_t, N>& old) {
  Pack<opmath_t, N> uv;
#pragma unroll
  for (int k = 0; k < N; ++k) uv.v[k] = static_cast<opmath_t>(now.v[k]) - static_cast<opmath_t>(old.v[k]);
  store_pack<N>(u, uv);
}

// ---------------------------------------------------------------- ops
// kUpdate (sgd_step_, adam_step_): the op also writes first-order MAML's update,
// opmath(stored new param) - opmath(old param), as one more store stream.  A template
// parameter, so the kernel without it is the code it was before.
template <typename scalar_t, bool kUpdate>
struct SgdOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* g;
  scalar_t* buf;
  opmath_t* update;
  SgdCoef<double> coef;
  ScalarArg lr;

  __device__ SgdCoef<opmath_t> prepare() const {
    SgdCoef<double> c = coef;
    c.minus_lr = -load_scalar(lr);
    return cast_coef<opmath_t, opmath_t>(c);
  }

  template <int N>
  __device__ void apply(int64_t i, const SgdCoef<opmath_t>& c) const {
    Pack<scalar_t, N> pv = load_pack<N>(p + i);
    [[maybe_unused]] const Pack<scalar_t, N> old = pv;  // kUpdate's reference point (dead without it)
    const Pack<scalar_t, N> gv = load_pack<N>(g + i);
    // On a first step the momentum buffer holds nothing yet: it is written, not read.
    const bool read_buf = c.has_momentum && !c.first_step;
    Pack<scalar_t, N> bv;
    if (read_buf) bv = load_pack<N>(buf + i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      opmath_t pk = static_cast<opmath_t>(pv.v[k]);
      opmath_t bk = read_buf ? static_cast<opmath_t>(bv.v[k]) : opmath_t(0);
      sgd_element<opmath_t>(pk, static_cast<opmath_t>(gv.v[k]), bk, c);
      pv.v[k] = static_cast<scalar_t>(pk);
      bv.v[k] = static_cast<scalar_t>(bk);
    }
    store_pack<N>(p + i, pv);
    if (c.has_momentum) store_pack<N>(buf + i, bv);
    if constexpr (kUpdate) store_update<N>(update + i, pv, old);
  }
};

struct AdamArgs {
  double beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize;
};

template <typename scalar_t, bool kUpdate>
struct AdamOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* g;
  scalar_t* m;
  scalar_t* v;
  scalar_t* vmax;
  AdamArgs args;
  ScalarArg step, lr;
  opmath_t* update;  // kUpdate only

  __device__ AdamCoef<opmath_t> prepare() const {
    const AdamCoef<double> c = adam_coef(load_scalar(lr), load_scalar(step), args.beta1, args.beta2, args.eps,
                                         args.weight_decay, args.amsgrad, args.maximize);
    return cast_coef<opmath_t, opmath_t>(c);
  }

  template <int N>
  __device__ void apply(int64_t i, const AdamCoef<opmath_t>& c) const {
    Pack<scalar_t, N> pv = load_pack<N>(p + i);
    [[maybe_unused]] const Pack<scalar_t, N> old = pv;  // kUpdate's reference point (dead without it)
    const Pack<scalar_t, N> gv = load_pack<N>(g + i);
    Pack<scalar_t, N> mv = load_pack<N>(m + i);
    Pack<scalar_t, N> vv = load_pack<N>(v + i);
    Pack<scalar_t, N> xv;
    if (c.amsgrad) xv = load_pack<N>(vmax + i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      opmath_t pk = static_cast<opmath_t>(pv.v[k]);
      opmath_t mk = static_cast<opmath_t>(mv.v[k]);
      opmath_t vk = static_cast<opmath_t>(vv.v[k]);
      opmath_t xk = c.amsgrad ? static_cast<opmath_t>(xv.v[k]) : opmath_t(0);
      adam_element<opmath_t>(pk, static_cast<opmath_t>(gv.v[k]), mk, vk, xk, c, opmath_t(1));
      pv.v[k] = static_cast<scalar_t>(pk);
      mv.v[k] = static_cast<scalar_t>(mk);
      vv.v[k] = static_cast<scalar_t>(vk);
      xv.v[k] = static_cast<scalar_t>(xk);
    }
    store_pack<N>(p + i, pv);
    store_pack<N>(m + i, mv);
    store_pack<N>(v + i, vv);
    if (c.amsgrad) store_pack<N>(vmax + i, xv);
    if constexpr (kUpdate) store_update<N>(update + i, pv, old);
  }
};

struct NoCoef {};

// kUpdate (first-order MAML): the task ended at anchor + update (rounded in opmath
// before it is added), and the parameter is not read.
template <typename scalar_t, bool kUpdate>
struct TaskEndOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* anchor;
  opmath_t* acc;
  const opmath_t* update;

  __device__ NoCoef prepare() const { return {}; }

  template <int N>
  __device__ void apply(int64_t i, NoCoef) const {
    if constexpr (kUpdate) {
      const Pack<scalar_t, N> av = load_pack<N>(anchor + i);
      const Pack<opmath_t, N> uv = load_pack<N>(update + i);
      Pack<opmath_t, N> sv = load_pack<N>(acc + i);
#pragma unroll
      for (int k = 0; k < N; ++k) task_end_element<opmath_t>(sv.v[k], static_cast<opmath_t>(av.v[k]) + uv.v[k]);
      store_pack<N>(acc + i, sv);
      store_pack<N>(p + i, av);
    } else {
      const Pack<scalar_t, N> pv = load_pack<N>(p + i);
      Pack<opmath_t, N> sv = load_pack<N>(acc + i);
#pragma unroll
      for (int k = 0; k < N; ++k) task_end_element<opmath_t>(sv.v[k], static_cast<opmath_t>(pv.v[k]));
      store_pack<N>(acc + i, sv);
      store_pack<N>(p + i, load_pack<N>(anchor + i));
    }
  }
};

template <typename opmath_t>
struct MetaCoef {
  opmath_t meta_lr, n;
};

template <typename scalar_t>
struct MetaUpdateOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* anchor;
  opmath_t* acc;
  ScalarArg meta_lr, n;

  __device__ MetaCoef<opmath_t> prepare() const {
    return {static_cast<opmath_t>(load_scalar(meta_lr)), static_cast<opmath_t>(load_scalar(n))};
  }

  template <int N>
  __device__ void apply(int64_t i, const MetaCoef<opmath_t>& c) const {
    const Pack<scalar_t, N> av = load_pack<N>(anchor + i);
    Pack<opmath_t, N> sv = load_pack<N>(acc + i);
    Pack<scalar_t, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      out.v[k] = static_cast<scalar_t>(meta_element<opmath_t>(static_cast<opmath_t>(av.v[k]), sv.v[k], c.meta_lr, c.n));
      sv.v[k] = opmath_t(0);
    }
    store_pack<N>(p + i, out);
    store_pack<N>(acc + i, sv);
  }
};

// kUpdates (first-order MAML): row r counts as theta + updates[r] (rounded in opmath
// before it is summed), and the rows are not read (still written with write_back).
template <typename scalar_t, bool kUpdates>
struct BatchedMetaOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* theta;
  scalar_t* rows;
  const opmath_t* updates;
  int64_t n_rows, P;
  bool write_back;
  ScalarArg meta_lr;

  __device__ MetaCoef<opmath_t> prepare() const {
    return {static_cast<opmath_t>(load_scalar(meta_lr)), static_cast<opmath_t>(n_rows)};
  }

  // Row r at i..i+N as stored: the adapted copy, or (kUpdates) the update.
  template <int N>
  __device__ __forceinline__ auto load_row(int64_t r, int64_t i) const {
    if constexpr (kUpdates) {
      return load_pack<N>(updates + grid::row_offset(r, P, i));
    } else {
      return load_pack<N>(rows + grid::row_offset(r, P, i));
    }
  }

  template <int N>
  __device__ void apply(int64_t i, const MetaCoef<opmath_t>& c) const {
    Pack<scalar_t, N> tv;
    opmath_t t[N];  // theta in opmath, read before the rows only when they are theta + updates
    if constexpr (kUpdates) {
      tv = load_pack<N>(theta + i);
#pragma unroll
      for (int k = 0; k < N; ++k) t[k] = static_cast<opmath_t>(tv.v[k]);
    }
    // A row's element k in opmath: the copy's, or theta + update rounded in opmath.
    const auto value = [&](auto stored, int k) {
      if constexpr (kUpdates) {
        return t[k] + stored;
      } else {
        return static_cast<opmath_t>(stored);
      }
    };
    // The row sum stays in registers; row 0 first, then each later row in order.
    opmath_t total[N];
    {
      const auto rv = load_row<N>(0, i);
#pragma unroll
      for (int k = 0; k < N; ++k) total[k] = value(rv.v[k], k);
    }
    for (int64_t r = 1; r < n_rows; ++r) {
      const auto rv = load_row<N>(r, i);
#pragma unroll
      for (int k = 0; k < N; ++k) total[k] = total[k] + value(rv.v[k], k);
    }
    if constexpr (!kUpdates) tv = load_pack<N>(theta + i);
#pragma unroll
    for (int k = 0; k < N; ++k)
      tv.v[k] = static_cast<scalar_t>(meta_element<opmath_t>(static_cast<opmath_t>(tv.v[k]), total[k], c.meta_lr, c.n));
    store_pack<N>(theta + i, tv);
    if (write_back)
      for (int64_t r = 0; r < n_rows; ++r) store_pack<N>(rows + grid::row_offset(r, P, i), tv);
  }
};

// ---------------------------------------------------------------- entry points
void sgd_step_cuda(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
                   double lr, const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, bool first_step,
                   const std::optional<at::Tensor>& update) {
  const bool has_momentum = momentum != 0.0;
  check_sgd_buffers(param, grad, momentum_buffer, has_momentum, update, c10::DeviceType::CUDA);
  const ScalarArg lr_arg = make_scalar(lr, lr_tensor, param, "lr");
  const SgdCoef<double> coef = sgd_coef(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sgd_step_cuda", [&] {
    with_flag(update.has_value(), [&](auto has_update) {
      constexpr bool kUpdate = decltype(has_update)::value;
      SgdOp<scalar_t, kUpdate> op{param.data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                  has_momentum ? momentum_buffer->data_ptr<scalar_t>() : nullptr,
                                  update_ptr<scalar_t>(update), coef, lr_arg};
      const bool aligned = aligned16(op.p) && aligned16(op.g) && (!has_momentum || aligned16(op.buf)) &&
                           (!kUpdate || aligned16(op.update));
      launch<scalar_t>(op, param.numel(), aligned, param);
    });
  });
}

void adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq, double step,
                    const std::optional<at::Tensor>& step_tensor, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                    double weight_decay, bool amsgrad, bool maximize, const std::optional<at::Tensor>& update,
                    bool fused, at::OptionalIntArrayRef spans) {
  // `fused` and `spans` select torch's fused CPU arithmetic (a correctly rounded square
  // root, each tensor's scalar tail); this kernel's square root is correctly rounded
  // already and its contract is torch's operation order within a few ulp, so both
  // arithmetics run the same kernel here.
  (void)fused;
  (void)spans;
  check_adam_buffers(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad, update, c10::DeviceType::CUDA);
  const auto dt = param.scalar_type();
  const ScalarArg step_arg = make_scalar(step, step_tensor, param, "step");
  check_step(step_arg);
  const ScalarArg lr_arg = make_scalar(lr, lr_tensor, param, "lr");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "adam_step_cuda", [&] {
    with_flag(update.has_value(), [&](auto has_update) {
      constexpr bool kUpdate = decltype(has_update)::value;
      AdamOp<scalar_t, kUpdate> op{param.data_ptr<scalar_t>(),
                                   grad.const_data_ptr<scalar_t>(),
                                   exp_avg.data_ptr<scalar_t>(),
                                   exp_avg_sq.data_ptr<scalar_t>(),
                                   amsgrad ? max_exp_avg_sq->data_ptr<scalar_t>() : nullptr,
                                   AdamArgs{beta1, beta2, eps, weight_decay, amsgrad, maximize},
                                   step_arg,
                                   lr_arg,
                                   update_ptr<scalar_t>(update)};
      const bool aligned = aligned16(op.p) && aligned16(op.g) && aligned16(op.m) && aligned16(op.v) &&
                           (!amsgrad || aligned16(op.vmax)) && (!kUpdate || aligned16(op.update));
      launch<scalar_t>(op, param.numel(), aligned, param);
    });
  });
}

void task_end_cuda(const at::Tensor& param, const at::Tensor& anchor, const at::Tensor& acc,
                   const std::optional<at::Tensor>& update) {
  check_task_buffers(param, anchor, acc, c10::DeviceType::CUDA);
  check_update(update, param);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "task_end_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    with_flag(update.has_value(), [&](auto has_update) {
      constexpr bool kUpdate = decltype(has_update)::value;
      TaskEndOp<scalar_t, kUpdate> op{param.data_ptr<scalar_t>(), anchor.const_data_ptr<scalar_t>(),
                                      acc.data_ptr<opmath_t>(), update_ptr<scalar_t>(update)};
      const bool aligned = aligned16(op.p) && aligned16(op.anchor) && aligned16(op.acc) &&
                           (!kUpdate || aligned16(op.update));
      launch<scalar_t>(op, param.numel(), aligned, param);
    });
  });
}

void meta_update_cuda(const at::Tensor& param, const at::Tensor& anchor, const at::Tensor& acc, double meta_lr,
                      const std::optional<at::Tensor>& meta_lr_tensor, double n,
                      const std::optional<at::Tensor>& n_tensor) {
  check_task_buffers(param, anchor, acc, c10::DeviceType::CUDA);
  const ScalarArg lr_arg = make_scalar(meta_lr, meta_lr_tensor, param, "meta_lr");
  const ScalarArg n_arg = make_scalar(n, n_tensor, param, "n");
  check_task_count(n_arg);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "meta_update_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    MetaUpdateOp<scalar_t> op{param.data_ptr<scalar_t>(), anchor.const_data_ptr<scalar_t>(),
                              acc.data_ptr<opmath_t>(), lr_arg, n_arg};
    const bool aligned = aligned16(op.p) && aligned16(op.anchor) && aligned16(op.acc);
    launch<scalar_t>(op, param.numel(), aligned, param);
  });
}

void batched_meta_update_cuda(const at::Tensor& theta, const at::Tensor& tasks, double meta_lr,
                              const std::optional<at::Tensor>& meta_lr_tensor, bool write_back,
                              const std::optional<at::Tensor>& updates) {
  check_batched_buffers(theta, tasks, c10::DeviceType::CUDA);
  check_batched_updates(updates, theta, tasks);
  const ScalarArg lr_arg = make_scalar(meta_lr, meta_lr_tensor, theta, "meta_lr");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "batched_meta_update_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    with_flag(updates.has_value(), [&](auto has_updates) {
      constexpr bool kUpdates = decltype(has_updates)::value;
      BatchedMetaOp<scalar_t, kUpdates> op{theta.data_ptr<scalar_t>(), tasks.data_ptr<scalar_t>(),
                                           update_ptr<scalar_t>(updates), tasks.size(0), theta.numel(), write_back,
                                           lr_arg};
      // Every row must start 16-byte aligned too, so P * sizeof(element) must be a multiple of 16.
      const auto rows_aligned = [&](const void* base, std::int64_t elem_size) {
        return grid::rows_aligned(reinterpret_cast<std::uintptr_t>(base), op.P, elem_size);
      };
      const bool aligned = aligned16(op.theta) && rows_aligned(op.rows, sizeof(scalar_t)) &&
                           (!kUpdates || rows_aligned(op.updates, sizeof(opmath_t)));
      launch<scalar_t>(op, theta.numel(), aligned, theta);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(reptile_fused, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("task_end_", &task_end_cuda);
  m.impl("meta_update_", &meta_update_cuda);
  m.impl("batched_meta_update_", &batched_meta_update_cuda);
}

}  // namespace reptile_fused
