// Attention forward, FlashAttention-2 structure (Dao 2023): one block per (batch, query head, BM query rows);
// the Q tile stays in shared memory while K/V tiles of BN keys stream through it (two buffers with cp.async where
// shared memory allows, so that the next tile loads during this one's products: pipeline_next); each warp owns 16
// query rows and keeps their online-softmax state (running max m, running sum l, in ScoreUnits) and output
// accumulator in fp32 registers. S = Q K^T and O += P V are warp tile products (tensor cores for fp16/bf16, see
// WarpGemm).
//
// Head dims are handled by three buckets (64, 128, 256) per dtype, with the padding columns zero-filled, so the
// build has 9 forward instances, not one per head size.
#include "llmk_device.cuh"

namespace llmk {

int attn_bucket(int E, int Ev) {
  const int d = E > Ev ? E : Ev;
  if (d <= 64) return 64;
  if (d <= 128) return 128;
  if (d <= 256) return 256;
  return 0;
}

// Tile sizes per (dtype, bucket). BM / 16 warps per block. Shared memory: Q (BM rows), K and V (BN rows each; one
// buffer of each, or two with p.stages = 2) of D + pad columns, and the P tile (BM x BN + pad). fp32 tiles are twice
// as large, hence smaller tiles; with one K/V buffer (SMEM) every config stays under the 163 KB a block may use on
// sm_80 (A100) and the 227 KB of sm_90; with two (SMEM_PIPELINED) every config fits sm_90 and all but fp32 at 256
// fit sm_80. Registers: the output accumulator is D/2 floats per thread, the score tile BN/2.
template <typename T, int D>
struct FwdTile;
template <typename T>
struct FwdTile<T, 64> { static constexpr int BM = 64, BN = 64; };
template <typename T>
struct FwdTile<T, 128> { static constexpr int BM = 64, BN = 64; };
template <typename T>
struct FwdTile<T, 256> { static constexpr int BM = 64, BN = 32; };
template <>
struct FwdTile<float, 128> { static constexpr int BM = 32, BN = 32; };
template <>
struct FwdTile<float, 256> { static constexpr int BM = 32, BN = 32; };

template <typename T, int D>
struct FwdLayout {
  static constexpr int BM = FwdTile<T, D>::BM, BN = FwdTile<T, D>::BN;
  static constexpr int PAD = Vec<T>::N;  // one 16-byte chunk per row: rows stay 16-byte aligned
  static constexpr int LD = D + PAD, LDP = BN + PAD;
  static constexpr int THREADS = BM / 16 * 32;
  static constexpr int SMEM = (BM * LD + 2 * BN * LD + BM * LDP) * static_cast<int>(sizeof(T));
  static constexpr int SMEM_PIPELINED = SMEM + 2 * BN * LD * static_cast<int>(sizeof(T));  // a second K and V
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdLayout<T, D>::THREADS, 1)
attn_fwd_kernel(const AttnFwdParams p) {
  using Lay = FwdLayout<T, D>;
  constexpr int BM = Lay::BM, BN = Lay::BN, LD = Lay::LD, LDP = Lay::LDP, THREADS = Lay::THREADS;
  constexpr int NT_S = BN / 8, NT_O = D / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // sQ, sP, then K/V buffer s (s < p.stages): K at sKV + 2 s BN LD, V right after it.
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sP = sQ + BM * LD;
  T* sKV = sP + BM * LDP;

  const AttnShape n = p.n;
  const int num_m_blocks = (n.L + BM - 1) / BM;
  const int64_t bid = blockIdx.x;
  const int mb = static_cast<int>(bid % num_m_blocks);
  const int h = static_cast<int>((bid / num_m_blocks) % n.Hq);
  const int b = static_cast<int>(bid / num_m_blocks / n.Hq);
  const int hk = h / (n.Hq / n.Hkv);  // GQA: query head h reads key/value head h // group
  const int m0 = mb * BM;
  const int warp = threadIdx.x >> 5;
  const int E16 = round_up(n.E, 16);

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* q_tile = q + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2];
  const T* k_head = k + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v_head = v + b * p.v_stride[0] + hk * p.v_stride[1];
  const int64_t mask_head = b * p.mask_stride[0] + h * p.mask_stride[1];
  const int64_t row_base = (static_cast<int64_t>(b) * n.Hq + h) * n.L;  // index of row 0 of this (b, h)
  const ScoreUnits units{p.natural};
  const bool stats = p.stats_ref != nullptr;
  const AttnRule& rule = p.rule;
  const float slope = rule_slope(rule, b, h);

  if (stats) {
    // Only tiles with a coarse lse need the pass; the others hand the lse on (the block's result is uniform, so the
    // whole block returns together). THREADS = 2 BM: one thread per row suffices.
    const int i = m0 + static_cast<int>(threadIdx.x);
    const bool mine = static_cast<int>(threadIdx.x) < BM && i < n.L;
    const float lse = mine ? p.stats_lse[row_base + i] : 0.f;
    if (!__syncthreads_or(mine && fabsf(lse) >= kCoarseLse && fabsf(lse) < INFINITY)) {
      if (mine) {
        p.stats_ref[row_base + i] = lse == -INFINITY ? -INFINITY : units.from_lse(lse);
        p.stats_inv_l[row_base + i] = 1.f;
      }
      return;
    }
  }

