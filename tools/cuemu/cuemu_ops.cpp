// The emulated extension's own ops: how many times each CUDA kernel was launched, so that the
// tests can check that every kernel ran and count the launches of a training step.
#include <torch/library.h>

#include <string>

#define CUEMU_NO_ARCH_MACROS
#include "cuemu.h"

namespace {

// One line per kernel: "<name> <launches>".
std::string launch_counts() {
  std::string out;
  for (const auto& [name, n] : ::cuemu::launch_counts())
    out += name + " " + std::to_string(n) + "\n";
  return out;
}

}  // namespace

TORCH_LIBRARY(mcloss_cuemu, m) { m.def("launch_counts() -> str", &launch_counts); }
