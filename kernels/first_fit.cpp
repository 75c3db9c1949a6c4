// speech_llama.FirstFitPacker, a torch class: where each sample goes when samples are packed into
// rows of max_seq_len, from lengths alone. The rule is dsu_ops/packing.py's; dsu_ops/reference.py
// holds the same packer in Python. Samples come a batch at a time: a call per sample into a torch
// class costs more than placing it.

#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace speech_llama {
namespace {

using Rows = std::vector<std::vector<int64_t>>;

struct Row {
  std::vector<int64_t> items, lengths;
  int64_t fill = 0;

  void put(int64_t item, int64_t length) {
    items.push_back(item);
    lengths.push_back(length);
    fill += length;
  }
};

class FirstFitPacker : public torch::CustomClassHolder {
 public:
  FirstFitPacker(int64_t max_seq_len, int64_t capacity) : max_seq_len_(max_seq_len), capacity_(capacity) {
    TORCH_CHECK_VALUE(max_seq_len >= 1 && capacity >= 1, "max_seq_len and capacity must be positive, got ",
                      max_seq_len, " and ", capacity);
  }

  // Places the samples in their order; returns the rows that left meanwhile, in the order they left.
  Rows add(const std::vector<int64_t>& items, const std::vector<int64_t>& lengths) {
    TORCH_CHECK_VALUE(items.size() == lengths.size(), "got ", items.size(), " items and ", lengths.size(), " lengths");
    for (size_t i = 0; i < items.size(); ++i) {
      TORCH_CHECK_VALUE(0 <= lengths[i] && lengths[i] <= max_seq_len_, "sample ", items[i], " has ", lengths[i],
                        " tokens; a row holds 0 to ", max_seq_len_);
    }
    Rows left;
    for (size_t i = 0; i < items.size(); ++i) place(items[i], lengths[i], left);
    return left;
  }

  // Re-places the open rows' samples longest first (ties in their order) and hands out every row,
  // oldest first: no row stays open.
  Rows finish() {
    std::vector<std::pair<int64_t, int64_t>> samples;  // (item, length)
    for (const Row& row : rows_) {
      for (size_t k = 0; k < row.items.size(); ++k) samples.emplace_back(row.items[k], row.lengths[k]);
    }
    std::stable_sort(samples.begin(), samples.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
    rows_.clear();
    for (const auto& [item, length] : samples) {
      const auto fit = first_fit(length);
      if (fit == rows_.end()) {
        rows_.emplace_back().put(item, length);
      } else {
        fit->put(item, length);
      }
    }
    Rows out;
    for (Row& row : rows_) out.push_back(std::move(row.items));
    rows_.clear();
    return out;
  }

  Rows open_rows() const {
    Rows out;
    for (const Row& row : rows_) out.push_back(row.items);
    return out;
  }

  // Replaces the open rows with these (items and their lengths, row by row): restores a packer's state.
  void reopen(const Rows& items, const Rows& lengths) {
    TORCH_CHECK_VALUE(items.size() == lengths.size(), "got ", items.size(), " rows of items and ", lengths.size(),
                      " of lengths");
    std::vector<Row> rows(items.size());
    for (size_t r = 0; r < items.size(); ++r) {
      TORCH_CHECK_VALUE(items[r].size() == lengths[r].size(), "row ", r, ": ", items[r].size(), " items, ",
                        lengths[r].size(), " lengths");
      for (size_t k = 0; k < items[r].size(); ++k) rows[r].put(items[r][k], lengths[r][k]);
      TORCH_CHECK_VALUE(rows[r].fill <= max_seq_len_, "row ", r, " of ", rows[r].fill, " tokens does not fit ",
                        max_seq_len_);
    }
    TORCH_CHECK_VALUE(static_cast<int64_t>(rows.size()) <= capacity_, rows.size(), " rows do not fit ", capacity_,
                      " open rows");
    rows_ = std::move(rows);
  }

 private:
  std::vector<Row>::iterator first_fit(int64_t length) {
    return std::find_if(rows_.begin(), rows_.end(), [&](const Row& row) { return row.fill + length <= max_seq_len_; });
  }

  void take(std::vector<Row>::iterator row, Rows& left) {
    left.push_back(std::move(row->items));
    rows_.erase(row);
  }

  void place(int64_t item, int64_t length, Rows& left) {
    if (length == 0) return;  // nothing to train on
    const auto fit = first_fit(length);
    if (fit != rows_.end()) {
      fit->put(item, length);
      if (fit->fill == max_seq_len_) take(fit, left);
    } else if (length == max_seq_len_) {
      left.push_back({item});
    } else {
      if (static_cast<int64_t>(rows_.size()) == capacity_) {  // the fullest (oldest among equals) makes room
        take(std::max_element(rows_.begin(), rows_.end(), [](const Row& a, const Row& b) { return a.fill < b.fill; }),
             left);
      }
      rows_.emplace_back().put(item, length);
    }
  }

  int64_t max_seq_len_, capacity_;
  std::vector<Row> rows_;  // open, oldest first
};

}  // namespace
}  // namespace speech_llama

TORCH_LIBRARY_FRAGMENT(speech_llama, m) {
  m.class_<speech_llama::FirstFitPacker>("FirstFitPacker")
      .def(torch::init<int64_t, int64_t>())
      .def("add", &speech_llama::FirstFitPacker::add)
      .def("finish", &speech_llama::FirstFitPacker::finish)
      .def("open_rows", &speech_llama::FirstFitPacker::open_rows)
      .def("reopen", &speech_llama::FirstFitPacker::reopen);
}
