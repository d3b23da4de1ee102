/* edgevl's matmuls for ONNX Runtime on x86 CPUs without VNNI, with AVX-512 VNNI and with AMX: the ops Int8MatMul and
 * Int4MatMul of edgevl's custom-op library (ort_ops.c). Both run the decoder's weight matmuls of an export's
 * decoder_avx2.onnx (export/cpu_graph.py), where ONNX Runtime's own kernels for them are the slower ones (edgevl.cpu
 * says where).
 *
 * Int8MatMul. On AVX2 without VNNI, ONNX Runtime's u8 x s8 integer GEMM pairs products with vpmaddubsw, whose int16
 * sums saturate for full-range operands, so edgevl runs its int8 graphs on the u8 x u8 kernels there (exact,
 * slower). This op computes the same integers with the sign trick llama.cpp's Q8_0 dot product uses: both operands
 * are symmetric (activations -128..127 after removing the zero point 128, weights -127..127), so
 *     a * w = |a| * (w with a's sign)    and    |a| <= 128, |w| <= 127  ->  a vpmaddubsw pair sum <= 32512,
 * which never saturates. With AVX-512 VNNI (vpdpbusd) and AMX (tdpbusd, for several rows) it sums u8 x s8 products
 * with no int16 step, the same integers. One exact int32 sum per output, scaled exactly as the graph it replaces:
 *   per_token = 1: the export's per-token chain (export/cpu_graph.py, quantize_matmuls_per_token):
 *       m = max|x| over the row;  q = clamp(rne((x / m) / (1/127)) + 128, 0, 255);
 *       y = (float(sum (q - 128) w) * ((1/127) * w_scale[n])) * m
 *   per_token = 0: com.microsoft.DynamicQuantizeMatMul (u8 activations, one scale and zero point per tensor):
 *       scale = (max(x, 0) - min(x, 0)) / 255, zp = rne(clamp(-min / scale, 0, 255));
 *       q = clamp(rne(x / scale) + zp, 0, 255);  y = float(sum (q - zp) w) * (scale * w_scale[n])
 * Inputs: x float [..., K]; w int8 [K, N] and w_scale float [N], both constant initializers (packed once, when
 * the kernel is created). Output: y float [..., N].
 *
 * Int4MatMul: com.microsoft.MatMulNBits as the int4 export uses it (below), on a kernel that streams 4-bit weights
 * faster than MLAS's AVX2 one. The work of both is split over ONNX Runtime's intra-op threads.
 *
 * Both also compute what follows a matmul in a decoder layer (export/cpu_graph.py, fuse_matmul_epilogues), so a
 * decode step runs 7 nodes a layer instead of 13 (ONNX Runtime's cost between small nodes is a share of a step):
 * optional inputs bias [N] (3) and residual (4, the output's shape), and the attribute swiglu (0 or 1):
 *     t = y + bias;   swiglu: t[..., j] = (t[j] * logistic(t[j])) * t[j + N/2] for j < N/2;   out = residual + t,
 * each in the float arithmetic of the ONNX Runtime nodes it replaces (Add; Split, Sigmoid, Mul, Mul, which ONNX
 * Runtime runs as QuickGelu and Mul with MLAS's FMA3 logistic kernel), so the outputs stay the graph's bit for bit.
 * A pass over the rows after the matmul (finish_row), except where the panel kernels run a call: they store it with
 * the sums (panel_epilogue), each task computing the same columns of both SwiGLU halves, so a prompt's [rows, N]
 * matmul output is never written (the InternVL2-1B int8 prefill of 662 positions on the 2-core Xeon: 9% faster).
 */
#include "ort_ops.h"

/* Weights packed in groups of COLS output columns, 32 K values each, one group after the other:
 * packed[((g * kp / 32) + kb) * COLS * 32 + c * 32 + i] = w[kb * 32 + i][g * COLS + c] (zero past K and N), so a
 * tile of COLS outputs streams one contiguous run of memory. */
enum { COLS = 4, KBLOCK = 32, COLUMNS_PER_TASK = 64 };
/* Tasks for a single row: longer streams, fewer tasks, and no software prefetch in its loops (the hardware
 * prefetchers follow each stream). The InternVL2-1B int8 decode step on the Zen 4, medians of alternations in one
 * process: VNNI kernels 16.7 ms against 20.7 with 64-column tasks and prefetch; AVX2 kernels 18.0 against 20.9. */
enum { VNNI_ROW_COLUMNS = 128, AVX2_ROW_COLUMNS = 256 };
/* The weight stream is prefetched this far ahead of a tile's loads (8 k-blocks of one group). */
enum { PREFETCH_BYTES = 1024 };
/* The panel kernels (several rows): an AMX tile register holds 16 rows of 64 bytes (A: 16 rows x 64 K codes; B: 16
 * K quads x 16 columns x 4; C: 16 x 16 int32 sums), and both the AMX and the VNNI kernels work on blocks of 32 rows
 * by two tiles of 16 columns. AMX takes calls of AMX_MIN_ROWS rows or more. */
enum { AMX_K = 64, TILE = 16, TILE_PAIR = 2 * TILE, AMX_MIN_ROWS = 16 };

typedef struct {
    Node node;
    int64_t k, n;
    int swiglu;      /* the output is the SwiGLU of the matmul's two halves (the epilogue, below) */
    int per_token;
    int vnni;        /* the AVX-512 VNNI kernels (vnni_*), else the AVX2 ones */
    int amx;         /* AMX_MIN_ROWS rows or more on AMX tiles (amx_block; one row keeps the VNNI kernels) */
    int64_t kp, np;  /* K and N padded to KBLOCK and COLS */
    int8_t* packed;
    int32_t* column_sums;  /* sum over K of each column of w (DynamicQuantizeMatMul's zero-point correction) */
    float* w_scale;
} Kernel;

