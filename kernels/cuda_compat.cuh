// Lets the kernel sources build as plain C++ (g++ -x c++) for the host tests: the qualifiers vanish
// and the launch coordinates become globals that the host driver sets before calling a kernel.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define EDGEVL_HD __host__ __device__ __forceinline__
#define EDGEVL_DEVICE __device__ __forceinline__
#define EDGEVL_CUDA 1
#else
#include <cstddef>
#include <cstdint>
#define __host__
#define __device__
#define __global__
#define __restrict__
#define EDGEVL_HD inline
#define EDGEVL_DEVICE inline
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// Defined by the host driver, which walks every block and thread of a launch in turn.
extern dim3 blockIdx, threadIdx, blockDim, gridDim;
#endif

#if defined(__CUDACC_RTC__)
// NVRTC has no libc headers; these are the only fixed-width types the kernels use.
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
#elif defined(__CUDACC__)
#include <cstdint>
#endif

namespace edgevl {

// float -> IEEE half bits, round to nearest even: __float2half_rn on the device, the same rounding
// in software on the host, so the fp16 output equals numpy's float32 -> float16 cast.
EDGEVL_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    uint32_t x;
    __builtin_memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t exp = (x >> 23) & 0xffu;
    uint32_t man = x & 0x7fffffu;
    if (exp == 0xffu) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0u));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000u;
        int shift = 14 - e;
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13);
    uint32_t rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;  // a carry into the exponent is right
    return (uint16_t)(sign | half);
#endif
}

EDGEVL_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t x;
    if (exp == 0) {
        if (man == 0) {
            x = sign;
        } else {
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400u));
            x = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        x = sign | 0x7f800000u | (man << 13);
    } else {
        x = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    __builtin_memcpy(&f, &x, 4);
    return f;
#endif
}

}  // namespace edgevl
