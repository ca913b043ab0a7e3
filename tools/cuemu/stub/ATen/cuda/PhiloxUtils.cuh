#pragma once  // cuemu stub: torch's PhiloxCudaState, and unpack() as host code
#include <ATen/cuda/detail/PhiloxCudaStateRaw.cuh>

#include <cstdint>
#include <tuple>

namespace at::cuda::philox {

// (seed, offset) of a draw, read through the pointers when the state was captured in a graph.
inline std::tuple<uint64_t, uint64_t> unpack(at::PhiloxCudaState arg) {
  if (arg.captured_) {
    return {static_cast<uint64_t>(*arg.seed_.ptr),
            static_cast<uint64_t>(*arg.offset_.ptr + arg.offset_intragraph_)};
  }
  return {arg.seed_.val, arg.offset_.val};
}

}  // namespace at::cuda::philox
