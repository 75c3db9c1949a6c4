// The speech_llama ops (schemas and CPU kernels): measure, assemble and pack.
// Semantics and layout: dsu_ops/__init__.py; the CUDA kernels are in pack_cuda.cu.
//
// Each op measures every sample first (its length after deduplication and its limit), then
// writes tokens straight into the output tensors: flat for assemble, rows of max_seq_len for pack.

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

// Calls emit(n, token, masked) for each of a sample's kept tokens, n = 0, 1, ...; the last one
// is force_last, masked, when the limit cut the sample.
template <typename Emit>
void for_each_kept(const Batch& b, int64_t sample, Extent extent, Emit emit) {
  const int64_t count = extent.kept, force_last = b.sample_force_last[sample];
  const bool forced = extent.cut && force_last >= 0;
  int64_t n = 0;
  for (int64_t p = b.sample_piece_offsets[sample]; p < b.sample_piece_offsets[sample + 1] && n < count; ++p) {
    const int64_t lo = b.piece_offsets[p], hi = b.piece_offsets[p + 1];
    const bool dedup = b.drops_repeats(p), masked = b.piece_masked[p];
    const int64_t shift = b.piece_is_dsu[p] ? b.dsu_offset : 0;
    for (int64_t i = lo; i < hi && n < count; ++i) {
      if (dedup && i > lo && b.values[i] == b.values[i - 1]) continue;
      if (forced && n == count - 1) {
        emit(n, force_last, true);
      } else {
        emit(n, b.values[i] + shift, masked);
      }
      ++n;
    }
  }
}

std::vector<Extent> measure_all(const Batch& b) {
  std::vector<Extent> extents(b.n_samples);
  for (int64_t s = 0; s < b.n_samples; ++s) extents[s] = measure(b, s);
  return extents;
}

