// Attention backward, FlashAttention-2 structure: one block per (batch, key/value head, BN keys). The K and V
// tiles stay in shared memory; the block walks over every query head of its GQA group and every tile of BM query
// rows, recomputes P from the saved log-sum-exp (P = weight(S, lse), see ScoreUnits; with a float mask or ALiBi, rows
// whose float32 lse is too coarse to hold the row sum take their max and sum from the forward kernel's statistics
// mode), and
//   dV += Pd^T dO          (Pd: P with dropout applied and scaled by 1/(1-p))
//   dP  = (dO V^T) * keep / (1-p)
//   dS  = P * (dP - delta)   (delta = rowsum(dO * O) - grad_lse, from the delta kernel below)
//   dK += scale * dS^T Q,  dQ += scale * dS K  (dQ through fp32 atomics: other blocks own other keys)
// dK and dV accumulate in fp32 shared memory, each element owned by one thread (no races, no atomics), and the
// GQA sum over query heads happens in the same accumulators. The Q and dO tiles stream through two buffers with
// cp.async where shared memory allows (pipeline_next): the next pair loads during this one's products. When the
// float mask needs a gradient, dS is written out as dmask; every (row, key) pair of the block's keys is then visited
// so every element is written.
#include "llmk_device.cuh"

namespace llmk {

// BM = BN query rows / keys per tile, BN / 16 warps. Shared memory: K, V, Q, dO tiles (D + pad columns; one Q/dO
// buffer, or two with p.stages = 2), the P and dS tiles, and the fp32 dK, dV accumulators (BN x D each); with one
// Q/dO buffer (SMEM) every config stays under sm_80's 163 KB; with two (SMEM_PIPELINED) every config fits sm_90's
// 227 KB and all but fp16/bf16 at 256 fit sm_80.
template <typename T, int D>
struct BwdTile;
template <typename T>
struct BwdTile<T, 64> { static constexpr int BN = 64; };
template <typename T>
struct BwdTile<T, 128> { static constexpr int BN = 32; };
template <typename T>
struct BwdTile<T, 256> { static constexpr int BN = 32; };
template <>
struct BwdTile<float, 64> { static constexpr int BN = 32; };
template <>
struct BwdTile<float, 256> { static constexpr int BN = 16; };

template <typename T, int D>
struct BwdLayout {
  static constexpr int BN = BwdTile<T, D>::BN, BM = BN;
  static constexpr int PAD = Vec<T>::N;
  static constexpr int LD = D + PAD, LDP = BN + PAD;
  static constexpr int THREADS = BN / 16 * 32;
  static constexpr int SMEM = (2 * BN * LD + 2 * BM * LD + 2 * BM * LDP) * static_cast<int>(sizeof(T)) +
                              2 * BN * D * static_cast<int>(sizeof(float));
  static constexpr int SMEM_PIPELINED = SMEM + 2 * BM * LD * static_cast<int>(sizeof(T));  // a second Q and dO
};

// The output columns of the dV / dK / dQ products are done in chunks of CH columns to bound the registers.
constexpr int CH = 64;

// acc (BN keys x D, fp32 shared memory) += A^T B over the BM query rows of the tile, for the columns below ncols16:
// warp w owns keys 16 w .. + 16, A is BM x BN (leading dim LDP, read transposed), B is BM x D (leading dim LD).
// The dV (A = Pd, B = dO) and dK (A = dS, B = Q) accumulations.
template <typename T, int D, int BM, int LD, int LDP>
__device__ __forceinline__ void accumulate_key_grad(float* acc, const T* A, const T* B, int ncols16) {
  constexpr int NT_C = CH / 8;
  const int warp = threadIdx.x >> 5;
  for (int c0 = 0; c0 < ncols16 && c0 < D; c0 += CH) {
    float part[NT_C][4];
#pragma unroll
    for (int nt = 0; nt < NT_C; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[nt][e] = acc[(warp * 16 + acc_row(e)) * D + c0 + nt * 8 + acc_col(e)];
    WarpGemm<T, NT_C>::run(part, A + warp * 16, 1, LDP, B + c0, LD, 1, BM);
#pragma unroll
    for (int nt = 0; nt < NT_C; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[(warp * 16 + acc_row(e)) * D + c0 + nt * 8 + acc_col(e)] = part[nt][e];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(BwdLayout<T, D>::THREADS, 1)
attn_bwd_kernel(const AttnBwdParams p) {
  using Lay = BwdLayout<T, D>;
  constexpr int BM = Lay::BM, BN = Lay::BN, LD = Lay::LD, LDP = Lay::LDP, THREADS = Lay::THREADS;
  constexpr int NT_S = BN / 8, NT_C = CH / 8;
  static_assert(D % CH == 0, "the head-dim bucket must be a multiple of the column chunk");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* acc_dk = reinterpret_cast<float*>(smem_raw);  // BN x D
  float* acc_dv = acc_dk + BN * D;                      // BN x D
  T* sK = reinterpret_cast<T*>(acc_dv + BN * D);
  T* sV = sK + BN * LD;
  T* sP = sV + BN * LD;    // Pd (dropout applied), BM x BN
  T* sdS = sP + BM * LDP;  // dS, BM x BN
  T* sQdO = sdS + BM * LDP;  // Q/dO buffer s (s < p.stages): Q at sQdO + 2 s BM LD, dO right after it

  const AttnShape n = p.n;
  const int num_n_blocks = (n.S + BN - 1) / BN;
  const int64_t bid = blockIdx.x;
  const int nb = static_cast<int>(bid % num_n_blocks);
  const int hk = static_cast<int>((bid / num_n_blocks) % n.Hkv);
  const int b = static_cast<int>(bid / num_n_blocks / n.Hkv);
  const int group = n.Hq / n.Hkv;
  const int n0 = nb * BN;
  const int n_rows = min(BN, n.S - n0);
  const int warp = threadIdx.x >> 5;
  const int E16 = round_up(n.E, 16), Ev16 = round_up(n.Ev, 16);
  const ScoreUnits units{p.natural};
  const AttnRule& rule = p.rule;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);

  load_tile_async<T, BN, D, THREADS>(sK, LD, k + b * p.k_stride[0] + hk * p.k_stride[1] + n0 * p.k_stride[2],
                                     p.k_stride[2], p.k_stride[3], n_rows, n.E, p.k_vec);
  load_tile_async<T, BN, D, THREADS>(sV, LD, v + b * p.v_stride[0] + hk * p.v_stride[1] + n0 * p.v_stride[2],
                                     p.v_stride[2], p.v_stride[3], n_rows, n.Ev, p.v_vec);
  for (int idx = threadIdx.x; idx < 2 * BN * D; idx += THREADS) acc_dk[idx] = 0.f;  // acc_dv follows acc_dk

  uint64_t seed = 0, offset = 0;
  if (p.dropout_p > 0.f) {
    seed = static_cast<uint64_t>(p.rng[0]);
    offset = static_cast<uint64_t>(p.rng[1]);
  }
  // Only the query tiles with a row that may see some key of this block under causal / window
  // (attn_query_range), unless dS must be written for every element.
  int m_begin = 0, m_end = n.L;
  if (p.dmask == nullptr) attn_query_range(rule, n.L, n0, n0 + n_rows, BM, &m_begin, &m_end);
  // The block's work is `tiles` (query head, query tile) pairs, head-major: tile it is head hk * group + it /
  // per_head, rows m_begin + (it % per_head) BM .. + BM.
  const int per_head = m_begin < m_end ? (m_end - m_begin + BM - 1) / BM : 0;
  const int tiles = per_head * group;
  // Q and dO of tile `it` into buffer `buf` (see pipeline_next: with two stages tile it + 1 loads during tile it).
  auto issue = [&](int it, int buf) {
    const int h = hk * group + it / per_head, m0 = m_begin + (it % per_head) * BM;
    const int m_rows = min(BM, n.L - m0);
    T* sQ = sQdO + buf * 2 * BM * LD;
    load_tile_async<T, BM, D, THREADS>(sQ, LD, q + b * p.q_stride[0] + h * p.q_stride[1] + m0 * p.q_stride[2],
                                       p.q_stride[2], p.q_stride[3], m_rows, n.E, p.q_vec);
    load_tile_async<T, BM, D, THREADS>(sQ + BM * LD, LD,
                                       dout + b * p.dout_stride[0] + h * p.dout_stride[1] + m0 * p.dout_stride[2],
                                       p.dout_stride[2], p.dout_stride[3], m_rows, n.Ev, p.dout_vec);
  };
  if (tiles > 0) issue(0, 0);
  cp_async_commit();  // group 0: K, V and the first Q/dO tile

  for (int it = 0; it < tiles; ++it) {
    const int h = hk * group + it / per_head, m0 = m_begin + (it % per_head) * BM;
    const int64_t row_base = (static_cast<int64_t>(b) * n.Hq + h) * n.L;
    const int64_t mask_head = b * p.mask_stride[0] + h * p.mask_stride[1];
    const float* lse_head = p.lse + b * p.lse_stride[0] + h * p.lse_stride[1];
    const float slope = rule_slope(rule, b, h);
    {  // the tile's work (the scope the loop over query tiles had)
      __syncthreads();  // every warp is done with the previous Q, dO, P and dS tiles: that Q/dO buffer may refill
      pipeline_next(p.stages, it, tiles, issue);
      __syncthreads();  // this tile's Q and dO (and, first time, K and V) are complete for every thread
      const T* sQ = sQdO + pipeline_buffer(p.stages, it) * 2 * BM * LD;
      const T* sdO = sQ + BM * LD;

      // Warp w: query rows m0 + 16 w .. + 16 against all BN keys.
      float s[NT_S][4], dp[NT_S][4];
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
      WarpGemm<T, NT_S>::run(s, sQ + warp * 16 * LD, LD, 1, sK, 1, LD, E16);     // Q K^T
      WarpGemm<T, NT_S>::run(dp, sdO + warp * 16 * LD, LD, 1, sV, 1, LD, Ev16);  // dO V^T

      // P = weight(t, ref) * inv_l: ref is the lse in score units and inv_l = 1, or the row's max and 1 / sum.
      float ref[2], inv_l[2], delta[2];
      int row_i[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_i[r] = m0 + warp * 16 + acc_row(2 * r);
        const bool valid = row_i[r] < n.L;
        if (p.row_ref != nullptr) {
          ref[r] = valid ? p.row_ref[row_base + row_i[r]] : -INFINITY;
          inv_l[r] = valid ? p.row_inv_l[row_base + row_i[r]] : 0.f;
        } else {
          const float lse = valid ? lse_head[row_i[r] * p.lse_stride[2]] : -INFINITY;
          ref[r] = lse == -INFINITY ? -INFINITY : units.from_lse(lse);
          inv_l[r] = 1.f;
        }
        delta[r] = valid ? p.delta[row_base + row_i[r]] : 0.f;
      }
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const int i = row_i[r];
          const int j = n0 + nt * 8 + acc_col(e);
          const bool visible = i < n.L && j < n.S && rule_visible(rule, i, j);
          float th;
          float t = rule_score(rule, p.score_scale, slope, s[nt][e], i, j, th);
          if (visible && p.mask_kind != MASK_NONE) {
            t = apply_mask(t, mask_value(p.mask, p.mask_kind, mask_head + i * p.mask_stride[2] + j * p.mask_stride[3]));
          }
          // ref = -inf marks a row with nothing visible: P = 0 there (exp2(-inf + inf) would be NaN).
          const float pe = (visible && ref[r] != -INFINITY) ? units.weight(t, ref[r]) * inv_l[r] : 0.f;
          bool keep = true;
          if (p.dropout_p > 0.f && visible) {
            keep = dropout_keep(seed, offset, static_cast<uint64_t>((row_base + i) * n.S + j), p.dropout_p);
          }
          const float pd = keep ? pe * p.keep_scale : 0.f;
          const float dpe = keep ? dp[nt][e] * p.keep_scale : 0.f;
          const float ds = pe * (dpe - delta[r]);  // d loss / d (capped score + mask): the mask's gradient
          const int sr = warp * 16 + acc_row(e), sc = nt * 8 + acc_col(e);
          sP[sr * LDP + sc] = Num<T>::from_f(pd);
          // Through the softcap, d(c tanh(x / c)) / dx = 1 - tanh^2; dQ and dK take that gradient.
          sdS[sr * LDP + sc] = Num<T>::from_f(rule.softcap ? ds * (1.f - th * th) : ds);
          if (p.dmask != nullptr && i < n.L && j < n.S) p.dmask[(row_base + i) * n.S + j] = ds;
        }
      }
      __syncthreads();  // P and dS tiles complete: the products below read other warps' rows

      // Warp w owns keys n0 + 16 w .. + 16 for dV and dK.
      accumulate_key_grad<T, D, BM, LD, LDP>(acc_dv, sP, sdO, Ev16);
      accumulate_key_grad<T, D, BM, LD, LDP>(acc_dk, sdS, sQ, E16);
      // Warp w owns query rows m0 + 16 w .. + 16 for dQ: A(i, j) = sdS[i][j], B(j, d) = sK[j][d].
      for (int c0 = 0; c0 < E16 && c0 < D; c0 += CH) {
        float acc[NT_C][4];
#pragma unroll
        for (int nt = 0; nt < NT_C; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
        WarpGemm<T, NT_C>::run(acc, sdS + warp * 16 * LDP, LDP, 1, sK + c0, LD, 1, BN);
#pragma unroll
        for (int nt = 0; nt < NT_C; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = m0 + warp * 16 + acc_row(e);
            const int d = c0 + nt * 8 + acc_col(e);
            if (i < n.L && d < n.E) atomicAdd(p.dq_acc + (row_base + i) * n.E + d, acc[nt][e] * p.scale);
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // with no query tile, K's and V's copies are still in flight

  __syncthreads();
  // dK = scale * dS^T Q, dV = Pd^T dO: rows j < S of this block, contiguous (B, Hkv, S, E / Ev) outputs.
  T* dk = static_cast<T*>(p.dk) + ((static_cast<int64_t>(b) * n.Hkv + hk) * n.S + n0) * n.E;
  T* dv = static_cast<T*>(p.dv) + ((static_cast<int64_t>(b) * n.Hkv + hk) * n.S + n0) * n.Ev;
  for (int idx = threadIdx.x; idx < BN * D; idx += THREADS) {
    const int r = idx / D, c = idx % D;
    if (r >= n_rows) continue;
    if (c < n.E) dk[static_cast<int64_t>(r) * n.E + c] = Num<T>::from_f(acc_dk[idx] * p.scale);
    if (c < n.Ev) dv[static_cast<int64_t>(r) * n.Ev + c] = Num<T>::from_f(acc_dv[idx]);
  }
}

// delta[row] = sum_d dO[row, d] * O[row, d] - grad_lse[row]; one warp per (b, h, i) row.
template <typename T>
__global__ void attn_bwd_delta_kernel(const AttnDeltaParams p) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.L;
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
       row += warps_per_grid) {
    const int64_t i = row % p.L, h = (row / p.L) % p.H, b = row / p.L / p.H;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1] + i * p.dout_stride[2];
    const T* out = static_cast<const T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + i * p.out_stride[2];
    float acc = 0.f;
    for (int d = lane; d < p.Ev; d += 32) {
      acc += Num<T>::to_f(dout[d * p.dout_stride[3]]) * Num<T>::to_f(out[d * p.out_stride[3]]);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (p.grad_lse != nullptr) {
        acc -= p.grad_lse[b * p.grad_lse_stride[0] + h * p.grad_lse_stride[1] + i * p.grad_lse_stride[2]];
      }
      p.delta[row] = acc;
    }
  }
}

template <typename T, int D>
static cudaError_t launch_bwd(const AttnBwdParams& p, cudaStream_t stream) {
  using Lay = BwdLayout<T, D>;
  const int64_t blocks = static_cast<int64_t>((p.n.S + Lay::BN - 1) / Lay::BN) * p.n.Hkv * p.n.B;
  return launch_tiles(attn_bwd_kernel<T, D>, blocks, Lay::THREADS, p.stages == 2 ? Lay::SMEM_PIPELINED : Lay::SMEM,
                      p, stream);
}

cudaError_t launch_attn_bwd(const AttnBwdParams& p, int dtype, cudaStream_t stream) {
  return with_dtype(dtype, cudaErrorInvalidValue, [&](auto t) {
    return with_bucket(p.n.E, p.n.Ev, cudaErrorInvalidValue,
                       [&](auto d) { return launch_bwd<decltype(t), decltype(d)::value>(p, stream); });
  });
}

template <typename T>
static cudaError_t launch_delta(const AttnDeltaParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.L;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + 7) / 8;  // 8 warps per block
  attn_bwd_delta_kernel<T><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_attn_bwd_delta(const AttnDeltaParams& p, int dtype, cudaStream_t stream) {
  return with_dtype(dtype, cudaErrorInvalidValue, [&](auto t) { return launch_delta<decltype(t)>(p, stream); });
}

template <typename T, int D>
static AttnConfig bwd_config() {
  using Lay = BwdLayout<T, D>;
  return AttnConfig{D, Lay::BM, Lay::BN, Lay::THREADS, Lay::SMEM, Lay::SMEM_PIPELINED};
}

AttnConfig attn_bwd_config(int dtype, int E, int Ev) {
  return with_dtype(dtype, AttnConfig{}, [&](auto t) {
    return with_bucket(E, Ev, AttnConfig{}, [&](auto d) { return bwd_config<decltype(t), decltype(d)::value>(); });
  });
}

}  // namespace llmk
