// Torch glue of the CUDA ops: checks the tensors, allocates the workspace and the outputs
// (through torch's caching allocator) and runs the two steps of pack_cuda.h on the current stream.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "batch_checks.h"
#include "pack_cuda.h"

namespace speech_llama {
namespace {

void check_cuda(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "speech_llama::", what, ": ", cudaGetErrorString(error));
}

// True (as a 0-d device tensor) when offsets start at 0, never decrease and end at `total`.
at::Tensor offsets_valid(const at::Tensor& offsets, int64_t total) {
  return offsets.diff().ge(0).all().logical_and(offsets[0].eq(0)).logical_and(offsets[-1].eq(total));
}

struct Prepared {
  DeviceBatch batch;
  at::Tensor workspace;
};

Prepared prepare(const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
                 const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets,
                 const at::Tensor& sample_limit, const at::Tensor& sample_force_last, int64_t dsu_offset,
                 bool deduplicate) {
  const BatchSizes sizes = check_batch(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets,
                                       sample_limit, sample_force_last, c10::DeviceType::CUDA);
  for (const at::Tensor* t : {&piece_offsets, &piece_is_dsu, &piece_masked, &sample_piece_offsets, &sample_limit,
                              &sample_force_last}) {
    TORCH_CHECK(t->device() == values.device(), "all inputs must be on ", values.device(), ", one is on ",
                t->device());
  }
  // The kernels index through the offsets unchecked: validate them here, in one synchronisation.
  const at::Tensor valid = offsets_valid(piece_offsets, sizes.n_values)
                               .logical_and(offsets_valid(sample_piece_offsets, sizes.n_pieces))
                               .logical_and(sample_limit.ge(-1).all());
  TORCH_CHECK(valid.item<bool>(),
              "piece_offsets and sample_piece_offsets must start at 0, never decrease and end at the number of "
              "values and pieces; sample_limit must be >= 0, or -1 for none");

  const DeviceBatch batch{values.data_ptr<int64_t>(),
                          piece_offsets.data_ptr<int64_t>(),
                          piece_is_dsu.data_ptr<bool>(),
                          piece_masked.data_ptr<bool>(),
                          sample_piece_offsets.data_ptr<int64_t>(),
                          sample_limit.data_ptr<int64_t>(),
                          sample_force_last.data_ptr<int64_t>(),
                          sizes.n_values,
                          sizes.n_pieces,
                          sizes.n_samples,
                          dsu_offset,
                          deduplicate};
  size_t bytes = 0;
  check_cuda(workspace_bytes(batch, &bytes), "workspace_bytes");
  return {batch, at::empty({static_cast<int64_t>(bytes)}, values.options().dtype(at::kByte))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assemble_cuda(
    const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
    const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets, const at::Tensor& sample_limit,
    const at::Tensor& sample_force_last, int64_t dsu_offset, bool deduplicate) {
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Prepared p = prepare(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
                       sample_force_last, dsu_offset, deduplicate);
  const size_t bytes = p.workspace.numel();
  at::Tensor offsets = at::empty({p.batch.n_samples + 1}, values.options());
  check_cuda(assemble_measure(p.batch, p.workspace.data_ptr(), bytes, offsets.data_ptr<int64_t>(), stream),
             "assemble");
  const int64_t n_tokens = offsets[p.batch.n_samples].item<int64_t>();
  at::Tensor tokens = at::empty({n_tokens}, values.options());
  at::Tensor labels = at::empty({n_tokens}, values.options());
  check_cuda(assemble_write(p.batch, p.workspace.data_ptr(), bytes, offsets.data_ptr<int64_t>(),
                            tokens.data_ptr<int64_t>(), labels.data_ptr<int64_t>(), stream),
             "assemble");
  return {tokens, labels, offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_cuda(
    const at::Tensor& values, const at::Tensor& piece_offsets, const at::Tensor& piece_is_dsu,
    const at::Tensor& piece_masked, const at::Tensor& sample_piece_offsets, const at::Tensor& sample_limit,
    const at::Tensor& sample_force_last, const at::Tensor& row_sample_offsets, int64_t dsu_offset, bool deduplicate,
    int64_t max_seq_len, int64_t pad_id) {
  TORCH_CHECK(max_seq_len >= 1, "max_seq_len must be positive, got ", max_seq_len);
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Prepared p = prepare(values, piece_offsets, piece_is_dsu, piece_masked, sample_piece_offsets, sample_limit,
                       sample_force_last, dsu_offset, deduplicate);
  check_vector(row_sample_offsets, "row_sample_offsets", at::kLong, c10::DeviceType::CUDA);
  TORCH_CHECK(row_sample_offsets.device() == values.device(), "row_sample_offsets must be on ", values.device());
  TORCH_CHECK(row_sample_offsets.numel() >= 1, "row_sample_offsets needs n_rows + 1 entries, got none");
  const int64_t n_rows = row_sample_offsets.numel() - 1;
  TORCH_CHECK(offsets_valid(row_sample_offsets, p.batch.n_samples).item<bool>(),
              "row_sample_offsets must start at 0, never decrease and end at the number of samples (",
              p.batch.n_samples, ")");

  const size_t bytes = p.workspace.numel();
  at::Tensor longest = at::empty({1}, values.options());
  check_cuda(pack_measure(p.batch, row_sample_offsets.data_ptr<int64_t>(), n_rows, p.workspace.data_ptr(), bytes,
                          reinterpret_cast<unsigned long long*>(longest.data_ptr<int64_t>()), stream),
             "pack");
  const int64_t fill = longest.item<int64_t>();
  TORCH_CHECK(fill <= max_seq_len, "a row holds ", fill, " tokens, more than max_seq_len ", max_seq_len);
  const auto options = values.options();
  at::Tensor tokens = at::full({n_rows, max_seq_len}, pad_id, options);
  at::Tensor targets = at::full({n_rows, max_seq_len}, -100, options);
  at::Tensor positions = at::zeros({n_rows, max_seq_len}, options);
  at::Tensor documents = at::full({n_rows, max_seq_len}, -1, options);
  check_cuda(pack_write(p.batch, p.workspace.data_ptr(), bytes, max_seq_len, tokens.data_ptr<int64_t>(),
                        targets.data_ptr<int64_t>(), positions.data_ptr<int64_t>(), documents.data_ptr<int64_t>(),
                        stream),
             "pack");
  return {tokens, targets, positions, documents};
}

}  // namespace
}  // namespace speech_llama

TORCH_LIBRARY_IMPL(speech_llama, CUDA, m) {
  m.impl("assemble", &speech_llama::assemble_cuda);
  m.impl("pack", &speech_llama::pack_cuda);
}
