// CUDA kernels of speech_llama::assemble and speech_llama::pack (interface: pack_cuda.h).
// Needs only the CUDA runtime and CUB, so nvcc compiles this file on its own.
//
// One thread per input value. A value is dropped when it repeats its predecessor inside a
// deduplicated DSU piece; an exclusive scan of the keep flags gives every kept value its rank in
// the deduplicated stream, from which each sample's length and each value's index inside its
// sample follow directly. Packing adds one thread per sample, which finds the sample's row and
// its first column there from a scan of the kept lengths.

#include <cub/device/device_scan.cuh>

#include "pack_cuda.h"

#define RETURN_IF_ERROR(call)                 \
  do {                                        \
    const cudaError_t error_ = (call);        \
    if (error_ != cudaSuccess) return error_; \
  } while (0)

namespace speech_llama {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest
constexpr int64_t kIgnore = -100;
constexpr size_t kAlign = 256;

size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Workspace layout; the caller's allocation is at least 256-byte aligned (torch's always is).
struct Workspace {
  int64_t* rank;           // (n_values + 1,) kept values before each value; the last entry: all kept
  int64_t* sample_start;   // (n_samples,) rank of the sample's first value
  int64_t* sample_length;  // (n_samples,) after deduplication, before the limit
  int64_t* sample_kept;    // (n_samples,) after the limit
  // pack only
  int64_t* sample_begin;     // (n_samples + 1,) exclusive scan of sample_kept
  int64_t* sample_row;       // (n_samples,)
  int64_t* sample_column;    // (n_samples,) the row's column of the sample's first token
  int64_t* sample_document;  // (n_samples,) the sample's number inside its row
  void* scan_storage;        // CUB's temporary storage
  size_t scan_bytes;
};

size_t array_bytes(const DeviceBatch& b) {
  return aligned((b.n_values + 1) * sizeof(int64_t)) + 3 * aligned(b.n_samples * sizeof(int64_t)) +
         aligned((b.n_samples + 1) * sizeof(int64_t)) + 3 * aligned(b.n_samples * sizeof(int64_t));
}

Workspace carve(const DeviceBatch& b, void* base, size_t total_bytes) {
  char* next = static_cast<char*>(base);
  auto take = [&next](int64_t count) {
    int64_t* array = reinterpret_cast<int64_t*>(next);
    next += aligned(count * sizeof(int64_t));
    return array;
  };
  Workspace w;
  w.rank = take(b.n_values + 1);
  w.sample_start = take(b.n_samples);
  w.sample_length = take(b.n_samples);
  w.sample_kept = take(b.n_samples);
  w.sample_begin = take(b.n_samples + 1);
  w.sample_row = take(b.n_samples);
  w.sample_column = take(b.n_samples);
  w.sample_document = take(b.n_samples);
  w.scan_storage = next;
  w.scan_bytes = total_bytes - array_bytes(b);
  return w;
}

// At least one block, so that empty inputs need no special case.
int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

__device__ int64_t first_index() { return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; }
__device__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// The segment holding position i: the last k in [0, n) with offsets[k] <= i (offsets start at
// 0, never decrease, and i < offsets[n]; empty segments are skipped over).
__device__ int64_t segment_of(const int64_t* offsets, int64_t n, int64_t i) {
  int64_t lo = 0, hi = n;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= i) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void mark_kept(DeviceBatch b, int64_t* keep) {
  for (int64_t i = first_index(); i < b.n_values; i += grid_stride()) {
    const int64_t piece = segment_of(b.piece_offsets, b.n_pieces, i);
    const bool repeat = b.deduplicate && b.piece_is_dsu[piece] && i > b.piece_offsets[piece] &&
                        b.values[i] == b.values[i - 1];
    keep[i] = repeat ? 0 : 1;
  }
}

