#pragma once  // cuemu stub: the CUDA generator, stood in for by the CPU one
// The emulated ops run on CPU tensors, so their generator is a CPU generator. What a host
// wrapper uses of the CUDA one is kept: get_generator_or_default<CUDAGeneratorImpl>, the
// mutex_ and philox_cuda_state(); seed and offset are two draws of the CPU generator's
// random64(), as the CPU ops take theirs (so both draw the same mask from the same state).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/cuda/PhiloxUtils.cuh>

#include <mutex>
#include <optional>

namespace at {

struct CUDAGeneratorImpl {
  CPUGeneratorImpl* cpu;
  std::mutex& mutex_;

  PhiloxCudaState philox_cuda_state(uint64_t /*increment*/) {
    const uint64_t seed = cpu->random64();
    return PhiloxCudaState(seed, cpu->random64());
  }
};

namespace cuda::detail {
inline const Generator& getDefaultCUDAGenerator(DeviceIndex = -1) {
  return at::detail::getDefaultCPUGenerator();
}
}  // namespace cuda::detail

template <>
inline CUDAGeneratorImpl* get_generator_or_default<CUDAGeneratorImpl>(
    const std::optional<Generator>& gen, const Generator& default_gen) {
  CPUGeneratorImpl* cpu = get_generator_or_default<CPUGeneratorImpl>(gen, default_gen);
  thread_local std::optional<CUDAGeneratorImpl> slot;
  slot.emplace(CUDAGeneratorImpl{cpu, cpu->mutex_});
  return &*slot;
}

}  // namespace at
