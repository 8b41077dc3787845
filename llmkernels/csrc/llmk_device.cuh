// Device helpers shared by the attention and softmax kernels: dtype conversion, mask reads, Philox dropout,
// warp reductions, 16-byte tile loads with a scalar fallback (synchronous and cp.async), and the warp-level tile
// matrix product.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "llmk_params.h"

namespace llmk {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------------------------
// dtype traits: every kernel computes in fp32 and converts on load/store.

template <typename T>
struct Num;

template <>
struct Num<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};

template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t bits(__half x) { return __half_as_ushort(x); }
};

template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
};

// Host-side dispatch, the one place that maps a DType code to its element type and head dims to their bucket, for
// every launcher and config query: f(T()) for the element type T of `dtype`, f(std::integral_constant<int, D>())
// for the bucket D of head dims (E, Ev); `otherwise` for an unknown code or head dims beyond 256.
template <typename R, typename F>
inline R with_dtype(int dtype, R otherwise, F&& f) {
  switch (dtype) {
    case DT_F16: return f(__half());
    case DT_BF16: return f(__nv_bfloat16());
    case DT_F32: return f(float());
    default: return otherwise;
  }
}

template <typename R, typename F>
inline R with_bucket(int E, int Ev, R otherwise, F&& f) {
  switch (attn_bucket(E, Ev)) {
    case 64: return f(std::integral_constant<int, 64>());
    case 128: return f(std::integral_constant<int, 128>());
    case 256: return f(std::integral_constant<int, 256>());
    default: return otherwise;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Masks: the additive value in natural units (bool false -> -inf). The kind is a runtime switch so that masks of
// every dtype share one kernel instance (no template explosion, the switch is uniform across a warp).

__device__ __forceinline__ float mask_value(const void* mask, int kind, int64_t off) {
  switch (kind) {
    case MASK_BOOL:
      return reinterpret_cast<const unsigned char*>(mask)[off] ? 0.f : -INFINITY;
    case MASK_F16:
      return __half2float(reinterpret_cast<const __half*>(mask)[off]);
    case MASK_BF16:
      return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(mask)[off]);
    case MASK_F32:
      return reinterpret_cast<const float*>(mask)[off];
    case MASK_F64:
      return static_cast<float>(reinterpret_cast<const double*>(mask)[off]);
    default:
      return 0.f;
  }
}

// Adds a mask value to a score in the kernel's units (ScoreUnits). A -inf mask hides the position whatever the score
// is, so a NaN score at a masked position does not spread over the row.
__device__ __forceinline__ float apply_mask(float t, float mv) { return mv == -INFINITY ? -INFINITY : t + mv; }

// The units of the scores inside the kernels. Without a float mask they are in base 2 (log2(e) folded into the
// scale, one exp2 per weight). A float mask is added in natural units as the contract says: scaling it by log2(e)
// instead overflows to -inf below about -2.36e38, and transformers' masks at finfo(dtype).min would then hide a row
// that PyTorch averages. With a float mask the scores s = scale * q.k + mask and the running max m stay natural and
// only their difference is scaled, exp2((s - m) * log2(e)); the lse is natural in both. A bool mask is 0 or -inf,
// the same in either unit.
struct ScoreUnits {
  bool natural;
  // The softmax weight of score t against the reference m (a running max, or the lse in the backward).
  __device__ __forceinline__ float weight(float t, float m) const { return exp2f(natural ? (t - m) * kLog2e : t - m); }
  // The natural-log lse of a row with max m and sum l (of weight(t, m)).
  __device__ __forceinline__ float lse(float m, float l) const {
    return natural ? m + log2f(l) * kLn2 : (m + log2f(l)) * kLn2;
  }
  // A natural-log lse in these units.
  __device__ __forceinline__ float from_lse(float lse) const { return natural ? lse : lse * kLog2e; }
};

// ---------------------------------------------------------------------------------------------------------------
// The score rule (AttnRule in llmk_params.h), per (query i, key j); the forward and the backward share these, so
// they apply the same rule to the same scores.

// Whether key j is visible to query i under causal / window (the mask aside). c = i + d fits an int: the host
// checks L + S < 2^31.
__device__ __forceinline__ bool rule_visible(const AttnRule& r, int i, int j) {
  const int c = i + r.diag;
  return (!r.causal || j <= c) && (r.window_left < 0 || c - j <= r.window_left) &&
         (r.window_right < 0 || j - c <= r.window_right);
}

// The score of the dot product x of query i and key j in the kernel's units, before the mask is added: scaled,
// capped (softcap), then the ALiBi bias (slope: this head's slope times alibi_unit). th is the tanh of the capped
// argument (the backward's factor 1 - th^2), 0 without a softcap.
__device__ __forceinline__ float rule_score(const AttnRule& r, float score_scale, float slope, float x, int i, int j,
                                            float& th) {
  float t;
  if (r.softcap) {
    th = tanhf(x * r.softcap_in);
    t = r.softcap_out * th;
  } else {
    th = 0.f;
    t = x * score_scale;
  }
  if (r.alibi != nullptr) t -= slope * static_cast<float>(abs(i + r.diag - j));
  return t;
}

// This (batch, head)'s ALiBi slope in score units, 0 without ALiBi.
__device__ __forceinline__ float rule_slope(const AttnRule& r, int b, int h) {
  return r.alibi != nullptr ? r.alibi[b * r.alibi_stride[0] + h * r.alibi_stride[1]] * r.alibi_unit : 0.f;
}

// Head h's sink logit (natural units), -inf without sinks (a denominator term of exp(-inf) = 0).
__device__ __forceinline__ float rule_sink(const AttnRule& r, int h) {
  if (r.sinks == nullptr) return -INFINITY;
  switch (r.sinks_dtype) {
    case DT_F16: return __half2float(reinterpret_cast<const __half*>(r.sinks)[h]);
    case DT_BF16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(r.sinks)[h]);
    default: return reinterpret_cast<const float*>(r.sinks)[h];
  }
}

