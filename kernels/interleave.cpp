// The speech_llama::interleave_spans op (CPU): the spans of the reference's CPT interleaving for a
// batch of rows, from random draws bit for bit what NumPy gives (dsu_ops/__init__.py).
//
// For row index i the reference seeds `rng = np.random.default_rng((seed, epoch, i))`, draws
// `rng.random() < 0.5` (start with text) and `np.maximum(rng.binomial(n, p, size=n_words), 1)`
// (span lengths in words), and cuts the words at the lengths' running sums below n_words.
// Building a NumPy generator costs about 15 us, several times the rest of an interleaved sample,
// so the draws are made here: NumPy's SeedSequence, PCG64 (XSL-RR, 128-bit LCG), next_double and
// the binomial inversion algorithm, transcribed. Only the inversion regime
// (min(p, 1 - p) * n <= 30) is implemented; the Python side uses NumPy outside it.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>
#include <vector>

namespace speech_llama {
namespace {

using u128 = unsigned __int128;

// numpy.random.SeedSequence
constexpr uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875, kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;
constexpr uint32_t kMixMultL = 0xca01f9dd, kMixMultR = 0x4973f715;
constexpr int kPoolSize = 4;

uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= kMultA;
  value *= hash_const;
  value ^= value >> 16;
  return value;
}

uint32_t mix(uint32_t x, uint32_t y) {
  uint32_t result = kMixMultL * x - kMixMultR * y;
  result ^= result >> 16;
  return result;
}

// An integer as SeedSequence reads it: 32-bit words, least significant first; 0 is one word.
void append_words(uint64_t value, std::vector<uint32_t>& out) {
  do {
    out.push_back(static_cast<uint32_t>(value));
    value >>= 32;
  } while (value != 0);
}

// SeedSequence(entropy).generate_state(4, np.uint64)
std::array<uint64_t, 4> seed_state(const std::vector<uint32_t>& entropy) {
  std::array<uint32_t, kPoolSize> pool{};
  uint32_t hash_const = kInitA;
  for (size_t i = 0; i < kPoolSize; ++i) pool[i] = hashmix(i < entropy.size() ? entropy[i] : 0, hash_const);
  for (size_t src = 0; src < kPoolSize; ++src) {
    for (size_t dst = 0; dst < kPoolSize; ++dst) {
      if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hash_const));
    }
  }
  for (size_t src = kPoolSize; src < entropy.size(); ++src) {
    for (size_t dst = 0; dst < kPoolSize; ++dst) pool[dst] = mix(pool[dst], hashmix(entropy[src], hash_const));
  }
  std::array<uint32_t, 8> words{};
  uint32_t hash_b = kInitB;
  for (size_t i = 0; i < words.size(); ++i) {
    uint32_t value = pool[i % kPoolSize] ^ hash_b;
    hash_b *= kMultB;
    value *= hash_b;
    value ^= value >> 16;
    words[i] = value;
  }
  std::array<uint64_t, 4> state{};
  for (size_t i = 0; i < state.size(); ++i) state[i] = words[2 * i] | (static_cast<uint64_t>(words[2 * i + 1]) << 32);
  return state;
}

// numpy.random.PCG64 seeded from a SeedSequence
class Pcg64 {
 public:
  explicit Pcg64(const std::array<uint64_t, 4>& seed) {
    const u128 initstate = (static_cast<u128>(seed[0]) << 64) | seed[1];
    const u128 initseq = (static_cast<u128>(seed[2]) << 64) | seed[3];
    inc_ = (initseq << 1) | 1;
    step();
    state_ += initstate;
    step();
  }

  uint64_t next64() {
    step();
    const uint64_t folded = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
    const unsigned rotation = static_cast<unsigned>(state_ >> 122);
    return (folded >> rotation) | (folded << ((-rotation) & 63));
  }

  double next_double() { return static_cast<double>(next64() >> 11) * (1.0 / 9007199254740992.0); }

 private:
  void step() { state_ = state_ * kMultiplier + inc_; }

  static constexpr u128 kMultiplier = (static_cast<u128>(2549297995355413924ULL) << 64) | 4865540595714422341ULL;
  u128 state_ = 0, inc_ = 0;
};

// NumPy's random_binomial_inversion for one (n, p), its setup done once.
class BinomialInversion {
 public:
  BinomialInversion(int64_t n, double p)
      : n_(n), p_(p), q_(1.0 - p), qn_(std::exp(n * std::log(q_))) {
    const double np = n * p;
    bound_ = static_cast<int64_t>(std::fmin(static_cast<double>(n), np + 10.0 * std::sqrt(np * q_ + 1)));
  }

