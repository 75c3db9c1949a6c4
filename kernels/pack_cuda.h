// The CUDA kernels of speech_llama::assemble and ::pack, behind a plain interface (device pointers and
// sizes, CUDA runtime types only) so that pack_cuda.cu compiles with nvcc alone; pack_cuda.cpp is
// the torch glue. Semantics and layout: dsu_ops/__init__.py.
//
// Each op runs in two steps on one stream. The first measures the batch into a workspace and
// ends with the output size (assemble) or the longest row (pack) in device memory; the caller
// reads it, allocates the outputs and runs the second step, which writes them. The same
// workspace serves both steps.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace speech_llama {

struct DeviceBatch {
  const int64_t* values;                // (n_values,)
  const int64_t* piece_offsets;         // (n_pieces + 1,)
  const bool* piece_is_dsu;             // (n_pieces,)
  const bool* piece_masked;             // (n_pieces,)
  const int64_t* sample_piece_offsets;  // (n_samples + 1,)
  const int64_t* sample_limit;          // (n_samples,), -1 for none
  const int64_t* sample_force_last;     // (n_samples,), negative for none
  int64_t n_values, n_pieces, n_samples;
  int64_t dsu_offset;
  bool deduplicate;
};

// Bytes of device workspace the steps below need for `batch`.
cudaError_t workspace_bytes(const DeviceBatch& batch, size_t* bytes);

// assemble, step 1: sample_offsets (n_samples + 1, device) gets every sample's start in the flat
// output; sample_offsets[n_samples] is the token count.
cudaError_t assemble_measure(const DeviceBatch& batch, void* workspace, size_t workspace_bytes,
                             int64_t* sample_offsets, cudaStream_t stream);
// assemble, step 2: tokens and labels, each (sample_offsets[n_samples],).
cudaError_t assemble_write(const DeviceBatch& batch, void* workspace, size_t workspace_bytes,
                           const int64_t* sample_offsets, int64_t* tokens, int64_t* labels, cudaStream_t stream);

// pack, step 1: places every sample in its row (row r holds samples row_sample_offsets[r] ..
// row_sample_offsets[r + 1] - 1, device, (n_rows + 1,)); *longest (device) gets the most tokens
// any row holds.
cudaError_t pack_measure(const DeviceBatch& batch, const int64_t* row_sample_offsets, int64_t n_rows,
                         void* workspace, size_t workspace_bytes, unsigned long long* longest, cudaStream_t stream);
// pack, step 2: writes the kept tokens into rows of max_seq_len (outputs (n_rows, max_seq_len),
// already filled with the padding values: pad_id, -100, 0, -1).
cudaError_t pack_write(const DeviceBatch& batch, void* workspace, size_t workspace_bytes, int64_t max_seq_len,
                       int64_t* tokens, int64_t* targets, int64_t* positions, int64_t* documents,
                       cudaStream_t stream);

}  // namespace speech_llama