// Beyond this |lse| a float32 lse no longer holds log(l) (the row sum) to 1e-3 (its ulp is 2^-12 at 2^11), so the
// attention backward with a float mask takes such rows' max and sum from a statistics pass of the forward kernel
// instead (a row whose every key carries finfo(float32).min has lse == its max: l is lost entirely).
constexpr float kCoarseLse = 2048.f;

// ---------------------------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10 (Salmon et al., SC'11), one call per element of the (B,H,L,S) score tensor, counter =
// (element index, offset), key = seed. The forward and the backward call it with the same arguments, so the
// backward regenerates exactly the forward's keep pattern without storing it.

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
    const uint32_t hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += W0;
    k.y += W1;
  }
  return c;
}

// True when element `index` is kept. u is uniform in [0, 1) with 24 random bits.
__device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t offset, uint64_t index, float p) {
  const uint4 r = philox4x32_10(
      make_uint4(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), static_cast<uint32_t>(offset),
                 static_cast<uint32_t>(offset >> 32)),
      make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)));
  const float u = static_cast<float>(r.x >> 8) * (1.0f / 16777216.0f);
  return u >= p;
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp()); }
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }

// Max / sum over the 4 threads that share an mma accumulator row (lanes 4g .. 4g+3).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Block-wide reductions for NTHREADS threads (a multiple of 32). `red` is NTHREADS/32 floats of shared memory;
// the leading barrier makes it safe to call these back to back. Every thread combines the warps' results in the
// same order, so all get the same value.
template <int NTHREADS, typename Op>
__device__ __forceinline__ float block_reduce(float v, float* red, Op op) {
  constexpr int NW = NTHREADS / 32;
  v = warp_reduce(v, op);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < NW; ++w) r = op(r, red[w]);
  return r;
}

template <int NTHREADS>
__device__ __forceinline__ float block_max(float v, float* red) { return block_reduce<NTHREADS>(v, red, MaxOp()); }

template <int NTHREADS>
__device__ __forceinline__ float block_sum(float v, float* red) { return block_reduce<NTHREADS>(v, red, SumOp()); }

// ---------------------------------------------------------------------------------------------------------------
// Tiles between global and shared memory. A tile is ROWS x COLS elements with leading dimension `ld` in shared
// memory; global element (r, c) is base[r * rs + c * cs] for r < nrows, c < ncols, and zero elsewhere (the zero
// padding is what lets the matrix products run over whole 16-wide steps). `vec` (checked on the host: cs == 1,
// base pointer and every other stride 16-byte aligned) allows 16-byte accesses; a chunk that crosses ncols is
// read element by element. Tiles are loaded with load_tile_async (below).

template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
};