  int64_t operator()(Pcg64& rng) const {
    int64_t x = 0;
    double px = qn_, u = rng.next_double();
    while (u > px) {
      ++x;
      if (x > bound_) {
        x = 0;
        px = qn_;
        u = rng.next_double();
      } else {
        u -= px;
        px = ((n_ - x + 1) * p_ * px) / (x * q_);
      }
    }
    return x;
  }

 private:
  int64_t n_;
  double p_, q_, qn_;
  int64_t bound_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> interleave_spans_cpu(const at::Tensor& indices,
                                                                    const at::Tensor& n_words, int64_t seed,
                                                                    int64_t epoch, int64_t n, double p) {
  TORCH_CHECK(indices.dim() == 1 && n_words.dim() == 1 && indices.numel() == n_words.numel(),
              "indices and n_words must be 1-D and of one length");
  TORCH_CHECK(indices.scalar_type() == at::kLong && n_words.scalar_type() == at::kLong, "indices and n_words must be Long");
  TORCH_CHECK(seed >= 0 && epoch >= 0, "seed and epoch must be non-negative");
  TORCH_CHECK(n >= 0 && p >= 0.0 && p <= 1.0, "binomial n must be >= 0 and p in [0, 1]");
  TORCH_CHECK(std::fmin(p, 1.0 - p) * n <= 30.0, "binomial draws with min(p, 1 - p) * n > 30 are NumPy's (BTPE)");
  const at::Tensor index = indices.contiguous(), words = n_words.contiguous();
  const int64_t rows = index.numel();
  const int64_t* row_index = index.data_ptr<int64_t>();
  const int64_t* row_words = words.data_ptr<int64_t>();
  int64_t most = 0;  // bounds: n_words + 1 per row at most, 2 for a row of no words
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(row_index[r] >= 0 && row_words[r] >= 0, "indices and n_words must be non-negative");
    most += row_words[r] + 2;
  }
  at::Tensor text_first = at::empty({rows}, index.options().dtype(at::kBool));
  at::Tensor bounds = at::empty({most}, index.options());
  at::Tensor offsets = at::empty({rows + 1}, index.options());
  bool* first = text_first.data_ptr<bool>();
  int64_t* bound = bounds.data_ptr<int64_t>();
  int64_t* offset = offsets.data_ptr<int64_t>();
  int64_t n_bounds = 0;

  // random_binomial: nothing is drawn for n == 0 or p == 0; p > 0.5 draws n - Binomial(n, 1 - p).
  const bool none = n == 0 || p == 0.0, flipped = p > 0.5;
  const BinomialInversion binomial(n, flipped ? 1.0 - p : p);
  std::vector<uint32_t> entropy;
  for (int64_t r = 0; r < rows; ++r) {
    entropy.clear();
    append_words(static_cast<uint64_t>(seed), entropy);
    append_words(static_cast<uint64_t>(epoch), entropy);
    append_words(static_cast<uint64_t>(row_index[r]), entropy);
    Pcg64 rng(seed_state(entropy));
    first[r] = rng.next_double() < 0.5;
    offset[r] = n_bounds;
    bound[n_bounds++] = 0;
    // The last span ends at n_words: the draws after the first cut there change nothing, and each
    // row has a generator of its own, so drawing stops.
    for (int64_t w = 0, cut = 0; w < row_words[r]; ++w) {
      const int64_t x = none ? 0 : flipped ? n - binomial(rng) : binomial(rng);
      cut += x > 1 ? x : 1;
      if (cut >= row_words[r]) break;
      bound[n_bounds++] = cut;
    }
    bound[n_bounds++] = row_words[r];
  }
  offset[rows] = n_bounds;
  return {text_first, bounds.narrow(0, 0, n_bounds), offsets};
}

}  // namespace
}  // namespace speech_llama

TORCH_LIBRARY_FRAGMENT(speech_llama, m) {
  m.def("interleave_spans(Tensor indices, Tensor n_words, int seed, int epoch, int n, float p) "
        "-> (Tensor text_first, Tensor bounds, Tensor bound_offsets)");
}

TORCH_LIBRARY_IMPL(speech_llama, CPU, m) {
  m.impl("interleave_spans", &speech_llama::interleave_spans_cpu);
}
