// Shape, dtype and device checks shared by the CPU op and the CUDA op's torch glue.
// Layout of a batch: dsu_ops/__init__.py.
#pragma once

#include <ATen/ATen.h>

namespace speech_llama {

struct BatchSizes {
  int64_t n_values, n_pieces, n_samples;
};

inline void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, c10::DeviceType device) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), " dimensions");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device().type() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline BatchSizes check_batch(const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
                              const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets,
                              const at::Tensor& sample_limit, const at::Tensor& sample_force_last,
                              c10::DeviceType device) {
  check_vector(values, "values", at::kLong, device);
  check_vector(piece_offsets, "piece_offsets", at::kLong, device);
  check_vector(piece_is_dsu, "piece_is_dsu", at::kBool, device);
  check_vector(piece_masked, "piece_masked", at::kBool, device);
  check_vector(sample_piece_offsets, "sample_piece_offsets", at::kLong, device);
  check_vector(sample_limit, "sample_limit", at::kLong, device);
  check_vector(sample_force_last, "sample_force_last", at::kLong, device);
  TORCH_CHECK(piece_offsets.numel() >= 1, "piece_offsets needs n_pieces + 1 entries, got none");
  TORCH_CHECK(sample_piece_offsets.numel() >= 1, "sample_piece_offsets needs n_samples + 1 entries, got none");
  const BatchSizes sizes{values.numel(), piece_offsets.numel() - 1, sample_piece_offsets.numel() - 1};
  TORCH_CHECK(piece_is_dsu.numel() == sizes.n_pieces && piece_masked.numel() == sizes.n_pieces,
              "piece_is_dsu and piece_masked need one entry per piece (", sizes.n_pieces, "), got ",
              piece_is_dsu.numel(), " and ", piece_masked.numel());
  TORCH_CHECK(sample_limit.numel() == sizes.n_samples && sample_force_last.numel() == sizes.n_samples,
              "sample_limit and sample_force_last need one entry per sample (", sizes.n_samples, "), got ",
              sample_limit.numel(), " and ", sample_force_last.numel());
  return sizes;
}

}  // namespace speech_llama
