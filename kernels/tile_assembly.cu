// GPU tile assembly: InternVL dynamic tiling (Pillow BICUBIC resize, row-major tiles, thumbnail)
// plus ImageNet normalisation, written straight into [tiles, 3, S, S] fp32 or fp16.
// Two launches per resize, as Pillow does it: a first pass into an RGB uint8 scratch buffer (its
// rounding is part of the result), then the other axis + normalise + write. The launcher picks the
// pass order with edgevl.resample.vertical_pass_first. Kernels only compute indices; the math is
// in resample.cuh so the host tests run the same code.
#include "resample.cuh"

using namespace edgevl;

EDGEVL_DEVICE long long global_thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

extern "C" __global__ void edgevl_resample_first_pass(
    const uint8_t* __restrict__ src, long long src_pitch, int src_pixel_bytes, int src_w, int src_h, int bgr,
    const int* __restrict__ bounds, const int* __restrict__ weights, int ksize, int axis, int row0,
    uint8_t* __restrict__ scratch, long long scratch_pitch, int scratch_w, int scratch_h) {
    const long long i = global_thread_index();
    if (i >= (long long)scratch_w * scratch_h * 3) return;
    const int c = (int)(i % 3);
    const int sx = (int)((i / 3) % scratch_w);
    const int sy = (int)(i / (3LL * scratch_w));
    const ImageView img{src, src_pitch, src_pixel_bytes, src_w, src_h, bgr};
    const AxisTaps taps{bounds, weights, ksize, 0};
    scratch[sy * scratch_pitch + sx * 3 + c] = first_pass_sample(img, axis, row0, sy, sx, c, taps);
}

// tiles_f32 / tiles_f16 / canvas_u8: each may be null; the six-camera layout writes its tiles and
// the uint8 canvas (the thumbnail's source) in the same launch.
extern "C" __global__ void edgevl_resample_second_pass(
    const uint8_t* __restrict__ mid, long long mid_pitch, int mid_w, int mid_h,
    const int* __restrict__ bounds, const int* __restrict__ weights, int ksize, int axis, int shift,
    int out_w, int out_h, int dst_x0, int dst_y0, int canvas_cols, int tile_size, int tile_offset,
    const float* __restrict__ norm_table, float* __restrict__ tiles_f32, uint16_t* __restrict__ tiles_f16,
    uint8_t* __restrict__ canvas_u8, long long canvas_pitch) {
    const long long i = global_thread_index();
    if (i >= (long long)out_w * out_h * 3) return;
    int c, y, x;
    split_chw(i, out_w, out_h, &c, &y, &x);
    const ImageView img{mid, mid_pitch, 3, mid_w, mid_h, 0};
    const AxisTaps taps{bounds, weights, ksize, shift};
    const uint8_t v = axis == 0 ? resample_sample(img, 0, y, x, c, taps) : resample_sample(img, 1, x, y, c, taps);
    const TileDestination dst{dst_x0, dst_y0, canvas_cols, tile_size, tile_offset};
    if (tiles_f32 || tiles_f16) {
        const long long o = tile_element_index(dst, c, x, y);
        const float value = normalize_value(norm_table, c, v);
        if (tiles_f32) tiles_f32[o] = value;
        if (tiles_f16) tiles_f16[o] = float_to_half_bits(value);
    }
    if (canvas_u8) canvas_u8[(dst_y0 + y) * canvas_pitch + (long long)(dst_x0 + x) * 3 + c] = v;
}
