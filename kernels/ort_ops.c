/* edgevl's custom-op library for ONNX Runtime (domain "edgevl"), loaded with
 * SessionOptions.register_custom_ops_library: Int8MatMul and Int4MatMul (ort_matmul.c) and GroupQueryAttention
 * (ort_attention.c), the ops of an export's decoder_avx2.onnx, and MultiHeadAttention (ort_attention.c), the op of its
 * vision_amx.onnx (export/cpu_graph.py). */
#include "ort_ops.h"

/* Called by ONNX Runtime's register_custom_ops_library. */
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
    OrtApiTable api = base->GetApi(ORT_API_VERSION_USED);
    if (api == NULL) return NULL;  /* a runtime older than the API version: it reports the missing op itself */
    OrtCustomOpDomain* domain;
    RETURN_IF_ERROR(API(api, CREATE_CUSTOM_OP_DOMAIN, CreateCustomOpDomainFn)("edgevl", &domain));
    RETURN_IF_ERROR(API(api, CUSTOM_OP_DOMAIN_ADD, CustomOpDomainAddFn)(domain, &EDGEVL_INT8_MATMUL));
    RETURN_IF_ERROR(API(api, CUSTOM_OP_DOMAIN_ADD, CustomOpDomainAddFn)(domain, &EDGEVL_INT4_MATMUL));
    RETURN_IF_ERROR(API(api, CUSTOM_OP_DOMAIN_ADD, CustomOpDomainAddFn)(domain, &EDGEVL_GROUP_ATTENTION));
    RETURN_IF_ERROR(API(api, CUSTOM_OP_DOMAIN_ADD, CustomOpDomainAddFn)(domain, &EDGEVL_MULTI_HEAD_ATTENTION));
    return API(api, ADD_CUSTOM_OP_DOMAIN, AddCustomOpDomainFn)(options, domain);
}

/* For edgevl.cpu (ctypes): this CPU's x86 ISA classes as cpuid (and the OS's saved state) report them, the view every
 * kernel here and MLAS's dispatch act on; under user-mode emulation (qemu -cpu Haswell) the emulated CPU's, where
 * /proc/cpuinfo shows the host's. Bits in edgevl.cpu's order: 1 AVX2 | 2 AVX-512 | 4 AVX-512 VNNI | 8 AVX-VNNI |
 * 16 AMX (int8) | 32 AMX-BF16. */
__attribute__((visibility("default"))) int EdgevlIsaClasses(void) {
    return (__builtin_cpu_supports("avx2") ? 1 : 0) | (__builtin_cpu_supports("avx512f") ? 2 : 0)
           | (__builtin_cpu_supports("avx512vnni") ? 4 : 0) | (__builtin_cpu_supports("avxvnni") ? 8 : 0)
           | (__builtin_cpu_supports("amx-int8") ? 16 : 0) | (__builtin_cpu_supports("amx-bf16") ? 32 : 0);
}