/* A call's input x [..., K] and output y [..., n], and the rows of x. */
static OrtStatus* input_output(const Node* node, int64_t k, int64_t n, OrtKernelContext* ctx, const float** x,
                                float** y, int64_t* rows) {
    OrtApiTable api = node->api;
    const OrtValue* x_value;
    RETURN_IF_ERROR(API(api, KERNEL_CONTEXT_GET_INPUT, KernelContextGetInputFn)(ctx, 0, &x_value));
    Tensor t;
    RETURN_IF_ERROR(tensor(node, x_value, TYPE_FLOAT, &t, "the input"));
    const size_t rank = t.rank;
    if (rank < 1 || t.dims[rank - 1] != k) {
        char what[128];
        snprintf(what, sizeof what, "the input's last dimension is %lld, the weight's K %lld",
                 rank ? (long long)t.dims[rank - 1] : -1LL, (long long)k);
        return error(node, ORT_INVALID_ARGUMENT, what);
    }
    *rows = 1;
    for (size_t i = 0; i + 1 < rank; i++) *rows *= t.dims[i];
    *x = t.data;
    t.dims[rank - 1] = n;
    OrtValue* y_value;
    RETURN_IF_ERROR(API(api, KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(ctx, 0, t.dims, rank, &y_value));
    void* y_data;
    RETURN_IF_ERROR(API(api, GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(y_value, &y_data));
    *y = y_data;
    return NULL;
}

/* ---- The epilogue: bias, SwiGLU and residual after the matmul (the header's formula) ---- */

/* The attribute swiglu, 0 where the node has none (graphs without the epilogue). */
static OrtStatus* swiglu_attribute(const Node* node, const OrtKernelInfo* info, int64_t n, int* swiglu) {
    const int64_t value = optional_attribute(node->api, info, "swiglu", 0);
    if (value != 0 && value != 1) return error(node, ORT_INVALID_ARGUMENT, "swiglu must be 0 or 1");
    if (value && n % 2) return error(node, ORT_INVALID_ARGUMENT, "swiglu needs an even N (two halves)");
    *swiglu = (int)value;
    return NULL;
}

/* One call of either op: its input and output, and the epilogue's. */
typedef struct {
    const float* x;         /* the input [rows, K] */
    int64_t rows;
    float* m;               /* where the matmul writes its [rows, n]: y, or with swiglu a buffer of the call's own */
    float* y;               /* the output [rows, width] */
    const float* bias;      /* [n] or NULL */
    const float* residual;  /* [rows, width] or NULL */
    int64_t n, width;       /* width: n / 2 with swiglu, else n */
    int swiglu;
    int stored;             /* the matmul's store computes the epilogue too (panel_epilogue): m is y, no pass after */
} Call;

/* MLAS's logistic as its FMA3 kernel computes it (the rational approximation Eigen uses, clamped to +-18): the same
 * operations in the same order, so the same bits. */
static const float LOGISTIC[] = {-18.0f, 18.0f,
                                 4.37031012579801e-11f, 1.15627324459942e-07f, 6.08574864600143e-05f,
                                 8.51377133304701e-03f, 2.48287947061529e-01f,
                                 6.10247389755681e-13f, 5.76102136993427e-09f, 6.29106785017040e-06f,
                                 1.70198817374094e-03f, 1.16817656904453e-01f, 9.93151921023180e-01f};
enum { LOWER, UPPER, A9, A7, A5, A3, A1, B10, B8, B6, B4, B2, B0 };

/* That logistic on vectors of W bits (W##_ps: the intrinsics' prefix), as a function `name` for `target`: one
 * sequence of operations for both widths, lane by lane the same bits. */
#define DEFINE_LOGISTIC(name, target, T, W)                                           \
    target static inline T name(T x) {                                                \
        x = W##_min_ps(W##_set1_ps(LOGISTIC[UPPER]), W##_max_ps(W##_set1_ps(LOGISTIC[LOWER]), x)); \
        const T x2 = W##_mul_ps(x, x);                                                \
        T p = W##_fmadd_ps(x2, W##_set1_ps(LOGISTIC[A9]), W##_set1_ps(LOGISTIC[A7])); \
        p = W##_fmadd_ps(x2, p, W##_set1_ps(LOGISTIC[A5]));                           \
        p = W##_fmadd_ps(x2, p, W##_set1_ps(LOGISTIC[A3]));                           \
        p = W##_fmadd_ps(x2, p, W##_set1_ps(LOGISTIC[A1]));                           \
        T q = W##_fmadd_ps(x2, W##_set1_ps(LOGISTIC[B10]), W##_set1_ps(LOGISTIC[B8])); \
        q = W##_fmadd_ps(x2, q, W##_set1_ps(LOGISTIC[B6]));                           \
        q = W##_fmadd_ps(x2, q, W##_set1_ps(LOGISTIC[B4]));                           \
        q = W##_fmadd_ps(x2, q, W##_set1_ps(LOGISTIC[B2]));                           \
        q = W##_fmadd_ps(x2, q, W##_set1_ps(LOGISTIC[B0]));                           \
        p = W##_mul_ps(x, p);                                                         \
        return W##_max_ps(W##_setzero_ps(), W##_add_ps(W##_div_ps(p, q), W##_set1_ps(0.5f))); \
    }

DEFINE_LOGISTIC(logistic8, AVX2_FMA, __m256, _mm256)

/* logistic8 of one value: vmaxps / vminps keep their second operand where the comparison fails (NaN included), and
 * x * p / q is (x * p) / q, as there. */
AVX2_FMA static inline float logistic1(float x) {
    const float* c = LOGISTIC;
    x = c[LOWER] > x ? c[LOWER] : x;
    x = c[UPPER] < x ? c[UPPER] : x;
    const float x2 = x * x;
    float p = fmaf(x2, c[A9], c[A7]);
    p = fmaf(x2, p, c[A5]);
    p = fmaf(x2, p, c[A3]);
    p = fmaf(x2, p, c[A1]);
    float q = fmaf(x2, c[B10], c[B8]);
    q = fmaf(x2, q, c[B6]);
    q = fmaf(x2, q, c[B4]);
    q = fmaf(x2, q, c[B2]);
    q = fmaf(x2, q, c[B0]);
    const float r = x * p / q + 0.5f;
    return 0.0f > r ? 0.0f : r;
}

/* Row r of the output. The library is built with -ffp-contract=off, so no multiply and add here or above are fused
 * into one rounding the graph's nodes do not make. */
AVX2_FMA static void finish_row(void* p, size_t r) {
    const Call* c = p;
    const float* m = c->m + r * c->n;
    float* y = c->y + r * c->width;
    const float* residual = c->residual ? c->residual + r * c->width : NULL;
    int64_t j = 0;
    for (; j + 8 <= c->width; j += 8) {
        __m256 t = _mm256_loadu_ps(m + j);
        if (c->bias) t = _mm256_add_ps(t, _mm256_loadu_ps(c->bias + j));
        if (c->swiglu) {
            __m256 up = _mm256_loadu_ps(m + c->width + j);
            if (c->bias) up = _mm256_add_ps(up, _mm256_loadu_ps(c->bias + c->width + j));
            t = _mm256_mul_ps(_mm256_mul_ps(t, logistic8(t)), up);
        }
        if (residual) t = _mm256_add_ps(_mm256_loadu_ps(residual + j), t);
        _mm256_storeu_ps(y + j, t);
    }
    for (; j < c->width; j++) {
        float t = m[j];
        if (c->bias) t += c->bias[j];
        if (c->swiglu) {
            float up = m[c->width + j];
            if (c->bias) up += c->bias[c->width + j];
            t = t * logistic1(t) * up;
        }
        if (residual) t = residual[j] + t;
        y[j] = t;
    }
}

/* Inputs 3 (bias) and 4 (residual) where the node has them, checked against the matmul's shape. */
static OrtStatus* epilogue_inputs(const Node* node, OrtKernelContext* ctx, Call* c) {
    size_t count;
    RETURN_IF_ERROR(API(node->api, KERNEL_CONTEXT_GET_INPUT_COUNT, KernelContextGetInputCountFn)(ctx, &count));
    const float** slots[2] = {&c->bias, &c->residual};
    const int64_t expected[2] = {c->n, c->rows * c->width};
    static const char* names[2] = {"the bias", "the residual"};
    for (size_t i = 0; i < 2 && 3 + i < count; i++) {
        const OrtValue* value;
        RETURN_IF_ERROR(API(node->api, KERNEL_CONTEXT_GET_INPUT, KernelContextGetInputFn)(ctx, 3 + i, &value));
        if (value == NULL) continue;
        Tensor t;
        RETURN_IF_ERROR(tensor(node, value, TYPE_FLOAT, &t, names[i]));
        int64_t elements = 1;
        for (size_t d = 0; d < t.rank; d++) elements *= t.dims[d];
        if (elements != expected[i]) {
            char what[160];
            snprintf(what, sizeof what, "%s has %lld values, expected %lld (%s)", names[i], (long long)elements,
                     (long long)expected[i], i ? "the output's shape" : "N");
            return error(node, ORT_INVALID_ARGUMENT, what);
        }
        *slots[i] = t.data;
    }
    return NULL;
}

/* A call's input, output and epilogue inputs (the output [..., width] for a matmul of `n` columns), and where the
 * matmul writes. panel_rows: the fewest rows the op's panel kernels take here (0: none); a call they run stores its
 * epilogue with the sums (panel_epilogue), with SwiGLU where its halves are whole tile pairs, which a task then
 * computes side by side. */
static OrtStatus* start_call(const Node* node, OrtKernelContext* ctx, int64_t k, int64_t n, int swiglu,
                             int64_t panel_rows, Call* c) {
    *c = (Call){.n = n, .width = swiglu ? n / 2 : n, .swiglu = swiglu};
    RETURN_IF_ERROR(input_output(node, k, c->width, ctx, &c->x, &c->y, &c->rows));
    RETURN_IF_ERROR(epilogue_inputs(node, ctx, c));
    c->m = c->y;
    c->stored = panel_rows && c->rows >= panel_rows && (!swiglu || c->width % TILE_PAIR == 0);
    if (swiglu && c->rows && !c->stored) {
        c->m = malloc(c->rows * n * sizeof(float));
        if (c->m == NULL) return error(node, ORT_FAIL, "out of memory for the matmul's two halves");
    }
    return NULL;
}

/* 2 where each task computes the same columns of both SwiGLU halves (the panel kernels store the epilogue), else 1 */
static inline int task_halves(const Call* c) { return c->stored && c->swiglu ? 2 : 1; }

/* After the matmul (`status` its outcome): the epilogue over every row, on ONNX Runtime's threads for several. */
static OrtStatus* end_call(const Node* node, OrtKernelContext* ctx, Call* c, OrtStatus* status) {
    if (status == NULL && !c->stored && (c->bias || c->residual || c->swiglu)) {
        if (c->rows == 1) finish_row(c, 0);
        else status = API(node->api, KERNEL_CONTEXT_PARALLEL_FOR, KernelContextParallelForFn)(ctx, finish_row,
                                                                                            c->rows, 0, c);
    }
    if (c->m != c->y) free(c->m);
    return status;
}

/* A weight input that must be a constant initializer of `type` (packed once, when the kernel is created). */
static OrtStatus* constant_input(const Node* node, const OrtKernelInfo* info, size_t index, int type, Tensor* t,
                                 const char* name) {
    int is_constant = 0;
    const OrtValue* value;
    RETURN_IF_ERROR(API(node->api, KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR, KernelInfoGetConstantInputFn)(
        info, index, &is_constant, &value));
    if (!is_constant)
        return error(node, ORT_INVALID_ARGUMENT, "the weight and its scales must be constant initializers");
    return tensor(node, value, type, t, name);
}

/* Which kernels this CPU runs: AMX for several rows where it has it (Int8MatMul's one row on its VNNI kernels,
 * Int4MatMul's on its AVX2 ones), else AVX-512 VNNI where it has that (Int4MatMul's for several rows only), else
 * AVX2. All compute the same integers; EDGEVL_MATMUL_KERNEL=avx2, avx512-vnni or amx names one (tests compare them
 * on one machine, and benchmarks/isa_mask.py shows a class without VNNI the AVX2 ones), an error where this CPU
 * cannot run it. */
static int has_vnni(void) {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl");
}

/* AMX: the tile instructions, and the tile state (tile_state_permitted). */
static int has_amx(void) {
    return has_vnni() && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8")
           && tile_state_permitted();
}

/* For edgevl.cpu (ctypes): the Int8MatMul kernels this CPU runs, 1 AVX2 | 2 AVX-512 VNNI | 4 AMX (0: no AVX2 and
 * FMA). */
__attribute__((visibility("default"))) int EdgevlInt8MatMulKernels(void) {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    return 1 | (has_vnni() ? 2 : 0) | (has_amx() ? 4 : 0);
}

static OrtStatus* matmul_kernels(const Node* node, int* vnni, int* amx) {
    const char* named = getenv("EDGEVL_MATMUL_KERNEL");
    if (named == NULL || *named == 0) {
        *amx = has_amx();
        *vnni = has_vnni();
    } else if (strcmp(named, "avx2") == 0) {
        *vnni = *amx = 0;
    } else if (strcmp(named, "avx512-vnni") == 0 && has_vnni()) {
        *vnni = 1;
        *amx = 0;
    } else if (strcmp(named, "amx") == 0 && has_amx()) {
        *vnni = *amx = 1;
    } else {
        char what[200];
        snprintf(what, sizeof what, "EDGEVL_MATMUL_KERNEL=%.40s: expected avx2, avx512-vnni or amx, one this CPU has "
                 "(%s)", named, has_amx() ? "all three" : has_vnni() ? "avx2 and avx512-vnni" : "avx2 only");
        return error(node, ORT_INVALID_ARGUMENT, what);
    }
    return NULL;
}

static void destroy(void* p) {
    Kernel* kernel = p;
    if (kernel == NULL) return;
    free(kernel->packed);
    free(kernel->column_sums);
    free(kernel->w_scale);
    free(kernel);
}

static OrtStatus* create(const OrtCustomOp* op, OrtApiTable api, const OrtKernelInfo* info, void** out) {
    (void)op;
    Node node = {0};
    RETURN_IF_ERROR(node_info(&node, api, "Int8MatMul", info));
    int64_t per_token;
    RETURN_IF_ERROR(API(api, KERNEL_INFO_GET_ATTRIBUTE_INT64, KernelInfoGetAttributeInt64Fn)(info, "per_token",
                                                                                            &per_token));
    Tensor wt, st;
    RETURN_IF_ERROR(constant_input(&node, info, 1, TYPE_INT8, &wt, "the weight"));
    RETURN_IF_ERROR(constant_input(&node, info, 2, TYPE_FLOAT, &st, "the weight scale"));
    if (wt.rank != 2 || st.rank != 1 || st.dims[0] != wt.dims[1] || wt.dims[0] <= 0 || wt.dims[1] <= 0)
        return error(&node, ORT_INVALID_ARGUMENT, "expected a weight [K, N] and a scale [N]");
    const int64_t k = wt.dims[0], n = wt.dims[1];

    Kernel* kernel = calloc(1, sizeof *kernel);
    if (kernel == NULL) return error(&node, ORT_FAIL, "out of memory");
    kernel->node = node;
    kernel->k = k;
    kernel->n = n;
    kernel->per_token = per_token != 0;
    OrtStatus* status = matmul_kernels(&node, &kernel->vnni, &kernel->amx);
    kernel->kp = round_up(k, kernel->amx ? AMX_K : KBLOCK);
    kernel->np = round_up(n, COLS);
    if (status == NULL) status = swiglu_attribute(&node, info, n, &kernel->swiglu);
    if (status != NULL) {
        free(kernel);
        return status;
    }
    const size_t packed_bytes = kernel->kp * kernel->np;
    kernel->packed = aligned_alloc(64, round_up(packed_bytes, 64));
    kernel->column_sums = calloc(kernel->np, sizeof(int32_t));
    kernel->w_scale = calloc(kernel->np, sizeof(float));
    if (kernel->packed == NULL || kernel->column_sums == NULL || kernel->w_scale == NULL) {
        destroy(kernel);
        return error(&node, ORT_FAIL, "out of memory for the packed weight");
    }
    memset(kernel->packed, 0, packed_bytes);
    memcpy(kernel->w_scale, st.data, n * sizeof(float));
    const int8_t* w = wt.data;
    const int64_t kp = kernel->kp;
    int saw_minus_128 = 0;
    /* Tiles of 32 rows x 64 columns: reads and writes both stay within a few cache lines. */
    for (int64_t n0 = 0; n0 < n; n0 += 64) {
        for (int64_t k0 = 0; k0 < k; k0 += KBLOCK) {
            for (int64_t kk = k0; kk < k0 + KBLOCK && kk < k; kk++) {
                const int8_t* row = w + kk * n;
                for (int64_t c = n0; c < n0 + 64 && c < n; c++) {
                    int8_t v = row[c];
                    saw_minus_128 |= v == -128;
                    kernel->column_sums[c] += v;
                    kernel->packed[((c / COLS) * (kp / KBLOCK) + kk / KBLOCK) * COLS * KBLOCK + (c % COLS) * KBLOCK
                                   + kk % KBLOCK] = v;
                }
            }
        }
    }
    if (saw_minus_128) {
        destroy(kernel);
        return error(&node, ORT_INVALID_ARGUMENT, "the weight holds -128; symmetric int8 weights (-127..127) are "
                     "required");
    }
    *out = kernel;
    return NULL;
}

/* One call's work, shared by the tasks ONNX Runtime's threads run. */
typedef struct {
    const Kernel* kernel;
    const float* x;
    float* y;
    int8_t* q;         /* [rows, kp] the u8 codes minus 128 (-128..127), zero past K */
    float* row_scale;  /* per_token: m of each row */
    int64_t rows;
    int64_t per_task;  /* columns a task computes */
    float a_scale;     /* per_token: 1/127; else the tensor's scale */
    int32_t correction;  /* added to each sum times its column's sum: 128 - zero point per tensor (0 per token),
                          * less 128 for the VNNI kernels, whose activations are the u8 codes */
    int* out_of_memory;  /* set by a task whose panel could not be allocated */
    const Call* call;    /* its epilogue, for panel_store where call->stored */
} Work;

/* q = rne(clamp((x / first) / second, low, high)) + offset: the per-token chain's Div (first = m), then ONNX
 * Runtime's QuantizeLinear (divide by the scale, clamp in float, round to nearest even: the default MXCSR mode, add
 * the zero point); first = 1 leaves x as it is. The caller's low, high and offset keep q within -128..127. */
__attribute__((target("avx2"))) static void quantize_row(const float* x, int8_t* q, int64_t k, float first,
                                                          float second, float low, float high, int32_t offset) {
    const __m256 d1 = _mm256_set1_ps(first), d2 = _mm256_set1_ps(second);
    const __m256 lo = _mm256_set1_ps(low), hi = _mm256_set1_ps(high);
    const __m256i shift = _mm256_set1_epi32(offset);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        __m256 v = _mm256_div_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), d1), d2);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);  /* NaN (0 / 0 for an all-zero row) becomes `low` */
        __m256i codes = _mm256_add_epi32(_mm256_cvtps_epi32(v), shift);
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
        _mm_storel_epi64((__m128i*)(q + i), _mm_packs_epi16(w, w));
    }
    for (; i < k; i++) {
        float v = (x[i] / first) / second;
        v = v > low ? v : low;  /* NaN fails the comparison: `low`, as above */
        v = v < high ? v : high;
        q[i] = (int8_t)(lrintf(v) + offset);
    }
}