// Asynchronous tile loads (cp.async, sm_80+), for the double-buffered K/V (forward) and Q/dO (backward) tiles:
// a thread issues 16-byte global -> shared copies that complete in the background while the warps compute on the
// other buffer. The discipline (PTX ISA, "cp.async"): copies issued since the last commit form one group;
// cp_async_wait<N>() returns once at most N of this thread's committed groups are still in flight; a __syncthreads()
// after the wait makes every thread's copies visible to the whole block. A buffer may be refilled only after a
// barrier that follows every warp's last read of it. tests/cuda_emulation.py runs these with the same semantics
// (the destination is poisoned when a copy is issued and written when it is waited for), so a read before the wait
// or a refill while another warp still reads shows up there.
//
// LLMK_CP_ASYNC: 1 where the instructions exist (device code for sm_80 and newer; the emulation sets it itself);
// elsewhere the same calls copy synchronously, which is also what a wait-for-all after each tile amounts to.
#ifndef LLMK_CP_ASYNC
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LLMK_CP_ASYNC 1
#else
#define LLMK_CP_ASYNC 0
#endif
#endif

// One 16-byte copy; both addresses 16-byte aligned. .cg caches in L2 only: each tile is read once per block.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
#if LLMK_CP_ASYNC
  const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(src) : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if LLMK_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if LLMK_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Loads a tile (the contract above) in 16-byte chunks: a chunk that is whole, inside the tile and vec-aligned is
// one cp.async; chunks past nrows / ncols are zero-filled, and chunks that cross ncols (odd head dims) or of
// tensors without vec are read element by element, synchronously, by plain stores into the same buffer (so they
// obey the same refill rule). The bytes that land in shared memory are those of the synchronous loads these
// replace, so the results are bitwise the same.
template <typename T, int ROWS, int COLS, int NTHREADS>
__device__ __forceinline__ void load_tile_async(T* smem, int ld, const T* base, int64_t rs, int64_t cs, int nrows,
                                                int ncols, bool vec) {
  constexpr int V = Vec<T>::N;
  static_assert(COLS % V == 0, "tile width must be a multiple of the vector width");
  constexpr int CHUNKS = ROWS * (COLS / V);
  for (int idx = threadIdx.x; idx < CHUNKS; idx += NTHREADS) {
    const int r = idx / (COLS / V);
    const int c = (idx % (COLS / V)) * V;
    T* dst = smem + r * ld + c;
    if (vec && r < nrows && c + V <= ncols) {
      cp_async_16(dst, base + r * rs + c);
    } else if (r >= nrows || c >= ncols) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);  // +0 in every dtype
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        dst[e] = c + e < ncols ? base[r * rs + static_cast<int64_t>(c + e) * cs] : Num<T>::from_f(0.f);
      }
    }
  }
}

// Which buffer tile `it` of a loop uses, and the loads around it, for 1 or 2 stages (kv_stages, chosen on the
// host: 2 where the second buffer fits the device's shared memory). The loop body of both attention kernels:
//   issue(tile 0 -> buffer 0); cp_async_commit();            // before the loop, with the block's other loads
//   for it: __syncthreads();                                  // every warp is done with the previous tiles
//           pipeline_next(stages, it, count, issue);          // prefetch it + 1 (2 stages) or load it (1 stage)
//           __syncthreads();                                  // tile it is complete for every thread
//           compute on buffer pipeline_buffer(stages, it)
//   cp_async_wait<0>();                                       // nothing may land after the loop (sO reuses sQ)
// With 2 stages, tile it + 1 is issued into the buffer tile it - 1 used (free after the first barrier) and then
// only tile it's group is waited for: the copies of it + 1 run during tile it's matrix products.
__device__ __forceinline__ int pipeline_buffer(int stages, int it) { return stages == 2 ? it & 1 : 0; }

