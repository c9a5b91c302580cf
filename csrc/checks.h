// Host-side argument checks, scalar handling and the dispatch of optional buffers,
// shared by the CPU and CUDA op implementations.  The Python wrappers run reptile_fused._validate first (so
// every backend rejects bad input with the same message); these checks keep a
// direct torch.ops.reptile_fused call from reading or writing out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <type_traits>

namespace reptile_fused {

inline at::ScalarType opmath_scalar_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_supported(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              name, " has unsupported dtype ", dt, "; supported: float32, float64, float16, bfloat16");
}

// param: contiguous 1-D buffer of a supported dtype on device_type.
inline void check_param(const at::Tensor& param, const char* name, c10::DeviceType device_type) {
  TORCH_CHECK(param.device().type() == device_type, name, " must be on ", device_type, ", got ", param.device());
  check_supported(param, name);
  TORCH_CHECK(param.dim() == 1 && param.is_contiguous(), name, " must be a contiguous 1-D flat buffer, got shape ",
              param.sizes());
}

// other: contiguous, same numel and device as param, with dtype `dtype`.
inline void check_like(const at::Tensor& other, const at::Tensor& param, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(other.device() == param.device(), name, " is on ", other.device(), " but param is on ", param.device());
  TORCH_CHECK(other.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", other.scalar_type());
  TORCH_CHECK(other.dim() == 1 && other.numel() == param.numel() && other.is_contiguous(), name,
              " must be a contiguous buffer of ", param.numel(), " elements, got shape ", other.sizes());
}

// First-order MAML's update buffer (optional): laid out like param, in its opmath
// dtype (like the task accumulator), and not the parameter buffer itself, which the
// op reads and writes in the same pass.
inline void check_update(const std::optional<at::Tensor>& update, const at::Tensor& param) {
  if (!update.has_value()) return;
  check_like(*update, param, opmath_scalar_type(param.scalar_type()), "update");
  TORCH_CHECK(update->numel() == 0 || update->data_ptr() != param.data_ptr(),
              "update must be a buffer of its own, not the parameter buffer");
}

// The buffers of each op, checked the same way on every device.
inline void check_sgd_buffers(const at::Tensor& param, const at::Tensor& grad,
                              const std::optional<at::Tensor>& momentum_buffer, bool has_momentum,
                              const std::optional<at::Tensor>& update, c10::DeviceType device_type) {
  check_param(param, "param", device_type);
  check_like(grad, param, param.scalar_type(), "grad");
  TORCH_CHECK(!has_momentum || momentum_buffer.has_value(), "sgd_step_: momentum != 0 needs a momentum_buffer");
  if (has_momentum) check_like(*momentum_buffer, param, param.scalar_type(), "momentum_buffer");
  check_update(update, param);
}

inline void check_adam_buffers(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                               const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                               bool amsgrad, const std::optional<at::Tensor>& update,
                               c10::DeviceType device_type) {
  check_param(param, "param", device_type);
  const auto dt = param.scalar_type();
  check_like(grad, param, dt, "grad");
  check_like(exp_avg, param, dt, "exp_avg");
  check_like(exp_avg_sq, param, dt, "exp_avg_sq");
  TORCH_CHECK(!amsgrad || max_exp_avg_sq.has_value(), "adam_step_: amsgrad=True needs max_exp_avg_sq");
  if (amsgrad) check_like(*max_exp_avg_sq, param, dt, "max_exp_avg_sq");
  check_update(update, param);
}

// task_end_ and meta_update_: the anchor has the parameter's dtype, the accumulator its opmath dtype.
inline void check_task_buffers(const at::Tensor& param, const at::Tensor& anchor, const at::Tensor& acc,
                               c10::DeviceType device_type) {
  check_param(param, "param", device_type);
  check_like(anchor, param, param.scalar_type(), "anchor");
  check_like(acc, param, opmath_scalar_type(param.scalar_type()), "acc");
}

inline void check_batched_buffers(const at::Tensor& theta, const at::Tensor& tasks, c10::DeviceType device_type) {
  check_param(theta, "theta", device_type);
  TORCH_CHECK(tasks.device() == theta.device(), "tasks is on ", tasks.device(), " but theta is on ", theta.device());
  TORCH_CHECK(tasks.scalar_type() == theta.scalar_type(), "tasks has dtype ", tasks.scalar_type(), " but theta has ",
              theta.scalar_type());
  TORCH_CHECK(tasks.dim() == 2 && tasks.size(1) == theta.numel() && tasks.is_contiguous(),
              "tasks must be a contiguous [n, P] buffer with P = ", theta.numel(), ", got shape ", tasks.sizes());
  TORCH_CHECK(tasks.size(0) >= 1, "tasks must hold at least one task row (n >= 1)");
}

// First-order MAML's per-task updates (optional): the tasks' [n, P] shape, contiguous,
// in theta's opmath dtype.
inline void check_batched_updates(const std::optional<at::Tensor>& updates, const at::Tensor& theta,
                                  const at::Tensor& tasks) {
  if (!updates.has_value()) return;
  const at::Tensor& u = *updates;
  TORCH_CHECK(u.device() == theta.device(), "updates is on ", u.device(), " but theta is on ", theta.device());
  TORCH_CHECK(u.scalar_type() == opmath_scalar_type(theta.scalar_type()), "updates must have dtype ",
              opmath_scalar_type(theta.scalar_type()), " for ", theta.scalar_type(), " parameters, got ",
              u.scalar_type());
  TORCH_CHECK(u.sizes() == tasks.sizes() && u.is_contiguous(),
              "updates must be a contiguous buffer of the tasks' shape ", tasks.sizes(), ", got ", u.sizes());
}

// fn(std::true_type{}) or fn(std::false_type{}): a flag that is uniform over the buffer
// (an optional buffer given or not) becomes a compile-time constant of the kernel, so
// the loop without the optional stream is the same code as before the stream existed.
template <typename Fn>
inline void with_flag(bool flag, const Fn& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// A scalar the kernels read: either a host value, or a pointer to a one-element
// floating tensor on the buffers' device that the CUDA kernel reads on the device
// (so a captured CUDA graph sees new values on replay).  Kind codes are plain ints
// so the struct can be passed to a kernel by value.
struct ScalarArg {
  const void* ptr = nullptr;
  int kind = 0;  // 0 float32, 1 float64, 2 float16, 3 bfloat16
  double value = 0.0;
};

inline ScalarArg make_scalar(double value, const std::optional<at::Tensor>& tensor, const at::Tensor& like,
                             const char* name) {
  ScalarArg s;
  s.value = value;
  if (!tensor.has_value()) return s;
  const at::Tensor& t = *tensor;
  TORCH_CHECK(t.numel() == 1 && t.dim() <= 1, name, " as a tensor must be 0-dim (or one element), got shape ",
              t.sizes());
  TORCH_CHECK(t.is_floating_point(), name, " as a tensor must be floating point, got ", t.scalar_type());
  if (t.device().is_cpu()) {
    s.value = t.item<double>();  // host memory: no device synchronisation
    return s;
  }
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the buffers are on ", like.device());
  switch (t.scalar_type()) {
    case at::kFloat: s.kind = 0; break;
    case at::kDouble: s.kind = 1; break;
    case at::kHalf: s.kind = 2; break;
    case at::kBFloat16: s.kind = 3; break;
    default: TORCH_CHECK(false, name, " has unsupported dtype ", t.scalar_type());
  }
  s.ptr = t.data_ptr();
  return s;
}

// Range checks of the counts; a device tensor is not read back for them (that would
// synchronise), so only host values are checked.
inline void check_step(const ScalarArg& step) {
  TORCH_CHECK(step.ptr != nullptr || step.value >= 1,
              "adam_step_: step must be >= 1 (the count after this step), got ", step.value);
}

inline void check_task_count(const ScalarArg& n) {
  TORCH_CHECK(n.ptr != nullptr || n.value > 0, "meta_update_: n (the number of finished tasks) must be > 0, got ",
              n.value);
}

}  // namespace reptile_fused
