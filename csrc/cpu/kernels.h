// The CPU kernels of every op, one table per CPU capability they were compiled for.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <optional>

namespace reptile_fused {

// Signatures match the schemas in ops.cpp.
struct CpuKernels {
  void (*sgd_step)(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                   const std::optional<at::Tensor>&, double, double, double, bool, bool, bool,
                   const std::optional<at::Tensor>&);
  void (*adam_step)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, double,
                    const std::optional<at::Tensor>&, double, double, double, double, bool, bool,
                    const std::optional<at::Tensor>&, bool, at::OptionalIntArrayRef);
  void (*task_end)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);
  void (*meta_update)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                      const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&);
  void (*batched_meta_update)(const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&, bool,
                              const std::optional<at::Tensor>&);
};

// Baseline build: runs on every CPU.
const CpuKernels* cpu_kernels_default();
// AVX2 + FMA + F16C build; nullptr where the compiler or architecture has none.
const CpuKernels* cpu_kernels_avx2();

}  // namespace reptile_fused