at::Tensor measure_cpu(const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
                       const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets,
                       const at::Tensor& sample_limit, const at::Tensor& sample_force_last, bool deduplicate) {
  const Batch b = cpu_batch(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
                            sample_force_last, 0, deduplicate);
  at::Tensor lengths = at::empty({b.n_samples}, values.options());
  int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t s = 0; s < b.n_samples; ++s) length[s] = measure(b, s).kept;
  return lengths;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_cpu(
    const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
    const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets, const at::Tensor& sample_limit,
    const at::Tensor& sample_force_last, int64_t dsu_offset, bool deduplicate) {
  const Batch b = cpu_batch(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
                            sample_force_last, dsu_offset, deduplicate);
  const std::vector<Extent> extents = measure_all(b);
  at::Tensor offsets = at::empty({b.n_samples + 1}, values.options());
  int64_t* offset = offsets.data_ptr<int64_t>();
  offset[0] = 0;
  for (int64_t s = 0; s < b.n_samples; ++s) offset[s + 1] = offset[s] + extents[s].kept;
  at::Tensor tokens = at::empty({offset[b.n_samples]}, values.options());
  at::Tensor labels = at::empty({offset[b.n_samples]}, values.options());
  int64_t* token = tokens.data_ptr<int64_t>();
  int64_t* label = labels.data_ptr<int64_t>();
  for (int64_t s = 0; s < b.n_samples; ++s) {
    int64_t* sample_tokens = token + offset[s];
    int64_t* sample_labels = label + offset[s];
    for_each_kept(b, s, extents[s], [&](int64_t n, int64_t t, bool masked) {
      sample_tokens[n] = t;
      sample_labels[n] = masked ? kIgnore : t;
    });
  }
  return {tokens, labels, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_cpu(
    const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
    const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets, const at::Tensor& sample_limit,
    const at::Tensor& sample_force_last, const at::Tensor& row_sample_offsets, int64_t dsu_offset, bool deduplicate,
    int64_t max_seq_len, int64_t pad_id) {
  TORCH_CHECK(max_seq_len >= 1, "max_seq_len must be positive, got ", max_seq_len);
  const Batch b = cpu_batch(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
                            sample_force_last, dsu_offset, deduplicate);
  check_vector(row_sample_offsets, "row_sample_offsets", at::kLong, c10::DeviceType::CPU);
  TORCH_CHECK(row_sample_offsets.numel() >= 1, "row_sample_offsets needs n_rows + 1 entries, got none");
  const int64_t n_rows = row_sample_offsets.numel() - 1;
  const int64_t* row_offset = row_sample_offsets.data_ptr<int64_t>();
  check_offsets(row_offset, n_rows, b.n_samples, "row_sample_offsets", "samples");

  const std::vector<Extent> extents = measure_all(b);
  for (int64_t r = 0; r < n_rows; ++r) {
    int64_t fill = 0;
    for (int64_t s = row_offset[r]; s < row_offset[r + 1]; ++s) fill += extents[s].kept;
    TORCH_CHECK(fill <= max_seq_len, "row ", r, " holds ", fill, " tokens, more than max_seq_len ", max_seq_len);
  }
  const auto options = values.options();
  at::Tensor tokens = at::full({n_rows, max_seq_len}, pad_id, options);
  at::Tensor targets = at::full({n_rows, max_seq_len}, kIgnore, options);
  at::Tensor positions = at::zeros({n_rows, max_seq_len}, options);
  at::Tensor documents = at::full({n_rows, max_seq_len}, -1, options);
  for (int64_t r = 0; r < n_rows; ++r) {
    int64_t column = r * max_seq_len;
    for (int64_t s = row_offset[r]; s < row_offset[r + 1]; ++s) {
      int64_t* token = tokens.data_ptr<int64_t>() + column;
      int64_t* target = targets.data_ptr<int64_t>() + column;
      int64_t* position = positions.data_ptr<int64_t>() + column;
      int64_t* document = documents.data_ptr<int64_t>() + column;
      const int64_t document_id = s - row_offset[r];
      // Token n predicts the label of token n + 1 of the same sample; the last one predicts nothing.
      for_each_kept(b, s, extents[s], [&](int64_t n, int64_t t, bool masked) {
        token[n] = t;
        position[n] = n;
        document[n] = document_id;
        if (n > 0) target[n - 1] = masked ? kIgnore : t;
      });
      column += extents[s].kept;
    }
  }
  return {tokens, targets, positions, documents};
}

}  // namespace
}  // namespace speech_llama

TORCH_LIBRARY(speech_llama, m) {
  m.def(
      "measure(Tensor values, Tensor piece_offsets, Tensor piece_is_dsu, Tensor piece_masked, "
      "Tensor sample_piece_offsets, Tensor sample_limit, Tensor sample_force_last, bool deduplicate) "
      "-> Tensor lengths");
  m.def(
      "assemble(Tensor values, Tensor piece_offsets, Tensor piece_is_dsu, Tensor piece_masked, "
      "Tensor sample_piece_offsets, Tensor sample_limit, Tensor sample_force_last, int dsu_offset, "
      "bool deduplicate) -> (Tensor tokens, Tensor labels, Tensor sample_offsets)");
  m.def(
      "pack(Tensor values, Tensor piece_offsets, Tensor piece_is_dsu, Tensor piece_masked, "
      "Tensor sample_piece_offsets, Tensor sample_limit, Tensor sample_force_last, Tensor row_sample_offsets, "
      "int dsu_offset, bool deduplicate, int max_seq_len, int pad_id) "
      "-> (Tensor tokens, Tensor targets, Tensor positions, Tensor document_ids)");
}

TORCH_LIBRARY_IMPL(speech_llama, CPU, m) {
  m.impl("measure", &speech_llama::measure_cpu);
  m.impl("assemble", &speech_llama::assemble_cpu);
  m.impl("pack", &speech_llama::pack_cpu);
}
