// Plain parameter structs and kernel launchers shared by the host bindings (bindings.cpp, compiled by the host
// compiler with the torch headers) and the kernels (*.cu, compiled by nvcc WITHOUT the torch headers, which
// keeps each nvcc run short). Every tensor is passed as a pointer plus int64 strides in elements, so the kernels
// read any layout (stride 0 on broadcast dims included) and no offset is computed in 32 bits.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace llmk {

enum DType : int { DT_F16 = 0, DT_BF16 = 1, DT_F32 = 2 };

// How a mask is stored. Bool: true = keep. Float kinds: added to the scaled scores (-inf allowed).
enum MaskKind : int { MASK_NONE = 0, MASK_BOOL = 1, MASK_F16 = 2, MASK_BF16 = 3, MASK_F32 = 4, MASK_F64 = 5 };

// ---- attention (canonical form: q (B,Hq,L,E), k (B,Hkv,S,E), v (B,Hkv,S,Ev), mask (B,Hq,L,S)) ----

struct AttnShape {
  int B, Hq, Hkv, L, S, E, Ev;
};

// The score rule's variants (contract.ScoreRule), shared by the forward and the backward, in the kernels' units
// (ScoreUnits): for query i and key j with d = diag, s = score_scale * q.k, or softcap_out * tanh(softcap_in * q.k)
// with a softcap; minus alibi_unit * slope[b, h] * |i + d - j| with ALiBi; then the float mask. Visible iff
// (!causal or j <= i + d) and i + d - window_left <= j (window_left >= 0) and j <= i + d + window_right
// (window_right >= 0). Sinks (forward only): the running max starts at the sink logit, the running sum at 1.
struct AttnRule {
  bool causal;          // j <= i + diag
  int diag;             // S - L for the bottom-right alignment, else 0
  int window_left;      // -1: unbounded
  int window_right;     // -1: unbounded (always -1 with causal: canonical form)
  bool softcap;         // the two factors below are used
  float softcap_in;     // scale / c (natural units inside tanh)
  float softcap_out;    // c, times log2(e) for base-2 scores
  const float* alibi;   // (B, Hq) slopes with alibi_stride, or null
  int64_t alibi_stride[2];
  float alibi_unit;     // 1, or log2(e) for base-2 scores
  const void* sinks;    // (Hq,) contiguous logits, or null
  int sinks_dtype;      // DType of sinks
};

// x clamped to [0, n] (64-bit: i + d +- a window side may leave the int range before clamping).
inline __host__ __device__ int clamp_to(int64_t x, int n) { return static_cast<int>(x < 0 ? 0 : x > n ? n : x); }

// The keys [*begin, *end) that query rows [m0, m1) may see under the rule (causal / window / alignment), the start
// rounded down to a multiple of BN: every key block outside is hidden from all of these rows and skipped. Empty
// (begin >= end) when the rows see no key. Query i sees keys i + d - left .. i + d + right (right 0 with causal).
inline __host__ __device__ void attn_key_range(const AttnRule& r, int S, int m0, int m1, int BN, int* begin,
                                               int* end) {
  const int right = r.causal ? 0 : r.window_right;
  const int lo = r.window_left >= 0 ? clamp_to(static_cast<int64_t>(m0) + r.diag - r.window_left, S) : 0;
  const int hi = right >= 0 ? clamp_to(static_cast<int64_t>(m1) - 1 + r.diag + right + 1, S) : S;
  *begin = lo < hi ? lo / BN * BN : hi;  // an empty range stays empty after rounding
  *end = hi;
}

// The query rows [*begin, *end) that may see some key of [n0, n1) under the rule, the start rounded down to a
// multiple of BM: the dK/dV pass skips the query tiles outside. Key j is seen by rows j - d - right .. j - d + left.
inline __host__ __device__ void attn_query_range(const AttnRule& r, int L, int n0, int n1, int BM, int* begin,
                                                 int* end) {
  const int right = r.causal ? 0 : r.window_right;
  const int lo = right >= 0 ? clamp_to(static_cast<int64_t>(n0) - r.diag - right, L) : 0;
  const int hi = r.window_left >= 0 ? clamp_to(static_cast<int64_t>(n1) - 1 - r.diag + r.window_left + 1, L) : L;
  *begin = lo < hi ? lo / BM * BM : hi;  // an empty range stays empty after rounding
  *end = hi;
}

struct AttnFwdParams {
  AttnShape n;
  const void* q;
  const void* k;
  const void* v;
  const void* mask;     // null when mask_kind == MASK_NONE
  void* out;            // (B,Hq,L,Ev) contiguous, dtype of q
  float* lse;           // (B,Hq,L) contiguous, natural log
  int64_t q_stride[4], k_stride[4], v_stride[4], mask_stride[4];
  bool q_vec, k_vec, v_vec, out_vec;  // 16-byte loads/stores are allowed for this tensor (checked on the host)
  int mask_kind;
  AttnRule rule;        // causal, window, alignment, softcap, ALiBi, sinks
  bool natural;         // scores in natural units (with a float mask), else base 2: see ScoreUnits
  float score_scale;    // scale, or scale * log2(e) for base-2 scores
  float dropout_p;      // 0: no dropout
  float keep_scale;     // 1 / (1 - dropout_p)
  const int64_t* rng;   // device pointer to [seed, offset] when dropout_p > 0
  int stages;           // K/V tile buffers: 2 (cp.async prefetch of the next tile) or 1; attn_stages()
  // Statistics mode, for the backward (stats_ref != null): out and lse are not written. For each tile of BM rows
  // where a row has a finite |stats_lse| >= kCoarseLse, the rows' reference (their max m, in score units) and 1 / l
  // are written to stats_ref and stats_inv_l; other tiles get from_lse(stats_lse) and 1.
  const float* stats_lse;  // (B,Hq,L) contiguous, the forward's lse
  float* stats_ref;        // (B,Hq,L) contiguous
  float* stats_inv_l;      // (B,Hq,L) contiguous
};

