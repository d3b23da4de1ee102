/* What edgevl's ONNX Runtime ops (ort_matmul.c, ort_attention.c; registered by ort_ops.c) share: the C API
 * entries they call, the custom-op table ONNX Runtime reads, and small helpers for names, errors and tensors.
 *
 * The ONNX Runtime wheel ships no C headers, so the few API entries used are declared here by their index in the
 * OrtApi function table, as onnxruntime_c_api.h orders it; ONNX Runtime only ever appends to that table (its ABI
 * promise), and tests/test_cpu.py, tests/test_cpu_graph.py and tests/test_export.py exercise the entries against the
 * installed runtime. API version 17: ONNX Runtime 1.17, the first with KernelContext_ParallelFor. */
#ifndef EDGEVL_ORT_OPS_H
#define EDGEVL_ORT_OPS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/syscall.h>
#include <unistd.h>

#if !defined(__x86_64__)
#error "edgevl's ONNX Runtime ops are x86-64 code (setup.py builds them there only)"
#endif
#include <immintrin.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtOp OrtOp;
typedef struct OrtOpAttr OrtOpAttr;
typedef struct OrtTensorTypeAndShapeInfo OrtShape;
typedef void* const* OrtApiTable;  /* const OrtApi*, read as its table of function pointers */

typedef struct OrtApiBase {
    OrtApiTable (*GetApi)(uint32_t version);
    const char* (*GetVersionString)(void);
} OrtApiBase;

enum { ORT_API_VERSION_USED = 17, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_INT8 = 3, TYPE_INT32 = 6 };  /* ONNXTensorElementDataType */
enum { OP_ATTR_INT = 1, OP_ATTR_FLOAT = 3 };  /* OrtOpAttrType */

/* OrtApi entries: index, then the type of the function there. */
#define CREATE_STATUS 0
typedef OrtStatus* (*CreateStatusFn)(int code, const char* msg);
#define CREATE_CUSTOM_OP_DOMAIN 26
typedef OrtStatus* (*CreateCustomOpDomainFn)(const char* domain, OrtCustomOpDomain** out);
#define CUSTOM_OP_DOMAIN_ADD 27
typedef OrtStatus* (*CustomOpDomainAddFn)(OrtCustomOpDomain* domain, const void* op);
#define ADD_CUSTOM_OP_DOMAIN 28
typedef OrtStatus* (*AddCustomOpDomainFn)(OrtSessionOptions* options, OrtCustomOpDomain* domain);
#define GET_TENSOR_MUTABLE_DATA 51
typedef OrtStatus* (*GetTensorMutableDataFn)(const OrtValue* value, void** out);
#define GET_TENSOR_ELEMENT_TYPE 60
typedef OrtStatus* (*GetTensorElementTypeFn)(const OrtShape* info, int* out);
#define GET_DIMENSIONS_COUNT 61
typedef OrtStatus* (*GetDimensionsCountFn)(const OrtShape* info, size_t* out);
#define GET_DIMENSIONS 62
typedef OrtStatus* (*GetDimensionsFn)(const OrtShape* info, int64_t* dims, size_t count);
#define GET_TENSOR_TYPE_AND_SHAPE 65
typedef OrtStatus* (*GetTensorTypeAndShapeFn)(const OrtValue* value, OrtShape** out);
#define KERNEL_INFO_GET_ATTRIBUTE_FLOAT 85
typedef OrtStatus* (*KernelInfoGetAttributeFloatFn)(const OrtKernelInfo* info, const char* name, float* out);
#define KERNEL_INFO_GET_ATTRIBUTE_INT64 86
typedef OrtStatus* (*KernelInfoGetAttributeInt64Fn)(const OrtKernelInfo* info, const char* name, int64_t* out);
#define KERNEL_CONTEXT_GET_INPUT_COUNT 88
typedef OrtStatus* (*KernelContextGetInputCountFn)(const OrtKernelContext* ctx, size_t* out);
#define KERNEL_CONTEXT_GET_INPUT 90
typedef OrtStatus* (*KernelContextGetInputFn)(const OrtKernelContext* ctx, size_t index, const OrtValue** out);
#define KERNEL_CONTEXT_GET_OUTPUT 91
typedef OrtStatus* (*KernelContextGetOutputFn)(OrtKernelContext* ctx, size_t index, const int64_t* dims,
                                               size_t count, OrtValue** out);
