/* edgevl's attention ops: GroupQueryAttention, the decoders' (here), and MultiHeadAttention, the vision graph's
 * (below).
 *
 * edgevl.GroupQueryAttention: com.microsoft.GroupQueryAttention as the CPU decoders use it (export/cpu_graph.py,
 * fuse_attention), with its own kernel for the one-row decode step and ONNX Runtime's for everything else.
 *
 * ONNX Runtime's CPU kernel runs the step's query heads one by one, each reading its KV head's cache again and
 * paying a GEMM call for one row: 2.2 ms of an 18 ms InternVL2-1B int8 decode step at 662 positions on the 2-core
 * Zen 4 (benchmarks/RESULTS.md, "What a decode step is made of now"), where the cache it reads is 16 MB. Here each
 * task takes one KV head and a chunk of positions and computes all of that head's query heads from one pass over
 * the chunk's keys and values (a softmax partial per chunk: max, sum and weighted values, merged afterwards as
 * flash-decoding does); the chunks spread a step over the intra-op threads whatever the number of KV heads.
 *
 * Same inputs, outputs and attributes as GroupQueryAttention (num_heads, kv_num_heads, scale, do_rotary,
 * rotary_interleaved): query packed [B, S, (num_heads + 2 kv_num_heads) * head], key and value absent, past_key and
 * past_value [B, kv, P, head] (one buffer with present's when bound so: written in place), seqlens_k int32 [B],
 * total_sequence_length int32 [1], cos_cache and sin_cache [rows, rotary / 2]. The one-row step (B = 1, S = 1,
 * packed, non-interleaved rotary, head a multiple of 16) runs here; any other call (a prompt, chunked prefill) is
 * handed to ONNX Runtime's own GroupQueryAttention kernel, created with the same attributes (OrtApi CreateOp,
 * InvokeOp), so prefill is ONNX Runtime's bit for bit and this op only ever changes the decode step. That step
 * computes what ONNX Runtime's does up to float rounding: the same rotary formula at position seqlens_k, the scale
 * on Q x K^T, a softmax through a Cephes-style exp polynomial (~1 ulp), all positions 0..seqlens_k. */
#include "ort_ops.h"

enum { INPUTS = 9, OUTPUTS = 3 };
enum { QUERY, KEY, VALUE, PAST_KEY, PAST_VALUE, SEQLENS_K, TOTAL_LENGTH, COS_CACHE, SIN_CACHE };
/* Positions a task reads at most; the head sizes the kernel takes (multiples of SLICE, which GroupQueryAttention
 * asks of any head with rotary, up to MAX_HEAD); query heads weighted together (BLOCK: weigh_values). */
enum { CHUNK = 64, SLICE = 16, MAX_HEAD = 256, BLOCK = 6 };
/* In a decode step the cache comes from DRAM (the weights streamed through since the last step): one thread over the
 * InternVL2-1B cache at 662 positions (24 layers, 16 MB), caches flushed first, on the Zen 4: 2.6 ms with the keys
 * prefetched 16 positions ahead, 2.0-2.3 with 64 (1.0 with the cache warm). */
enum { KEYS_AHEAD = 64 };

typedef struct {
    Node node;
    int64_t heads, kv_heads, rotary, interleaved;
    float scale;
    OrtOp* gqa;  /* ONNX Runtime's GroupQueryAttention, for every call but the one-row step */
} Attention;

/* ONNX Runtime's own com.microsoft `op` (version 1, its float kernel: type constraints T and, for
 * GroupQueryAttention, M), created through the C API with the node's int attributes and its scale (none: the op's
 * default), so that an op here can hand it the calls its own kernel does not take (InvokeOp). */
static OrtStatus* onnxruntime_op(OrtApiTable api, const OrtKernelInfo* info, const char* op, const char* const* names,
                                 const int64_t* values, int ints, const float* scale, int inputs, int outputs,
                                 OrtOp** out) {
    enum { MAX_ATTRIBUTES = 8 };
    OrtOpAttr* attrs[MAX_ATTRIBUTES] = {NULL};
    CreateOpAttrFn create_attr = API(api, CREATE_OP_ATTR, CreateOpAttrFn);
    OrtStatus* status = NULL;
    for (int i = 0; i < ints && status == NULL; i++)
        status = create_attr(names[i], &values[i], 1, OP_ATTR_INT, &attrs[i]);
    const int count = ints + (scale != NULL);
    if (status == NULL && scale != NULL) status = create_attr("scale", scale, 1, OP_ATTR_FLOAT, &attrs[ints]);
    const char* constraint_names[] = {"T", "M"};
    const int constraint_types[] = {TYPE_FLOAT, TYPE_INT32};
    const int constraints = strcmp(op, "GroupQueryAttention") == 0 ? 2 : 1;
    if (status == NULL)
        status = API(api, CREATE_OP, CreateOpFn)(info, op, "com.microsoft", 1, constraint_names, constraint_types,
                                                 constraints, (const OrtOpAttr* const*)attrs, count, inputs, outputs,
                                                 out);
    for (int i = 0; i < count; i++)
        if (attrs[i] != NULL) API(api, RELEASE_OP_ATTR, ReleaseOpAttrFn)(attrs[i]);
    return status;
}

static void destroy_attention(void* p) {
    Attention* kernel = p;
    if (kernel == NULL) return;
    if (kernel->gqa != NULL) API(kernel->node.api, RELEASE_OP, ReleaseOpFn)(kernel->gqa);
    free(kernel);
}