template <typename Issue>
__device__ __forceinline__ void pipeline_next(int stages, int it, int count, Issue&& issue) {
  if (stages == 2 && it + 1 < count) {
    issue(it + 1, (it + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    if (stages != 2 && it > 0) {
      issue(it, 0);
      cp_async_commit();
    }
    cp_async_wait<0>();
  }
}

// Writes rows < nrows and cols < ncols of a shared-memory tile to global memory with row stride rs (unit column
// stride).
template <typename T, int ROWS, int COLS, int NTHREADS>
__device__ __forceinline__ void store_tile(T* base, int64_t rs, const T* smem, int ld, int nrows, int ncols,
                                           bool vec) {
  constexpr int V = Vec<T>::N;
  constexpr int CHUNKS = ROWS * (COLS / V);
  for (int idx = threadIdx.x; idx < CHUNKS; idx += NTHREADS) {
    const int r = idx / (COLS / V);
    const int c = (idx % (COLS / V)) * V;
    if (r >= nrows || c >= ncols) continue;
    const T* src = smem + r * ld + c;
    if (vec && c + V <= ncols) {
      *reinterpret_cast<uint4*>(base + r * rs + c) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < V && c + e < ncols; ++e) base[r * rs + c + e] = src[e];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Warp-level tile product on shared memory, in the accumulator layout of mma.m16n8k16 for every dtype:
//
//   acc[nt] (a 16 x 8 tile) += sum_{k < K} A(r, k) * B(k, 8 nt + c),  r < 16, c < 8
//   A(r, k) = A[r * a_rs + k * a_cs],  B(k, n) = B[k * b_rs + n * b_cs]   (any orientation: transposes are free)
//
// Lane l holds acc[nt][0..1] at row l/4, cols 2(l%4) + {0,1} and acc[nt][2..3] at row l/4 + 8, same cols (PTX ISA,
// "matrix fragments for mma.m16n8k16"). fp16/bf16 run on the tensor cores (sm_80+); fp32 runs the same layout with
// IEEE fp32 FMAs, so every kernel above this function is the same code for all three dtypes. K % 16 == 0.

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two 16-bit values in one register, the lower column in the low half (the .f16x2 / .bf16x2 convention).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return Num<T>::bits(lo) | (Num<T>::bits(hi) << 16);
}

template <typename T, int NT>
struct WarpGemm {
  static __device__ __forceinline__ void run(float (&acc)[NT][4], const T* A, int a_rs, int a_cs, const T* B,
                                             int b_rs, int b_cs, int K) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t2 = (lane & 3) * 2;
    for (int k0 = 0; k0 < K; k0 += 16) {
      const T* a_lo = A + g * a_rs + (k0 + t2) * a_cs;        // row g,     cols k0 + t2 (+1)
      const T* a_hi = A + (g + 8) * a_rs + (k0 + t2) * a_cs;  // row g + 8
      uint32_t a[4];
      a[0] = pack2(a_lo[0], a_lo[a_cs]);
      a[1] = pack2(a_hi[0], a_hi[a_cs]);
      a[2] = pack2(a_lo[8 * a_cs], a_lo[9 * a_cs]);  // cols k0 + t2 + 8 (+1)
      a[3] = pack2(a_hi[8 * a_cs], a_hi[9 * a_cs]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const T* b_col = B + (k0 + t2) * b_rs + (nt * 8 + g) * b_cs;  // rows k0 + t2 (+1), col 8 nt + g
        uint32_t b[2];
        b[0] = pack2(b_col[0], b_col[b_rs]);
        b[1] = pack2(b_col[8 * b_rs], b_col[9 * b_rs]);  // rows k0 + t2 + 8 (+1)
        mma_16816(acc[nt], a, b, T());
      }
    }
  }
};

template <int NT>
struct WarpGemm<float, NT> {
  static __device__ __forceinline__ void run(float (&acc)[NT][4], const float* A, int a_rs, int a_cs,
                                             const float* B, int b_rs, int b_cs, int K) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t2 = (lane & 3) * 2;
#pragma unroll 2
    for (int k = 0; k < K; ++k) {
      const float a_lo = A[g * a_rs + k * a_cs];
      const float a_hi = A[(g + 8) * a_rs + k * a_cs];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float b0 = B[k * b_rs + (nt * 8 + t2) * b_cs];
        const float b1 = B[k * b_rs + (nt * 8 + t2 + 1) * b_cs];
        acc[nt][0] = fmaf(a_lo, b0, acc[nt][0]);
        acc[nt][1] = fmaf(a_lo, b1, acc[nt][1]);
        acc[nt][2] = fmaf(a_hi, b0, acc[nt][2]);
        acc[nt][3] = fmaf(a_hi, b1, acc[nt][3]);
      }
    }
  }
};

// Position of accumulator element e (0..3) of a lane inside its 16 x 8 tile.
__device__ __forceinline__ int acc_row(int e) { return ((threadIdx.x & 31) >> 2) + (e >> 1) * 8; }
__device__ __forceinline__ int acc_col(int e) { return (threadIdx.x & 3) * 2 + (e & 1); }

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Launches a tiled attention kernel: `blocks` blocks of `threads` threads with `smem` bytes of dynamic shared
// memory (opted into first: above 48 KB a kernel must ask). Nothing to do for no block; more than 2^31 - 1 blocks
// is refused (a 1-D grid).
template <typename P>
inline cudaError_t launch_tiles(void (*kernel)(P), int64_t blocks, int threads, int smem, const P& p,
                                cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace llmk
