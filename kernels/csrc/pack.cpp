// The speech_llama::assemble op (schema and CPU kernel).
// Semantics and layout: kernels/__init__.py; the CUDA kernel is in pack_cuda.cu.
//
// Two passes over a batch: the first measures every sample (its length after deduplication and
// its limit), the second writes tokens straight into the output tensors.

#include <torch/library.h>

#include <tuple>
#include <vector>

#include "batch_checks.h"

namespace speech_llama {
namespace {

constexpr int64_t kIgnore = -100;

// Raw views of a validated CPU batch.
struct Batch {
  const int64_t* values;
  const int64_t* piece_offsets;
  const bool* piece_is_dsu;
  const bool* piece_masked;
  const int64_t* sample_piece_offsets;
  const int64_t* sample_limit;
  const int64_t* sample_force_last;
  int64_t n_samples;
  int64_t dsu_offset;
  bool deduplicate;

  bool drops_repeats(int64_t piece) const { return deduplicate && piece_is_dsu[piece]; }
};

// How much of a sample survives: `kept` tokens after deduplication and the limit, and whether
// the limit cut it (then a force_last token replaces the last kept one).
struct Extent {
  int64_t kept;
  bool cut;
};

void check_offsets(const int64_t* offsets, int64_t n_segments, int64_t total, const char* name, const char* of) {
  TORCH_CHECK(offsets[0] == 0, name, "[0] must be 0, got ", offsets[0]);
  for (int64_t k = 0; k < n_segments; ++k) {
    TORCH_CHECK(offsets[k] <= offsets[k + 1], name, " decreases at index ", k + 1);
  }
  TORCH_CHECK(offsets[n_segments] == total, name, " must end at the number of ", of, " (", total, "), got ",
              offsets[n_segments]);
}

Batch cpu_batch(const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
                const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets, const at::Tensor& sample_limit,
                const at::Tensor& sample_force_last, int64_t dsu_offset, bool deduplicate) {
  const BatchSizes sizes = check_batch(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets,
                                       sample_limit, sample_force_last, c10::DeviceType::CPU);
  const Batch b{values.data_ptr<int64_t>(),       piece_offsets.data_ptr<int64_t>(),
                piece_is_dsu.data_ptr<bool>(),     piece_masked.data_ptr<bool>(),
                sample_piece_offsets.data_ptr<int64_t>(), sample_limit.data_ptr<int64_t>(),
                sample_force_last.data_ptr<int64_t>(),    sizes.n_samples,
                dsu_offset,                        deduplicate};
  check_offsets(b.piece_offsets, sizes.n_pieces, sizes.n_values, "piece_offsets", "values");
  check_offsets(b.sample_piece_offsets, sizes.n_samples, sizes.n_pieces, "sample_piece_offsets", "pieces");
  for (int64_t s = 0; s < sizes.n_samples; ++s) {
    TORCH_CHECK(b.sample_limit[s] >= -1, "sample_limit[", s, "] must be >= 0, or -1 for none; got ", b.sample_limit[s]);
  }
  return b;
}

Extent measure(const Batch& b, int64_t sample) {
  int64_t length = 0;
  for (int64_t p = b.sample_piece_offsets[sample]; p < b.sample_piece_offsets[sample + 1]; ++p) {
    const int64_t lo = b.piece_offsets[p], hi = b.piece_offsets[p + 1];
    length += hi - lo;
    if (b.drops_repeats(p)) {
      for (int64_t i = lo + 1; i < hi; ++i) length -= b.values[i] == b.values[i - 1];
    }
  }
  const int64_t limit = b.sample_limit[sample];
  if (limit >= 0 && length > limit) return {limit, true};
  return {length, false};
}

// Writes a sample's kept tokens and their (unshifted) labels.
void write_sample(const Batch& b, int64_t sample, Extent extent, int64_t* tokens, int64_t* labels) {
  const int64_t count = extent.kept;
  int64_t n = 0;
  for (int64_t p = b.sample_piece_offsets[sample]; p < b.sample_piece_offsets[sample + 1] && n < count; ++p) {
    const int64_t lo = b.piece_offsets[p], hi = b.piece_offsets[p + 1];
    const bool dedup = b.drops_repeats(p), masked = b.piece_masked[p];
    const int64_t shift = b.piece_is_dsu[p] ? b.dsu_offset : 0;
    for (int64_t i = lo; i < hi && n < count; ++i) {
      if (dedup && i > lo && b.values[i] == b.values[i - 1]) continue;
      tokens[n] = b.values[i] + shift;
      labels[n] = masked ? kIgnore : tokens[n];
      ++n;
    }
  }
  const int64_t force_last = b.sample_force_last[sample];
  if (extent.cut && force_last >= 0 && count > 0) {
    tokens[count - 1] = force_last;
    labels[count - 1] = kIgnore;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_cpu(
    const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
    const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets, const at::Tensor& sample_limit,
    const at::Tensor& sample_force_last, int64_t dsu_offset, bool deduplicate) {
  const Batch b = cpu_batch(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
                            sample_force_last, dsu_offset, deduplicate);
  const auto long_options = values.options();
  at::Tensor offsets = at::empty({b.n_samples + 1}, long_options);
  int64_t* offset = offsets.data_ptr<int64_t>();
  std::vector<Extent> extents(b.n_samples);
  offset[0] = 0;
  for (int64_t s = 0; s < b.n_samples; ++s) {
    extents[s] = measure(b, s);
    offset[s + 1] = offset[s] + extents[s].kept;
  }
  at::Tensor tokens = at::empty({offset[b.n_samples]}, long_options);
  at::Tensor labels = at::empty({offset[b.n_samples]}, long_options);
  int64_t* token = tokens.data_ptr<int64_t>();
  int64_t* label = labels.data_ptr<int64_t>();
  for (int64_t s = 0; s < b.n_samples; ++s) {
    write_sample(b, s, extents[s], token + offset[s], label + offset[s]);
  }
  return {tokens, labels, offsets};
}

}  // namespace
}  // namespace speech_llama

TORCH_LIBRARY(speech_llama, m) {
  m.def(
      "assemble(Tensor values, Tensor piece_offsets, Tensor piece_is_dsu, Tensor piece_masked, "
      "Tensor sample_piece_offsets, Tensor sample_limit, Tensor sample_force_last, int dsu_offset, "
      "bool deduplicate) -> (Tensor tokens, Tensor labels, Tensor sample_offsets)");
}

TORCH_LIBRARY_IMPL(speech_llama, CPU, m) {
  m.impl("assemble", &speech_llama::assemble_cpu);
}