  uint64_t seed = 0, offset = 0;
  if (p.dropout_p > 0.f) {
    seed = static_cast<uint64_t>(p.rng[0]);
    offset = static_cast<uint64_t>(p.rng[1]);
  }

  // This lane's two rows: r = 0 -> row g, r = 1 -> row g + 8 of the warp's 16.
  int row_i[2];
  row_i[0] = m0 + warp * 16 + acc_row(0);
  row_i[1] = row_i[0] + 8;
  // A sink joins the denominator as one more weight: the running max starts at its logit and the sum at its
  // weight, 1 (lse then includes it; a row that sees no key keeps m = sink, l = 1: output 0, lse = sink).
  const bool has_sink = rule.sinks != nullptr;
  const float sink = has_sink ? units.from_lse(rule_sink(rule, h)) : -INFINITY;
  float m_run[2] = {sink, sink};
  float l_run[2] = {has_sink ? 1.f : 0.f, has_sink ? 1.f : 0.f};
  float o[NT_O][4];
#pragma unroll
  for (int nt = 0; nt < NT_O; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] = 0.f;

  // Only the key tiles that some row of this tile may see under causal / window (attn_key_range): the others are
  // all hidden and never loaded.
  int n_begin, n_end;
  attn_key_range(rule, n.S, m0, min(m0 + BM, n.L), BN, &n_begin, &n_end);
  const int tiles = n_begin < n_end ? (n_end - n_begin + BN - 1) / BN : 0;
  // Key tile `it` into K/V buffer `buf` (see pipeline_next: with two stages tile it + 1 loads during tile it).
  auto issue = [&](int it, int buf) {
    const int n0 = n_begin + it * BN;
    const int n_rows = min(BN, n.S - n0);
    T* sK = sKV + buf * 2 * BN * LD;
    load_tile_async<T, BN, D, THREADS>(sK, LD, k_head + n0 * p.k_stride[2], p.k_stride[2], p.k_stride[3], n_rows,
                                       n.E, p.k_vec);
    load_tile_async<T, BN, D, THREADS>(sK + BN * LD, LD, v_head + n0 * p.v_stride[2], p.v_stride[2], p.v_stride[3],
                                       n_rows, n.Ev, p.v_vec);
  };
  load_tile_async<T, BM, D, THREADS>(sQ, LD, q_tile, p.q_stride[2], p.q_stride[3], min(BM, n.L - m0), n.E,
                                     p.q_vec);
  if (tiles > 0) issue(0, 0);
  cp_async_commit();  // group 0: Q and the first K/V tile
  for (int it = 0; it < tiles; ++it) {
    __syncthreads();  // every warp is done with the previous K/V tiles: their buffer may be refilled
    pipeline_next(p.stages, it, tiles, issue);
    __syncthreads();  // this tile's K and V (and, first time, Q) are complete for every thread
    const int n0 = n_begin + it * BN;
    const T* sK = sKV + pipeline_buffer(p.stages, it) * 2 * BN * LD;
    const T* sV = sK + BN * LD;

    // S = Q K^T for the warp's 16 rows: A(r, d) = sQ[r][d], B(d, j) = sK[j][d].
    float s[NT_S][4];
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    WarpGemm<T, NT_S>::run(s, sQ + warp * 16 * LD, LD, 1, sK, 1, LD, E16);

    // Scores in ScoreUnits with every mask applied; out-of-range and masked positions become -inf.
    float tile_max[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row_i[e >> 1];
        const int j = n0 + nt * 8 + acc_col(e);
        float th;
        float t = rule_score(rule, p.score_scale, slope, s[nt][e], i, j, th);
        const bool visible = i < n.L && j < n.S && rule_visible(rule, i, j);
        if (visible && p.mask_kind != MASK_NONE) {
          t = apply_mask(t, mask_value(p.mask, p.mask_kind, mask_head + i * p.mask_stride[2] + j * p.mask_stride[3]));
        }
        s[nt][e] = visible ? t : -INFINITY;
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
      }
    }

    // Online softmax update. A row with nothing visible so far keeps m = -inf; m_use = 0 then, so that
    // exp2(-inf - m_use) = 0 instead of exp2(-inf + inf) = NaN.
    float m_use[2], alpha[2], row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = quad_max(tile_max[r]);
      m_use[r] = tile_max[r] == -INFINITY ? 0.f : tile_max[r];
      alpha[r] = units.weight(m_run[r], m_use[r]);
    }
    T* p_row = sP + (warp * 16) * LDP;
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const float pe = units.weight(s[nt][e], m_use[r]);
        row_sum[r] += pe;  // l counts every weight: dropout acts on the normalised weights
        float pd = pe;
        if (p.dropout_p > 0.f) {
          const int i = row_i[r];
          const int j = n0 + nt * 8 + acc_col(e);
          const bool keep = i < n.L && j < n.S &&
                            dropout_keep(seed, offset, static_cast<uint64_t>((row_base + i) * n.S + j), p.dropout_p);
          pd = keep ? pe : 0.f;
        }
        p_row[acc_row(e) * LDP + nt * 8 + acc_col(e)] = Num<T>::from_f(pd);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_run[r] = l_run[r] * alpha[r] + quad_sum(row_sum[r]);
      m_run[r] = tile_max[r];
    }
