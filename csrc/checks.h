// Host-side argument checks and scalar handling shared by the CPU and CUDA op
// implementations.  The Python wrappers run reptile_fused._validate first (so
// every backend rejects bad input with the same message); these checks keep a
// direct torch.ops.reptile_fused call from reading or writing out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

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

}  // namespace reptile_fused
