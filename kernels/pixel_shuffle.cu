// InternVL's 0.5 pixel shuffle [T, side^2, C] -> [T, side^2/4, 4C] (v1 and v2 token orders),
// optionally fused with the projector's LayerNorm over the 4C channels. Index math lives in
// pixel_shuffle.cuh so the host tests run the same code.
#include "pixel_shuffle.cuh"

using namespace edgevl;

// One thread per output element; a pure gather, so fp16 in -> fp16 out copies bits exactly.
#define EDGEVL_PIXEL_SHUFFLE(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const T* __restrict__ x, T* __restrict__ y, int tiles, int side,  \
                                    int channels, int v2) {                                          \
        const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;                         \
        const int tokens = (side / 2) * (side / 2);                                                   \
        const long long per_tile = (long long)tokens * 4 * channels;                                  \
        if (i >= per_tile * tiles) return;                                                            \
        const long long t = i / per_tile;                                                             \
        const int tok = (int)((i % per_tile) / (4 * channels));                                       \
        const int c4 = (int)(i % (4 * channels));                                                     \
        y[i] = x[t * side * side * channels + pixel_shuffle_source(tok, c4, side, channels, v2)];     \
    }
EDGEVL_PIXEL_SHUFFLE(edgevl_pixel_shuffle_f32, float)
EDGEVL_PIXEL_SHUFFLE(edgevl_pixel_shuffle_f16, uint16_t)

#if defined(EDGEVL_CUDA)
// One block per output token (blockDim.x a power of two, <= 1024): fp32 statistics, two-pass
// (mean, then variance about the mean) so the result tracks torch's LayerNorm to ~1e-6.
EDGEVL_DEVICE float block_sum(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    const float total = shared[0];
    __syncthreads();
    return total;
}

#define EDGEVL_PIXEL_SHUFFLE_LN(NAME, T)                                                                \
    extern "C" __global__ void NAME(const T* __restrict__ x, const float* __restrict__ weight,       \
                                    const float* __restrict__ bias, float eps, T* __restrict__ y,     \
                                    int tiles, int side, int channels, int v2) {                      \
        __shared__ float shared[1024];                                                                \
        const int tokens = (side / 2) * (side / 2);                                                   \
        const int t = blockIdx.x / tokens;                                                            \
        const int tok = blockIdx.x % tokens;                                                          \
        const int width = 4 * channels;                                                               \
        const T* src = x + (long long)t * side * side * channels;                                     \
        float sum = 0.f;                                                                              \
        for (int c4 = threadIdx.x; c4 < width; c4 += blockDim.x)                                      \
            sum += load_as_float(src, pixel_shuffle_source(tok, c4, side, channels, v2));             \
        const float mean = block_sum(sum, shared) / width;                                         \
        float sq = 0.f;                                                                               \
        for (int c4 = threadIdx.x; c4 < width; c4 += blockDim.x) {                                    \
            const float d = load_as_float(src, pixel_shuffle_source(tok, c4, side, channels, v2)) - mean; \
            sq += d * d;                                                                              \
        }                                                                                             \
        const float rstd = rsqrtf(block_sum(sq, shared) / width + eps);                            \
        T* out = y + (long long)blockIdx.x * width;                                                   \
        for (int c4 = threadIdx.x; c4 < width; c4 += blockDim.x) {                                    \
            const float v = load_as_float(src, pixel_shuffle_source(tok, c4, side, channels, v2));    \
            store_from_float(out, c4, layer_norm_value(v, mean, rstd, weight[c4], bias[c4]));         \
        }                                                                                             \
    }
EDGEVL_PIXEL_SHUFFLE_LN(edgevl_pixel_shuffle_layernorm_f32, float)
EDGEVL_PIXEL_SHUFFLE_LN(edgevl_pixel_shuffle_layernorm_f16, uint16_t)
#endif