/* q - 128 -> the u8 code q (the VNNI kernels' activations): flipping the top bit adds 128 modulo 256. */
__attribute__((target("avx2"))) static void to_codes(int8_t* q, int64_t bytes) {  /* bytes: a multiple of KBLOCK */
    const __m256i top = _mm256_set1_epi8((char)0x80);
    for (int64_t i = 0; i < bytes; i += 32)
        _mm256_storeu_si256((__m256i*)(q + i), _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(q + i)), top));
}

/* Per-token rows: q = rne((x / m) / (1/127)), clamped to -128..127 (the graph's u8 code minus 128). */
__attribute__((target("avx2"))) static void quantize_rows_per_token(void* p, size_t r) {
    Work* work = p;
    const int64_t k = work->kernel->k, kp = work->kernel->kp;
    const float* x = work->x + r * k;
    float m = 0.0f;
    __m256 vmax = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; i < k; i++) m = fabsf(x[i]) > m ? fabsf(x[i]) : m;
    work->row_scale[r] = m;
    int8_t* q = work->q + r * kp;
    quantize_row(x, q, k, m, work->a_scale, -128.0f, 127.0f, 0);
    memset(q + k, 0, kp - k);
    if (work->kernel->vnni) to_codes(q, kp);
}

/* Sums of |a| * (w with a's sign) over K for one or two rows of a and the COLS columns of one packed group, with
 * named accumulators (arrays of them left GCC's -O2 keeping the sums in memory: 2.6x slower). */
#define SIGNED_DOT(acc, magnitude, row, w) \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w, row)), ones))

static inline void prefetch_ahead(const int8_t* w) {  /* one k-block of a group: two cache lines */
    _mm_prefetch((const char*)w + PREFETCH_BYTES, _MM_HINT_T0);
    _mm_prefetch((const char*)w + PREFETCH_BYTES + 64, _MM_HINT_T0);
}

/* One k-block of one row (`row`, its `magnitude`) against the group at w, into that group's four sums. */
#define GROUP_DOTS(s0, s1, s2, s3, w)                                                          \
    do {                                                                                       \
        SIGNED_DOT(s0, magnitude, row, _mm256_load_si256((const __m256i*)(w)));                \
        SIGNED_DOT(s1, magnitude, row, _mm256_load_si256((const __m256i*)((w) + KBLOCK)));     \
        SIGNED_DOT(s2, magnitude, row, _mm256_load_si256((const __m256i*)((w) + 2 * KBLOCK))); \
        SIGNED_DOT(s3, magnitude, row, _mm256_load_si256((const __m256i*)((w) + 3 * KBLOCK))); \
    } while (0)

__attribute__((target("avx2"))) static inline __m128i reduce4(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
    const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(s0, s1), _mm256_hadd_epi32(s2, s3));
    return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

__attribute__((target("avx2"))) static void tile1(const int8_t* a, int64_t kp, const int8_t* w, int32_t out[][COLS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t k0 = 0; k0 < kp; k0 += KBLOCK, w += COLS * KBLOCK) {
        const __m256i row = _mm256_loadu_si256((const __m256i*)(a + k0));
        const __m256i magnitude = _mm256_abs_epi8(row);  /* -128 -> 0x80: 128 read as unsigned */
        GROUP_DOTS(s0, s1, s2, s3, w);
    }
    _mm_storeu_si128((__m128i*)out[0], reduce4(s0, s1, s2, s3));
}

/* One row against STREAMS groups `stride` bytes apart at once. A core keeps more reads from memory in flight over
 * several streams than over one (one row by the 48 MLP matrices of the InternVL2-1B shape, 2 threads, the 2-core
 * Xeon: 24 GB/s with one stream, 33 with four), and a decode step is one row: its speed is this loop's. */
enum { STREAMS = 4 };
__attribute__((target("avx2"))) static void tile1_streams(const int8_t* a, int64_t kp, const int8_t* w, int64_t stride,
                                                           int32_t out[STREAMS][COLS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s02 = s00, s03 = s00, s10 = s00, s11 = s00, s12 = s00, s13 = s00;
    __m256i s20 = s00, s21 = s00, s22 = s00, s23 = s00, s30 = s00, s31 = s00, s32 = s00, s33 = s00;
    for (int64_t k0 = 0; k0 < kp; k0 += KBLOCK, w += COLS * KBLOCK) {
        const __m256i row = _mm256_loadu_si256((const __m256i*)(a + k0));
        const __m256i magnitude = _mm256_abs_epi8(row);
        GROUP_DOTS(s00, s01, s02, s03, w);
        GROUP_DOTS(s10, s11, s12, s13, w + stride);
        GROUP_DOTS(s20, s21, s22, s23, w + 2 * stride);
        GROUP_DOTS(s30, s31, s32, s33, w + 3 * stride);
    }
    _mm_storeu_si128((__m128i*)out[0], reduce4(s00, s01, s02, s03));
    _mm_storeu_si128((__m128i*)out[1], reduce4(s10, s11, s12, s13));
    _mm_storeu_si128((__m128i*)out[2], reduce4(s20, s21, s22, s23));
    _mm_storeu_si128((__m128i*)out[3], reduce4(s30, s31, s32, s33));
}

__attribute__((target("avx2"))) static void tile2(const int8_t* a, int64_t kp, const int8_t* w, int32_t out[][COLS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s02 = s00, s03 = s00;
    __m256i s10 = s00, s11 = s00, s12 = s00, s13 = s00;
    const int8_t* b = a + kp;  /* the second row */
    for (int64_t k0 = 0; k0 < kp; k0 += KBLOCK, w += COLS * KBLOCK) {
        prefetch_ahead(w);
        const __m256i row0 = _mm256_loadu_si256((const __m256i*)(a + k0));
        const __m256i row1 = _mm256_loadu_si256((const __m256i*)(b + k0));
        const __m256i m0 = _mm256_abs_epi8(row0), m1 = _mm256_abs_epi8(row1);
        const __m256i w0 = _mm256_load_si256((const __m256i*)w), w1 = _mm256_load_si256((const __m256i*)(w + KBLOCK));
        SIGNED_DOT(s00, m0, row0, w0);
        SIGNED_DOT(s10, m1, row1, w0);
        SIGNED_DOT(s01, m0, row0, w1);
        SIGNED_DOT(s11, m1, row1, w1);
        const __m256i w2 = _mm256_load_si256((const __m256i*)(w + 2 * KBLOCK));
        const __m256i w3 = _mm256_load_si256((const __m256i*)(w + 3 * KBLOCK));
        SIGNED_DOT(s02, m0, row0, w2);
        SIGNED_DOT(s12, m1, row1, w2);
        SIGNED_DOT(s03, m0, row0, w3);
        SIGNED_DOT(s13, m1, row1, w3);
    }
    _mm_storeu_si128((__m128i*)out[0], reduce4(s00, s01, s02, s03));
    _mm_storeu_si128((__m128i*)out[1], reduce4(s10, s11, s12, s13));
}

/* Rows r .. r + rows - 1 of columns c .. c + COLS - 1 from their integer sums, scaled as the replaced graph does
 * (the vector and scalar paths round alike: the same float operations in the same order). */
__attribute__((target("avx2"))) static void store_tile(const Work* work, int64_t r, int rows, int64_t c,
                                                        int32_t acc[][COLS]) {
    const Kernel* kernel = work->kernel;
    const int64_t n = kernel->n;
    if (c + COLS <= n) {
        const __m128i correction = _mm_mullo_epi32(_mm_set1_epi32(work->correction),
                                                   _mm_loadu_si128((const __m128i*)(kernel->column_sums + c)));
        const __m128 scale = _mm_mul_ps(_mm_set1_ps(work->a_scale), _mm_loadu_ps(kernel->w_scale + c));
        for (int i = 0; i < rows; i++) {
            const __m128i exact = _mm_add_epi32(_mm_loadu_si128((const __m128i*)acc[i]), correction);
            __m128 y = _mm_mul_ps(_mm_cvtepi32_ps(exact), scale);
            if (kernel->per_token) y = _mm_mul_ps(y, _mm_set1_ps(work->row_scale[r + i]));
            _mm_storeu_ps(work->y + (r + i) * n + c, y);
        }
        return;
    }
    for (int i = 0; i < rows; i++) {
        float* y = work->y + (r + i) * n;
        for (int j = 0; j < COLS && c + j < n; j++) {
            const int32_t exact = acc[i][j] + work->correction * kernel->column_sums[c + j];
            const float scale = work->a_scale * kernel->w_scale[c + j];
            y[c + j] = kernel->per_token ? ((float)exact * scale) * work->row_scale[r + i] : (float)exact * scale;
        }
    }
}

typedef void (*RowStreamsFn)(const int8_t* a, int64_t kp, const int8_t* w, int64_t stride, int32_t out[STREAMS][COLS]);
typedef void (*RowTileFn)(const int8_t* a, int64_t kp, const int8_t* w, int32_t out[][COLS]);

/* Row r of columns [c0, c1): STREAMS groups at a time, from places a quarter of the columns apart, then the groups
 * left over, on either class's one-row kernels. */
static void multiply_row(const Work* work, int64_t r, int64_t c0, int64_t c1, RowStreamsFn streams, RowTileFn tile) {
    const int64_t kp = work->kernel->kp;
    const int8_t* a = work->q + r * kp;
    const int8_t* packed = work->kernel->packed;
    int32_t acc[STREAMS][COLS];
    const int64_t span = (c1 - c0) / COLS / STREAMS * COLS;  /* columns between two streams */
    for (int64_t c = c0; c < c0 + span; c += COLS) {
        streams(a, kp, packed + c * kp, span * kp, acc);
        for (int j = 0; j < STREAMS; j++) store_tile(work, r, 1, c + j * span, &acc[j]);
    }
    for (int64_t c = c0 + STREAMS * span; c < c1; c += COLS) {
        tile(a, kp, packed + c * kp, acc);
        store_tile(work, r, 1, c, acc);
    }
}

/* Columns [c0, c1) of every row (one task): the task's packed weights (<= 64 x K bytes) stay in cache while the
 * rows pass over them two at a time; a single row (a decode step, its tasks AVX2_ROW_COLUMNS wide) as multiply_row. */
static void multiply_columns(const Work* work, int64_t c0, int64_t c1) {
    const Kernel* kernel = work->kernel;
    const int64_t kp = kernel->kp;
    int32_t acc[2][COLS];
    int64_t r = 0;
    for (; r + 2 <= work->rows; r += 2) {
        for (int64_t c = c0; c < c1; c += COLS) {
            tile2(work->q + r * kp, kp, kernel->packed + c * kp, acc);
            store_tile(work, r, 2, c, acc);
        }
    }
    if (r < work->rows) multiply_row(work, r, c0, c1, tile1_streams, tile1);
}

/* ---- The AVX-512 VNNI kernels: vpdpbusd sums four u8 x s8 products into each int32 lane with no int16 step, so
 * the activations go in as their u8 codes (q + 128) with no sign trick, and the column sums take the 128 back out
 * (Work.correction): sum (q + 128) w - 128 sum w = sum q w, the same integers as the AVX2 kernels. For one row, one
 * zmm load is one k-block of two columns of a group (the packed layout), the row's 32 codes broadcast to both halves;
 * lanes 0-7 sum the first column's products, 8-15 the second's. Several rows take the panel kernels below. */
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2")))

VNNI_TARGET static inline __m512i broadcast_row(const int8_t* a) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)a));
}

