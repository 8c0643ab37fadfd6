// Runs csrc/gram_kernel.cuh, the same source the GPU build compiles, on the host under
// cuda_emulation.h: every dtype, bias 0 and 1, sizes on both sides of the 64-wide tiles and
// the 16-deep slabs, a row stride wider than the output, and an output that already holds
// values (the kernel adds to it). Every element is checked against a long double reference
// computed from the same (rounded) inputs, within a bound on the accumulation's rounding;
// the padding columns and a guard before the output must keep their poison, and a write
// past its end is an AddressSanitizer error. The "ghost" cases run ghost_sq_norm_kernel (one
// sample's positions as both sets) and check every tile pair's partial sum the same way.
//
//   gram_harness [--quick] [--filter SUBSTRING] [--list]
//
// Prints a line per failing case and ends with "N passed, M failed"; exits non-zero on
// any failure (tests/test_kernel_emulation.py builds and runs it).
#include <math.h>

#include "cuda_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gram_kernel.cuh"
#include "harness_main.h"

namespace {

constexpr int64_t kGuard = 37;  // elements before the output

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() {
  return "float32";
}
template <>
const char* type_name<double>() {
  return "float64";
}
template <>
const char* type_name<c10::Half>() {
  return "float16";
}
template <>
const char* type_name<c10::BFloat16>() {
  return "bfloat16";
}

template <typename acc_t>
bool is_poison(acc_t v) {
  acc_t poison;
  std::memset(&poison, 0xFF, sizeof poison);
  return std::memcmp(&v, &poison, sizeof v) == 0;
}

struct Shape {
  int64_t na, nb, d_x, d_g, pad;  // pad: extra columns per output row (ld_out = nb + pad)
  double bias;
};

template <typename T>
std::string run(const Shape& s, uint64_t seed) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  auto fill = [&](int64_t n) {
    std::vector<T> v(n);
    for (auto& e : v) e = static_cast<T>(normal(rng));
    return v;
  };
  const std::vector<T> xa = fill(s.na * s.d_x), ga = fill(s.na * s.d_g), xb = fill(s.nb * s.d_x),
                       gb = fill(s.nb * s.d_g);
  const int64_t ld = s.nb + s.pad;
  // A guard before out; none after it, so that AddressSanitizer reports a write past its end
  // (a stray write adds exactly 0 there: rows and columns beyond the sets are staged as zeros).
  std::vector<acc_t> buffer(kGuard + s.na * ld);
  std::memset(buffer.data(), 0xFF, buffer.size() * sizeof(acc_t));
  acc_t* out = buffer.data() + kGuard;
  std::vector<acc_t> before(s.na * s.nb);
  for (int64_t n = 0; n < s.na; ++n)
    for (int64_t m = 0; m < s.nb; ++m) out[n * ld + m] = before[n * s.nb + m] = static_cast<acc_t>(normal(rng));

  const indivgrad::GramPlan p = indivgrad::make_gram_plan(s.na, s.nb, s.d_x, s.d_g, ld);
  cuda_emulation::launch(static_cast<unsigned>(p.blocks), indivgrad::kGramThreads,
                         static_cast<size_t>(indivgrad::gram_smem_bytes(sizeof(acc_t))), {},
                         indivgrad::gram_kernel<T, acc_t>, xa.data(), ga.data(), xb.data(), gb.data(), out, p,
                         static_cast<acc_t>(s.bias));