static OrtStatus* create_attention(const OrtCustomOp* op, OrtApiTable api, const OrtKernelInfo* info, void** out) {
    (void)op;
    Node node = {0};
    RETURN_IF_ERROR(node_info(&node, api, "GroupQueryAttention", info));
    KernelInfoGetAttributeInt64Fn int64_attribute = API(api, KERNEL_INFO_GET_ATTRIBUTE_INT64,
                                                        KernelInfoGetAttributeInt64Fn);
    int64_t heads, kv_heads, rotary, interleaved;
    float scale;
    RETURN_IF_ERROR(int64_attribute(info, "num_heads", &heads));
    RETURN_IF_ERROR(int64_attribute(info, "kv_num_heads", &kv_heads));
    RETURN_IF_ERROR(int64_attribute(info, "do_rotary", &rotary));
    RETURN_IF_ERROR(int64_attribute(info, "rotary_interleaved", &interleaved));
    RETURN_IF_ERROR(API(api, KERNEL_INFO_GET_ATTRIBUTE_FLOAT, KernelInfoGetAttributeFloatFn)(info, "scale", &scale));
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0)
        return error(&node, ORT_INVALID_ARGUMENT, "num_heads must be a positive multiple of kv_num_heads");

    Attention* kernel = calloc(1, sizeof *kernel);
    if (kernel == NULL) return error(&node, ORT_FAIL, "out of memory");
    *kernel = (Attention){node, heads, kv_heads, rotary, interleaved, scale, NULL};
    /* ONNX Runtime's kernel, given exactly the attributes read above. */
    const char* names[] = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved"};
    const int64_t values[] = {heads, kv_heads, rotary, interleaved};
    OrtStatus* status = onnxruntime_op(api, info, "GroupQueryAttention", names, values, 4, &scale, INPUTS, OUTPUTS,
                                       &kernel->gqa);
    if (status != NULL) {
        destroy_attention(kernel);
        return status;
    }
    *out = kernel;
    return NULL;
}

/* One step's work, shared by the tasks: task t takes KV head t / chunks and its chunk t % chunks of positions. */
typedef struct {
    const float* q;  /* [heads][head]: the step's queries, rotated */
    const float* k;  /* [kv][capacity][head]: the cache, the step's row written */
    const float* v;
    int64_t capacity, head, group, positions, chunk, chunks;
    float scale;
    float* scores;   /* [tasks][group][chunk]: scores, then their exp */
    float* partial;  /* [tasks][group][head + 2]: sum of exp x value, the chunk's max, the sum of exp */
} Decode;

AVX2_FMA static inline float sum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

AVX2_FMA static inline float max8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

AVX2_FMA static inline float dot(const float* a, const float* b, int64_t n) {  /* n: a multiple of SLICE */
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    for (int64_t j = 0; j < n; j += SLICE) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    return sum8(_mm256_add_ps(s0, s1));
}

/* The scaled dot products of a with the eight rows b[0..8) (row stride and length n, a multiple of 8). */
AVX2_FMA static inline __m256 dot8(const float* a, const float* b, int64_t n, __m256 scale) {
    __m256 d[8];
    for (int r = 0; r < 8; r++) d[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 x = _mm256_loadu_ps(a + j);
        for (int r = 0; r < 8; r++) d[r] = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + r * n + j), d[r]);
    }
    /* lanes 0-3: rows 0-3 then 4-7 over each 128-bit half; the halves added */
    const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
    const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
    return _mm256_mul_ps(sums, scale);
}

/* exp(x) for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, times 2^n (~1 ulp); below
 * -87 (where 2^n leaves the normal floats) it is exp(-87) ~ 1.6e-38, as good as 0 beside the row's maximum's 1. */
AVX2_FMA static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2 in two parts: r exact to ~1e-10 */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* One chunk's softmax partial for the scores s[0..n) (replaced by their exp): returns the max, sets *sum. */
AVX2_FMA static float exp_scores(float* s, int64_t n, float* sum) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + i));
    float m = max8(m8);
    for (; i < n; i++) m = s[i] > m ? s[i] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 total = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
        _mm256_storeu_ps(s + i, e);
        total = _mm256_add_ps(total, e);
    }
    if (i < n) {  /* the tail through the same polynomial, zeros past it */
        float tail[8];
        for (int64_t j = 0; j < 8; j++) tail[j] = i + j < n ? s[i + j] - m : -INFINITY;
        const __m256 e = exp8(_mm256_loadu_ps(tail));
        _mm256_storeu_ps(tail, e);
        for (int64_t j = i; j < n; j++) s[j] = tail[j - i];
        total = _mm256_add_ps(total, _mm256_blendv_ps(
            e, _mm256_setzero_ps(), _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)(n - i - 1))))));
    }
    *sum = sum8(total);
    return m;
}

/* out[g][j..j+16) = sum_i e[g][i] v[i][j..j+16) for `count` query heads, j each multiple of SLICE: 2 x count
 * accumulators, the value row's 2 registers and a broadcast weight, within AVX2's 16 (count <= BLOCK); called with a
 * constant count, so the loops unroll. */
