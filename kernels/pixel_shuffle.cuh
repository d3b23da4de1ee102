// Index math of InternVL's 0.5 pixel shuffle, shared by the device kernels and the host tests.
// Features [T, side*side, C] (CLS dropped) read as the reference's [T, W, H, C] become
// [T, (side/2)^2, 4C]; v1 keeps the reference's missing final transpose (token order transposed).
#pragma once
#include "cuda_compat.cuh"

namespace edgevl {

// Source offset within one tile's [side*side, C] block for output token tok, channel c4.
// Derived from the reference's reshape(n, w, h/2, 2C) -> permute -> reshape(n, h/2, w/2, 4C)
// (-> permute for v2).
EDGEVL_HD long long pixel_shuffle_source(int tok, int c4, int side, int channels, int v2) {
    const int half = side / 2;
    const int h2 = v2 ? tok % half : tok / half;
    const int w2 = v2 ? tok / half : tok % half;
    const int c2 = c4 % (2 * channels);
    const int w = 2 * w2 + c4 / (2 * channels);
    const int h = 2 * h2 + c2 / channels;
    return ((long long)w * side + h) * channels + c2 % channels;
}

template <typename T>
EDGEVL_HD float load_as_float(const T* p, long long i);
template <>
EDGEVL_HD float load_as_float<float>(const float* p, long long i) { return p[i]; }
template <>
EDGEVL_HD float load_as_float<uint16_t>(const uint16_t* p, long long i) { return half_bits_to_float(p[i]); }

EDGEVL_HD void store_from_float(float* p, long long i, float v) { p[i] = v; }
EDGEVL_HD void store_from_float(uint16_t* p, long long i, float v) { p[i] = float_to_half_bits(v); }

// The projector's LayerNorm on one element once its token's mean and 1/sqrt(var + eps) are known.
EDGEVL_HD float layer_norm_value(float x, float mean, float rstd, float weight, float bias) {
    return (x - mean) * rstd * weight + bias;
}

}  // namespace edgevl
