// DMI_CPU_CLONES marks a hot CPU entry point to be compiled twice, for AVX2+FMA (x86-64-v3) and
// for baseline x86-64, with the loader picking the clone once at load time (an ifunc). This keeps
// one portable .so that is still fast where AVX2 exists. Elsewhere it expands to nothing.
//
// Also the GCC/Clang vector types the CPU kernels compute with, and their unaligned loads and
// stores (through memcpy, which compiles to one vector move).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && \
    !defined(DMI_EXT_NO_CLONES)
#define DMI_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DMI_CPU_CLONES
#endif

// Helpers called from a cloned entry point must be inlined into it to be compiled for its target.
#if defined(__GNUC__)
#define DMI_INLINE inline __attribute__((always_inline))
#else
#define DMI_INLINE inline
#endif

namespace dmi_ext::cpu {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

DMI_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
DMI_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
DMI_INLINE v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
DMI_INLINE void store4(float* p, v4f v) { std::memcpy(p, &v, sizeof v); }
DMI_INLINE v4d load4(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
DMI_INLINE void store4(double* p, v4d v) { std::memcpy(p, &v, sizeof v); }

// Lane-wise mask ? a : b (mask lanes all ones or all zeros).
DMI_INLINE v8f select(v8i mask, v8f a, v8f b) { return (v8f)((mask & (v8i)a) | (~mask & (v8i)b)); }
DMI_INLINE v4d select(v4l mask, v4d a, v4d b) { return (v4d)((mask & (v4l)a) | (~mask & (v4l)b)); }

}  // namespace dmi_ext::cpu