AVX2_FMA static inline __attribute__((always_inline)) void weigh_values(const float* e, int64_t chunk, const float* v,
                                                                   int64_t n, int64_t head, int count, float* out,
                                                                   int64_t out_stride) {
    for (int64_t j = 0; j < head; j += SLICE) {
        __m256 a[BLOCK][2];
        for (int g = 0; g < count; g++) a[g][0] = a[g][1] = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            const __m256 v0 = _mm256_loadu_ps(v + i * head + j), v1 = _mm256_loadu_ps(v + i * head + j + 8);
            for (int g = 0; g < count; g++) {
                const __m256 weight = _mm256_broadcast_ss(e + g * chunk + i);
                a[g][0] = _mm256_fmadd_ps(weight, v0, a[g][0]);
                a[g][1] = _mm256_fmadd_ps(weight, v1, a[g][1]);
            }
        }
        for (int g = 0; g < count; g++) {
            _mm256_storeu_ps(out + g * out_stride + j, a[g][0]);
            _mm256_storeu_ps(out + g * out_stride + j + 8, a[g][1]);
        }
    }
}

AVX2_FMA static void decode_task(void* p, size_t task) {
    const Decode* w = p;
    const int64_t head = w->head, group = w->group, chunk = w->chunk;
    const int64_t kv = (int64_t)task / w->chunks, p0 = ((int64_t)task % w->chunks) * chunk;
    const int64_t n = p0 + chunk < w->positions ? chunk : w->positions - p0;
    const float* k = w->k + (kv * w->capacity + p0) * head;
    const float* v = w->v + (kv * w->capacity + p0) * head;
    const float* q = w->q + kv * group * head;
    float* s = w->scores + task * group * chunk;
    float* partial = w->partial + task * group * (head + 2);
    const __m256 scale = _mm256_set1_ps(w->scale);
    /* Scores eight positions at a time: their eight dot products reduced together. Meanwhile the value rows are
     * fetched into cache (the weighting below reads them in slices, a pattern the hardware prefetchers follow less
     * well), and the key rows KEYS_AHEAD positions on (the next chunk's, which the same thread usually takes next). */
    int64_t i = 0;
    const int64_t ahead = (w->positions - p0) * head;  /* prefetches stay within the head's rows */
    for (int64_t c = 0; c < KEYS_AHEAD * head && c < ahead; c += 16) _mm_prefetch((const char*)(k + c), _MM_HINT_T0);
    for (; i + 8 <= n; i += 8) {
        for (int64_t c = 0; c < 8 * head; c += 16) _mm_prefetch((const char*)(v + i * head + c), _MM_HINT_T0);
        for (int64_t c = (i + KEYS_AHEAD) * head; c < (i + KEYS_AHEAD + 8) * head && c < ahead; c += 16)
            _mm_prefetch((const char*)(k + c), _MM_HINT_T0);
        for (int64_t g = 0; g < group; g++) _mm256_storeu_ps(s + g * chunk + i, dot8(q + g * head, k + i * head, head,
                                                                                      scale));
    }
    for (; i < n; i++)
        for (int64_t g = 0; g < group; g++) s[g * chunk + i] = dot(q + g * head, k + i * head, head) * w->scale;
    for (int64_t g = 0; g < group; g++)
        partial[g * (head + 2) + head] = exp_scores(s + g * chunk, n, &partial[g * (head + 2) + head + 1]);
    /* The value rows once per BLOCK query heads (the chunk stays in L1 for the next block). */
    for (int64_t g = 0; g < group; g += BLOCK) {
        const float* e = s + g * chunk;
        float* out = partial + g * (head + 2);
        switch (group - g < BLOCK ? group - g : BLOCK) {
            case 1: weigh_values(e, chunk, v, n, head, 1, out, head + 2); break;
            case 2: weigh_values(e, chunk, v, n, head, 2, out, head + 2); break;
            case 3: weigh_values(e, chunk, v, n, head, 3, out, head + 2); break;
            case 4: weigh_values(e, chunk, v, n, head, 4, out, head + 2); break;
            case 5: weigh_values(e, chunk, v, n, head, 5, out, head + 2); break;
            default: weigh_values(e, chunk, v, n, head, BLOCK, out, head + 2); break;
        }
    }
}

/* The chunks' partials merged: out[h] = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) sum_c. */
static void merge(const Decode* w, int64_t heads, float* out) {
    const int64_t head = w->head, group = w->group;
    for (int64_t h = 0; h < heads; h++) {
        const int64_t kv = h / group, g = h % group;
        const float* first = w->partial + ((kv * w->chunks) * group + g) * (head + 2);
        const int64_t stride = group * (head + 2);  /* from one chunk's partial to the next */
        float m = -INFINITY, total = 0.0f;
        for (int64_t c = 0; c < w->chunks; c++) m = first[c * stride + head] > m ? first[c * stride + head] : m;
        float* y = out + h * head;
        memset(y, 0, head * sizeof(float));
        for (int64_t c = 0; c < w->chunks; c++) {
            const float* part = first + c * stride;
            const float weight = expf(part[head] - m);
            total += weight * part[head + 1];
            for (int64_t j = 0; j < head; j++) y[j] += weight * part[j];
        }
        for (int64_t j = 0; j < head; j++) y[j] /= total;
    }
}

/* x rotated at one position, GroupQueryAttention's non-interleaved rotary over its first `dims` values (0: a
 * copy, for an op without rotary). */
AVX2_FMA static void rotate(const float* x, const float* cos, const float* sin, int64_t dims, int64_t head, float* y) {
    const int64_t half = dims / 2;
    for (int64_t i = 0; i < half; i++) {
        y[i] = fmaf(x[i], cos[i], -(x[i + half] * sin[i]));
        y[i + half] = fmaf(x[i], sin[i], x[i + half] * cos[i]);
    }
    memcpy(y + dims, x + dims, (head - dims) * sizeof(float));
}

