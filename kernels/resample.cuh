// Per-pixel math of the tile-assembly kernel, shared by the device kernels and the host tests.
// Pillow's BICUBIC in 8bpc fixed point (libImaging/Resample.c): the taps and 22-bit weights come
// from the host (edgevl.resample.bicubic_coefficients) and are never recomputed here in float,
// which is what keeps the device bit-identical to the numpy reference.
#pragma once
#include "cuda_compat.cuh"

namespace edgevl {

constexpr int kPrecisionBits = 22;

// A uint8 HWC image with pitched rows; bgr swaps channels 0 and 2 on read so the output is RGB.
struct ImageView {
    const uint8_t* data;
    long long row_pitch_bytes;
    int pixel_bytes;
    int width;
    int height;
    int bgr;
};

// Taps along one axis: bounds [n, 2] (first source index, count), weights [n, ksize] in 22-bit
// fixed point. shift is the first source index the buffer holds (Pillow trims the rows that the
// vertical pass never reads before the horizontal pass).
struct AxisTaps {
    const int* bounds;
    const int* weights;
    int ksize;
    int shift;
};

EDGEVL_HD uint8_t clip8(int acc) {
    // Arithmetic shift of the biased sum, then clamp: Pillow's clip8 with its lookup table.
    int v = acc >> kPrecisionBits;
    return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

EDGEVL_HD int source_channel(int c, int bgr) { return bgr ? 2 - c : c; }

EDGEVL_HD int pixel_at(const ImageView& img, int row, int col, int c) {
    return img.data[row * img.row_pitch_bytes + (long long)col * img.pixel_bytes + source_channel(c, img.bgr)];
}

// One output sample of an 8bpc pass: along rows (axis 0, Pillow's vertical pass) or along columns
// (axis 1, horizontal). out_pos indexes the resampled axis, other_pos the untouched one.
EDGEVL_HD uint8_t resample_sample(const ImageView& img, int axis, int out_pos, int other_pos, int c,
                                  const AxisTaps& taps) {
    const int first = taps.bounds[2 * out_pos] - taps.shift;
    const int count = taps.bounds[2 * out_pos + 1];
    const int* w = taps.weights + (long long)out_pos * taps.ksize;
    int acc = 1 << (kPrecisionBits - 1);  // round half up
    for (int k = 0; k < count; ++k) {
        const int p = axis == 0 ? pixel_at(img, first + k, other_pos, c) : pixel_at(img, other_pos, first + k, c);
        acc += p * w[k];
    }
    return clip8(acc);
}

// First pass: scratch pixel (sy, sx, c) of an RGB uint8 buffer. A horizontal first pass reads
// source row sy + row0; a vertical one writes every output row (row0 = 0).
EDGEVL_HD uint8_t first_pass_sample(const ImageView& src, int axis, int row0, int sy, int sx, int c,
                                    const AxisTaps& taps) {
    return axis == 1 ? resample_sample(src, 1, sx, sy + row0, c, taps) : resample_sample(src, 0, sy, sx, c, taps);
}

// Where pixel (x, y) of one resized image lands in the tile layout. The resized image sits at
// (dst_x0, dst_y0) in a canvas cut into tile_size squares, canvas_cols across, numbered row-major
// from tile_offset: a plain grid, a thumbnail (offset = grid tiles) or one view of the
// six-camera canvas all use this one mapping.
struct TileDestination {
    int dst_x0;
    int dst_y0;
    int canvas_cols;
    int tile_size;
    int tile_offset;
};

EDGEVL_HD long long tile_element_index(const TileDestination& d, int c, int x, int y) {
    const int gx = d.dst_x0 + x;
    const int gy = d.dst_y0 + y;
    const long long tile = d.tile_offset + (long long)(gy / d.tile_size) * d.canvas_cols + gx / d.tile_size;
    return ((tile * 3 + c) * d.tile_size + gy % d.tile_size) * d.tile_size + gx % d.tile_size;
}

// ToTensor + Normalize as a [3, 256] float32 table built on the host with the reference's float32 ops.
EDGEVL_HD float normalize_value(const float* table, int c, uint8_t v) { return table[c * 256 + v]; }

// Linear element index -> (c, y, x) of an out_w x out_h x 3 pass, x fastest so writes coalesce.
EDGEVL_HD void split_chw(long long i, int w, int h, int* c, int* y, int* x) {
    *x = (int)(i % w);
    *y = (int)((i / w) % h);
    *c = (int)(i / ((long long)w * h));
}

}  // namespace edgevl
