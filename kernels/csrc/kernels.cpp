// The one translation unit kernels/native.py compiles per target: the kernel files below,
// included as they are. Each of them alone spends ~6 s of its compile parsing the ATen and
// torch/library.h headers; compiled as one unit they parse them once, which halves a
// target's build (47 s of CPU to 25 s for AVX2 at -O3), with the same flags and code.
// Their anonymous namespaces merge here, so a helper's name must be unique across them.
#include "int8_gemm.cpp"
#include "paged_attention.cpp"
#include "layer_ops.cpp"
#include "decode_layers.cpp"