/* A group's four column sums from its two accumulators (columns 0, 1 and 2, 3). */
VNNI_TARGET static inline __m128i reduce_group(__m512i c01, __m512i c23) {
    return reduce4(_mm512_castsi512_si256(c01), _mm512_extracti64x4_epi64(c01, 1), _mm512_castsi512_si256(c23),
                   _mm512_extracti64x4_epi64(c23, 1));
}

#define VNNI_GROUP(s01, s23, row, w)                                                         \
    do {                                                                                     \
        s01 = _mm512_dpbusd_epi32(s01, row, _mm512_load_si512((const void*)(w)));            \
        s23 = _mm512_dpbusd_epi32(s23, row, _mm512_load_si512((const void*)((w) + 64)));     \
    } while (0)

VNNI_TARGET static void vnni_tile1(const int8_t* a, int64_t kp, const int8_t* w, int32_t out[][COLS]) {
    __m512i s01 = _mm512_setzero_si512(), s23 = s01;
    for (int64_t k0 = 0; k0 < kp; k0 += KBLOCK, w += COLS * KBLOCK) {
        const __m512i row = broadcast_row(a + k0);
        VNNI_GROUP(s01, s23, row, w);
    }
    _mm_storeu_si128((__m128i*)out[0], reduce_group(s01, s23));
}

/* One row against STREAMS groups `stride` bytes apart at once (tile1_streams). */
VNNI_TARGET static void vnni_tile1_streams(const int8_t* a, int64_t kp, const int8_t* w, int64_t stride,
                                           int32_t out[STREAMS][COLS]) {
    __m512i s0 = _mm512_setzero_si512(), t0 = s0, s1 = s0, t1 = s0, s2 = s0, t2 = s0, s3 = s0, t3 = s0;
    for (int64_t k0 = 0; k0 < kp; k0 += KBLOCK, w += COLS * KBLOCK) {
        const __m512i row = broadcast_row(a + k0);
        VNNI_GROUP(s0, t0, row, w);
        VNNI_GROUP(s1, t1, row, w + stride);
        VNNI_GROUP(s2, t2, row, w + 2 * stride);
        VNNI_GROUP(s3, t3, row, w + 3 * stride);
    }
    _mm_storeu_si128((__m128i*)out[0], reduce_group(s0, t0));
    _mm_storeu_si128((__m128i*)out[1], reduce_group(s1, t1));
    _mm_storeu_si128((__m128i*)out[2], reduce_group(s2, t2));
    _mm_storeu_si128((__m128i*)out[3], reduce_group(s3, t3));
}

/* ---- The panel kernels, for several rows, on AMX (Sapphire Rapids and later) or AVX-512 VNNI: _tile_dpbusd sums
 * u8 x s8 products in groups of four as vpdpbusd does, so the activations are the VNNI kernels' u8 codes and the same
 * correction applies: the same integers. Both want each K quad's 16 columns side by side (B tiles' order), which the
 * packed layout (kept for the one-row kernels: one copy of the weights) is not, so a task first gathers its columns'
 * weights into that order (its panel, in L2), then passes every 32 rows of activations over it. A block's rows,
 * columns and K past the data are zeros (the q buffer is whole blocks of rows, K is padded to AMX_K on AMX, the panel
 * to whole tiles), and only real outputs are stored. */
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2")))

/* 32 K values of 16 columns as a B tile's 8 rows: in[i] holds columns 2i and 2i + 1, each as 8 (column, quad)
 * dwords (4 K values); out[q * TILE + j] = quad q of column j. Per four columns, one permutation per half of the
 * quads puts them in (quad, column) order, and a 4 x 4 transpose of 128-bit lanes over the four makes each quad's row
 * of 16 columns. */
VNNI_TARGET static void panel_transpose(const __m512i in[8], int32_t* out) {
    /* (quad q, column j) of quads 0-3, then 4-7, of four columns from two zmm (columns 0 and 1, then 2 and 3) */
    const __m512i first = _mm512_set_epi32(27, 19, 11, 3, 26, 18, 10, 2, 25, 17, 9, 1, 24, 16, 8, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(4));
    __m512i low[4], high[4];
    for (int g = 0; g < 4; g++) {
        low[g] = _mm512_permutex2var_epi32(in[2 * g], first, in[2 * g + 1]);
        high[g] = _mm512_permutex2var_epi32(in[2 * g], second, in[2 * g + 1]);
    }
    for (int h = 0; h < 2; h++, out += 4 * TILE) {
        const __m512i* e = h ? high : low;
        const __m512i t0 = _mm512_shuffle_i32x4(e[0], e[1], 0x44), t1 = _mm512_shuffle_i32x4(e[0], e[1], 0xEE);
        const __m512i t2 = _mm512_shuffle_i32x4(e[2], e[3], 0x44), t3 = _mm512_shuffle_i32x4(e[2], e[3], 0xEE);
        _mm512_store_si512((void*)out, _mm512_shuffle_i32x4(t0, t2, 0x88));
        _mm512_store_si512((void*)(out + TILE), _mm512_shuffle_i32x4(t0, t2, 0xDD));
        _mm512_store_si512((void*)(out + 2 * TILE), _mm512_shuffle_i32x4(t1, t3, 0x88));
        _mm512_store_si512((void*)(out + 3 * TILE), _mm512_shuffle_i32x4(t1, t3, 0xDD));
    }
}

/* Columns [c, c + TILE) of the packed weight as a B tile's rows: panel[kq][j] = w[4 kq .. 4 kq + 3][c + j] (four
 * bytes), zero past np. A k-block of a packed group is two zmm of (column, quad) dwords already. */
AMX_TARGET static void int8_panel(const Kernel* kernel, int64_t c, int32_t* panel) {
    const int64_t kp = kernel->kp;
    for (int64_t kb = 0; kb < kp / KBLOCK; kb++) {
        __m512i in[8];
        for (int g = 0; g < 4; g++) {
            const int8_t* w = kernel->packed + (c + g * COLS) * kp + kb * COLS * KBLOCK;
            const int real = c + g * COLS < kernel->np;
            in[2 * g] = real ? _mm512_load_si512((const void*)w) : _mm512_setzero_si512();
            in[2 * g + 1] = real ? _mm512_load_si512((const void*)(w + 64)) : _mm512_setzero_si512();
        }
        panel_transpose(in, panel + kb * (KBLOCK / 4) * TILE);
    }
}

/* The columns of the tile at c that are real (below n). */
static inline __mmask16 real_columns(int64_t c, int64_t n) {
    return c + TILE <= n ? 0xFFFF : (__mmask16)((1u << (n - c)) - 1);
}

/* The column scaling of the tile at c: each sum's correction and scale. */
typedef struct {
    __m512i correction;
    __m512 scale;
} TileScaling;

AMX_TARGET static TileScaling tile_scaling(const Work* work, int64_t c, __mmask16 real) {
    const Kernel* kernel = work->kernel;
    return (TileScaling){_mm512_mullo_epi32(_mm512_set1_epi32(work->correction),
                                            _mm512_maskz_loadu_epi32(real, kernel->column_sums + c)),
                         _mm512_mul_ps(_mm512_set1_ps(work->a_scale),
                                       _mm512_maskz_loadu_ps(real, kernel->w_scale + c))};
}

/* Row `row`'s matmul values from its sums, scaled as store_tile does, element by element the same float operations. */
AMX_TARGET static inline __m512 tile_values(const Work* work, const int32_t* sums, TileScaling s, int64_t row) {
    const __m512i exact = _mm512_add_epi32(_mm512_loadu_si512((const void*)sums), s.correction);
    const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), s.scale);
    return work->kernel->per_token ? _mm512_mul_ps(y, _mm512_set1_ps(work->row_scale[row])) : y;
}