__global__ void measure_samples(DeviceBatch b, Workspace w) {
  for (int64_t s = first_index(); s < b.n_samples; s += grid_stride()) {
    const int64_t first = b.piece_offsets[b.sample_piece_offsets[s]];
    const int64_t end = b.piece_offsets[b.sample_piece_offsets[s + 1]];
    const int64_t length = w.rank[end] - w.rank[first];
    const int64_t limit = b.sample_limit[s];
    w.sample_start[s] = w.rank[first];
    w.sample_length[s] = length;
    w.sample_kept[s] = limit >= 0 && length > limit ? limit : length;
  }
}

// A kept value: its sample, its index there, and its token and mask after the force_last rule.
struct Placed {
  int64_t sample, index, token;
  bool masked;
};

// False when deduplication or the sample's limit drops value i.
__device__ bool place_value(const DeviceBatch& b, const Workspace& w, int64_t i, Placed* out) {
  if (w.rank[i + 1] == w.rank[i]) return false;
  const int64_t piece = segment_of(b.piece_offsets, b.n_pieces, i);
  const int64_t sample = segment_of(b.sample_piece_offsets, b.n_samples, piece);
  const int64_t index = w.rank[i] - w.sample_start[sample];
  const int64_t kept = w.sample_kept[sample];
  if (index >= kept) return false;
  int64_t token = b.values[i] + (b.piece_is_dsu[piece] ? b.dsu_offset : 0);
  bool masked = b.piece_masked[piece];
  const int64_t force_last = b.sample_force_last[sample];
  if (index == kept - 1 && kept < w.sample_length[sample] && force_last >= 0) {
    token = force_last;
    masked = true;
  }
  *out = {sample, index, token, masked};
  return true;
}

__global__ void write_flat(DeviceBatch b, Workspace w, const int64_t* sample_offsets, int64_t* tokens,
                           int64_t* labels) {
  for (int64_t i = first_index(); i < b.n_values; i += grid_stride()) {
    Placed v;
    if (!place_value(b, w, i, &v)) continue;
    const int64_t at = sample_offsets[v.sample] + v.index;
    tokens[at] = v.token;
    labels[at] = v.masked ? kIgnore : v.token;
  }
}

__global__ void place_samples(DeviceBatch b, Workspace w, const int64_t* row_sample_offsets, int64_t n_rows) {
  for (int64_t s = first_index(); s < b.n_samples; s += grid_stride()) {
    const int64_t row = segment_of(row_sample_offsets, n_rows, s);
    const int64_t first = row_sample_offsets[row];
    w.sample_row[s] = row;
    w.sample_column[s] = w.sample_begin[s] - w.sample_begin[first];
    w.sample_document[s] = s - first;
  }
}

__global__ void longest_row(const Workspace w, const int64_t* row_sample_offsets, int64_t n_rows,
                            unsigned long long* longest) {
  for (int64_t r = first_index(); r < n_rows; r += grid_stride()) {
    const int64_t fill = w.sample_begin[row_sample_offsets[r + 1]] - w.sample_begin[row_sample_offsets[r]];
    atomicMax(longest, static_cast<unsigned long long>(fill));
  }
}

// Token n of a sample goes to its row's column c + n; it is the target of column c + n - 1.
__global__ void write_rows(DeviceBatch b, Workspace w, int64_t max_seq_len, int64_t* tokens, int64_t* targets,
                           int64_t* positions, int64_t* documents) {
  for (int64_t i = first_index(); i < b.n_values; i += grid_stride()) {
    Placed v;
    if (!place_value(b, w, i, &v)) continue;
    const int64_t at = w.sample_row[v.sample] * max_seq_len + w.sample_column[v.sample] + v.index;
    tokens[at] = v.token;
    positions[at] = v.index;
    documents[at] = w.sample_document[v.sample];
    if (v.index > 0) targets[at - 1] = v.masked ? kIgnore : v.token;
  }
}

// First step: keep flags, their scan into ranks, and every sample's lengths.
cudaError_t measure(const DeviceBatch& b, const Workspace& w, cudaStream_t stream) {
  mark_kept<<<blocks_for(b.n_values), kThreads, 0, stream>>>(b, w.rank);
  RETURN_IF_ERROR(cudaGetLastError());
  RETURN_IF_ERROR(cudaMemsetAsync(w.rank + b.n_values, 0, sizeof(int64_t), stream));
  size_t scan_bytes = w.scan_bytes;
  RETURN_IF_ERROR(
      cub::DeviceScan::ExclusiveSum(w.scan_storage, scan_bytes, w.rank, w.rank, b.n_values + 1, stream));
  measure_samples<<<blocks_for(b.n_samples), kThreads, 0, stream>>>(b, w);
  return cudaGetLastError();
}

