// DMI_CPU_CLONES marks a hot CPU entry point to be compiled twice, for AVX2+FMA (x86-64-v3) and
// for baseline x86-64, with the loader picking the clone once at load time (an ifunc). This keeps
// one portable .so that is still fast where AVX2 exists. Elsewhere it expands to nothing.
#pragma once

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