/* logistic8 on 16 lanes, for the panel kernels' epilogue. */
DEFINE_LOGISTIC(logistic16, VNNI_TARGET, __m512, _mm512)

/* Row `row` of the call's output at columns [c, c + TILE) (`real` of them) from the matmul's values there, t, and
 * with SwiGLU u, the second half's (columns c + width): the epilogue in finish_row's float operations, in one pass
 * and with no [rows, N] buffer for SwiGLU. */
VNNI_TARGET static inline void panel_epilogue(const Call* call, int64_t row, int64_t c, __mmask16 real, __m512 t,
                                              __m512 u) {
    if (call->bias) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(real, call->bias + c));
    if (call->swiglu) {
        if (call->bias) u = _mm512_add_ps(u, _mm512_maskz_loadu_ps(real, call->bias + call->width + c));
        t = _mm512_mul_ps(_mm512_mul_ps(t, logistic16(t)), u);
    }
    if (call->residual) t = _mm512_add_ps(_mm512_maskz_loadu_ps(real, call->residual + row * call->width + c), t);
    _mm512_mask_storeu_ps(call->y + row * call->width + c, real, t);
}

/* Rows r .. r + rows - 1 of columns [c, c + TILE) from their sums (row stride TILE_PAIR), and where the call stores
 * its epilogue here, SwiGLU's second half from up_sums; columns past N are neither read nor written. */
AMX_TARGET static void panel_store(const Work* work, int64_t r, int rows, int64_t c, const int32_t* sums,
                                   const int32_t* up_sums) {
    const Call* call = work->call;
    const __mmask16 real = real_columns(c, work->kernel->n);
    const TileScaling gate = tile_scaling(work, c, real);
    const TileScaling up = up_sums ? tile_scaling(work, c + call->width, real) : gate;
    for (int i = 0; i < rows; i++) {
        const __m512 t = tile_values(work, sums + i * TILE_PAIR, gate, r + i);
        if (!call->stored) _mm512_mask_storeu_ps(work->y + (r + i) * call->n + c, real, t);
        else panel_epilogue(call, r + i, c, real, t,
                            up_sums ? tile_values(work, up_sums + i * TILE_PAIR, up, r + i) : t);
    }
}

/* This thread's tiles: C in tiles 0-3 (16 x 16 int32), A in 4 and 5 (16 rows x `step` K codes), B in 6 and 7 (the
 * same K as step / 4 rows of 16 columns x 4). */
AMX_TARGET static void amx_configure(int step) {
    TileConfig config = {.palette = 1};
    for (int i = 0; i < 8; i++) {
        config.bytes_per_row[i] = i == 4 || i == 5 ? step : AMX_K;
        config.rows[i] = i >= 6 ? step / 4 : TILE;
    }
    tile_configure(&config);
}

/* Rows [r, r + 32) (a, `stride` bytes apart) by the two tiles of columns whose panels are b0 and b1, over K [k0, k1)
 * in steps of `step`: four C tiles, stored to sums[32][32]. */
