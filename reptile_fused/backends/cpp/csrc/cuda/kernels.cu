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

#include "../checks.h"
#include "../element_math.h"
#include "grid.h"

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

// ---------------------------------------------------------------- ops
template <typename scalar_t>
struct SgdOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* g;
  scalar_t* buf;
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
  }
};

struct AdamArgs {
  double beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize;
};

template <typename scalar_t>
struct AdamOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* g;
  scalar_t* m;
  scalar_t* v;
  scalar_t* vmax;
  AdamArgs args;
  ScalarArg step, lr;

  __device__ AdamCoef<opmath_t> prepare() const {
    const AdamCoef<double> c = adam_coef(load_scalar(lr), load_scalar(step), args.beta1, args.beta2, args.eps,
                                         args.weight_decay, args.amsgrad, args.maximize);
    return cast_coef<opmath_t, opmath_t>(c);
  }

  template <int N>
  __device__ void apply(int64_t i, const AdamCoef<opmath_t>& c) const {
    Pack<scalar_t, N> pv = load_pack<N>(p + i);
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
  }
};

struct NoCoef {};

template <typename scalar_t>
struct TaskEndOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* anchor;
  opmath_t* acc;

  __device__ NoCoef prepare() const { return {}; }

  template <int N>
  __device__ void apply(int64_t i, NoCoef) const {
    const Pack<scalar_t, N> pv = load_pack<N>(p + i);
    Pack<opmath_t, N> sv = load_pack<N>(acc + i);
#pragma unroll
    for (int k = 0; k < N; ++k) task_end_element<opmath_t>(sv.v[k], static_cast<opmath_t>(pv.v[k]));
    store_pack<N>(acc + i, sv);
    store_pack<N>(p + i, load_pack<N>(anchor + i));
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

template <typename scalar_t>
struct BatchedMetaOp {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* theta;
  scalar_t* rows;
  int64_t n_rows, P;
  bool write_back;
  ScalarArg meta_lr;

  __device__ MetaCoef<opmath_t> prepare() const {
    return {static_cast<opmath_t>(load_scalar(meta_lr)), static_cast<opmath_t>(n_rows)};
  }

  template <int N>
  __device__ void apply(int64_t i, const MetaCoef<opmath_t>& c) const {
    // The row sum stays in registers; row 0 first, then each later row in order.
    opmath_t total[N];
    {
      const Pack<scalar_t, N> rv = load_pack<N>(rows + i);
#pragma unroll
      for (int k = 0; k < N; ++k) total[k] = static_cast<opmath_t>(rv.v[k]);
    }
    for (int64_t r = 1; r < n_rows; ++r) {
      const Pack<scalar_t, N> rv = load_pack<N>(rows + grid::row_offset(r, P, i));
#pragma unroll
      for (int k = 0; k < N; ++k) total[k] = total[k] + static_cast<opmath_t>(rv.v[k]);
    }
    Pack<scalar_t, N> tv = load_pack<N>(theta + i);
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
                   double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const bool has_momentum = momentum != 0.0;
  check_sgd_buffers(param, grad, momentum_buffer, has_momentum, c10::DeviceType::CUDA);
  const ScalarArg lr_arg = make_scalar(lr, lr_tensor, param, "lr");
  const SgdCoef<double> coef = sgd_coef(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sgd_step_cuda", [&] {
    SgdOp<scalar_t> op{param.data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                       has_momentum ? momentum_buffer->data_ptr<scalar_t>() : nullptr, coef, lr_arg};
    const bool aligned = aligned16(op.p) && aligned16(op.g) && (!has_momentum || aligned16(op.buf));
    launch<scalar_t>(op, param.numel(), aligned, param);
  });
}

void adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq, double step,
                    const std::optional<at::Tensor>& step_tensor, double lr,
                    const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                    double weight_decay, bool amsgrad, bool maximize) {
  check_adam_buffers(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, amsgrad, c10::DeviceType::CUDA);
  const auto dt = param.scalar_type();
  const ScalarArg step_arg = make_scalar(step, step_tensor, param, "step");
  check_step(step_arg);
  const ScalarArg lr_arg = make_scalar(lr, lr_tensor, param, "lr");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "adam_step_cuda", [&] {
    AdamOp<scalar_t> op{param.data_ptr<scalar_t>(),
                        grad.const_data_ptr<scalar_t>(),
                        exp_avg.data_ptr<scalar_t>(),
                        exp_avg_sq.data_ptr<scalar_t>(),
                        amsgrad ? max_exp_avg_sq->data_ptr<scalar_t>() : nullptr,
                        AdamArgs{beta1, beta2, eps, weight_decay, amsgrad, maximize},
                        step_arg,
                        lr_arg};
    const bool aligned = aligned16(op.p) && aligned16(op.g) && aligned16(op.m) && aligned16(op.v) &&
                         (!amsgrad || aligned16(op.vmax));
    launch<scalar_t>(op, param.numel(), aligned, param);
  });
}

void task_end_cuda(const at::Tensor& param, const at::Tensor& anchor, const at::Tensor& acc) {
  check_task_buffers(param, anchor, acc, c10::DeviceType::CUDA);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "task_end_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    TaskEndOp<scalar_t> op{param.data_ptr<scalar_t>(), anchor.const_data_ptr<scalar_t>(), acc.data_ptr<opmath_t>()};
    const bool aligned = aligned16(op.p) && aligned16(op.anchor) && aligned16(op.acc);
    launch<scalar_t>(op, param.numel(), aligned, param);
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
                              const std::optional<at::Tensor>& meta_lr_tensor, bool write_back) {
  check_batched_buffers(theta, tasks, c10::DeviceType::CUDA);
  const ScalarArg lr_arg = make_scalar(meta_lr, meta_lr_tensor, theta, "meta_lr");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "batched_meta_update_cuda", [&] {
    BatchedMetaOp<scalar_t> op{theta.data_ptr<scalar_t>(), tasks.data_ptr<scalar_t>(), tasks.size(0),
                               theta.numel(), write_back, lr_arg};
    // Every row must start 16-byte aligned too, so P * sizeof(scalar_t) must be a multiple of 16.
    const bool aligned = aligned16(op.theta) &&
                         grid::rows_aligned(reinterpret_cast<std::uintptr_t>(op.rows), op.P, sizeof(scalar_t));
    launch<scalar_t>(op, theta.numel(), aligned, theta);
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