typedef struct {
    const OrtValue* values[INPUTS];
    Tensor t[INPUTS];  /* rank 0 where the input is absent */
} Inputs;

/* The one-row step, where it applies: *done = 0 leaves the call to ONNX Runtime's kernel. */
static OrtStatus* decode_step(const Attention* kernel, OrtKernelContext* ctx, const Inputs* in, int64_t head,
                              int64_t present_length, OrtValue* const* outputs, int* done) {
    const Node* node = &kernel->node;
    const Tensor *query = &in->t[QUERY], *past_k = &in->t[PAST_KEY], *past_v = &in->t[PAST_VALUE];
    const Tensor *cos = &in->t[COS_CACHE], *sin = &in->t[SIN_CACHE];
    *done = 0;
    if (query->dims[0] != 1 || query->dims[1] != 1 || in->values[KEY] != NULL || past_k->rank != 4
        || past_v->rank != 4 || head % SLICE != 0 || head > MAX_HEAD || kernel->interleaved
        || (kernel->rotary && (cos->rank != 2 || sin->rank != 2)))
        return NULL;
    const int32_t position = ((const int32_t*)in->t[SEQLENS_K].data)[0];
    const int64_t past_length = past_k->dims[2], rotary = kernel->rotary ? 2 * cos->dims[1] : 0;
    if (position < 0 || position >= present_length || position > past_length
        || ((const int32_t*)in->t[TOTAL_LENGTH].data)[0] != position + 1)
        return error(node, ORT_INVALID_ARGUMENT, "seqlens_k must be total_sequence_length - 1, within the cache");
    if (kernel->rotary && (cos->dims[0] <= position || sin->dims[0] <= position || sin->dims[1] != cos->dims[1]
                           || rotary > head))
        return error(node, ORT_INVALID_ARGUMENT, "cos_cache and sin_cache must have a row for the position and "
                     "at most head_size / 2 columns");

    OrtApiTable api = node->api;
    float* present[2];
    for (int i = 0; i < 2; i++) {
        void* data;
        RETURN_IF_ERROR(API(api, GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(outputs[1 + i], &data));
        present[i] = data;
    }
    float* y;
    RETURN_IF_ERROR(API(api, GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(outputs[0], (void**)&y));
    const int64_t heads = kernel->heads, kv_heads = kernel->kv_heads;
    const float* x = query->data;
    const float* past[2] = {past_k->data, past_v->data};
    const float* angle_cos = kernel->rotary ? (const float*)cos->data + position * cos->dims[1] : NULL;
    const float* angle_sin = kernel->rotary ? (const float*)sin->data + position * sin->dims[1] : NULL;
    for (int i = 0; i < 2; i++)  /* a present that is not the past's buffer gets the past's rows first */
        if (present[i] != past[i])
            for (int64_t h = 0; h < kv_heads; h++)
                memcpy(present[i] + h * present_length * head, past[i] + h * past_length * head,
                       position * head * sizeof(float));
    for (int64_t h = 0; h < kv_heads; h++) {  /* the step's key (rotated) and value, at row `position` */
        const float* key = x + (heads + h) * head;
        float* row = present[0] + (h * present_length + position) * head;
        rotate(key, angle_cos, angle_sin, rotary, head, row);
        memcpy(present[1] + (h * present_length + position) * head, x + (heads + kv_heads + h) * head,
               head * sizeof(float));
    }

    const int64_t positions = position + 1, chunks = (positions + CHUNK - 1) / CHUNK, group = heads / kv_heads;
    Decode work = {NULL, present[0], present[1], present_length, head, group, positions,
                   (positions + chunks - 1) / chunks, chunks,
                   kernel->scale == 0.0f ? 1.0f / sqrtf((float)head) : kernel->scale, NULL, NULL};
    const size_t tasks = kv_heads * chunks;
    float* q = malloc(heads * head * sizeof(float));
    work.scores = malloc(tasks * group * work.chunk * sizeof(float));
    work.partial = malloc(tasks * group * (head + 2) * sizeof(float));
    OrtStatus* status = NULL;
    if (q == NULL || work.scores == NULL || work.partial == NULL) {
        status = error(node, ORT_FAIL, "out of memory for the attention scores");
    } else {
        for (int64_t h = 0; h < heads; h++) rotate(x + h * head, angle_cos, angle_sin, rotary, head, q + h * head);
        work.q = q;
        status = API(api, KERNEL_CONTEXT_PARALLEL_FOR, KernelContextParallelForFn)(ctx, decode_task, tasks, 0, &work);
        if (status == NULL) merge(&work, heads, y);
    }
    free(q);
    free(work.scores);
    free(work.partial);
    *done = status == NULL;
    return status;
}

static OrtStatus* compute_attention(void* p, OrtKernelContext* ctx) {
    Attention* kernel = p;
    const Node* node = &kernel->node;
    OrtApiTable api = node->api;
    static const int types[INPUTS] = {TYPE_FLOAT, TYPE_FLOAT, TYPE_FLOAT, TYPE_FLOAT, TYPE_FLOAT, TYPE_INT32,
                                      TYPE_INT32, TYPE_FLOAT, TYPE_FLOAT};
    static const char* names[INPUTS] = {"query", "key", "value", "past_key", "past_value", "seqlens_k",
                                        "total_sequence_length", "cos_cache", "sin_cache"};
    Inputs in = {0};
    for (int i = 0; i < INPUTS; i++) {
        RETURN_IF_ERROR(API(api, KERNEL_CONTEXT_GET_INPUT, KernelContextGetInputFn)(ctx, i, &in.values[i]));
        if (in.values[i] != NULL) RETURN_IF_ERROR(tensor(node, in.values[i], types[i], &in.t[i], names[i]));
    }
    const Tensor* query = &in.t[QUERY];
    if (query->rank != 3 || in.t[PAST_KEY].rank != 4 || in.values[SEQLENS_K] == NULL
        || in.values[TOTAL_LENGTH] == NULL)
        return error(node, ORT_INVALID_ARGUMENT, "expected query [B, S, hidden], past_key [B, kv, P, head], "
                     "seqlens_k and total_sequence_length");
    /* The outputs' shapes as GroupQueryAttention computes them (InvokeOp writes into the outputs given). */
    const int64_t packed = in.values[KEY] == NULL ? kernel->heads + 2 * kernel->kv_heads : kernel->heads;
    const int64_t head = query->dims[2] / packed;
    const int64_t total = ((const int32_t*)in.t[TOTAL_LENGTH].data)[0];
    const int64_t present_length = total > in.t[PAST_KEY].dims[2] ? total : in.t[PAST_KEY].dims[2];
    const int64_t y_dims[3] = {query->dims[0], query->dims[1], kernel->heads * head};
    const int64_t kv_dims[4] = {query->dims[0], kernel->kv_heads, present_length, head};
    OrtValue* outputs[OUTPUTS];
    KernelContextGetOutputFn output = API(api, KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn);
    RETURN_IF_ERROR(output(ctx, 0, y_dims, 3, &outputs[0]));
    RETURN_IF_ERROR(output(ctx, 1, kv_dims, 4, &outputs[1]));
    RETURN_IF_ERROR(output(ctx, 2, kv_dims, 4, &outputs[2]));
    int done = 0;
    RETURN_IF_ERROR(decode_step(kernel, ctx, &in, head, present_length, outputs, &done));
    if (done) return NULL;
    return API(api, INVOKE_OP, InvokeOpFn)(ctx, kernel->gqa, in.values, INPUTS, outputs, OUTPUTS);
}

static const char* attention_name(const OrtCustomOp* op) { (void)op; return "GroupQueryAttention"; }
static int attention_input_type(const OrtCustomOp* op, size_t i) {
    (void)op;
    return i == SEQLENS_K || i == TOTAL_LENGTH ? TYPE_INT32 : TYPE_FLOAT;
}
static size_t attention_inputs(const OrtCustomOp* op) { (void)op; return INPUTS; }
static int attention_input_presence(const OrtCustomOp* op, size_t i) {
    return i == KEY || i == VALUE || i == COS_CACHE || i == SIN_CACHE ? optional(op, i) : required(op, i);
}
static size_t attention_outputs(const OrtCustomOp* op) { (void)op; return OUTPUTS; }

const OrtCustomOp EDGEVL_GROUP_ATTENTION = {
    ORT_API_VERSION_USED, NULL, attention_name, op_provider, attention_input_type, attention_inputs,
    float_type, attention_outputs, NULL, destroy_attention, attention_input_presence, required,
    default_memory, one, zero, one, zero, create_attention, compute_attention, NULL, one, last_version,
};

/* ---- edgevl.MultiHeadAttention: com.microsoft.MultiHeadAttention as the int8 exports' vision graph uses it
 * (export/cpu_graph.py, fuse_vision_attention: query, key and value [B, S, heads * head], num_heads, scale; no bias,
 * mask or cache), on AMX-BF16 tiles where the CPU has them, ONNX Runtime's kernel (OrtApi CreateOp, InvokeOp)
 * everywhere else and for any call the tiles do not take.
 *
 * On the tiles, per head: Q, K and V rounded to bf16 (round to nearest even), Q x K^T summed in fp32, the softmax in
 * fp32 (scale, log2 e and max folded into one fused multiply-subtract, then exp2_16), its weights rounded to bf16
 * before x V (summed in fp32), then divided by the fp32 sum of the unrounded weights. bf16 keeps 8 bits of
 * significand: an InternViT-300M tile's attention comes out with ~0.3% relative error against fp32, about what its
 * int8 matmuls already cost. ONNX Runtime's fp32 kernel runs at ~120 GMAC/s on the 2-core Xeon, half of an int8
 * vision tile (benchmarks/RESULTS.md, "Vision attention on AMX-BF16 tiles"). */
enum { MHA_INPUTS = 3, ROW_BLOCK = 32, D_STEP = 32, MAX_MHA_HEAD = 256 };

#define BF16_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx512dq,avx2,fma")))

typedef struct {
    Node node;
    int64_t heads;
    float scale;  /* 0: 1 / sqrt(head), as MultiHeadAttention */
    int tiles;    /* the AMX-BF16 kernel */
    OrtOp* mha;   /* ONNX Runtime's MultiHeadAttention */
} MultiHead;

/* The tiles where the CPU has AMX-BF16 and the tile state, unless EDGEVL_MATMUL_KERNEL names kernels other than
 * "amx" (as it does for edgevl's matmuls: tests and benchmarks compare the classes on one machine). */
__attribute__((visibility("default"))) int EdgevlAttentionTiles(void) {
    const char* named = getenv("EDGEVL_MATMUL_KERNEL");
    return (named == NULL || *named == 0 || strcmp(named, "amx") == 0) && __builtin_cpu_supports("avx512bf16")
           && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && tile_state_permitted();
}

static void destroy_multi_head(void* p) {
    MultiHead* kernel = p;
    if (kernel == NULL) return;
    if (kernel->mha != NULL) API(kernel->node.api, RELEASE_OP, ReleaseOpFn)(kernel->mha);
    free(kernel);
}

static OrtStatus* create_multi_head(const OrtCustomOp* op, OrtApiTable api, const OrtKernelInfo* info, void** out) {
    (void)op;
    Node node = {0};
    RETURN_IF_ERROR(node_info(&node, api, "MultiHeadAttention", info));
    int64_t heads;
    RETURN_IF_ERROR(API(api, KERNEL_INFO_GET_ATTRIBUTE_INT64, KernelInfoGetAttributeInt64Fn)(info, "num_heads",
                                                                                             &heads));
    if (heads <= 0) return error(&node, ORT_INVALID_ARGUMENT, "num_heads must be positive");
    float scale = 0.0f;
    OrtStatus* missing = API(api, KERNEL_INFO_GET_ATTRIBUTE_FLOAT, KernelInfoGetAttributeFloatFn)(info, "scale",
                                                                                                 &scale);
    if (missing != NULL) API(api, RELEASE_STATUS, ReleaseStatusFn)(missing);  /* the default scale */

    MultiHead* kernel = calloc(1, sizeof *kernel);
    if (kernel == NULL) return error(&node, ORT_FAIL, "out of memory");
    *kernel = (MultiHead){node, heads, scale, EdgevlAttentionTiles(), NULL};
    const char* names[] = {"num_heads"};
    OrtStatus* status = onnxruntime_op(api, info, "MultiHeadAttention", names, &heads, 1,
                                       missing == NULL ? &scale : NULL, MHA_INPUTS, 1, &kernel->mha);
    if (status != NULL) {
        destroy_multi_head(kernel);
        return status;
    }
    *out = kernel;
    return NULL;
}

/* One call on the tiles. K and V are packed per head as bf16 tiles (pack_task); then task t takes head t / blocks and
 * its block t % blocks of ROW_BLOCK query rows (attend_task). Tiles: C in 0-3 (16 x 16 fp32), A in 4 and 5 (16 rows x
 * 32 bf16), B in 6 and 7 (16 rows of 16 columns x 2 bf16: 32 of the product's depth). */
typedef struct {
    const float *q, *k, *v;
    float* y;
    int64_t batch, heads, rows, head, width;  /* width: heads * head, each tensor's row */
    int64_t keys, depth;  /* keys: rows padded to ROW_BLOCK; depth: head padded to D_STEP */
    float scale;
    uint16_t *kp, *vp;  /* per (batch, head): K as [keys / 16][depth / 32] B tiles, V as [keys / 32][head / 16] */
    int out_of_memory;  /* set by a task that could not allocate its scores */
} Tiles;

BF16_TARGET static inline __m512i bf16_pair(__m512 low, __m512 high) {  /* 32 bf16: low's 16, then high's */
    return (__m512i)_mm512_cvtne2ps_pbh(high, low);
}

/* Values [d0, d0 + 32) of a row as 32 bf16, zeros past `head` (or the whole row when `real` is 0). */
BF16_TARGET static inline __m512i row_bf16(const float* row, int64_t d0, int64_t head, int real) {
    const int64_t left = real ? head - d0 : 0;
    const __mmask16 m0 = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    const __mmask16 m1 = left >= 32 ? 0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
    return bf16_pair(_mm512_maskz_loadu_ps(m0, row + d0), _mm512_maskz_loadu_ps(m1, row + d0 + 16));
}

BF16_TARGET static void pack_task(void* p, size_t task) {
    const Tiles* w = p;
    const int64_t b = (int64_t)task / w->heads, h = (int64_t)task % w->heads, steps = w->depth / D_STEP;
    const float* k = w->k + b * w->rows * w->width + h * w->head;
    const float* v = w->v + b * w->rows * w->width + h * w->head;
    uint16_t* kp = w->kp + task * w->keys * w->depth;
    uint16_t* vp = w->vp + task * w->keys * w->head;
    /* K: B tile (block j, step s) row r is the depth pair (2r, 2r + 1) of the step for 16 keys: a 16 x 16 transpose
     * of bf16 pairs, gathered from the block's keys converted once. */
    const __m512i across = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                                                 15), _mm512_set1_epi32(16));
    for (int64_t j = 0; j < w->keys / 16; j++)
        for (int64_t s = 0; s < steps; s++) {
            uint32_t rows[16][16];
            for (int c = 0; c < 16; c++)
                _mm512_storeu_si512(rows[c], row_bf16(k + (j * 16 + c) * w->width, s * D_STEP, w->head,
                                                      j * 16 + c < w->rows));
            uint16_t* tile = kp + (j * steps + s) * 16 * D_STEP;
            for (int r = 0; r < 16; r++)
                _mm512_storeu_si512(tile + r * D_STEP,
                                    _mm512_i32gather_epi32(_mm512_add_epi32(across, _mm512_set1_epi32(r)), rows, 4));
        }
    /* V: B tile (step i, block c) row r holds keys 2r and 2r + 1 of the step, interleaved, for 16 columns. */
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26,
                                       11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_loadu_si512(order);
    for (int64_t i = 0; i < w->keys / ROW_BLOCK; i++)
        for (int64_t c = 0; c < w->head / 16; c++) {
            uint16_t* tile = vp + (i * (w->head / 16) + c) * 16 * D_STEP;
            for (int r = 0; r < 16; r++) {
                const int64_t key = i * ROW_BLOCK + 2 * r;
                const __m512 a = key < w->rows ? _mm512_loadu_ps(v + key * w->width + c * 16) : _mm512_setzero_ps();
                const __m512 b = key + 1 < w->rows ? _mm512_loadu_ps(v + (key + 1) * w->width + c * 16)
                                                   : _mm512_setzero_ps();
                _mm512_storeu_si512(tile + r * D_STEP, _mm512_permutexvar_epi16(interleave, bf16_pair(a, b)));
            }
        }
}

