// Which cross-entropy logits the CUDA row kernel reads as they are, and which (N, C, D) the
// vector column kernel takes (torch-free, no CUDA headers: csrc/ops.h, the CUDA launchers and
// the emulator's tests share these rules).
#pragma once

#include <cstdint>

namespace torch_losses {
namespace cuda {

// Logits (N, C, D) with element strides (sN, sC, sD) go to the kernels in the rows_strided layout
// of CrossEntropyArgs, without a copy, when each row (n, d) holds its classes contiguously
// (sC == 1) and the tensor is not the contiguous (N, C, D) (which needs no layout): rows of a
// slice x[:, :C] of a wider tensor, an (N, d, C) tensor seen as (N, C, d). One class: copied
// (nothing to vectorize).
inline bool ce_rows_strided(int64_t N, int64_t C, int64_t D, int64_t sN, int64_t sC, int64_t sD) {
  (void)sD;
  if (C < 2 || sC != 1) return false;
  const bool contiguous = D == 1 && (N <= 1 || sN == C);
  return !contiguous;
}

// The vector column kernel (contiguous (N, C, D), D > 1) walks a sample's classes with 32-bit
// offsets c D <= C D: it runs where C D fits an int, else the scalar column kernel does (a
// sample of 2^31 elements, 4 GB of bf16).
inline bool ce_column_vec_fits(int64_t C, int64_t D) { return D > 0 && C <= INT32_MAX / D; }

}  // namespace cuda
}  // namespace torch_losses