// Exclusive scan of n values into out (n + 1,), out[n] being the total.
cudaError_t exclusive_sum(const int64_t* values, int64_t n, int64_t* out, const Workspace& w, cudaStream_t stream) {
  RETURN_IF_ERROR(cudaMemcpyAsync(out, values, n * sizeof(int64_t), cudaMemcpyDeviceToDevice, stream));
  RETURN_IF_ERROR(cudaMemsetAsync(out + n, 0, sizeof(int64_t), stream));
  size_t scan_bytes = w.scan_bytes;
  return cub::DeviceScan::ExclusiveSum(w.scan_storage, scan_bytes, out, out, n + 1, stream);
}

}  // namespace

cudaError_t workspace_bytes(const DeviceBatch& batch, size_t* bytes) {
  size_t value_scan = 0, sample_scan = 0;
  int64_t* none = nullptr;
  RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(nullptr, value_scan, none, none, batch.n_values + 1));
  RETURN_IF_ERROR(cub::DeviceScan::ExclusiveSum(nullptr, sample_scan, none, none, batch.n_samples + 1));
  *bytes = array_bytes(batch) + aligned(value_scan > sample_scan ? value_scan : sample_scan);
  return cudaSuccess;
}

cudaError_t assemble_measure(const DeviceBatch& batch, void* workspace, size_t workspace_bytes,
                             int64_t* sample_offsets, cudaStream_t stream) {
  const Workspace w = carve(batch, workspace, workspace_bytes);
  RETURN_IF_ERROR(measure(batch, w, stream));
  return exclusive_sum(w.sample_kept, batch.n_samples, sample_offsets, w, stream);
}

cudaError_t assemble_write(const DeviceBatch& batch, void* workspace, size_t workspace_bytes,
                           const int64_t* sample_offsets, int64_t* tokens, int64_t* labels, cudaStream_t stream) {
  const Workspace w = carve(batch, workspace, workspace_bytes);
  write_flat<<<blocks_for(batch.n_values), kThreads, 0, stream>>>(batch, w, sample_offsets, tokens, labels);
  return cudaGetLastError();
}

cudaError_t pack_measure(const DeviceBatch& batch, const int64_t* row_sample_offsets, int64_t n_rows,
                         void* workspace, size_t workspace_bytes, unsigned long long* longest, cudaStream_t stream) {
  const Workspace w = carve(batch, workspace, workspace_bytes);
  RETURN_IF_ERROR(measure(batch, w, stream));
  RETURN_IF_ERROR(exclusive_sum(w.sample_kept, batch.n_samples, w.sample_begin, w, stream));
  place_samples<<<blocks_for(batch.n_samples), kThreads, 0, stream>>>(batch, w, row_sample_offsets, n_rows);
  RETURN_IF_ERROR(cudaGetLastError());
  RETURN_IF_ERROR(cudaMemsetAsync(longest, 0, sizeof(unsigned long long), stream));
  longest_row<<<blocks_for(n_rows), kThreads, 0, stream>>>(w, row_sample_offsets, n_rows, longest);
  return cudaGetLastError();
}

cudaError_t pack_write(const DeviceBatch& batch, void* workspace, size_t workspace_bytes, int64_t max_seq_len,
                       int64_t* tokens, int64_t* targets, int64_t* positions, int64_t* documents,
                       cudaStream_t stream) {
  const Workspace w = carve(batch, workspace, workspace_bytes);
  write_rows<<<blocks_for(batch.n_values), kThreads, 0, stream>>>(batch, w, max_seq_len, tokens, targets, positions,
                                                                   documents);
  return cudaGetLastError();
}

}  // namespace speech_llama
