// Runs csrc/outer_kernel.cuh, the same source the GPU build compiles, on the host under
// cuda_emulation.h and checks every element it writes, bit for bit, against the value
// the host computes for it: all dtypes, both layouts, every misalignment of out and
// bias_out, odd and large widths, every activation, with and without pre and bias_out,
// several SM counts (so several launch shapes), and the last blocks of outputs over 2^32
// elements (those live in a reserved, mostly inaccessible mapping: a write outside the
// checked window faults). Bytes around out and bias_out are guards that must stay 0xFF,
// as must every element a launch does not own.
//
//   outer_harness [--quick] [--filter SUBSTRING] [--list]
//
// Prints a line per failing case and ends with "N passed, M failed"; exits non-zero on
// any failure (tests/test_kernel_emulation.py builds and runs it).
#include <math.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cuda_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <string>
#include <vector>

#include "harness_main.h"
#include "outer_kernel.cuh"

using indivgrad::Activation;
using indivgrad::ActParams;
using indivgrad::OuterPlan;

namespace {

constexpr int64_t kL2Bytes = 50 << 20;   // an H100's
constexpr size_t kGuardBytes = 64;       // a multiple of 16: misalignment comes only from the offset
constexpr unsigned char kPoison = 0xFF;  // NaN in every float type, so never an expected value

enum class DType { Float32, Float64, Float16, BFloat16 };
const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "?";
}
int dtype_size(DType d) { return d == DType::Float64 ? 8 : d == DType::Float32 ? 4 : 2; }

const std::pair<Activation, const char*> kActivations[] = {
    {Activation::Identity, "identity"}, {Activation::Relu, "relu"},          {Activation::LeakyRelu, "leaky_relu"},
    {Activation::Elu, "elu"},           {Activation::Tanh, "tanh"},          {Activation::Sigmoid, "sigmoid"},
    {Activation::Gelu, "gelu"},         {Activation::GeluTanh, "gelu_tanh"}, {Activation::Silu, "silu"},
    {Activation::Softplus, "softplus"}};
constexpr int kNumActivations = sizeof(kActivations) / sizeof(kActivations[0]);

struct Case {
  DType dtype;
  int64_t N, d_in, d_out;
  bool out_in;
  int out_mis, bias_mis;  // elements past a 16-byte boundary
  int act;                // index into kActivations; used when with_pre
  bool with_pre, with_bias;
  int num_sms;
  int64_t last_row_blocks;  // > 0: run only the last row blocks (outputs too large for memory)
  bool quick;               // part of the --quick subset

  std::string name() const {
    std::string s = std::string(dtype_name(dtype)) + "/" + (out_in ? "out_in" : "in_out") + "/" + std::to_string(N) +
                    "x" + std::to_string(d_in) + "x" + std::to_string(d_out) + "/mis" + std::to_string(out_mis) + "," +
                    std::to_string(bias_mis) + "/" + (with_pre ? kActivations[act].second : "outer") +
                    (with_bias ? "/bias" : "") + "/sms" + std::to_string(num_sms);
    if (last_row_blocks) s += "/last" + std::to_string(last_row_blocks);
    return s;
  }
};

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Deterministic inputs in [-2, 2), exactly representable in T; every 4th pre is 0, where
// relu, leaky_relu and elu switch branches.
struct Rng {
  uint64_t state;
  double next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<double>(z >> 11) / static_cast<double>(1ull << 53) * 4.0 - 2.0;
  }
};