#pragma unroll
    for (int nt = 0; nt < NT_O; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[nt][e] *= alpha[e >> 1];
    __syncwarp();  // the warp's P rows are written (each warp reads only its own rows of sP)

    // O += P V: A(r, j) = sP[r][j], B(j, d) = sV[j][d]. The statistics mode needs only m and l.
    if (!stats) WarpGemm<T, NT_O>::run(o, p_row, LDP, 1, sV, LD, 1, BN);
  }
  cp_async_wait<0>();  // with no key tile, Q's copies are still in flight, and sO below reuses sQ

  if (stats) {
    // The same m and l as the forward computed (the same code on the same tiles), in score units.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if ((threadIdx.x & 3) == 0 && row_i[r] < n.L) {
        const bool empty = m_run[r] == -INFINITY;
        p.stats_ref[row_base + row_i[r]] = m_run[r];
        p.stats_inv_l[row_base + row_i[r]] = empty ? 0.f : 1.f / l_run[r];
      }
    }
    return;
  }

  // Normalise; rows with no visible key (m = -inf) give 0 and lse = -inf (with a sink: o = 0, l = 1, lse = sink). A NaN score leaves m finite and l NaN,
  // so NaN propagates to the output as in PyTorch's math path.
  float inv[2];
  bool empty[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    empty[r] = m_run[r] == -INFINITY;
    inv[r] = empty[r] ? 0.f : p.keep_scale / l_run[r];
    if ((threadIdx.x & 3) == 0 && row_i[r] < n.L) {
      p.lse[row_base + row_i[r]] = empty[r] ? -INFINITY : units.lse(m_run[r], l_run[r]);
    }
  }

  // Stage the output tile in shared memory (over Q, which every warp has finished with) for coalesced stores.
  __syncthreads();
  T* sO = sQ;
#pragma unroll
  for (int nt = 0; nt < NT_O; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1;
      sO[(warp * 16 + acc_row(e)) * LD + nt * 8 + acc_col(e)] = Num<T>::from_f(empty[r] ? 0.f : o[nt][e] * inv[r]);
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + (row_base + m0) * n.Ev;
  store_tile<T, BM, D, THREADS>(out, n.Ev, sO, LD, min(BM, n.L - m0), n.Ev, p.out_vec);
}

template <typename T, int D>
static cudaError_t launch_fwd(const AttnFwdParams& p, cudaStream_t stream) {
  using Lay = FwdLayout<T, D>;
  const int64_t blocks = static_cast<int64_t>((p.n.L + Lay::BM - 1) / Lay::BM) * p.n.Hq * p.n.B;
  return launch_tiles(attn_fwd_kernel<T, D>, blocks, Lay::THREADS, p.stages == 2 ? Lay::SMEM_PIPELINED : Lay::SMEM,
                      p, stream);
}

cudaError_t launch_attn_fwd(const AttnFwdParams& p, int dtype, cudaStream_t stream) {
  return with_dtype(dtype, cudaErrorInvalidValue, [&](auto t) {
    return with_bucket(p.n.E, p.n.Ev, cudaErrorInvalidValue,
                       [&](auto d) { return launch_fwd<decltype(t), decltype(d)::value>(p, stream); });
  });
}

template <typename T, int D>
static AttnConfig fwd_config() {
  using Lay = FwdLayout<T, D>;
  return AttnConfig{D, Lay::BM, Lay::BN, Lay::THREADS, Lay::SMEM, Lay::SMEM_PIPELINED};
}

AttnConfig attn_fwd_config(int dtype, int E, int Ev) {
  return with_dtype(dtype, AttnConfig{}, [&](auto t) {
    return with_bucket(E, Ev, AttnConfig{}, [&](auto d) { return fwd_config<decltype(t), decltype(d)::value>(); });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The keep pattern as a tensor (for tests and for users who want to see it): the same dropout_keep() calls, with
// the same element indices, as the attention kernels.

__global__ void dropout_mask_kernel(const DropoutMaskParams p) {
  const uint64_t seed = static_cast<uint64_t>(p.rng[0]), offset = static_cast<uint64_t>(p.rng[1]);
  const int64_t total = p.B * p.H * p.L * p.S;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.keep[idx] = dropout_keep(seed, offset, static_cast<uint64_t>(idx), p.dropout_p);
  }
}

cudaError_t launch_dropout_mask(const DropoutMaskParams& p, cudaStream_t stream) {
  const int64_t total = p.B * p.H * p.L * p.S;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + 255) / 256;
  dropout_mask_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace llmk