  const long double eps = std::is_same_v<acc_t, double> ? 1e-15L : 1e-6L;
  for (int64_t n = 0; n < s.na; ++n) {
    for (int64_t m = 0; m < s.nb; ++m) {
      long double kx = 0, kg = 0, ax = 0, ag = 0;
      for (int64_t i = 0; i < s.d_x; ++i) {
        const long double t =
            static_cast<long double>(static_cast<acc_t>(xa[n * s.d_x + i])) * static_cast<acc_t>(xb[m * s.d_x + i]);
        kx += t;
        ax += fabsl(t);
      }
      for (int64_t j = 0; j < s.d_g; ++j) {
        const long double t =
            static_cast<long double>(static_cast<acc_t>(ga[n * s.d_g + j])) * static_cast<acc_t>(gb[m * s.d_g + j]);
        kg += t;
        ag += fabsl(t);
      }
      const long double ref = before[n * s.nb + m] + (kx + s.bias) * kg;
      const long double bound =
          eps * (4 + s.d_x + s.d_g) * ((ax + fabsl(s.bias)) * ag + fabsl(before[n * s.nb + m])) + 1e-30L;
      const acc_t got = out[n * ld + m];
      if (!(fabsl(got - ref) <= bound))
        return "out[" + std::to_string(n) + ", " + std::to_string(m) + "] = " + std::to_string(double(got)) +
               ", expected " + std::to_string(double(ref)) + " (wrong elements)";
    }
    for (int64_t m = s.nb; m < ld; ++m)
      if (!is_poison(out[n * ld + m]))
        return "padding column " + std::to_string(m) + " of row " + std::to_string(n) + " was written (out of bounds)";
  }
  for (int64_t i = 0; i < kGuard; ++i)
    if (!is_poison(buffer[i])) return "a guard element before out was written (out of bounds)";
  return "";
}

// ghost_sq_norm_kernel on s.na samples of s.nb positions: partial[n, pair] against the
// reference w·sum over the tile pair's positions (a, b) of (x_a·x_b)(g_a·g_b), w = 2 off the
// diagonal.
template <typename T>
std::string run_ghost(const Shape& s, uint64_t seed) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  auto fill = [&](int64_t n) {
    std::vector<T> v(n);
    for (auto& e : v) e = static_cast<T>(normal(rng));
    return v;
  };
  const int64_t n = s.na, t = s.nb;
  const std::vector<T> x = fill(n * t * s.d_x), g = fill(n * t * s.d_g);
  const indivgrad::GhostPlan p = indivgrad::make_ghost_plan(n, t, s.d_x, s.d_g);
  std::vector<acc_t> buffer(kGuard + n * p.pairs);  // a guard before, none after (AddressSanitizer)
  std::memset(buffer.data(), 0xFF, buffer.size() * sizeof(acc_t));
  acc_t* partial = buffer.data() + kGuard;
  cuda_emulation::launch(static_cast<unsigned>(p.blocks), indivgrad::kGramThreads,
                         static_cast<size_t>(indivgrad::gram_smem_bytes(sizeof(acc_t))), {},
                         indivgrad::ghost_sq_norm_kernel<T, acc_t>, x.data(), g.data(), partial, p);
  const long double eps = std::is_same_v<acc_t, double> ? 1e-15L : 1e-6L;
  auto dot = [](const T* a, const T* b, int64_t d, long double* abs_sum) {
    long double sum = 0;
    *abs_sum = 0;
    for (int64_t k = 0; k < d; ++k) {
      const long double v = static_cast<long double>(static_cast<acc_t>(a[k])) * static_cast<acc_t>(b[k]);
      sum += v;
      *abs_sum += fabsl(v);
    }
    return sum;
  };
  const int64_t tile = indivgrad::kGramTile;
  for (int64_t sample = 0; sample < n; ++sample) {
    const T* xs = x.data() + sample * t * s.d_x;
    const T* gs = g.data() + sample * t * s.d_g;
    int64_t pair = 0;
    for (int64_t i = 0; i < p.tiles; ++i)
      for (int64_t j = i; j < p.tiles; ++j, ++pair) {
        long double ref = 0, bound = 0, ax, ag;
        for (int64_t a = i * tile; a < std::min(t, (i + 1) * tile); ++a)
          for (int64_t b = j * tile; b < std::min(t, (j + 1) * tile); ++b) {
            ref += dot(xs + a * s.d_x, xs + b * s.d_x, s.d_x, &ax) * dot(gs + a * s.d_g, gs + b * s.d_g, s.d_g, &ag);
            bound += ax * ag;
          }
        const long double w = i == j ? 1 : 2;
        ref *= w;
        bound = eps * (40 + s.d_x + s.d_g) * w * bound + 1e-30L;
        const acc_t got = partial[sample * p.pairs + pair];
        if (!(fabsl(got - ref) <= bound))
          return "partial[" + std::to_string(sample) + ", " + std::to_string(pair) +
                 "] = " + std::to_string(double(got)) + ", expected " + std::to_string(double(ref)) +
                 " (wrong elements)";
      }
  }
  for (int64_t i = 0; i < kGuard; ++i)
    if (!is_poison(buffer[i])) return "a guard element before partial was written (out of bounds)";
  return "";
}