/* 2^t for t <= 0: t = n + f, |f| <= 1/2, 2^f by its Taylor polynomial in f ln 2 to the 6th power (relative error
 * below 3e-7, a thousandth of the bf16 rounding the weights then take), times 2^n by vscalefps; below -126 it is
 * 2^-126 ~ 1e-38, as good as 0 beside the row maximum's 1. */
BF16_TARGET static inline __m512 exp2_16(__m512 t) {
    t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530e-4f);                   /* ln2^6 / 720 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));  /* ln2^5 / 120 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));  /* ln2^4 / 24 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));  /* ln2^3 / 6 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));  /* ln2^2 / 2 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));  /* ln2 */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

BF16_TARGET static void configure_tiles(void) {
    TileConfig config = {.palette = 1};
    for (int i = 0; i < 8; i++) {
        config.bytes_per_row[i] = 64;
        config.rows[i] = 16;
    }
    tile_configure(&config);
}

BF16_TARGET static __mmask16 first(int64_t n) { return n >= 16 ? 0xffff : n > 0 ? (__mmask16)((1u << n) - 1) : 0; }

BF16_TARGET static void attend_task(void* p, size_t task) {
    const Tiles* w = p;
    const int64_t blocks = w->keys / ROW_BLOCK, bh = (int64_t)task / blocks, r0 = (int64_t)task % blocks * ROW_BLOCK;
    const int64_t b = bh / w->heads, h = bh % w->heads, steps = w->depth / D_STEP, n = w->rows;
    const int64_t rows = n - r0 < ROW_BLOCK ? n - r0 : ROW_BLOCK, keys = w->keys, columns = w->head / 16;
    const uint16_t* kp = w->kp + bh * keys * w->depth;
    const uint16_t* vp = w->vp + bh * keys * w->head;
    float* scores = malloc(ROW_BLOCK * keys * sizeof(float));             /* [32][keys] */
    uint16_t* weights = aligned_alloc(64, ROW_BLOCK * keys * sizeof(uint16_t));  /* A tiles [2][keys / 32][16][32] */
    if (scores == NULL || weights == NULL) {
        __atomic_store_n(&((Tiles*)p)->out_of_memory, 1, __ATOMIC_RELAXED);
        free(scores);
        free(weights);
        return;
    }
    uint16_t q[2][MAX_MHA_HEAD / D_STEP][16][D_STEP];
    const float* query = w->q + (b * n + r0) * w->width + h * w->head;
    for (int r = 0; r < ROW_BLOCK; r++)
        for (int64_t s = 0; s < steps; s++)
            _mm512_storeu_si512(q[r / 16][s][r % 16], row_bf16(query + r * w->width, s * D_STEP, w->head, r < rows));
    configure_tiles();
    for (int64_t j = 0; j < keys / 16; j += 2) {  /* scores for 32 rows x 32 keys */
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; s++) {
            _tile_loadd(4, q[0][s], 64);
            _tile_loadd(5, q[1][s], 64);
            _tile_loadd(6, kp + (j * steps + s) * 16 * D_STEP, 64);
            _tile_loadd(7, kp + ((j + 1) * steps + s) * 16 * D_STEP, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, scores + j * 16, keys * 4);
        _tile_stored(1, scores + (j + 1) * 16, keys * 4);
        _tile_stored(2, scores + 16 * keys + j * 16, keys * 4);
        _tile_stored(3, scores + 16 * keys + (j + 1) * 16, keys * 4);
    }
    float inverse[ROW_BLOCK];
    const __m512 scale = _mm512_set1_ps(w->scale * 1.44269504088896341f);  /* exp(x) = 2^(x log2 e) */
    for (int r = 0; r < ROW_BLOCK; r++) {  /* the softmax of each row over the n keys; padded rows get zeros */
        const float* s = scores + r * keys;
        uint16_t* out = weights + (r / 16) * keys * 16 + (r % 16) * D_STEP;
        __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) m = _mm512_mask_max_ps(m, first(n - i), m, _mm512_loadu_ps(s + i));
        const __m512 shift = _mm512_mul_ps(_mm512_set1_ps(_mm512_reduce_max_ps(m)), scale);
        for (int64_t i = 0; i < keys; i += D_STEP) {
            __m512 e0 = _mm512_setzero_ps(), e1 = e0;
            if (r < rows) {
                e0 = _mm512_maskz_mov_ps(first(n - i), exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + i), scale, shift)));
                e1 = _mm512_maskz_mov_ps(first(n - i - 16),
                                         exp2_16(_mm512_fmsub_ps(_mm512_loadu_ps(s + i + 16), scale, shift)));
                sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
            }
            _mm512_storeu_si512(out + (i / D_STEP) * 16 * D_STEP, bf16_pair(e0, e1));
        }
        inverse[r] = r < rows ? 1.0f / _mm512_reduce_add_ps(sum) : 0.0f;
    }
    float o[ROW_BLOCK][MAX_MHA_HEAD];
    for (int64_t c = 0; c < columns; c += 2) {  /* 32 rows x 32 columns (16 for an odd last block) of weights x V */
        const int pair = c + 1 < columns;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t i = 0; i < keys / D_STEP; i++) {
            _tile_loadd(4, weights + i * 16 * D_STEP, 64);
            _tile_loadd(5, weights + (keys / D_STEP + i) * 16 * D_STEP, 64);
            _tile_loadd(6, vp + (i * columns + c) * 16 * D_STEP, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (pair) {
                _tile_loadd(7, vp + (i * columns + c + 1) * 16 * D_STEP, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, &o[0][c * 16], sizeof o[0]);
        _tile_stored(2, &o[16][c * 16], sizeof o[0]);
        if (pair) {
            _tile_stored(1, &o[0][(c + 1) * 16], sizeof o[0]);
            _tile_stored(3, &o[16][(c + 1) * 16], sizeof o[0]);
        }
    }
    tile_release();
    float* y = w->y + (b * n + r0) * w->width + h * w->head;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < w->head; d += 16)
            _mm512_storeu_ps(y + r * w->width + d, _mm512_mul_ps(_mm512_loadu_ps(&o[r][d]),
                                                                  _mm512_set1_ps(inverse[r])));
    free(scores);
    free(weights);
}

