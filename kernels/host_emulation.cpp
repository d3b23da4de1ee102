// Host build of the kernels for the tests (g++ -x c++, no GPU): every launch is emulated by walking
// all its blocks and threads and calling the very __global__ functions the device runs, so the
// index mapping and the per-pixel math are checked element by element against the numpy reference.
#include "tile_assembly.cu"
#include "pixel_shuffle.cu"

#include <cmath>
#include <vector>

dim3 blockIdx, threadIdx, blockDim, gridDim;

namespace {

constexpr unsigned kBlock = 256;

template <typename Kernel>
void emulate_launch(long long elements, Kernel&& kernel) {
    blockDim.x = kBlock;
    gridDim.x = (unsigned)((elements + kBlock - 1) / kBlock);
    for (unsigned b = 0; b < gridDim.x; ++b) {
        blockIdx.x = b;
        for (unsigned t = 0; t < kBlock; ++t) {
            threadIdx.x = t;
            kernel();
        }
    }
}

// Serial statistics in double (a reference-grade mean / variance), then the kernel's own
// per-element normalisation and store.
template <typename T>
void pixel_shuffle_layernorm(const T* x, const float* weight, const float* bias, float eps, T* y, int tiles,
                             int side, int channels, int v2) {
    const int tokens = (side / 2) * (side / 2);
    const int width = 4 * channels;
    std::vector<float> row(width);
    for (int t = 0; t < tiles; ++t) {
        const T* src = x + (long long)t * side * side * channels;
        for (int tok = 0; tok < tokens; ++tok) {
            double sum = 0.0;
            for (int c4 = 0; c4 < width; ++c4) {
                row[c4] = load_as_float(src, pixel_shuffle_source(tok, c4, side, channels, v2));
                sum += row[c4];
            }
            const double mean = sum / width;
            double sq = 0.0;
            for (int c4 = 0; c4 < width; ++c4) sq += (row[c4] - mean) * (row[c4] - mean);
            const float rstd = (float)(1.0 / std::sqrt(sq / width + eps));
            T* out = y + ((long long)t * tokens + tok) * width;
            for (int c4 = 0; c4 < width; ++c4)
                store_from_float(out, c4, layer_norm_value(row[c4], (float)mean, rstd, weight[c4], bias[c4]));
        }
    }
}

}  // namespace

extern "C" {

void edgevl_host_resample_first_pass(const uint8_t* src, long long src_pitch, int src_pixel_bytes, int src_w,
                                     int src_h, int bgr, const int* bounds, const int* weights, int ksize,
                                     int axis, int row0, uint8_t* scratch, long long scratch_pitch, int scratch_w,
                                     int scratch_h) {
    emulate_launch((long long)scratch_w * scratch_h * 3, [&] {
        edgevl_resample_first_pass(src, src_pitch, src_pixel_bytes, src_w, src_h, bgr, bounds, weights, ksize, axis,
                                   row0, scratch, scratch_pitch, scratch_w, scratch_h);
    });
}

void edgevl_host_resample_second_pass(const uint8_t* mid, long long mid_pitch, int mid_w, int mid_h,
                                      const int* bounds, const int* weights, int ksize, int axis, int shift,
                                      int out_w, int out_h, int dst_x0, int dst_y0, int canvas_cols, int tile_size,
                                      int tile_offset, const float* norm_table, float* tiles_f32,
                                      uint16_t* tiles_f16, uint8_t* canvas_u8, long long canvas_pitch) {
    emulate_launch((long long)out_w * out_h * 3, [&] {
        edgevl_resample_second_pass(mid, mid_pitch, mid_w, mid_h, bounds, weights, ksize, axis, shift, out_w, out_h,
                                    dst_x0, dst_y0, canvas_cols, tile_size, tile_offset, norm_table, tiles_f32,
                                    tiles_f16, canvas_u8, canvas_pitch);
    });
}

void edgevl_host_pixel_shuffle_f32(const float* x, float* y, int tiles, int side, int channels, int v2) {
    emulate_launch((long long)tiles * side * side * channels,
                   [&] { edgevl_pixel_shuffle_f32(x, y, tiles, side, channels, v2); });
}

void edgevl_host_pixel_shuffle_f16(const uint16_t* x, uint16_t* y, int tiles, int side, int channels, int v2) {
    emulate_launch((long long)tiles * side * side * channels,
                   [&] { edgevl_pixel_shuffle_f16(x, y, tiles, side, channels, v2); });
}

void edgevl_host_pixel_shuffle_layernorm_f32(const float* x, const float* weight, const float* bias, float eps,
                                             float* y, int tiles, int side, int channels, int v2) {
    pixel_shuffle_layernorm(x, weight, bias, eps, y, tiles, side, channels, v2);
}

}  // extern "C"