AMX_TARGET static void amx_block(const int8_t* a, int64_t stride, const int32_t* b0, const int32_t* b1, int64_t k0,
                                 int64_t k1, int64_t step, int32_t sums[TILE_PAIR][TILE_PAIR]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (; k0 < k1; k0 += step) {
        _tile_loadd(4, a + k0, stride);
        _tile_loadd(5, a + TILE * stride + k0, stride);
        _tile_loadd(6, b0 + k0 / 4 * TILE, AMX_K);
        _tile_loadd(7, b1 + k0 / 4 * TILE, AMX_K);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    const int64_t row_bytes = TILE_PAIR * sizeof(int32_t);
    _tile_stored(0, &sums[0][0], row_bytes);
    _tile_stored(1, &sums[0][TILE], row_bytes);
    _tile_stored(2, &sums[TILE][0], row_bytes);
    _tile_stored(3, &sums[TILE][TILE], row_bytes);
}

/* amx_block's sums on AVX-512 VNNI for the first `rows` rows (in eights; the rest of sums is left as it was): each K
 * quad of a row broadcast against a K quad's row of both panels (named accumulators for the same reason as tile1's).
 * Int8MatMul at 662 rows on the 2-core Xeon: 1.6x the GMAC/s of four-row tiles read from the packed layout. */
#define VNNI_PANEL_ROW(i)                                                        \
    do {                                                                         \
        int32_t quad;                                                            \
        memcpy(&quad, a + (r + i) * stride + k, 4);                              \
        const __m512i x = _mm512_set1_epi32(quad);                               \
        s##i##a = _mm512_dpbusd_epi32(s##i##a, x, w0);                           \
        s##i##b = _mm512_dpbusd_epi32(s##i##b, x, w1);                           \
    } while (0)
#define VNNI_PANEL_STORE(i)                                                      \
    do {                                                                         \
        _mm512_storeu_si512((void*)&sums[r + i][0], s##i##a);                    \
        _mm512_storeu_si512((void*)&sums[r + i][TILE], s##i##b);             \
    } while (0)

VNNI_TARGET static void vnni_panel_block(const int8_t* a, int64_t stride, const int32_t* b0, const int32_t* b1,
                                         int64_t k0, int64_t k1, int rows, int32_t sums[TILE_PAIR][TILE_PAIR]) {
    for (int r = 0; r < rows; r += 8) {
        __m512i s0a = _mm512_setzero_si512(), s0b = s0a, s1a = s0a, s1b = s0a, s2a = s0a, s2b = s0a, s3a = s0a;
        __m512i s3b = s0a, s4a = s0a, s4b = s0a, s5a = s0a, s5b = s0a, s6a = s0a, s6b = s0a, s7a = s0a, s7b = s0a;
        for (int64_t k = k0; k < k1; k += 4) {
            const __m512i w0 = _mm512_load_si512((const void*)(b0 + k / 4 * TILE));
            const __m512i w1 = _mm512_load_si512((const void*)(b1 + k / 4 * TILE));
            VNNI_PANEL_ROW(0);
            VNNI_PANEL_ROW(1);
            VNNI_PANEL_ROW(2);
            VNNI_PANEL_ROW(3);
            VNNI_PANEL_ROW(4);
            VNNI_PANEL_ROW(5);
            VNNI_PANEL_ROW(6);
            VNNI_PANEL_ROW(7);
        }
        VNNI_PANEL_STORE(0);
        VNNI_PANEL_STORE(1);
        VNNI_PANEL_STORE(2);
        VNNI_PANEL_STORE(3);
        VNNI_PANEL_STORE(4);
        VNNI_PANEL_STORE(5);
        VNNI_PANEL_STORE(6);
        VNNI_PANEL_STORE(7);
    }
}

/* amx_block's sums on AMX tiles (configured for `step`) or vnni_panel_block's. */
VNNI_TARGET static void panel_sums(int amx, const int8_t* a, int64_t stride, const int32_t* b0, const int32_t* b1,
                                   int64_t k0, int64_t k1, int64_t step, int rows, int32_t sums[TILE_PAIR][TILE_PAIR]) {
    if (amx) amx_block(a, stride, b0, b1, k0, k1, step, sums);
    else vnni_panel_block(a, stride, b0, b1, k0, k1, rows, sums);
}

/* Columns [c0, c1) of several rows (c0 a multiple of TILE_PAIR) on the VNNI or AMX kernels: the panel gathered, then
 * each block of 32 rows (AMX tiles from AMX_MIN_ROWS rows, else vnni_panel_block). With SwiGLU stored here the same
 * columns of the second half too (their panel after the first's), so each tile's store has both. */
VNNI_TARGET static void panel_multiply_columns(const Work* work, int64_t c0, int64_t c1) {
    const Kernel* kernel = work->kernel;
    const int64_t kp = kernel->kp, tiles = round_up(c1 - c0, TILE_PAIR) / TILE, tile_ints = kp / 4 * TILE;
    const int halves = task_halves(work->call);
    int32_t* panel = aligned_alloc(64, halves * tiles * tile_ints * sizeof(int32_t));
    if (panel == NULL) {
        __atomic_store_n(work->out_of_memory, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int h = 0; h < halves; h++)
        for (int64_t t = 0; t < tiles; t++)
            int8_panel(kernel, c0 + h * work->call->width + t * TILE, panel + (h * tiles + t) * tile_ints);
    const int amx = kernel->amx && work->rows >= AMX_MIN_ROWS;
    if (amx) amx_configure(AMX_K);
    int32_t sums[2][TILE_PAIR][TILE_PAIR];
    for (int64_t r = 0; r < work->rows; r += TILE_PAIR) {
        const int rows = work->rows - r < TILE_PAIR ? (int)(work->rows - r) : TILE_PAIR;
        for (int64_t t = 0; t < tiles; t += 2) {
            for (int h = 0; h < halves; h++) {
                const int32_t *b0 = panel + (h * tiles + t) * tile_ints, *b1 = b0 + tile_ints;
                panel_sums(amx, work->q + r * kp, kp, b0, b1, 0, kp, AMX_K, rows, sums[h]);
            }
            for (int h = 0; h < 2 && c0 + (t + h) * TILE < c1; h++)
                panel_store(work, r, rows, c0 + (t + h) * TILE, &sums[0][0][h * TILE],
                            halves == 2 ? &sums[1][0][h * TILE] : NULL);
        }
    }
    if (amx) tile_release();
    free(panel);
}

/* The columns the tasks split: N padded, or with SwiGLU stored by the panel kernels the first half's (each task
 * computing the same columns of the second half beside them). */
static int64_t task_columns(const Work* work) {
    return task_halves(work->call) == 2 ? work->call->width : work->kernel->np;
}

/* One of ONNX Runtime's parallel tasks: columns [task * per_task, ...) of every row, on the kernel's class. */
static void multiply_task(void* p, size_t task) {
    const Work* work = p;
    const int64_t c0 = (int64_t)task * work->per_task, end = task_columns(work);
    const int64_t c1 = c0 + work->per_task < end ? c0 + work->per_task : end;
    if (work->kernel->vnni && work->rows > 1) panel_multiply_columns(work, c0, c1);
    else if (work->kernel->vnni) multiply_row(work, 0, c0, c1, vnni_tile1_streams, vnni_tile1);
    else multiply_columns(work, c0, c1);
}

/* DynamicQuantizeLinear's scale and zero point over the whole tensor (ONNX Runtime's GetQuantizationParameter). */
__attribute__((target("avx2"))) static void tensor_quantization(const float* x, int64_t count, float* scale,
                                                                 int32_t* zero_point) {
    __m256 low = _mm256_setzero_ps(), high = low;
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {  /* min_ps / max_ps return the second operand for a NaN, as the loop below */
        const __m256 v = _mm256_loadu_ps(x + i);
        low = _mm256_min_ps(v, low);
        high = _mm256_max_ps(v, high);
    }
    float lows[8], highs[8], lo = 0.0f, hi = 0.0f;
    _mm256_storeu_ps(lows, low);
    _mm256_storeu_ps(highs, high);
    for (int j = 0; j < 8; j++) {
        lo = lows[j] < lo ? lows[j] : lo;
        hi = highs[j] > hi ? highs[j] : hi;
    }
    for (; i < count; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    *scale = hi == lo ? 1.0f : (hi - lo) / 255.0f;
    float zp = 0.0f - lo / *scale;
    zp = zp < 0.0f ? 0.0f : zp > 255.0f ? 255.0f : zp;
    *zero_point = (int32_t)nearbyintf(zp);
}

static OrtStatus* compute(void* p, OrtKernelContext* ctx) {
    Kernel* kernel = p;
    const Node* node = &kernel->node;
    Call call;
    RETURN_IF_ERROR(start_call(node, ctx, kernel->k, kernel->n, kernel->swiglu, kernel->vnni ? 2 : 0, &call));
    const int64_t rows = call.rows;
    if (rows == 0) return NULL;

    const int64_t per_task = rows > 1 ? COLUMNS_PER_TASK : kernel->vnni ? VNNI_ROW_COLUMNS : AVX2_ROW_COLUMNS;
    int out_of_memory = 0;
    Work work = {kernel, call.x, call.m, NULL, NULL, rows, per_task, 1.0f / 127.0f, kernel->vnni ? -128 : 0,
                 &out_of_memory, &call};
    /* the VNNI and AMX kernels read several rows in whole blocks (one row, as multiply_row, only itself) */
    const int64_t q_rows = kernel->vnni && rows > 1 ? (int64_t)round_up(rows, TILE_PAIR) : rows;
    work.q = aligned_alloc(64, round_up(q_rows * kernel->kp, 64));
    work.row_scale = malloc(rows * sizeof(float));
    if (work.q == NULL || work.row_scale == NULL) {
        free(work.q);
        free(work.row_scale);
        return end_call(node, ctx, &call, error(node, ORT_FAIL, "out of memory for the quantized input"));
    }
    KernelContextParallelForFn parallel_for = API(node->api, KERNEL_CONTEXT_PARALLEL_FOR,
                                                  KernelContextParallelForFn);
    OrtStatus* status = NULL;
    if (kernel->per_token) {
        if (rows > 1) status = parallel_for(ctx, quantize_rows_per_token, rows, 0, &work);
        else quantize_rows_per_token(&work, 0);
    } else {
        int32_t zero_point;
        tensor_quantization(work.x, rows * kernel->k, &work.a_scale, &zero_point);
        work.correction += 128 - zero_point;
        /* Stored as q - 128 (-128..127); the correction (128 - zp) x column sum makes the product q - zp's. */
        for (int64_t r = 0; r < rows; r++) {
            int8_t* q = work.q + r * kernel->kp;
            quantize_row(work.x + r * kernel->k, q, kernel->k, 1.0f, work.a_scale,
                         (float)(0 - zero_point), (float)(255 - zero_point), zero_point - 128);
            memset(q + kernel->k, 0, kernel->kp - kernel->k);
            if (kernel->vnni) to_codes(q, kernel->kp);
        }
    }
    memset(work.q + rows * kernel->kp, 0, (q_rows - rows) * kernel->kp);
    if (status == NULL) {
        size_t tasks = (task_columns(&work) + per_task - 1) / per_task;
        status = parallel_for(ctx, multiply_task, tasks, 0, &work);
        if (status == NULL && out_of_memory) status = error(node, ORT_FAIL, "out of memory for a task's weight panel");
    }
    free(work.q);
    free(work.row_scale);
    return end_call(node, ctx, &call, status);
}


/* ---- Int4MatMul: com.microsoft.MatMulNBits (bits 4, symmetric, accuracy_level 4) with a faster AVX2 kernel ----
 * Inputs and attributes as MatMulNBits': x float [..., K]; w uint8 [N, blocks, block_size / 2] (two 4-bit codes a
 * byte, the low nibble first; value = code - 8); scales float [N, blocks] (or flat); attributes K, N, block_size
 * (32, 64 or 128). Both weight inputs constant initializers. The arithmetic is MatMulNBits' with int8 compute
 * (MLAS's QuantizeARow_CompInt8): each block of block_size values of a row of x quantized symmetrically,
 *     amax = max |x|;  a_scale = amax / 127;  q = rne(x * (127 / amax))  (0 where amax = 0),
 *     y[n] = sum over blocks of float(sum q (code - 8)) * (a_scale * scale[n, block]),
 * the integer sum exact (MLAS computes sum q code and subtracts 8 sum q in float: outputs agree to float rounding).
 * Kernel: 8 columns a group; per 32 K values of a column 16 bytes (low nibbles K 0..15, high 16..31); two columns'
 * 16 bytes in one 32-byte load, so one vpmaddubsw (codes 0..15 unsigned x q signed, pair sums <= 2 * 15 * 127)
 * serves two columns; int16 sums stay within range for 128 K (4 * 2 * 3810 < 32768). */
enum { GROUP = 8, UNIT = 32, GROUPS_PER_TASK = 8 };
/* A single row's tasks: longer, and its loops without software prefetch, as Int8MatMul's (the InternVL2-1B int4
 * decode step on the Zen 4, medians of 6 alternations: 10.8 ms against 12.8 with 8 groups and prefetch). */
enum { ROW_GROUPS_PER_TASK = 32 };

typedef struct {
    Node node;
    int64_t k, n;
    int swiglu;
    int amx;  /* several rows on AMX tiles (int4_panel_*), else */
    int vnni;  /* several rows on AVX-512 VNNI over the same panels */
    int64_t block, blocks, groups;
    uint8_t* packed;  /* [groups][blocks][block / 32 units][4 column pairs][32 bytes] */
    float* scales;    /* [groups][blocks][8], each column's at the lane its sum comes out in (LANE) */
} Kernel4;

/* The lane of a group's sums vector holding each column's: the lanes hold columns 0 2 4 6 1 3 5 7 (pair_sums). */
static const int LANE[GROUP] = {0, 4, 1, 5, 2, 6, 3, 7};

static void destroy4(void* p) {
    Kernel4* kernel = p;
    if (kernel == NULL) return;
    free(kernel->packed);
    free(kernel->scales);
    free(kernel);
}

static OrtStatus* create4(const OrtCustomOp* op, OrtApiTable api, const OrtKernelInfo* info, void** out) {
    (void)op;
    Node node = {0};
    RETURN_IF_ERROR(node_info(&node, api, "Int4MatMul", info));
    int64_t block;
    KernelInfoGetAttributeInt64Fn attribute = API(api, KERNEL_INFO_GET_ATTRIBUTE_INT64, KernelInfoGetAttributeInt64Fn);
    int64_t k, n;
    RETURN_IF_ERROR(attribute(info, "K", &k));
    RETURN_IF_ERROR(attribute(info, "N", &n));
    RETURN_IF_ERROR(attribute(info, "block_size", &block));
    if (block != 32 && block != 64 && block != 128)
        return error(&node, ORT_INVALID_ARGUMENT, "block_size must be 32, 64 or 128");
    if (k <= 0 || n <= 0) return error(&node, ORT_INVALID_ARGUMENT, "K and N must be positive");
    int swiglu = 0;
    RETURN_IF_ERROR(swiglu_attribute(&node, info, n, &swiglu));
    Tensor wt, st;
    RETURN_IF_ERROR(constant_input(&node, info, 1, TYPE_UINT8, &wt, "the weight"));
    RETURN_IF_ERROR(constant_input(&node, info, 2, TYPE_FLOAT, &st, "the scales"));
    const int64_t blocks = (k + block - 1) / block;
    int64_t scale_count = 1;
    for (size_t i = 0; i < st.rank; i++) scale_count *= st.dims[i];
    if (wt.rank != 3 || wt.dims[0] != n || wt.dims[1] != blocks || wt.dims[2] != block / 2 || scale_count != n * blocks)
        return error(&node, ORT_INVALID_ARGUMENT, "expected a weight [N, ceil(K / block_size), block_size / 2] and "
                     "N x ceil(K / block_size) scales");

    Kernel4* kernel = calloc(1, sizeof *kernel);
    if (kernel == NULL) return error(&node, ORT_FAIL, "out of memory");
    kernel->node = node;
    kernel->k = k;
    kernel->n = n;
    kernel->swiglu = swiglu;
    kernel->block = block;
    kernel->blocks = blocks;
    kernel->groups = (n + GROUP - 1) / GROUP;
    OrtStatus* status = matmul_kernels(&node, &kernel->vnni, &kernel->amx);
    if (status != NULL) {
        free(kernel);
        return status;
    }
    const size_t bytes = kernel->groups * blocks * GROUP * block / 2;
    kernel->packed = aligned_alloc(64, round_up(bytes, 64));
    kernel->scales = calloc(kernel->groups * blocks * GROUP, sizeof(float));
    if (kernel->packed == NULL || kernel->scales == NULL) {
        destroy4(kernel);
        return error(&node, ORT_FAIL, "out of memory for the packed weight");
    }
    memset(kernel->packed, 0x88, bytes);  /* code 8 = 0 past N */
    const uint8_t* w = wt.data;
    const float* s = st.data;
    const int64_t units = block / UNIT;
    for (int64_t c = 0; c < n; c++) {
        const int64_t g = c / GROUP, pair = c % GROUP / 2, half = c % 2;
        for (int64_t b = 0; b < blocks; b++) {
            kernel->scales[(g * blocks + b) * GROUP + LANE[c % GROUP]] = s[c * blocks + b];
            const uint8_t* src = w + (c * blocks + b) * (block / 2);
            for (int64_t u = 0; u < units; u++) {
                uint8_t* dst = kernel->packed + (((g * blocks + b) * units + u) * 4 + pair) * 32 + half * 16;
                for (int j = 0; j < 16; j++) {  /* K u*32 + j in the low nibble, u*32 + 16 + j in the high */
                    const int64_t lo = u * UNIT + j, hi = lo + 16;
                    const int code_lo = src[lo / 2] >> (lo % 2 * 4) & 15, code_hi = src[hi / 2] >> (hi % 2 * 4) & 15;
                    dst[j] = (uint8_t)(code_lo | code_hi << 4);
                }
            }
        }
    }
    *out = kernel;
    return NULL;
}

typedef struct {
    const Kernel4* kernel;
    const float* x;
    float* y;
    int8_t* q;         /* [rows][K padded to blocks][2]: per 32 K, q 0..15 twice, then q 16..31 twice */
    uint8_t* codes;    /* the panel kernels' instead: [rows padded to TILE_PAIR][K padded to blocks], q + 128 */
    int* out_of_memory;  /* set by a task whose panel could not be allocated */
    float* a_scale;    /* [rows][blocks] */
    int32_t* offset;   /* [rows][blocks]: 8 x the sum of q, the codes' zero point times the activations */
    int64_t rows;
    int64_t per_task;  /* groups a task computes */
    const Call* call;  /* its epilogue, for the panel kernels where call->stored */
} Work4;

/* 16 values of x times `inverse`, rounded to nearest even (the default MXCSR mode), as 16 int8 in order; their sum
 * added to *sum. */
__attribute__((target("avx2"))) static inline __m128i quantize16(const float* x, __m256 inverse, __m256i* sum) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inverse));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inverse));
    *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(a, b));
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  /* a 0..7, b 0..7 */
    return _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
}

