// y[m, n] = sum_k x[m, k] * e4m3(W[n, k]) * S[n / 128, k / 128] for a few tokens (decode): reads the fp8 weight
// once, never materialises a dequantized copy. One warp per output row; each lane converts 16 consecutive codes
// per step (one 128-bit load), which all lie in one 128-column scale block because 16 divides 128.
// Needs K % 16 == 0 and 16-byte aligned rows (all Kimi-K2 widths); the caller falls back to torch otherwise.
// Pure CUDA (no torch headers) so it can be compile-checked on machines without a CUDA build of torch.

#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kBlock = 128;     // scale block edge
constexpr int kMaxTokens = 16;  // rows of x per launch (decode and small batches)
constexpr int kWarps = 4;       // warps (output rows) per thread block

__device__ __forceinline__ float2 e4m3x2_to_float2(uint16_t pair) {
    __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), __NV_E4M3);
    return __half22float2(*reinterpret_cast<__half2*>(&raw));
}

template <int M>
__global__ void __launch_bounds__(kWarps * 32) fp8_linear_kernel(const float* __restrict__ x,
                                                                 const uint8_t* __restrict__ w,
                                                                 const float* __restrict__ s, float* __restrict__ y,
                                                                 int N, int K) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
    if (n >= N) return;
    const int kb = (K + kBlock - 1) / kBlock;
    const uint8_t* row = w + static_cast<size_t>(n) * K;
    const float* srow = s + static_cast<size_t>(n / kBlock) * kb;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;

    for (int k0 = lane * 16; k0 < K; k0 += 32 * 16) {
        const uint4 codes = __ldg(reinterpret_cast<const uint4*>(row + k0));
        const uint16_t* pairs = reinterpret_cast<const uint16_t*>(&codes);
        float wf[16];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float2 f = e4m3x2_to_float2(pairs[i]);
            wf[2 * i] = f.x;
            wf[2 * i + 1] = f.y;
        }
        const float scale = __ldg(srow + k0 / kBlock);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float4* xv = reinterpret_cast<const float4*>(x + static_cast<size_t>(m) * K + k0);
            float part = 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float4 v = __ldg(xv + j);
                part += wf[4 * j] * v.x + wf[4 * j + 1] * v.y + wf[4 * j + 2] * v.z + wf[4 * j + 3] * v.w;
            }
            acc[m] += part * scale;
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        float v = acc[m];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) y[static_cast<size_t>(m) * N + n] = v;
    }
}

template <int M>
void launch(const float* x, const uint8_t* w, const float* s, float* y, int N, int K, cudaStream_t stream) {
    const dim3 grid((N + kWarps - 1) / kWarps);
    fp8_linear_kernel<M><<<grid, kWarps * 32, 0, stream>>>(x, w, s, y, N, K);
}

}  // namespace

// Returns 0, or -1 when the shape is not supported (the caller then uses its fallback).
extern "C" int hybrid_fp8_linear(const float* x, const uint8_t* w, const float* s, float* y, int M, int N, int K,
                                 cudaStream_t stream) {
    if (M < 1 || M > kMaxTokens || K % 16 != 0 || N < 1) return -1;
    // the token count is a template argument so the accumulators stay in registers: M in chunks of 8, 4, 2, 1
    for (int done = 0; done < M;) {
        const int left = M - done;
        const float* xs = x + static_cast<size_t>(done) * K;
        float* ys = y + static_cast<size_t>(done) * N;
        if (left >= 8) {
            launch<8>(xs, w, s, ys, N, K, stream);
            done += 8;
        } else if (left >= 4) {
            launch<4>(xs, w, s, ys, N, K, stream);
            done += 4;
        } else if (left >= 2) {
            launch<2>(xs, w, s, ys, N, K, stream);
            done += 2;
        } else {
            launch<1>(xs, w, s, ys, N, K, stream);
            done += 1;
        }
    }
    return 0;
}
