// Masked softmax over the last dim of x (A,B,M,N), forward and backward, for rows of any length:
//   variant 0, 1: a warp per row, the row in registers (N <= 256, N <= 512), several rows per block;
//   variant 2:    a block of 256 threads per row, the row in registers (N <= 4096);
//   variant 3:    a block per row streaming the row twice (online max/sum, then the output): any N.
// Inputs are read through their strides (16-byte loads when the row is contiguous and aligned, element by element
// otherwise); the output is contiguous. Arithmetic in fp32, scores in ScoreUnits (base 2 with log2(e) folded into the
// scale, natural with a float mask).
#include <cstring>

#include "llmk_device.cuh"

namespace llmk {

constexpr int kWarpBlock = 128;   // threads per block of the warp-per-row variants (4 rows per block)
// 256 threads per block of the block-per-row variants: with 512 the 128-register cap per thread made the
// kernels spill on sm_90.
constexpr int kRowBlock = 256;
constexpr int kBlockEPT = 16;     // elements per thread of variant 2

int softmax_variant(int64_t N) {
  if (N <= 32 * 8) return 0;
  if (N <= 32 * 16) return 1;
  if (N <= static_cast<int64_t>(kRowBlock) * kBlockEPT) return 2;
  return 3;
}

const char* softmax_variant_name(int variant) {
  switch (variant) {
    case 0: return "warp per row, 8 elements per lane";
    case 1: return "warp per row, 16 elements per lane";
    case 2: return "block of 256 per row, 16 elements per thread";
    default: return "block per row, online (two reads)";
  }
}

// V consecutive elements j0 .. j0 + V - 1 of a row (zeros past N).
template <typename T>
__device__ __forceinline__ void load_chunk(float (&out)[Vec<T>::N], const T* row, int64_t stride, int64_t j0,
                                           int64_t N, bool vec) {
  constexpr int V = Vec<T>::N;
  if (vec && j0 + V <= N) {
    // memcpy, not a pointer cast, between the 16-byte word and its elements: type punning through a cast is
    // undefined behaviour (strict aliasing) and was seen miscompiled by a host compiler; memcpy compiles to moves.
    const uint4 raw = *reinterpret_cast<const uint4*>(row + j0);
    T e[V];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = Num<T>::to_f(e[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = j0 + v < N ? Num<T>::to_f(row[(j0 + v) * stride]) : 0.f;
  }
}

// Stores elements j0 .. j0 + V - 1 (those < N) of a contiguous row.
template <typename T>
__device__ __forceinline__ void store_chunk(T* row, int64_t j0, int64_t N, const float (&val)[Vec<T>::N], bool vec) {
  constexpr int V = Vec<T>::N;
  if (vec && j0 + V <= N) {
    T e[V];
#pragma unroll
    for (int v = 0; v < V; ++v) e[v] = Num<T>::from_f(val[v]);
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint4*>(row + j0) = raw;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (j0 + v < N) row[j0 + v] = Num<T>::from_f(val[v]);
  }
}

struct RowIndex {
  int64_t a, b, m;
};

__device__ __forceinline__ RowIndex split_row(int64_t row, int64_t B, int64_t M) {
  return RowIndex{row / M / B, (row / M) % B, row % M};
}

// Where row (a, b, m) starts in a tensor with these strides (in elements).
__device__ __forceinline__ int64_t row_offset(const int64_t (&stride)[4], const RowIndex& ri) {
  return ri.a * stride[0] + ri.b * stride[1] + ri.m * stride[2];
}

// The logits of chunk j0 of a row in ScoreUnits: scale * x (+ mask), -inf where masked, causal-hidden or past N.
template <typename T>
__device__ __forceinline__ void logits_chunk(float (&t)[Vec<T>::N], const SoftmaxFwdParams& p, const T* xrow,
                                             int64_t mask_row, int64_t m, int64_t j0) {
  constexpr int V = Vec<T>::N;
  load_chunk<T>(t, xrow, p.x_stride[3], j0, p.N, p.x_vec);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t j = j0 + v;
    const bool visible = j < p.N && (!p.causal || j <= m);
    float x = t[v] * p.score_scale;
    if (visible && p.mask_kind != MASK_NONE) {
      x = apply_mask(x, mask_value(p.mask, p.mask_kind, mask_row + j * p.mask_stride[3]));
    }
    t[v] = visible ? x : -INFINITY;
  }
}

template <int TPR, int BLOCK>
__device__ __forceinline__ float row_max(float v, float* red) {
  if constexpr (TPR == 32) {
    return warp_max(v);
  } else {
    return block_max<BLOCK>(v, red);
  }
}

template <int TPR, int BLOCK>
__device__ __forceinline__ float row_sum(float v, float* red) {
  if constexpr (TPR == 32) {
    return warp_sum(v);
  } else {
    return block_sum<BLOCK>(v, red);
  }
}

// ---- forward, row in registers: TPR threads per row (32 or the whole block), EPT elements per thread ----
template <typename T, int TPR, int EPT>
__global__ void __launch_bounds__(TPR == 32 ? kWarpBlock : TPR, 1)
softmax_fwd_regs_kernel(const SoftmaxFwdParams p) {
  constexpr int BLOCK = TPR == 32 ? kWarpBlock : TPR;
  constexpr int RPB = BLOCK / TPR;  // rows per block
  constexpr int V = Vec<T>::N, CPT = EPT / V;
  static_assert(EPT % V == 0, "elements per thread must be whole 16-byte chunks");
  __shared__ float red[BLOCK / 32];
  const int tr = threadIdx.x % TPR;
  const int64_t rows = p.A * p.B * p.M;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR; row < rows;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    const RowIndex ri = split_row(row, p.B, p.M);
    const T* xrow = static_cast<const T*>(p.x) + row_offset(p.x_stride, ri);
    const int64_t mask_row = row_offset(p.mask_stride, ri);
    const ScoreUnits units{p.natural};
    float t[CPT][V];
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      logits_chunk<T>(t[c], p, xrow, mask_row, ri.m, static_cast<int64_t>(c * TPR + tr) * V);
#pragma unroll
      for (int v = 0; v < V; ++v) mx = fmaxf(mx, t[c][v]);
    }
    mx = row_max<TPR, BLOCK>(mx, red);
    const float m_use = mx == -INFINITY ? 0.f : mx;  // fully masked row: every exp2 gives 0, not NaN
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < CPT; ++c)
#pragma unroll
      for (int v = 0; v < V; ++v) {
        t[c][v] = units.weight(t[c][v], m_use);
        sum += t[c][v];
      }
    sum = row_sum<TPR, BLOCK>(sum, red);
    const float inv = mx == -INFINITY ? 0.f : 1.f / sum;
    T* yrow = static_cast<T*>(p.y) + row * p.N;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
#pragma unroll
      for (int v = 0; v < V; ++v) t[c][v] *= inv;
      store_chunk<T>(yrow, static_cast<int64_t>(c * TPR + tr) * V, p.N, t[c], p.y_vec);
    }
  }
}

