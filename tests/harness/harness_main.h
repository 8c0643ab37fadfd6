// The command line and the case loop every kernel harness shares:
//
//   HARNESS [--quick] [--filter SUBSTRING] [--list]
//
// runs each case (a `name()` and a `quick` flag; with --quick only the quick ones) whose name
// contains SUBSTRING, as run(case, seed) -> an error message, empty when it passed; prints a
// line per failing case (and, when a sanitizer stops the process, the case it stopped) and
// ends with "N passed, M failed"; exits non-zero on any failure, 2 on a bad argument.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace harness {

inline const char*& running_case() {
  static const char* name = nullptr;
  return name;
}

inline void name_the_running_case() {
  if (running_case()) std::fprintf(stderr, "FAIL %s: stopped by the sanitizer (report above)\n", running_case());
}

template <typename Case, typename Run>
int main(int argc, char** argv, const std::vector<Case>& cases, Run run) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_set_death_callback(name_the_running_case);
#endif
  bool quick = false, list = false;
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      quick = true;
    } else if (a == "--list") {
      list = true;
    } else if (a == "--filter" && i + 1 < argc) {
      filter = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--filter SUBSTRING] [--list]\n", argv[0]);
      return 2;
    }
  }
  int passed = 0, failed = 0;
  uint64_t seed = 1;
  for (const Case& c : cases) {
    ++seed;
    const std::string name = c.name();
    if ((quick && !c.quick) || name.find(filter) == std::string::npos) continue;
    if (list) {
      std::printf("%s\n", name.c_str());
      continue;
    }
    running_case() = name.c_str();
    const std::string error = run(c, seed);
    running_case() = nullptr;
    if (error.empty()) {
      ++passed;
    } else {
      ++failed;
      std::printf("FAIL %s: %s\n", name.c_str(), error.c_str());
      std::fflush(stdout);
    }
  }
  if (list) return 0;
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed || !passed ? 1 : 0;
}

}  // namespace harness