struct AttnBwdParams {
  AttnShape n;
  const void* q;
  const void* k;
  const void* v;
  const void* mask;
  const void* dout;
  const float* lse;     // (B,Hq,L) with lse_stride
  const float* delta;   // (B,Hq,L) contiguous: rowsum(dO * O) - grad_lse
  float* dq_acc;        // (B,Hq,L,E) contiguous fp32, zero-filled, accumulated with atomics
  void* dk;             // (B,Hkv,S,E) contiguous
  void* dv;             // (B,Hkv,S,Ev) contiguous
  float* dmask;         // (B,Hq,L,S) contiguous fp32, or null
  int64_t q_stride[4], k_stride[4], v_stride[4], mask_stride[4], dout_stride[4], lse_stride[3];
  bool q_vec, k_vec, v_vec, dout_vec;
  int mask_kind;
  AttnRule rule;        // as in AttnFwdParams (sinks unused: the lse includes them)
  bool natural;         // as in AttnFwdParams
  float scale;          // natural units, for dQ and dK
  float score_scale;    // as in AttnFwdParams
  // With a float mask or ALiBi: per-row reference and 1 / l from the forward kernel's statistics mode;
  // P = weight(s, ref) * inv_l. Null: ref = from_lse(lse), inv_l = 1.
  const float* row_ref;
  const float* row_inv_l;
  float dropout_p;
  float keep_scale;
  const int64_t* rng;
  int stages;           // Q/dO tile buffers: 2 (cp.async prefetch of the next tile) or 1; attn_stages()
};

struct AttnDeltaParams {
  int B, H, L, Ev;
  const void* dout;
  const void* out;
  const float* grad_lse;  // (B,H,L) or null
  float* delta;           // (B,H,L) contiguous
  int64_t dout_stride[4], out_stride[4], grad_lse_stride[3];
};

struct DropoutMaskParams {
  int64_t B, H, L, S;
  const int64_t* rng;
  float dropout_p;
  bool* keep;  // (B,H,L,S) contiguous
};

// Tile sizes of one attention kernel instance (one per dtype and head-dim bucket).
struct AttnConfig {
  int D;        // head-dim bucket: 64, 128 or 256 (E and Ev up to D, the rest padded with zeros)
  int BM, BN;   // query rows and key rows per tile
  int threads;
  int smem_bytes;  // dynamic shared memory per block with one buffer of the streamed tiles (stages = 1)
  int smem_bytes_pipelined;  // with two (stages = 2)
};

// How many buffers of the streamed tiles a kernel with config c gets on a device whose blocks may use smem_optin
// bytes: 2 where they fit, else 1; max_stages (1 or 2) caps it (LLMKERNELS_CUDA_STAGES, for comparisons).
inline int attn_stages(const AttnConfig& c, int smem_optin, int max_stages) {
  return max_stages >= 2 && c.smem_bytes_pipelined <= smem_optin ? 2 : 1;
}

// The bucket for head dims E and Ev (0 when they exceed 256), and the configs chosen for it.
int attn_bucket(int E, int Ev);
AttnConfig attn_fwd_config(int dtype, int E, int Ev);
AttnConfig attn_bwd_config(int dtype, int E, int Ev);

cudaError_t launch_attn_fwd(const AttnFwdParams& p, int dtype, cudaStream_t stream);
cudaError_t launch_attn_bwd_delta(const AttnDeltaParams& p, int dtype, cudaStream_t stream);
cudaError_t launch_attn_bwd(const AttnBwdParams& p, int dtype, cudaStream_t stream);
cudaError_t launch_dropout_mask(const DropoutMaskParams& p, cudaStream_t stream);

// ---- masked softmax (canonical form: x (A,B,M,N), softmax over N; mask (A,B,M,N)) ----

struct SoftmaxFwdParams {
  int64_t A, B, M, N;
  const void* x;
  const void* mask;
  void* y;               // (A,B,M,N) contiguous
  int64_t x_stride[4], mask_stride[4];
  bool x_vec, y_vec;
  int mask_kind;
  bool causal;           // column j > row m is masked
  bool natural;          // as in AttnFwdParams
  float score_scale;     // as in AttnFwdParams
};

struct SoftmaxBwdParams {
  int64_t A, B, M, N;
  const void* dy;
  const void* y;
  void* dx;              // (A,B,M,N) contiguous
  int64_t dy_stride[4], y_stride[4];
  bool dy_vec, y_vec, dx_vec;
  float scale;
};

// Which kernel a row length gets: 0 warp per row (short), 1 warp per row (up to 1024), 2 block per row with the
// row in registers, 3 block per row streaming the row twice (online softmax; any length).
int softmax_variant(int64_t N);
const char* softmax_variant_name(int variant);

cudaError_t launch_softmax_fwd(const SoftmaxFwdParams& p, int dtype, cudaStream_t stream);
cudaError_t launch_softmax_bwd(const SoftmaxBwdParams& p, int dtype, cudaStream_t stream);

}  // namespace llmk