// ---- forward, any length: pass 1 keeps a per-thread online (max, sum), merged across the block; pass 2 reads
// the row again and writes exp2(t - max) / sum ----
template <typename T>
__global__ void __launch_bounds__(kRowBlock, 1) softmax_fwd_stream_kernel(const SoftmaxFwdParams p) {
  constexpr int V = Vec<T>::N;
  __shared__ float red[kRowBlock / 32];
  const int64_t rows = p.A * p.B * p.M;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowIndex ri = split_row(row, p.B, p.M);
    const T* xrow = static_cast<const T*>(p.x) + row_offset(p.x_stride, ri);
    const int64_t mask_row = row_offset(p.mask_stride, ri);
    const ScoreUnits units{p.natural};
    float m_run = -INFINITY, l_run = 0.f;
    for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * V; j0 < p.N; j0 += static_cast<int64_t>(kRowBlock) * V) {
      float t[V];
      logits_chunk<T>(t, p, xrow, mask_row, ri.m, j0);
      float cm = m_run;
#pragma unroll
      for (int v = 0; v < V; ++v) cm = fmaxf(cm, t[v]);
      const float cm_use = cm == -INFINITY ? 0.f : cm;
      float s = 0.f;
#pragma unroll
      for (int v = 0; v < V; ++v) s += units.weight(t[v], cm_use);
      l_run = l_run * units.weight(m_run, cm_use) + s;
      m_run = cm;
    }
    const float mx = block_max<kRowBlock>(m_run, red);
    const float m_use = mx == -INFINITY ? 0.f : mx;
    const float sum = block_sum<kRowBlock>(l_run * units.weight(m_run, m_use), red);
    const float inv = mx == -INFINITY ? 0.f : 1.f / sum;
    T* yrow = static_cast<T*>(p.y) + row * p.N;
    for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * V; j0 < p.N; j0 += static_cast<int64_t>(kRowBlock) * V) {
      float t[V];
      logits_chunk<T>(t, p, xrow, mask_row, ri.m, j0);
#pragma unroll
      for (int v = 0; v < V; ++v) t[v] = units.weight(t[v], m_use) * inv;
      store_chunk<T>(yrow, j0, p.N, t, p.y_vec);
    }
  }
}

// ---- backward: dx = scale * y * (dy - sum(dy * y)) ----
template <typename T, int TPR, int EPT>
__global__ void __launch_bounds__(TPR == 32 ? kWarpBlock : TPR, 1)
softmax_bwd_regs_kernel(const SoftmaxBwdParams p) {
  constexpr int BLOCK = TPR == 32 ? kWarpBlock : TPR;
  constexpr int RPB = BLOCK / TPR;
  constexpr int V = Vec<T>::N, CPT = EPT / V;
  static_assert(EPT % V == 0, "elements per thread must be whole 16-byte chunks");
  __shared__ float red[BLOCK / 32];
  const int tr = threadIdx.x % TPR;
  const int64_t rows = p.A * p.B * p.M;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * RPB + threadIdx.x / TPR; row < rows;
       row += static_cast<int64_t>(gridDim.x) * RPB) {
    const RowIndex ri = split_row(row, p.B, p.M);
    const T* yrow = static_cast<const T*>(p.y) + row_offset(p.y_stride, ri);
    const T* dyrow = static_cast<const T*>(p.dy) + row_offset(p.dy_stride, ri);
    float y[CPT][V], dy[CPT][V];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int64_t j0 = static_cast<int64_t>(c * TPR + tr) * V;
      load_chunk<T>(y[c], yrow, p.y_stride[3], j0, p.N, p.y_vec);
      load_chunk<T>(dy[c], dyrow, p.dy_stride[3], j0, p.N, p.dy_vec);
#pragma unroll
      for (int v = 0; v < V; ++v) dot += y[c][v] * dy[c][v];
    }
    dot = row_sum<TPR, BLOCK>(dot, red);
    T* dxrow = static_cast<T*>(p.dx) + row * p.N;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
