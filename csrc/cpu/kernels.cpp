// Baseline CPU kernels, the choice between them and the AVX2 build, and their
// registration for the CPU dispatch key.
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#define RF_CPU_TABLE cpu_kernels_default
#include "kernels_impl.h"

namespace reptile_fused {
namespace {

// torch's own choice (CPU features, capped by ATEN_CPU_CAPABILITY), so the
// extension never uses an instruction set torch itself was told to avoid.
const CpuKernels& kernels() {
  static const CpuKernels* chosen = [] {
    const std::string cap = at::get_cpu_capability();
    const CpuKernels* avx2 = cpu_kernels_avx2();
    return (avx2 != nullptr && (cap == "AVX2" || cap == "AVX512")) ? avx2 : cpu_kernels_default();
  }();
  return *chosen;
}

void sgd_step(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
              double lr, const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, bool first_step,
              const std::optional<at::Tensor>& update) {
  kernels().sgd_step(param, grad, momentum_buffer, lr, lr_tensor, momentum, dampening, weight_decay, nesterov,
                     maximize, first_step, update);
}

void adam_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
               const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq, double step,
               const std::optional<at::Tensor>& step_tensor, double lr, const std::optional<at::Tensor>& lr_tensor,
               double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
               const std::optional<at::Tensor>& update, bool fused, at::OptionalIntArrayRef spans) {
  kernels().adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, step_tensor, lr, lr_tensor, beta1,
                      beta2, eps, weight_decay, amsgrad, maximize, update, fused, spans);
}

void task_end(const at::Tensor& param, const at::Tensor& anchor, const at::Tensor& acc,
              const std::optional<at::Tensor>& update) {
  kernels().task_end(param, anchor, acc, update);
}

void meta_update(const at::Tensor& param, const at::Tensor& anchor, const at::Tensor& acc, double meta_lr,
                 const std::optional<at::Tensor>& meta_lr_tensor, double n, const std::optional<at::Tensor>& n_tensor) {
  kernels().meta_update(param, anchor, acc, meta_lr, meta_lr_tensor, n, n_tensor);
}

void batched_meta_update(const at::Tensor& theta, const at::Tensor& tasks, double meta_lr,
                         const std::optional<at::Tensor>& meta_lr_tensor, bool write_back,
                         const std::optional<at::Tensor>& updates) {
  kernels().batched_meta_update(theta, tasks, meta_lr, meta_lr_tensor, write_back, updates);
}

}  // namespace

TORCH_LIBRARY_IMPL(reptile_fused, CPU, m) {
  m.impl("sgd_step_", &sgd_step);
  m.impl("adam_step_", &adam_step);
  m.impl("task_end_", &task_end);
  m.impl("meta_update_", &meta_update);
  m.impl("batched_meta_update_", &batched_meta_update);
}

}  // namespace reptile_fused
