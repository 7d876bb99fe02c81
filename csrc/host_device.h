// Code shared by the CPU and CUDA kernels, and CUDA code the CPU tests run on the host, is
// marked with these: host-and-device and always inlined under nvcc, always inlined elsewhere.
#pragma once

#if defined(__CUDACC__)
#define LRFUSE_HD __host__ __device__ __forceinline__
#define LRFUSE_UNROLL _Pragma("unroll")
#else
#define LRFUSE_HD inline __attribute__((always_inline))
#define LRFUSE_UNROLL
#endif