#pragma unroll
      for (int v = 0; v < V; ++v) y[c][v] = p.scale * y[c][v] * (dy[c][v] - dot);
      store_chunk<T>(dxrow, static_cast<int64_t>(c * TPR + tr) * V, p.N, y[c], p.dx_vec);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowBlock, 1) softmax_bwd_stream_kernel(const SoftmaxBwdParams p) {
  constexpr int V = Vec<T>::N;
  __shared__ float red[kRowBlock / 32];
  const int64_t rows = p.A * p.B * p.M;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowIndex ri = split_row(row, p.B, p.M);
    const T* yrow = static_cast<const T*>(p.y) + row_offset(p.y_stride, ri);
    const T* dyrow = static_cast<const T*>(p.dy) + row_offset(p.dy_stride, ri);
    float dot = 0.f;
    for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * V; j0 < p.N; j0 += static_cast<int64_t>(kRowBlock) * V) {
      float y[V], dy[V];
      load_chunk<T>(y, yrow, p.y_stride[3], j0, p.N, p.y_vec);
      load_chunk<T>(dy, dyrow, p.dy_stride[3], j0, p.N, p.dy_vec);
#pragma unroll
      for (int v = 0; v < V; ++v) dot += y[v] * dy[v];
    }
    dot = block_sum<kRowBlock>(dot, red);
    T* dxrow = static_cast<T*>(p.dx) + row * p.N;
    for (int64_t j0 = static_cast<int64_t>(threadIdx.x) * V; j0 < p.N; j0 += static_cast<int64_t>(kRowBlock) * V) {
      float y[V], dy[V];
      load_chunk<T>(y, yrow, p.y_stride[3], j0, p.N, p.y_vec);
      load_chunk<T>(dy, dyrow, p.dy_stride[3], j0, p.N, p.dy_vec);
#pragma unroll
      for (int v = 0; v < V; ++v) y[v] = p.scale * y[v] * (dy[v] - dot);
      store_chunk<T>(dxrow, j0, p.N, y, p.dx_vec);
    }
  }
}

// ---- launchers: a grid-stride loop over rows, so any number of rows fits a bounded grid ----
constexpr int64_t kMaxBlocks = 1 << 20;

static unsigned grid_for(int64_t rows, int rows_per_block) {
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// The kernels of one direction, indexed by softmax_variant: both directions pick and launch them the same way.
template <typename P>
struct SoftmaxKernels {
  void (*by_variant[4])(P);
};

template <typename T>
static SoftmaxKernels<SoftmaxFwdParams> fwd_kernels() {
  return {{softmax_fwd_regs_kernel<T, 32, 8>, softmax_fwd_regs_kernel<T, 32, 16>,
           softmax_fwd_regs_kernel<T, kRowBlock, kBlockEPT>, softmax_fwd_stream_kernel<T>}};
}

template <typename T>
static SoftmaxKernels<SoftmaxBwdParams> bwd_kernels() {
  return {{softmax_bwd_regs_kernel<T, 32, 8>, softmax_bwd_regs_kernel<T, 32, 16>,
           softmax_bwd_regs_kernel<T, kRowBlock, kBlockEPT>, softmax_bwd_stream_kernel<T>}};
}

template <typename P>
static cudaError_t launch_softmax(const P& p, const SoftmaxKernels<P>& kernels, cudaStream_t stream) {
  const int64_t rows = p.A * p.B * p.M;
  if (rows == 0 || p.N == 0) return cudaSuccess;
  const int variant = softmax_variant(p.N);
  const bool warp_per_row = variant < 2;
  const auto kernel = kernels.by_variant[variant];
  kernel<<<grid_for(rows, warp_per_row ? kWarpBlock / 32 : 1), warp_per_row ? kWarpBlock : kRowBlock, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_softmax_fwd(const SoftmaxFwdParams& p, int dtype, cudaStream_t stream) {
  return with_dtype(dtype, cudaErrorInvalidValue,
                    [&](auto t) { return launch_softmax(p, fwd_kernels<decltype(t)>(), stream); });
}

cudaError_t launch_softmax_bwd(const SoftmaxBwdParams& p, int dtype, cudaStream_t stream) {
  return with_dtype(dtype, cudaErrorInvalidValue,
                    [&](auto t) { return launch_softmax(p, bwd_kernels<decltype(t)>(), stream); });
}

}  // namespace llmk