struct Case {
  const char* dtype;
  Shape shape;
  bool quick;
  bool ghost = false;  // ghost_sq_norm_kernel: shape.na samples of shape.nb positions
  std::string name() const {
    char buf[160];
    if (ghost) {
      std::snprintf(buf, sizeof buf, "ghost %s n=%lld t=%lld d_x=%lld d_g=%lld", dtype,
                    static_cast<long long>(shape.na), static_cast<long long>(shape.nb),
                    static_cast<long long>(shape.d_x), static_cast<long long>(shape.d_g));
      return buf;
    }
    std::snprintf(buf, sizeof buf, "%s na=%lld nb=%lld d_x=%lld d_g=%lld pad=%lld bias=%g", dtype,
                  static_cast<long long>(shape.na), static_cast<long long>(shape.nb), static_cast<long long>(shape.d_x),
                  static_cast<long long>(shape.d_g), static_cast<long long>(shape.pad), shape.bias);
    return buf;
  }
};

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  const char* dtypes[] = {"float32", "float64", "float16", "bfloat16"};
  const int64_t sides[] = {1, 5, 64, 65, 130};
  const int64_t depths[] = {1, 16, 17, 40};
  int k = 0;
  for (const char* dt : dtypes)
    for (int64_t na : sides)
      for (int64_t nb : sides)
        for (int64_t d : depths) {
          const int64_t d_g = depths[(k + 1) % 4];
          const bool quick = (na == 65 || na == 5) && (nb == 65 || nb == 130) && d != 1;
          cases.push_back({dt, {na, nb, d, d_g, k % 3 == 0 ? 3 : 0, k % 2 ? 1.0 : 0.0}, quick});
          ++k;
        }
  // ghost_sq_norm_kernel: positions on both sides of the 64-wide tiles (1 to 3 tiles a side,
  // 1 to 6 tile pairs), widths on both sides of the 16-deep slabs.
  const int64_t positions[] = {1, 5, 64, 65, 130};
  for (const char* dt : dtypes)
    for (int64_t n : {int64_t{1}, int64_t{3}})
      for (int64_t t : positions) {
        const int64_t d_x = depths[k % 4], d_g = depths[(k + 1) % 4];
        const bool quick = n == 3 && (t == 65 || t == 130) && d_x != 1;
        cases.push_back({dt, {n, t, d_x, d_g, 0, 0.0}, quick, true});
        ++k;
      }
  return cases;
}

std::string run_case(const Case& c, uint64_t seed) {
  const std::string dt = c.dtype;
  if (c.ghost) {
    if (dt == "float32") return run_ghost<float>(c.shape, seed);
    if (dt == "float64") return run_ghost<double>(c.shape, seed);
    if (dt == "float16") return run_ghost<c10::Half>(c.shape, seed);
    return run_ghost<c10::BFloat16>(c.shape, seed);
  }
  if (dt == "float32") return run<float>(c.shape, seed);
  if (dt == "float64") return run<double>(c.shape, seed);
  if (dt == "float16") return run<c10::Half>(c.shape, seed);
  return run<c10::BFloat16>(c.shape, seed);
}

}  // namespace

int main(int argc, char** argv) { return harness::main(argc, argv, all_cases(), run_case); }