// A poisoned buffer with guard bytes on both sides. Large outputs are reserved but left
// inaccessible except for a window around the part a partial launch writes.
class Buffer {
 public:
  Buffer(size_t elem_size, int64_t count, int misalign, int64_t window_first_elem = 0)
      : elem_size_(elem_size), count_(count) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = elem_size * static_cast<size_t>(count);
    mapped_ = 2 * page + kGuardBytes + bytes + kGuardBytes + page;
    void* m = mmap(nullptr, mapped_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("mmap failed");
    map_ = static_cast<unsigned char*>(m);
    data_ = map_ + page + kGuardBytes + misalign * elem_size;
    const auto page_down = [&](unsigned char* p) { return map_ + (static_cast<size_t>(p - map_) / page) * page; };
    window_begin_ = page_down(data_ + window_first_elem * elem_size - kGuardBytes);
    window_end_ = page_down(data_ + bytes + kGuardBytes + page - 1);
    if (mprotect(window_begin_, window_end_ - window_begin_, PROT_READ | PROT_WRITE) != 0)
      throw std::runtime_error("mprotect failed");
    std::memset(window_begin_, kPoison, window_end_ - window_begin_);
  }
  ~Buffer() { munmap(map_, mapped_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }
  const unsigned char* elem(int64_t i) const { return data_ + i * elem_size_; }
  // The first guard byte before or after the elements that is not poison, or "".
  std::string check_guards() const {
    for (const unsigned char* p = window_begin_; p < data_; ++p)
      if (*p != kPoison) return "guard byte " + std::to_string(data_ - p) + " before the buffer was written";
    for (const unsigned char* p = data_ + elem_size_ * count_; p < window_end_; ++p)
      if (*p != kPoison)
        return "guard byte " + std::to_string(p - data_ - elem_size_ * count_) + " after it was written";
    return "";
  }
  bool poisoned(int64_t i) const {
    for (size_t b = 0; b < elem_size_; ++b)
      if (elem(i)[b] != kPoison) return false;
    return true;
  }

 private:
  size_t elem_size_;
  int64_t count_;
  size_t mapped_;
  unsigned char* map_;
  unsigned char* data_;
  unsigned char* window_begin_;
  unsigned char* window_end_;
};

// Collects the first few mismatches of one buffer.
struct Mismatches {
  const char* what;
  int64_t count = 0;
  std::string first;
  void add(const std::string& where) {
    if (count++ == 0) first = where;
  }
  std::string report() const {
    return count ? std::string(what) + ": " + std::to_string(count) + " wrong elements, first " + first : "";
  }
};

template <typename T>
std::string run_case(const Case& c, uint64_t seed) {
  using acc_t = typename AccType<T>::type;
  const int64_t N = c.N, R = c.out_in ? c.d_out : c.d_in, C = c.out_in ? c.d_in : c.d_out;
  Rng rng{seed};
  std::vector<T> x(N * c.d_in), up(N * c.d_out), pre(N * c.d_out);
  for (auto& v : x) v = static_cast<T>(rng.next());
  for (auto& v : up) v = static_cast<T>(rng.next());
  for (size_t i = 0; i < pre.size(); ++i) pre[i] = static_cast<T>(i % 4 == 0 ? 0.0 : 3 * rng.next());
  const ActParams act{kActivations[c.act].first, 0.2, 0.7, 1.5, 3.0};

  // Buffer puts out at c.out_mis elements past a 16-byte boundary; the plan sees only that.
  const auto out_offset = static_cast<uintptr_t>(c.out_mis * sizeof(T));
  const OuterPlan p =
      indivgrad::make_outer_plan(N, R, C, c.out_in, sizeof(T), sizeof(acc_t), out_offset, c.num_sms, kL2Bytes);
  const int64_t pitch = C * static_cast<int64_t>(sizeof(T));
  const int want_store = out_offset % 16 == 0 && pitch % 16 == 0                   ? 16
                         : sizeof(T) == 2 && out_offset % 8 == 0 && pitch % 8 == 0 ? 8
                                                                                   : 0;
  if (p.store_bytes != want_store) return "plan chose the wrong path";
  if (p.blocks() > INT32_MAX) return "plan needs more than 2^31 - 1 blocks";
  const int64_t first_block = c.last_row_blocks ? p.row_blocks - c.last_row_blocks : 0;
  const int64_t first_row = first_block * p.block_rows;  // rows before it are not written
  std::vector<int64_t> blocks;
  for (int64_t b = first_block * p.col_tiles; c.last_row_blocks && b < p.blocks(); ++b) blocks.push_back(b);

  Buffer out(sizeof(T), N * R * C, c.out_mis, first_row * C);
  Buffer bias(sizeof(T), N * c.d_out, c.bias_mis);
  const size_t smem = static_cast<size_t>(indivgrad::outer_smem_bytes(p, sizeof(acc_t)));
  if (reinterpret_cast<uintptr_t>(out.as<T>()) % 16 != out_offset % 16) return "harness: out misplaced";
  auto kernel = indivgrad::outer_kernel<T, acc_t, 0, false>;
  if (p.store_bytes == 16)
    kernel = p.streaming ? indivgrad::outer_kernel<T, acc_t, 16, true> : indivgrad::outer_kernel<T, acc_t, 16, false>;
  if constexpr (sizeof(T) == 2)
    if (p.store_bytes == 8)
      kernel = p.streaming ? indivgrad::outer_kernel<T, acc_t, 8, true> : indivgrad::outer_kernel<T, acc_t, 8, false>;
  try {
    cuda_emulation::launch(static_cast<unsigned>(p.blocks()), indivgrad::kOuterThreads, smem, blocks, kernel, x.data(),
                           up.data(), c.with_pre ? pre.data() : nullptr, out.as<T>(),
                           c.with_bias ? bias.as<T>() : nullptr, p, act);
  } catch (const std::exception& e) {
    return e.what();
  }

  auto g_at = [&](int64_t i) {
    const acc_t u = static_cast<acc_t>(up[i]);
    return c.with_pre ? indivgrad::activation_backward<acc_t>(act, u, static_cast<acc_t>(pre[i])) : u;
  };
  std::vector<acc_t> g(N * c.d_out);
  for (int64_t i = 0; i < N * c.d_out; ++i) g[i] = g_at(i);

  std::string errors;
  Mismatches wrong_out{"out"}, wrong_bias{"bias_out"};
  for (int64_t q = first_row; q < N * R; ++q) {
    const int64_t n = q / R;
    const acc_t row = c.out_in ? g[q] : static_cast<acc_t>(x[q]);
    const T* got = reinterpret_cast<const T*>(out.elem(q * C));
    for (int64_t col = 0; col < C; ++col) {
      const int64_t ci = n * C + col;
      const T want = static_cast<T>(row * (c.out_in ? static_cast<acc_t>(x[ci]) : g[ci]));
      if (std::memcmp(&want, got + col, sizeof(T)) != 0)
        wrong_out.add("[" + std::to_string(n) + ", " + std::to_string(q % R) + ", " + std::to_string(col) + "]");
    }
  }
  for (int64_t i = 0; i < N * c.d_out; ++i) {
    // Written by the launched blocks: (out_in) the block of its row, (in_out) of its sample's row 0.
    const bool owned = c.with_bias && (c.out_in ? i >= first_row : (i / c.d_out) * R >= first_row);
    const T want = static_cast<T>(g[i]);
    if (owned ? std::memcmp(&want, bias.elem(i), sizeof(T)) != 0 : !bias.poisoned(i))
      wrong_bias.add(std::to_string(i) + (owned ? "" : " (not this launch's, but written)"));
  }
  for (const std::string& e : {wrong_out.report(), wrong_bias.report(), out.check_guards(), bias.check_guards()})
    if (!e.empty()) errors += (errors.empty() ? "" : "; ") + e;
  return errors;
}

std::string run(const Case& c, uint64_t seed) {
  switch (c.dtype) {
    case DType::Float32: return run_case<float>(c, seed);
    case DType::Float64: return run_case<double>(c, seed);
    case DType::Float16: return run_case<c10::Half>(c, seed);
    case DType::BFloat16: return run_case<c10::BFloat16>(c, seed);
  }
  return "unknown dtype";
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  const DType dtypes[] = {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16};
  const int sms[] = {132, 1, 7};
  // (N, d_in, d_out): odd and large widths both ways, exact tile sizes +-1, many tiny samples.
  const int64_t shapes[][3] = {{1, 1, 1},    {3, 7, 5},    {2, 257, 3},   {2, 3, 257},   {2, 2047, 2},
                               {2, 2, 2047}, {2, 2048, 3}, {2, 3, 2048},  {1, 2049, 2},  {1, 2, 2049},
                               {1, 4097, 1}, {1, 1, 4097}, {1, 40000, 1}, {1, 1, 40000}, {37, 16, 24},
                               {300, 3, 5},  {4, 64, 96},  {5, 12, 20},   {2, 300, 100}};
  int k = 0;
  // Every dtype, layout, misalignment and shape; activations, pre/bias and SM counts rotate.
  for (DType d : dtypes) {
    const int vec = 16 / dtype_size(d);
    for (bool out_in : {false, true})
      for (int mis = 0; mis < vec; ++mis)
        for (const auto& s : shapes) {
          Case c{d,
                 s[0],
                 s[1],
                 s[2],
                 out_in,
                 mis,
                 (mis + k) % vec,
                 k % kNumActivations,
                 k % 5 != 4,
                 k % 3 != 2,
                 sms[k % 3],
                 0,
                 mis <= 1 && k % 2 == 0};
          cases.push_back(c);
          ++k;
        }
  }
  // Every activation, with and without bias, and the plain outer product, on shapes with
  // several column tiles (out_in) and several row blocks per sample (in_out).
  for (DType d : {DType::Float32, DType::BFloat16, DType::Float64})
    for (bool out_in : {false, true})
      for (int a = -1; a < kNumActivations; ++a)
        for (bool with_bias : {false, true}) {
          const int64_t d_in = out_in ? 2100 : 600, d_out = out_in ? 40 : 24;
          cases.push_back(
              Case{d, out_in ? 2 : 3, d_in, d_out, out_in, 0, 1, a < 0 ? 0 : a, a >= 0, with_bias, 132, 0, a % 3 == 0});
        }
  // Outputs over 2^32 elements, fast path (16- and 8-byte stores) and run path: the
  // last two row blocks, which hold the largest offsets (an int or uint32 offset wraps).
  const int64_t big[][4] = {// dtype index, d_in, d_out, out_in
                            {3, 32768, 32770, 0}, {3, 32770, 32768, 1}, {3, 32776, 32768, 1}, {3, 32768, 32776, 0},
                            {0, 32768, 32772, 0}, {0, 32772, 32768, 1}, {0, 32768, 32769, 0}, {3, 32768, 32772, 0},
                            {3, 32772, 32768, 1}};  // the last two: 8-byte stores
  for (const auto& b : big)
    cases.push_back(Case{dtypes[b[0]], 5, b[1], b[2], b[3] != 0, 0, 3, 8, true, true, 132, 2, true});
  return cases;
}

}  // namespace

int main(int argc, char** argv) { return harness::main(argc, argv, all_cases(), run); }
