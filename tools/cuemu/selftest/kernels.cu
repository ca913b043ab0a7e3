// The emulator's own test program: correct kernels that must run clean under every schedule
// and sanitizer, and broken ones that it (or a sanitizer build of it) must catch.
// tests/test_cuemu.py rewrites it as tools/cuemu/build.py does the project's .cu files
// (launches, dynamic shared memory), compiles it (g++: plain, ASan+UBSan, TSan) and runs one
// case per process:  ./kernels CASE   -> "CASE: ok", "CASE: wrong N" or "CASE: caught: ..."
#include "cuemu.h"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

constexpr int kThreads = 128;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- correct kernels

// Per block: grid-stride partial sums, a warp butterfly, then a __syncthreads tree over the
// per-warp sums in dynamic shared memory; block b writes out[b].
__global__ void block_sums(const float* x, int64_t n, float* out) {
  extern __shared__ float part[];
  float s = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    s += x[i];
  s = warp_sum(s);
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) part[warp] = s;
  __syncthreads();
  for (unsigned stride = blockDim.x / 64; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = part[0];
}

// 16-byte loads and stores: y = 2 x, four floats at a time.
__global__ void scale4(const float4* x, float4* y, int64_t n4) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float4 v = x[i];
    y[i] = make_float4(2 * v.x, 2 * v.y, 2 * v.z, 2 * v.w);
  }
}

// Votes, a block-wide count and an atomic: how many elements are positive.
__global__ void count_positive(const float* x, int n, int* total, int* per_block) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool pos = i < n && x[i] > 0;
  const unsigned ballot = __ballot_sync(0xffffffffu, pos);
  const int block_count = __syncthreads_count(pos);
  if (threadIdx.x % 32 == 0) atomicAdd(total, __popc(ballot));
  if (threadIdx.x == 0) per_block[blockIdx.x] = block_count;
}

// ---- broken kernels

// a shuffle with the full mask inside a branch that half of the warp takes
__global__ void divergent_shfl(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}
// __syncthreads in a branch that only some warps take
__global__ void divergent_barrier(float* out) {
  __shared__ float s[kThreads];
  s[threadIdx.x] = threadIdx.x;
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = s[kThreads - 1 - threadIdx.x];
}
// no __syncthreads between writes to shared memory and reads of other threads' slots
__global__ void missing_barrier(float* out) {
  __shared__ float s[kThreads];
  s[threadIdx.x] = threadIdx.x;
  out[threadIdx.x] = s[kThreads - 1 - threadIdx.x];
}
// lane 0 publishes through memory without a __syncwarp before the others read
__global__ void missing_syncwarp(const float* x, float* scratch, float* out) {
  float v = x[threadIdx.x];
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  if (threadIdx.x == 0) scratch[0] = v;
  out[threadIdx.x] = scratch[0];
}
// a shuffle whose mask leaves out the lanes it reads
__global__ void read_outside_mask(float* out) {
  float v = threadIdx.x;
  v = __shfl_xor_sync(0x0000ffffu, v, 16);
  out[threadIdx.x] = v;
}
// one past the end of a global array
__global__ void oob_global(const float* x, int n, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[0] = x[i];
}
// past the end of static shared memory
__global__ void oob_shared(float* out, int k) {
  __shared__ float s[32];
  s[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + k];
}
// some threads exit, the others meet at __syncthreads (undefined behaviour in CUDA)
__global__ void early_exit_barrier(float* out, int n) {
  __shared__ float s[kThreads];
  if (int(threadIdx.x) >= n) return;
  s[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % n];
}
// reads dynamic shared memory that no thread wrote
__global__ void uninitialised_shared(float* out) {
  extern __shared__ float buf[];
  if (threadIdx.x > 0) buf[threadIdx.x] = 1;
  __syncthreads();
  out[threadIdx.x] = buf[0];
}
// two blocks write the same elements (CUEMU_THREADS=2 runs them at once)
__global__ void blocks_write_same(float* out) { out[threadIdx.x] += float(blockIdx.x + 1); }

// ---- host side

template <typename T>
T* alloc(size_t n) {
  T* p;
  cudaMalloc(&p, n * sizeof(T));
  return p;
}