/* MLAS's QuantizeARow_CompInt8 for one row: per block amax, a_scale = amax / 127, q = rne(x * (127 / amax)), in
 * the AVX2 kernels' layout: per 32 K, q 0..15 twice (32 bytes), then q 16..31 twice; or for the panel ones as u8
 * codes q + 128 in order. A block's values past K are 0. */
__attribute__((target("avx2"))) static void quantize_blocks(void* p, size_t r) {
    Work4* work = p;
    const Kernel4* kernel = work->kernel;
    const int64_t k = kernel->k, block = kernel->block, blocks = kernel->blocks;
    const float* x = work->x + r * k;
    const int64_t values = blocks * block;  /* a row's: K padded to whole blocks */
    const __m128i top = _mm_set1_epi8((char)0x80);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    float padded[128];
    for (int64_t b = 0; b < blocks; b++, x += block) {
        const float* v = x;
        if (k - b * block < block) {  /* the last block, past K: zeros (only where K is not a multiple of it) */
            memset(padded, 0, sizeof padded);
            memcpy(padded, x, (k - b * block) * sizeof(float));
            v = padded;
        }
        __m256 peak = _mm256_setzero_ps();
        for (int64_t i = 0; i < block; i += 8)
            peak = _mm256_max_ps(peak, _mm256_and_ps(_mm256_loadu_ps(v + i), abs_mask));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
        const __m256 inverse = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        __m256i sum = _mm256_setzero_si256();
        for (int64_t i = 0; i < block; i += 16) {
            const __m128i q16 = quantize16(v + i, inverse, &sum);
            const int64_t at = r * values + b * block + i;
            if (work->codes) _mm_storeu_si128((__m128i*)(work->codes + at), _mm_xor_si128(q16, top));
            else _mm256_store_si256((__m256i*)(work->q + 2 * at), _mm256_broadcastsi128_si256(q16));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        work->a_scale[r * blocks + b] = amax / 127.0f;
        work->offset[r * blocks + b] = 8 * _mm_cvtsi128_si32(s4);
    }
}

/* One pair of columns, one unit: lo/hi nibbles times the row's q for K 0..15 and 16..31, int16 sums added to acc. */
#define PAIR_DOT(acc, wp, qlo, qhi)                                                                     \
    do {                                                                                                \
        const __m256i v_ = _mm256_load_si256((const __m256i*)(wp));                                     \
        acc = _mm256_add_epi16(acc, _mm256_add_epi16(                                                   \
                  _mm256_maddubs_epi16(_mm256_and_si256(v_, nibble), qlo),                              \
                  _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v_, 4), nibble), qhi)));      \
    } while (0)

/* The 8 columns' int32 sums from four pairs' int16 sums, column c in lane LANE[c]. */
__attribute__((target("avx2"))) static inline __m256i pair_sums(__m256i t0, __m256i t1, __m256i t2, __m256i t3) {
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_hadd_epi32(_mm256_hadd_epi32(_mm256_madd_epi16(t0, ones), _mm256_madd_epi16(t1, ones)),
                             _mm256_hadd_epi32(_mm256_madd_epi16(t2, ones), _mm256_madd_epi16(t3, ones)));
}

AVX2_FMA static inline __m256 scaled(__m256 acc, __m256i sums, int32_t offset, float a_scale, const float* scales) {
    const __m256 exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, _mm256_set1_epi32(offset)));
    return _mm256_fmadd_ps(exact, _mm256_mul_ps(_mm256_set1_ps(a_scale), _mm256_loadu_ps(scales)), acc);
}

/* One or two rows x one group of 8 columns over all of K; y[row][LANE[c]] for column c. */
AVX2_FMA static void group1(const Work4* work, int64_t r, int64_t g, float y[2][GROUP]) {
    const Kernel4* kernel = work->kernel;
    const int64_t blocks = kernel->blocks, units = kernel->block / UNIT;
    const __m256i nibble = _mm256_set1_epi8(15);
    const uint8_t* w = kernel->packed + g * blocks * units * 128;
    const int8_t* q = work->q + r * blocks * units * 64;
    const float* scales = kernel->scales + g * blocks * GROUP;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i t0 = _mm256_setzero_si256(), t1 = t0, t2 = t0, t3 = t0;
        for (int64_t u = 0; u < units; u++, w += 128, q += 64) {
            const __m256i qlo = _mm256_load_si256((const __m256i*)q), qhi = _mm256_load_si256((const __m256i*)(q + 32));
            PAIR_DOT(t0, w, qlo, qhi);
            PAIR_DOT(t1, w + 32, qlo, qhi);
            PAIR_DOT(t2, w + 64, qlo, qhi);
            PAIR_DOT(t3, w + 96, qlo, qhi);
        }
        acc = scaled(acc, pair_sums(t0, t1, t2, t3), work->offset[r * blocks + b], work->a_scale[r * blocks + b],
                     scales + b * GROUP);
    }
    _mm256_storeu_ps(y[0], acc);
}

/* One row by two groups `span` groups apart at once: two weight streams in flight (tile1_streams). */
AVX2_FMA static void group1_pair(const Work4* work, int64_t r, int64_t g, int64_t span, float y[2][GROUP]) {
    const Kernel4* kernel = work->kernel;
    const int64_t blocks = kernel->blocks, units = kernel->block / UNIT;
    const __m256i nibble = _mm256_set1_epi8(15);
    const uint8_t* w = kernel->packed + g * blocks * units * 128;
    const int64_t stride = span * blocks * units * 128;
    const int8_t* q = work->q + r * blocks * units * 64;
    const float* scales = kernel->scales + g * blocks * GROUP;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (int64_t b = 0; b < blocks; b++) {
        __m256i t0 = _mm256_setzero_si256(), t1 = t0, t2 = t0, t3 = t0, s0 = t0, s1 = t0, s2 = t0, s3 = t0;
        for (int64_t u = 0; u < units; u++, w += 128, q += 64) {
            const __m256i qlo = _mm256_load_si256((const __m256i*)q), qhi = _mm256_load_si256((const __m256i*)(q + 32));
            PAIR_DOT(t0, w, qlo, qhi);
            PAIR_DOT(t1, w + 32, qlo, qhi);
            PAIR_DOT(t2, w + 64, qlo, qhi);
            PAIR_DOT(t3, w + 96, qlo, qhi);
            PAIR_DOT(s0, w + stride, qlo, qhi);
            PAIR_DOT(s1, w + stride + 32, qlo, qhi);
            PAIR_DOT(s2, w + stride + 64, qlo, qhi);
            PAIR_DOT(s3, w + stride + 96, qlo, qhi);
        }
        const int32_t offset = work->offset[r * blocks + b];
        const float a_scale = work->a_scale[r * blocks + b];
        acc0 = scaled(acc0, pair_sums(t0, t1, t2, t3), offset, a_scale, scales + b * GROUP);
        acc1 = scaled(acc1, pair_sums(s0, s1, s2, s3), offset, a_scale, scales + (span * blocks + b) * GROUP);
    }
    _mm256_storeu_ps(y[0], acc0);
    _mm256_storeu_ps(y[1], acc1);
}

AVX2_FMA static void group2(const Work4* work, int64_t r, int64_t g, float y[2][GROUP]) {
    const Kernel4* kernel = work->kernel;
    const int64_t blocks = kernel->blocks, units = kernel->block / UNIT;
    const __m256i nibble = _mm256_set1_epi8(15);
    const uint8_t* w = kernel->packed + g * blocks * units * 128;
    const int8_t* q = work->q + r * blocks * units * 64;
    const int8_t* p = q + blocks * units * 64;  /* the second row */
    const float* scales = kernel->scales + g * blocks * GROUP;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    for (int64_t b = 0; b < blocks; b++) {
        __m256i t0 = _mm256_setzero_si256(), t1 = t0, t2 = t0, t3 = t0, s0 = t0, s1 = t0, s2 = t0, s3 = t0;
        for (int64_t u = 0; u < units; u++, w += 128, q += 64, p += 64) {
            _mm_prefetch((const char*)w + 1024, _MM_HINT_T0);
            _mm_prefetch((const char*)w + 1088, _MM_HINT_T0);
            const __m256i qlo = _mm256_load_si256((const __m256i*)q), qhi = _mm256_load_si256((const __m256i*)(q + 32));
            const __m256i plo = _mm256_load_si256((const __m256i*)p), phi = _mm256_load_si256((const __m256i*)(p + 32));
            PAIR_DOT(t0, w, qlo, qhi);
            PAIR_DOT(s0, w, plo, phi);
            PAIR_DOT(t1, w + 32, qlo, qhi);
            PAIR_DOT(s1, w + 32, plo, phi);
            PAIR_DOT(t2, w + 64, qlo, qhi);
            PAIR_DOT(s2, w + 64, plo, phi);
            PAIR_DOT(t3, w + 96, qlo, qhi);
            PAIR_DOT(s3, w + 96, plo, phi);
        }
        acc0 = scaled(acc0, pair_sums(t0, t1, t2, t3), work->offset[r * blocks + b], work->a_scale[r * blocks + b],
                      scales + b * GROUP);
        acc1 = scaled(acc1, pair_sums(s0, s1, s2, s3), work->offset[(r + 1) * blocks + b],
                      work->a_scale[(r + 1) * blocks + b], scales + b * GROUP);
    }
    _mm256_storeu_ps(y[0], acc0);
    _mm256_storeu_ps(y[1], acc1);
}

static void store_group(float* y, int64_t c0, int64_t n, const float lanes[GROUP]) {
    for (int j = 0; j < GROUP && c0 + j < n; j++) y[c0 + j] = lanes[LANE[j]];
}

/* ---- Int4MatMul for several rows on AMX tiles or AVX-512 VNNI: the same integer sum per block, sum q (code - 8), as
 * the AVX2 kernels (u8 codes q + 128 by s8 weights code - 8, less 128 x the block's sum of code - 8 per column), then
 * the same float steps in the same order (one fma per block), so the outputs are the AVX2 kernels' bit for bit. A
 * task unpacks its columns' codes into B tiles' order (its panel), with each block's column sums and scales; both
 * classes read that panel (the 2-core Xeon's 662-position int4 prefill: 2.3 s on the AVX2 kernels, 1.1 s on these
 * with VNNI, 0.7 s with AMX). */

/* Columns [c, c + TILE) (c a multiple of GROUP): panel [K padded to blocks / 4][16] of code - 8 four at a time,
 * sums [blocks][16] of code - 8 over each block, scales [blocks][16]; zero past the packed groups. */