#define RELEASE_STATUS 93
typedef void (*ReleaseStatusFn)(OrtStatus* status);
#define RELEASE_TENSOR_TYPE_AND_SHAPE_INFO 99
typedef void (*ReleaseShapeFn)(OrtShape* info);
#define CREATE_OP_ATTR 211
typedef OrtStatus* (*CreateOpAttrFn)(const char* name, const void* data, int len, int type, OrtOpAttr** out);
#define RELEASE_OP_ATTR 212
typedef void (*ReleaseOpAttrFn)(OrtOpAttr* attr);
#define CREATE_OP 213
typedef OrtStatus* (*CreateOpFn)(const OrtKernelInfo* info, const char* op_name, const char* domain, int version,
                                 const char** type_constraint_names, const int* type_constraint_values,
                                 int type_constraint_count, const OrtOpAttr* const* attrs, int attr_count,
                                 int input_count, int output_count, OrtOp** out);
#define INVOKE_OP 214
typedef OrtStatus* (*InvokeOpFn)(const OrtKernelContext* ctx, const OrtOp* op, const OrtValue* const* inputs,
                                 int input_count, OrtValue* const* outputs, int output_count);
#define RELEASE_OP 215
typedef void (*ReleaseOpFn)(OrtOp* op);
#define KERNEL_INFO_GET_NODE_NAME 244
typedef OrtStatus* (*KernelInfoGetNodeNameFn)(const OrtKernelInfo* info, char* out, size_t* size);
#define KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR 249
typedef OrtStatus* (*KernelInfoGetConstantInputFn)(const OrtKernelInfo* info, size_t index, int* is_constant,
                                                   const OrtValue** out);
#define KERNEL_CONTEXT_PARALLEL_FOR 274
typedef OrtStatus* (*KernelContextParallelForFn)(const OrtKernelContext* ctx, void (*fn)(void*, size_t),
                                                 size_t total, size_t num_batch, void* user_data);

#define API(table, name, type) ((type)(table)[name])

/* The ops' floating-point code: AVX2 with FMA, what node_info requires of the CPU. */
#define AVX2_FMA __attribute__((target("avx2,fma")))

/* OrtCustomOp as of API version 17 (the fields ONNX Runtime reads for that version). */
typedef struct OrtCustomOp {
    uint32_t version;
    void* (*CreateKernel)(const struct OrtCustomOp* op, OrtApiTable api, const OrtKernelInfo* info);
    const char* (*GetName)(const struct OrtCustomOp* op);
    const char* (*GetExecutionProviderType)(const struct OrtCustomOp* op);
    int (*GetInputType)(const struct OrtCustomOp* op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp* op);
    int (*GetOutputType)(const struct OrtCustomOp* op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp* op);
    void (*KernelCompute)(void* kernel, OrtKernelContext* ctx);
    void (*KernelDestroy)(void* kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp* op, size_t index);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp* op, size_t index);
    int (*GetInputMemoryType)(const struct OrtCustomOp* op, size_t index);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp* op);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp* op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp* op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp* op);
    OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp* op, OrtApiTable api, const OrtKernelInfo* info,
                                 void** kernel);
    OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* ctx);
    void* InferOutputShapeFn;  /* none: ONNX Runtime infers nothing for the output, as for any op without it */
    int (*GetStartVersion)(const struct OrtCustomOp* op);
    int (*GetEndVersion)(const struct OrtCustomOp* op);
} OrtCustomOp;

/* What every op's kernel starts with: the API table, the op's and the node's names (for errors). */
typedef struct {
    OrtApiTable api;
    const char* op;
    char name[128];
} Node;

static inline OrtStatus* error(const Node* node, int code, const char* what) {
    char msg[512];
    snprintf(msg, sizeof msg, "edgevl %s node %s: %s", node->op, node->name, what);
    return API(node->api, CREATE_STATUS, CreateStatusFn)(code, msg);
}

/* The node's name, from its kernel info; an error where the CPU cannot run the ops. */
static inline OrtStatus* node_info(Node* node, OrtApiTable api, const char* op, const OrtKernelInfo* info) {
    node->api = api;
    node->op = op;
    size_t size = sizeof node->name;
    OrtStatus* unnamed = API(api, KERNEL_INFO_GET_NODE_NAME, KernelInfoGetNodeNameFn)(info, node->name, &size);
    if (unnamed != NULL) {  /* a name longer than the buffer: errors say "?" */
        API(api, RELEASE_STATUS, ReleaseStatusFn)(unnamed);
        strcpy(node->name, "?");
    }
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
               ? NULL : error(node, ORT_FAIL, "this CPU has no AVX2 and FMA");
}

