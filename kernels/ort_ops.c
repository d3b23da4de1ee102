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
