// The CPU kernels compiled for AVX2 + FMA + F16C, chosen at run time on CPUs that
// have them (kernels.cpp).  The target is set by pragma rather than by compiler
// flags so that one setup.py source list builds both copies; it must precede every
// include, so that at::vec selects its 256-bit implementation.  GCC only: other
// compilers get the baseline kernels alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c")
// The pragma does not define the ISA macros that headers test (sleef.h declares its
// 256-bit functions only under __AVX__); -mavx2 would.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define RF_CPU_TABLE cpu_kernels_avx2
#include "kernels_impl.h"
#else
#include "kernels.h"
namespace reptile_fused {
const CpuKernels* cpu_kernels_avx2() { return nullptr; }
}  // namespace reptile_fused
#endif