/* An int attribute the node may leave out (`fallback` then): ONNX Runtime answers a missing one with an error. */
static inline int64_t optional_attribute(OrtApiTable api, const OrtKernelInfo* info, const char* name,
                                         int64_t fallback) {
    int64_t value;
    OrtStatus* missing = API(api, KERNEL_INFO_GET_ATTRIBUTE_INT64, KernelInfoGetAttributeInt64Fn)(info, name, &value);
    if (missing == NULL) return value;
    API(api, RELEASE_STATUS, ReleaseStatusFn)(missing);
    return fallback;
}

#define RETURN_IF_ERROR(expr)               \
    do {                                    \
        OrtStatus* status_ = (expr);        \
        if (status_ != NULL) return status_; \
    } while (0)

static inline size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

/* AMX's tile registers need Linux's leave to use their state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once
 * for the whole process; ONNX Runtime asks for it too where MLAS takes AMX). */
static inline int tile_state_permitted(void) {
    static int permitted = -1;
    if (permitted < 0) permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}

typedef struct {  /* LDTILECFG's 64-byte operand, palette 1 */
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* This thread's tile registers shaped as `config` says; tile_release gives them back, as each task does before it
 * returns its thread (MLAS's AMX kernels load their own shape when they find another). */
__attribute__((target("amx-tile"))) static inline void tile_configure(const TileConfig* config) {
    /* GCC 12 does not count LDTILECFG as reading its operand and drops the stores that fill it as dead: say it reads
     * memory */
    __asm__ volatile("" : : "r"(config) : "memory");
    _tile_loadconfig(config);
}

__attribute__((target("amx-tile"))) static inline void tile_release(void) { _tile_release(); }

/* A tensor's shape and data. */
typedef struct {
    int64_t dims[8];
    size_t rank;
    void* data;
} Tensor;

/* Shape and data of a tensor, which must be of `type`. */
static inline OrtStatus* tensor(const Node* node, const OrtValue* value, int type, Tensor* t, const char* name) {
    OrtApiTable api = node->api;
    OrtShape* shape;
    int element_type;
    RETURN_IF_ERROR(API(api, GET_TENSOR_TYPE_AND_SHAPE, GetTensorTypeAndShapeFn)(value, &shape));
    OrtStatus* status = API(api, GET_TENSOR_ELEMENT_TYPE, GetTensorElementTypeFn)(shape, &element_type);
    if (status == NULL) status = API(api, GET_DIMENSIONS_COUNT, GetDimensionsCountFn)(shape, &t->rank);
    if (status == NULL && t->rank > 8) status = error(node, ORT_INVALID_ARGUMENT, "more than 8 dimensions");
    if (status == NULL) status = API(api, GET_DIMENSIONS, GetDimensionsFn)(shape, t->dims, t->rank);
    API(api, RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseShapeFn)(shape);
    RETURN_IF_ERROR(status);
    if (element_type != type) {
        char what[128];
        snprintf(what, sizeof what, "%s has element type %d, expected %d", name, element_type, type);
        return error(node, ORT_INVALID_ARGUMENT, what);
    }
    return API(api, GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(value, &t->data);
}

/* OrtCustomOp entries every op shares. */
static inline const char* op_provider(const OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
/* OrtCustomOpInputOutputCharacteristic: INPUT_OUTPUT_REQUIRED, _OPTIONAL; OrtMemType: OrtMemTypeDefault */
static inline int required(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static inline int optional(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 1; }
static inline int float_type(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static inline int default_memory(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static inline int one(const OrtCustomOp* op) { (void)op; return 1; }
static inline int zero(const OrtCustomOp* op) { (void)op; return 0; }
static inline int last_version(const OrtCustomOp* op) { (void)op; return 1 << 30; }

extern const OrtCustomOp EDGEVL_INT8_MATMUL, EDGEVL_INT4_MATMUL, EDGEVL_GROUP_ATTENTION, EDGEVL_MULTI_HEAD_ATTENTION;

#endif
