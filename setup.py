import platform

from setuptools import Extension, setup

# edgevl's int8 and int4 matmuls and decode-step attention for ONNX Runtime on x86 without VNNI and on AVX-512 VNNI
# (kernels/ort_ops.c; edgevl.cpu loads it): a custom-op library, not a Python module. Optional: without a C compiler
# the install still succeeds, and those CPUs run the int8 and int4 graphs on ONNX Runtime's own slower kernels
# instead (`edgevl doctor` says which).
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
ORT_OPS = Extension("edgevl.kernels._ort_ops", sources=["kernels/ort_ops.c", "kernels/ort_matmul.c",
                                                     "kernels/ort_attention.c"],
                    depends=["kernels/ort_ops.h"], optional=True,
                    # -ffp-contract=off: no a * b + c fused into one rounding the replaced graph nodes do not make
                    extra_compile_args=["-O3", "-ffp-contract=off"])

# export/ and kernels/ sit at the top level (the design card's layout) but install as
# edgevl.export and edgevl.kernels, so site-packages gets no generic top-level names.
setup(
    name="edgevl",
    version="0.1.0",
    description="Mini-InternVL vision-language models on edge hardware (PyTorch, ONNX Runtime, TensorRT)",
    python_requires=">=3.10",
    packages=["edgevl", "edgevl.backends", "edgevl.testing", "edgevl.formats", "edgevl.export", "edgevl.export.trt",
              "edgevl.kernels"],
    package_dir={"edgevl": "edgevl", "edgevl.export": "export", "edgevl.kernels": "kernels"},
    # CUDA sources are compiled by NVRTC at first use; the .cpp is the host-emulation build for `edgevl selftest`.
    # data/*.onnx: edgevl.cpu's checks of ONNX Runtime's integer GEMM (u8s8_probe) and of edgevl's own ops
    # (matmul_probe), which must not need the onnx package.
    package_data={"edgevl.kernels": ["*.cu", "*.cuh", "*.cpp"], "edgevl": ["data/*.onnx"]},
    install_requires=["numpy>=1.24", "ml_dtypes>=0.3", "pillow>=10", "tokenizers>=0.19", "sentencepiece>=0.2",
                      "onnxruntime>=1.20"],
    extras_require={
        "torch": ["torch>=2.1"],
        "export": ["torch>=2.1", "onnx>=1.16", "onnxscript>=0.2", "tqdm>=4.60"],
        "video": ["opencv-python-headless>=4.8"],
        # onnxruntime-gpu replaces the base onnxruntime on CUDA machines (uninstall onnxruntime first).
        "gpu": ["cuda-python>=12", "nvidia-cuda-nvrtc", "tensorrt>=10"],
        # NVRTC runs without a GPU, so CI compiles every kernel for the target architectures.
        "dev": ["pytest>=8", "pytest-xdist>=3", "torch>=2.1", "transformers>=5,<6", "opencv-python-headless>=4.8",
                "onnx>=1.16", "onnxscript>=0.2", "cuda-python>=12", "nvidia-cuda-nvrtc", "matplotlib", "psutil",
                "threadpoolctl", "hypothesis>=6"],
    },
    ext_modules=[ORT_OPS] if X86_64 else [],
    entry_points={"console_scripts": ["edgevl=edgevl.cli:main"]},
)