/* The call on the tiles, where they take it (*done = 0 leaves it to ONNX Runtime's kernel). */
static OrtStatus* attend_on_tiles(const MultiHead* kernel, OrtKernelContext* ctx, const Tensor t[MHA_INPUTS],
                                  OrtValue* output, int* done) {
    const Node* node = &kernel->node;
    const int64_t width = t[0].dims[2], head = width / kernel->heads;
    *done = 0;
    for (int i = 1; i < MHA_INPUTS; i++)
        if (t[i].rank != 3 || memcmp(t[i].dims, t[0].dims, 3 * sizeof(int64_t)) != 0) return NULL;
    if (!kernel->tiles || width % kernel->heads != 0 || head % 16 != 0 || head > MAX_MHA_HEAD || t[0].dims[1] == 0)
        return NULL;
    Tiles work = {t[0].data, t[1].data, t[2].data, NULL, t[0].dims[0], kernel->heads, t[0].dims[1], head, width,
                  round_up(t[0].dims[1], ROW_BLOCK), round_up(head, D_STEP),
                  kernel->scale == 0.0f ? 1.0f / sqrtf((float)head) : kernel->scale, NULL, NULL, 0};
    RETURN_IF_ERROR(API(node->api, GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(output, (void**)&work.y));
    const size_t heads = work.batch * work.heads;
    work.kp = aligned_alloc(64, heads * work.keys * work.depth * sizeof(uint16_t));
    work.vp = aligned_alloc(64, heads * work.keys * work.head * sizeof(uint16_t));
    OrtStatus* status = NULL;
    KernelContextParallelForFn parallel = API(node->api, KERNEL_CONTEXT_PARALLEL_FOR, KernelContextParallelForFn);
    if (work.kp == NULL || work.vp == NULL) status = error(node, ORT_FAIL, "out of memory for bf16 keys and values");
    if (status == NULL) status = parallel(ctx, pack_task, heads, 0, &work);
    if (status == NULL) status = parallel(ctx, attend_task, heads * (work.keys / ROW_BLOCK), 0, &work);
    if (status == NULL && work.out_of_memory) status = error(node, ORT_FAIL, "out of memory for attention scores");
    free(work.kp);
    free(work.vp);
    *done = status == NULL;
    return status;
}

static OrtStatus* compute_multi_head(void* p, OrtKernelContext* ctx) {
    MultiHead* kernel = p;
    const Node* node = &kernel->node;
    OrtApiTable api = node->api;
    static const char* names[MHA_INPUTS] = {"query", "key", "value"};
    const OrtValue* values[MHA_INPUTS];
    Tensor t[MHA_INPUTS];
    for (int i = 0; i < MHA_INPUTS; i++) {
        RETURN_IF_ERROR(API(api, KERNEL_CONTEXT_GET_INPUT, KernelContextGetInputFn)(ctx, i, &values[i]));
        RETURN_IF_ERROR(tensor(node, values[i], TYPE_FLOAT, &t[i], names[i]));
    }
    if (t[0].rank != 3) return error(node, ORT_INVALID_ARGUMENT, "expected query [B, S, num_heads * head]");
    OrtValue* output;
    RETURN_IF_ERROR(API(api, KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(ctx, 0, t[0].dims, 3, &output));
    int done = 0;
    RETURN_IF_ERROR(attend_on_tiles(kernel, ctx, t, output, &done));
    if (done) return NULL;
    return API(api, INVOKE_OP, InvokeOpFn)(ctx, kernel->mha, values, MHA_INPUTS, &output, 1);
}

static const char* multi_head_name(const OrtCustomOp* op) { (void)op; return "MultiHeadAttention"; }
static size_t multi_head_inputs(const OrtCustomOp* op) { (void)op; return MHA_INPUTS; }
static size_t multi_head_outputs(const OrtCustomOp* op) { (void)op; return 1; }

const OrtCustomOp EDGEVL_MULTI_HEAD_ATTENTION = {
    ORT_API_VERSION_USED, NULL, multi_head_name, op_provider, float_type, multi_head_inputs, float_type,
    multi_head_outputs, NULL, destroy_multi_head, required, required, default_memory, one, zero, one, zero,
    create_multi_head, compute_multi_head, NULL, one, last_version,
};