int run(const std::string& c) {
  float* out = alloc<float>(kThreads);
  float* x = alloc<float>(100);
  float* scratch = alloc<float>(1);
  for (int i = 0; i < 100; ++i) x[i] = float(i % 7) - 3.0f;
  for (int i = 0; i < kThreads; ++i) out[i] = 0;
  scratch[0] = -1;
  int wrong = -1;
  if (c == "block_sums") {
    const int64_t n = 100003;
    const unsigned blocks = 37;
    std::vector<float> h(n);
    float* dx = alloc<float>(n);
    for (int64_t i = 0; i < n; ++i) dx[i] = float((i * 7919) % 1000) / 1000.0f - 0.5f;
    float* sums = alloc<float>(blocks);
    block_sums<<<blocks, kThreads, kThreads / 32 * sizeof(float)>>>(dx, n, sums);
    double got = 0, want = 0;
    for (unsigned b = 0; b < blocks; ++b) got += sums[b];
    for (int64_t i = 0; i < n; ++i) want += dx[i];
    wrong = std::abs(got - want) > 1e-2;
    const auto counts = cuemu::launch_counts();
    wrong += counts.count("block_sums") ? int(counts.at("block_sums") != 1) : 1;
  } else if (c == "scale4") {
    const int64_t n4 = 1000;
    float4* a = alloc<float4>(n4);
    float4* b = alloc<float4>(n4);
    for (int64_t i = 0; i < n4; ++i) a[i] = make_float4(float(i), 1, -2, 0.5f);
    scale4<<<8, kThreads>>>(a, b, n4);
    wrong = 0;
    for (int64_t i = 0; i < n4; ++i)
      wrong += b[i].x != 2 * float(i) || b[i].y != 2 || b[i].z != -4 || b[i].w != 1;
  } else if (c == "misaligned_float4") {
    float4* a = alloc<float4>(65);
    float* shifted = reinterpret_cast<float*>(a) + 1;  // 4 bytes past a 16-byte boundary
    scale4<<<1, 32>>>(reinterpret_cast<const float4*>(shifted), a, 16);
  } else if (c == "count_positive") {
    int* total = alloc<int>(1);
    int* per_block = alloc<int>(2);
    *total = 0;
    count_positive<<<2, 64>>>(x, 100, total, per_block);
    int want = 0, want0 = 0;
    for (int i = 0; i < 100; ++i) {
      want += x[i] > 0;
      want0 += i < 64 && x[i] > 0;
    }
    wrong = (*total != want) + (per_block[0] != want0) + (per_block[1] != want - want0);
  } else if (c == "divergent_shfl") {
    divergent_shfl<<<1, 32>>>(out);
  } else if (c == "divergent_barrier") {
    divergent_barrier<<<1, kThreads>>>(out);
    wrong = 0;
    for (int i = 0; i < kThreads; ++i) wrong += out[i] != float(kThreads - 1 - i);
  } else if (c == "missing_barrier") {
    missing_barrier<<<1, kThreads>>>(out);
    wrong = 0;
    for (int i = 0; i < kThreads; ++i) wrong += out[i] != float(kThreads - 1 - i);
  } else if (c == "missing_syncwarp") {
    missing_syncwarp<<<1, 32>>>(x, scratch, out);
    wrong = 0;
    for (int i = 0; i < 32; ++i) wrong += out[i] != x[0] + x[16];
  } else if (c == "read_outside_mask") {
    read_outside_mask<<<1, 32>>>(out);
  } else if (c == "oob_global") {
    oob_global<<<1, kThreads>>>(x, 100, out);
  } else if (c == "oob_shared") {
    oob_shared<<<1, 32>>>(out, 1);
  } else if (c == "early_exit_barrier") {
    early_exit_barrier<<<1, kThreads>>>(out, 100);
    wrong = 0;
    for (int i = 0; i < 100; ++i) wrong += out[i] != 1;
  } else if (c == "uninitialised_shared") {
    uninitialised_shared<<<1, 32, 32 * sizeof(float)>>>(out);
    wrong = 0;
    for (int i = 0; i < 32; ++i) wrong += out[i] != out[i];  // NaN: the never-written poison
  } else if (c == "blocks_write_same") {
    blocks_write_same<<<2, 32>>>(out);
    wrong = 0;
  } else if (c == "bad_config") {
    scale4<<<1, 2048>>>(nullptr, nullptr, 0);
  } else {
    std::printf("%s: unknown case\n", c.c_str());
    return 2;
  }
  if (wrong < 0)
    std::printf("%s: no error reported\n", c.c_str());
  else if (wrong == 0)
    std::printf("%s: ok\n", c.c_str());
  else
    std::printf("%s: wrong %d\n", c.c_str(), wrong);
  return 0;
}

int main(int argc, char** argv) {
  const std::string c = argc > 1 ? argv[1] : "";
  try {
    return run(c);
  } catch (const cuemu::Error& e) {
    std::printf("%s: caught: %s\n", c.c_str(), e.what());
    return 0;
  }
}
