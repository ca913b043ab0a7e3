// The CPU kernels compiled a second time for AVX2+FMA (8 floats per instruction, fused
// multiply-add in exp_f32), in their own namespace so that nothing is shared with the baseline
// copy. Everything from outside (the standard library, c10) is included before the target
// pragma, so only our own kernels are built for AVX2; mcloss_cpu.cpp calls them only on a CPU
// that has AVX2 and FMA.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu/cpu_table.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MCLOSS_NS mcloss_avx2
#define MCLOSS_AVX2 1  // the target pragma does not define __AVX__ and friends
#include "cpu/cpu_kernels.h"
#pragma GCC pop_options

void mcloss::cpu::fill_tables_avx2(KernelTables& t) { mcloss_avx2::cpu_impl::fill_all(t); }
#else
void mcloss::cpu::fill_tables_avx2(KernelTables& t) { fill_tables_default(t); }
#endif