VNNI_TARGET static void int4_panel(const Kernel4* kernel, int64_t c, int32_t* panel, int32_t* sums, float* scales) {
    const int64_t blocks = kernel->blocks, block = kernel->block, units = block / UNIT;
    const __m256i nibble = _mm256_set1_epi8(15);
    const __m512i eight = _mm512_set1_epi8(8), ones = _mm512_set1_epi8(1);
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t u = 0; u < units; u++) {
            __m512i in[8];  /* columns c + 2i and c + 2i + 1: a pair's 32 bytes, each column's 32 K in order */
            for (int i = 0; i < 8; i++) {
                const int64_t col = c + 2 * i, g = col / GROUP;
                if (g >= kernel->groups) {
                    in[i] = _mm512_setzero_si512();
                    continue;
                }
                const uint8_t* w = kernel->packed + (((g * blocks + b) * units + u) * 4 + col % GROUP / 2) * 32;
                const __m256i v = _mm256_load_si256((const __m256i*)w);
                const __m256i low = _mm256_and_si256(v, nibble);  /* K 0..15 of both columns */
                const __m256i high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);  /* K 16..31 */
                const __m512i lanes = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
                in[i] = _mm512_sub_epi8(_mm512_shuffle_i64x2(lanes, lanes, _MM_SHUFFLE(3, 1, 2, 0)), eight);
            }
            panel_transpose(in, panel + (b * block + u * UNIT) / 4 * TILE);
        }
        __m512i sum = _mm512_setzero_si512();
        for (int64_t kq = b * block / 4; kq < (b + 1) * block / 4; kq++)
            sum = _mm512_dpbusd_epi32(sum, ones, _mm512_load_si512((const void*)(panel + kq * TILE)));
        _mm512_storeu_si512((void*)(sums + b * TILE), sum);
        for (int j = 0; j < TILE; j++) {
            const int64_t g = (c + j) / GROUP, at = (g * blocks + b) * GROUP + LANE[(c + j) % GROUP];
            scales[b * TILE + j] = g < kernel->groups ? kernel->scales[at] : 0.0f;
        }
    }
}

/* Groups [g0, g1) of every row: the panels, then per 32 rows and two tiles of columns, each block's integer sums
 * (four C tiles on AMX, else vnni_panel_block) scaled into float sums. With SwiGLU stored here the same columns of
 * the second half too (their panels after the first's), so each tile's store has both. */
VNNI_TARGET static void int4_panel_multiply_groups(const Work4* work, int64_t g0, int64_t g1) {
    const Kernel4* kernel = work->kernel;
    const Call* call = work->call;
    const int64_t n = kernel->n, blocks = kernel->blocks, block = kernel->block, values = blocks * block;
    const int64_t c0 = g0 * GROUP, c1 = g1 * GROUP, tiles = round_up(c1 - c0, TILE_PAIR) / TILE;
    const int64_t tile_ints = values / 4 * TILE, tile_blocks = blocks * TILE;
    const int halves = task_halves(call);
    int32_t* panel = aligned_alloc(64, halves * tiles * (tile_ints + 2 * tile_blocks) * sizeof(int32_t));
    if (panel == NULL) {
        __atomic_store_n(work->out_of_memory, 1, __ATOMIC_RELAXED);
        return;
    }
    int32_t* column_sums = panel + halves * tiles * tile_ints;
    float* scales = (float*)(column_sums + halves * tiles * tile_blocks);
    for (int hf = 0; hf < halves; hf++)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t at = hf * tiles + t;
            int4_panel(kernel, c0 + hf * call->width + t * TILE, panel + at * tile_ints,
                       column_sums + at * tile_blocks, scales + at * tile_blocks);
        }
    const int64_t step = block < AMX_K ? block : AMX_K;
    if (kernel->amx) amx_configure((int)step);
    int32_t sums[TILE_PAIR][TILE_PAIR];
    __m512 acc[2][TILE_PAIR][2];  /* [half][row][tile of the pair] */
    for (int64_t r = 0; r < work->rows; r += TILE_PAIR) {
        const int rows = work->rows - r < TILE_PAIR ? (int)(work->rows - r) : TILE_PAIR;
        const int8_t* a = (const int8_t*)work->codes + r * values;
        for (int64_t t = 0; t < tiles; t += 2) {
            for (int hf = 0; hf < halves; hf++) {
                const int32_t *b0 = panel + (hf * tiles + t) * tile_ints, *b1 = b0 + tile_ints;
                for (int i = 0; i < rows; i++) acc[hf][i][0] = acc[hf][i][1] = _mm512_setzero_ps();
                for (int64_t b = 0; b < blocks; b++) {
                    panel_sums(kernel->amx, a, values, b0, b1, b * block, (b + 1) * block, step, rows, sums);
                    for (int h = 0; h < 2; h++) {
                        const int64_t at = (hf * tiles + t + h) * tile_blocks + b * TILE;
                        /* 128 x the block's sum of code - 8 per column */
                        const __m512i correction = _mm512_slli_epi32(
                            _mm512_loadu_si512((const void*)(column_sums + at)), 7);
                        const __m512 scale = _mm512_loadu_ps(scales + at);
                        for (int i = 0; i < rows; i++) {
                            const __m512i exact = _mm512_sub_epi32(
                                _mm512_loadu_si512((const void*)&sums[i][h * TILE]), correction);
                            const __m512 s = _mm512_mul_ps(_mm512_set1_ps(work->a_scale[(r + i) * blocks + b]), scale);
                            acc[hf][i][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), s, acc[hf][i][h]);
                        }
                    }
                }
            }
            for (int h = 0; h < 2; h++) {
                const int64_t c = c0 + (t + h) * TILE;
                if (c >= c1 || c >= n) continue;
                const __mmask16 real = real_columns(c, n);
                for (int i = 0; i < rows; i++) {
                    if (!call->stored) _mm512_mask_storeu_ps(work->y + (r + i) * n + c, real, acc[0][i][h]);
                    else panel_epilogue(call, r + i, c, real, acc[0][i][h], acc[halves - 1][i][h]);
                }
            }
        }
    }
    if (kernel->amx) tile_release();
    free(panel);
}

/* The groups the tasks split: all, or with SwiGLU stored by the panel kernels the first half's (as task_columns). */
static int64_t task_groups(const Work4* work) {
    return task_halves(work->call) == 2 ? work->call->width / GROUP : work->kernel->groups;
}

static void multiply_groups(void* p, size_t task) {
    const Work4* work = p;
    const Kernel4* kernel = work->kernel;
    const int64_t n = kernel->n;
    const int64_t g0 = (int64_t)task * work->per_task, end = task_groups(work);
    const int64_t g1 = g0 + work->per_task < end ? g0 + work->per_task : end;
    if (work->codes) {
        int4_panel_multiply_groups(work, g0, g1);
        return;
    }
    float sums[2][GROUP];
    int64_t r = 0;
    for (; r + 2 <= work->rows; r += 2) {
        for (int64_t g = g0; g < g1; g++) {
            group2(work, r, g, sums);
            store_group(work->y + r * n, g * GROUP, n, sums[0]);
            store_group(work->y + (r + 1) * n, g * GROUP, n, sums[1]);
        }
    }
    if (r == work->rows) return;
    const int64_t span = (g1 - g0) / 2;  /* groups between the two streams */
    for (int64_t g = g0; g < g0 + span; g++) {
        group1_pair(work, r, g, span, sums);
        store_group(work->y + r * n, g * GROUP, n, sums[0]);
        store_group(work->y + r * n, (g + span) * GROUP, n, sums[1]);
    }
    if (g0 + 2 * span < g1) {
        group1(work, r, g1 - 1, sums);
        store_group(work->y + r * n, (g1 - 1) * GROUP, n, sums[0]);
    }
}

static OrtStatus* compute4(void* p, OrtKernelContext* ctx) {
    Kernel4* kernel = p;
    const Node* node = &kernel->node;
    Call call;
    /* fewer rows stay on the AVX2 kernels, whose two-row tiles need no panel */
    const int64_t panel_rows = kernel->amx || kernel->vnni ? AMX_MIN_ROWS : 0;
    RETURN_IF_ERROR(start_call(node, ctx, kernel->k, kernel->n, kernel->swiglu, panel_rows, &call));
    const int64_t rows = call.rows;
    if (rows == 0) return NULL;

    const int64_t blocks = kernel->blocks, values = blocks * kernel->block;
    const int panels = panel_rows && rows >= panel_rows;
    /* panel tasks: whole tiles of columns (GROUPS_PER_TASK groups: two tile pairs) */
    const int64_t per_task = rows == 1 ? ROW_GROUPS_PER_TASK : GROUPS_PER_TASK;
    int out_of_memory = 0;
    Work4 work = {.kernel = kernel, .x = call.x, .y = call.m, .out_of_memory = &out_of_memory, .rows = rows,
                  .per_task = per_task, .call = &call};
    if (panels) work.codes = aligned_alloc(64, round_up(round_up(rows, TILE_PAIR) * values, 64));
    else work.q = aligned_alloc(64, round_up(rows * values * 2, 64));
    work.a_scale = malloc(rows * blocks * sizeof(float));
    work.offset = malloc(rows * blocks * sizeof(int32_t));
    OrtStatus* status = NULL;
    if ((work.q == NULL && work.codes == NULL) || work.a_scale == NULL || work.offset == NULL) {
        status = error(node, ORT_FAIL, "out of memory for the quantized input");
    } else {
        KernelContextParallelForFn parallel_for = API(node->api, KERNEL_CONTEXT_PARALLEL_FOR,
                                                      KernelContextParallelForFn);
        if (panels) memset(work.codes + rows * values, 0, (round_up(rows, TILE_PAIR) - rows) * values);
        if (rows > 1) status = parallel_for(ctx, quantize_blocks, rows, 0, &work);
        else quantize_blocks(&work, 0);
        if (status == NULL)
            status = parallel_for(ctx, multiply_groups, (task_groups(&work) + per_task - 1) / per_task, 0, &work);
        if (status == NULL && out_of_memory) status = error(node, ORT_FAIL, "out of memory for a task's weight panel");
    }
    free(work.q);
    free(work.codes);
    free(work.a_scale);
    free(work.offset);
    return end_call(node, ctx, &call, status);
}

static const char* op_name4(const OrtCustomOp* op) { (void)op; return "Int4MatMul"; }
static int input_type4(const OrtCustomOp* op, size_t i) { (void)op; return i == 1 ? TYPE_UINT8 : TYPE_FLOAT; }

static const char* op_name(const OrtCustomOp* op) { (void)op; return "Int8MatMul"; }
static int input_type(const OrtCustomOp* op, size_t i) { (void)op; return i == 1 ? TYPE_INT8 : TYPE_FLOAT; }
static size_t input_count(const OrtCustomOp* op) { (void)op; return 5; }
static int weights_then_epilogue(const OrtCustomOp* op, size_t i) { return i < 3 ? required(op, i) : optional(op, i); }
static int output_type(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t output_count(const OrtCustomOp* op) { (void)op; return 1; }

const OrtCustomOp EDGEVL_INT8_MATMUL = {
    ORT_API_VERSION_USED, NULL, op_name, op_provider, input_type, input_count, output_type, output_count, NULL,
    destroy, weights_then_epilogue, required, default_memory, one, zero, one, zero, create, compute, NULL, one,
    last_version,
};

const OrtCustomOp EDGEVL_INT4_MATMUL = {
    ORT_API_VERSION_USED, NULL, op_name4, op_provider, input_type4, input_count, output_type, output_count, NULL,
    destroy4, weights_then_epilogue, required, default_memory, one, zero, one, zero, create4, compute4, NULL, one,
    last_version,
};
