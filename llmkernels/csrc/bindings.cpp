// Host side of the CUDA backend: op schemas (TORCH_LIBRARY llmkernels_cuda), argument checks, and the CUDA
// implementations that fill the parameter structs and launch the kernels of attention_fwd.cu, attention_bwd.cu and
// softmax.cu on the current stream. The ops write into outputs the caller allocates (llmkernels/cuda_ext.py uses
// llmkernels._alloc.new_output, so tests can poison them), hence the mutable "Tensor(a!)" arguments.
//
// Only c10/cuda headers are included (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may lack).
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include "llmk_params.h"

namespace {

using at::Tensor;
using c10::optional;

constexpr double kLog2e = 1.4426950408889634;

int dtype_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return llmk::DT_F16;
    case at::kBFloat16: return llmk::DT_BF16;
    case at::kFloat: return llmk::DT_F32;
    default:
      TORCH_CHECK(false, "llmkernels_cuda: ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return -1;
}

int mask_kind(const optional<Tensor>& mask) {
  if (!mask.has_value()) return llmk::MASK_NONE;
  switch (mask->scalar_type()) {
    case at::kBool: return llmk::MASK_BOOL;
    case at::kHalf: return llmk::MASK_F16;
    case at::kBFloat16: return llmk::MASK_BF16;
    case at::kFloat: return llmk::MASK_F32;
    case at::kDouble: return llmk::MASK_F64;
    default:
      TORCH_CHECK(false, "llmkernels_cuda: the mask must be bool or float16/bfloat16/float32/float64, got ",
                  mask->scalar_type());
  }
  return -1;
}

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "llmkernels_cuda: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "llmkernels_cuda: ", name, " is on ", t.device(), " but the inputs are on ",
              ref.device());
  TORCH_CHECK(t.layout() == at::kStrided, "llmkernels_cuda: ", name, " must be a dense (strided) tensor");
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "llmkernels_cuda: ", name, " must have shape ", expected, ", got ", t.sizes());
}

void check_output(const Tensor& t, const char* name, const Tensor& ref, at::IntArrayRef shape, at::ScalarType dtype) {
  check_cuda(t, name, ref);
  check_shape(t, name, shape);
  TORCH_CHECK(t.scalar_type() == dtype, "llmkernels_cuda: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "llmkernels_cuda: ", name, " must be contiguous");
}

template <int N>
void copy_strides(int64_t (&dst)[N], const Tensor& t) {
  for (int i = 0; i < N; ++i) dst[i] = t.stride(i);
}

// 16-byte accesses are allowed when the last dim is unit-stride and the pointer and every other stride keep each
// row start 16-byte aligned (a stride-0 broadcast dim qualifies).
bool vec_ok(const Tensor& t) {
  const int64_t v = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.stride(d) % v != 0) return false;
  }
  return true;
}

// Tensors with a last dim of size <= 1 may carry any stride there; the kernels multiply by it, so give them 1.
int64_t last_stride(const Tensor& t) { return t.size(-1) <= 1 ? 1 : t.stride(-1); }

// The strides of a 4-D input the kernels index along its last dim.
void input_strides(int64_t (&dst)[4], const Tensor& t) {
  copy_strides(dst, t);
  dst[3] = last_stride(t);
}

// The kernels' score units (ScoreUnits in llmk_device.cuh): natural with a float mask, so that it is really added;
// base 2 otherwise. Sets p.natural and p.score_scale.
template <typename P>
void set_score_units(P& p, int kind, double scale) {
  p.natural = kind != llmk::MASK_NONE && kind != llmk::MASK_BOOL;
  p.score_scale = static_cast<float>(p.natural ? scale : scale * kLog2e);
}

// Returns the shared memory a block may opt into on ref's device.
int check_device_and_smem(const Tensor& ref, int smem_bytes, const char* what) {
  int dev = ref.get_device();
  int major = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK(major >= 8, "llmkernels_cuda: ", what, " needs compute capability 8.0 or newer (mma.sync bf16/fp16)");
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(smem_bytes <= optin, "llmkernels_cuda: ", what, " needs ", smem_bytes,
              " bytes of shared memory per block; this GPU allows ", optin);
  return optin;
}

// The most buffers of streamed tiles the attention kernels may use: LLMKERNELS_CUDA_STAGES=1 turns the cp.async
// double buffering off (the tiles then load synchronously, one at a time: for comparing speed and results), unset
// or 2 lets every kernel use two buffers where they fit (llmk::attn_stages).
int max_stages() {
  const char* env = std::getenv("LLMKERNELS_CUDA_STAGES");
  if (env == nullptr || *env == '\0') return 2;
  const std::string value(env);
  TORCH_CHECK(value == "1" || value == "2", "llmkernels_cuda: LLMKERNELS_CUDA_STAGES must be 1 or 2, got '", value,
              "'");
  return value == "1" ? 1 : 2;
}

void check_int(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= INT32_MAX, "llmkernels_cuda: ", name, " = ", value, " exceeds 2^31 - 1");
}

struct AttnInputs {
  llmk::AttnShape n;
  int dtype;
  int mask_kind;
};

// The score rule's arguments as the ops receive them (contract.ScoreRule in canonical form).
struct RuleArgs {
  int64_t window_left, window_right;
  bool bottom_right;
  double softcap;
  const optional<Tensor>& alibi_slopes;
  const optional<Tensor>& sinks;
};

// Checks the rule against the inputs (the canonical form is validated in Python; this guards direct op calls).
void check_rule(const RuleArgs& r, const Tensor& q, const llmk::AttnShape& n, bool is_causal) {
  TORCH_CHECK(r.window_left >= -1 && r.window_left <= INT32_MAX, "llmkernels_cuda: window_left must be -1 or in [0, ",
              INT32_MAX, "], got ", r.window_left);
  TORCH_CHECK(r.window_right >= -1 && r.window_right <= INT32_MAX,
              "llmkernels_cuda: window_right must be -1 or in [0, ", INT32_MAX, "], got ", r.window_right);
  TORCH_CHECK(!(is_causal && r.window_right >= 0),
              "llmkernels_cuda: window_right must be -1 with is_causal (canonical form), got ", r.window_right);
  TORCH_CHECK(std::isfinite(r.softcap) && r.softcap >= 0.0, "llmkernels_cuda: softcap must be finite and >= 0, got ",
              r.softcap);
  // i + d - j and the window bounds are computed in 32 bits.
  check_int(static_cast<int64_t>(n.L) + n.S, "L + S");
  if (r.alibi_slopes.has_value()) {
    const Tensor& a = *r.alibi_slopes;
    check_cuda(a, "alibi_slopes", q);
    TORCH_CHECK(a.scalar_type() == at::kFloat, "llmkernels_cuda: alibi_slopes must be float32, got ", a.scalar_type());
    check_shape(a, "alibi_slopes", {n.B, n.Hq});
  }
  if (r.sinks.has_value()) {
    const Tensor& t = *r.sinks;
    check_cuda(t, "sinks", q);
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == q.scalar_type(),
                "llmkernels_cuda: sinks must be float32 or q's dtype ", q.scalar_type(), ", got ", t.scalar_type());
    check_shape(t, "sinks", {n.Hq});
    TORCH_CHECK(t.is_contiguous(), "llmkernels_cuda: sinks must be contiguous");
  }
}

// The kernels' AttnRule, in the score units already set in p (set_score_units).
template <typename P>
void set_rule(P& p, const RuleArgs& r, bool is_causal, double scale, bool with_sinks) {
  llmk::AttnRule& k = p.rule;
  const double unit = p.natural ? 1.0 : kLog2e;
  k.causal = is_causal;
  k.diag = r.bottom_right ? p.n.S - p.n.L : 0;
  k.window_left = static_cast<int>(r.window_left);
  k.window_right = static_cast<int>(r.window_right);
  k.softcap = r.softcap > 0.0;
  k.softcap_in = k.softcap ? static_cast<float>(scale / r.softcap) : 0.f;
  k.softcap_out = k.softcap ? static_cast<float>(r.softcap * unit) : 0.f;
  k.alibi = r.alibi_slopes.has_value() ? r.alibi_slopes->data_ptr<float>() : nullptr;
  if (r.alibi_slopes.has_value()) copy_strides(k.alibi_stride, *r.alibi_slopes);
  k.alibi_unit = static_cast<float>(unit);
  k.sinks = with_sinks && r.sinks.has_value() ? r.sinks->data_ptr() : nullptr;
  k.sinks_dtype = r.sinks.has_value() ? dtype_code(*r.sinks, "sinks") : llmk::DT_F32;
}

// Checks shared by the forward and the backward: q (B,Hq,L,E), k (B,Hkv,S,E), v (B,Hkv,S,Ev), mask (B,Hq,L,S).
AttnInputs check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& mask,
                                  double dropout_p, const optional<Tensor>& rng_state) {
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "llmkernels_cuda: q, k, v must be 4-D (B, H, L, E), got ", q.dim(), ", ", k.dim(), ", ", v.dim(),
              " dims");
  const int dtype = dtype_code(q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "llmkernels_cuda: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "llmkernels_cuda: q, k, v must have the same batch size");
  TORCH_CHECK(k.size(3) == E, "llmkernels_cuda: k must have head dim ", E, " (q's), got ", k.size(3));
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == S, "llmkernels_cuda: v must have shape (B, Hkv, S, Ev) = (", B, ", ",
              Hkv, ", ", S, ", Ev), got ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "llmkernels_cuda: q heads (", Hq, ") must be a multiple of k/v heads (", Hkv,
              ")");
  TORCH_CHECK(E >= 1 && E <= 256 && Ev >= 1 && Ev <= 256, "llmkernels_cuda: head dims must be in [1, 256], got E=",
              E, ", Ev=", Ev);
  check_int(B, "B");
  check_int(Hq, "Hq");
  check_int(L, "L");
  check_int(S, "S");
  check_int(B * Hq * L, "B * Hq * L");
  const int kind = mask_kind(mask);
  if (mask.has_value()) {
    check_cuda(*mask, "mask", q);
    TORCH_CHECK(mask->dim() == 4, "llmkernels_cuda: the mask must be 4-D (B, Hq, L, S), got ", mask->dim(), " dims");
    check_shape(*mask, "mask", {B, Hq, L, S});
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "llmkernels_cuda: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng_state.has_value(), "llmkernels_cuda: dropout_p > 0 needs rng_state ([seed, offset], int64)");
    check_cuda(*rng_state, "rng_state", q);
    TORCH_CHECK(rng_state->scalar_type() == at::kLong && rng_state->numel() == 2 && rng_state->is_contiguous(),
                "llmkernels_cuda: rng_state must be a contiguous int64 tensor [seed, offset]");
  }
  llmk::AttnShape n{static_cast<int>(B), static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(L),
                    static_cast<int>(S), static_cast<int>(E), static_cast<int>(Ev)};
  return AttnInputs{n, dtype, kind};
}

// The fields that the forward and backward parameters share: inputs, mask, score units, the rule (sinks only when
// with_sinks: the forward's denominator), dropout.
template <typename P>
void set_attention_inputs(P& p, const AttnInputs& in, const Tensor& q, const Tensor& k, const Tensor& v,
                          const optional<Tensor>& mask, double dropout_p, bool is_causal, double scale,
                          const optional<Tensor>& rng_state, const RuleArgs& rule, bool with_sinks) {
  p.n = in.n;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.mask = mask.has_value() ? mask->data_ptr() : nullptr;
  input_strides(p.q_stride, q);
  input_strides(p.k_stride, k);
  input_strides(p.v_stride, v);
  if (mask.has_value()) copy_strides(p.mask_stride, *mask);
  p.q_vec = vec_ok(q);
  p.k_vec = vec_ok(k);
  p.v_vec = vec_ok(v);
  p.mask_kind = in.mask_kind;
  set_score_units(p, in.mask_kind, scale);
  set_rule(p, rule, is_causal, scale, with_sinks);
  p.dropout_p = static_cast<float>(dropout_p);
  p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.rng = dropout_p > 0.0 ? rng_state->data_ptr<int64_t>() : nullptr;
}

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& mask,
                       double dropout_p, bool is_causal, double scale, const optional<Tensor>& rng_state,
                       int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                       const optional<Tensor>& alibi_slopes, const optional<Tensor>& sinks, const Tensor& out,
                       const Tensor& lse) {
  const AttnInputs in = check_attention_inputs(q, k, v, mask, dropout_p, rng_state);
  const llmk::AttnShape& n = in.n;
  const RuleArgs rule{window_left, window_right, bottom_right, softcap, alibi_slopes, sinks};
  check_rule(rule, q, n, is_causal);
  check_output(out, "out", q, {n.B, n.Hq, n.L, n.Ev}, q.scalar_type());
  check_output(lse, "lse", q, {n.B, n.Hq, n.L}, at::kFloat);
  if (static_cast<int64_t>(n.B) * n.Hq * n.L == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const llmk::AttnConfig cfg = llmk::attn_fwd_config(in.dtype, n.E, n.Ev);
  const int optin = check_device_and_smem(q, cfg.smem_bytes, "attention_forward");

  llmk::AttnFwdParams p{};
  set_attention_inputs(p, in, q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule, true);
  p.stages = llmk::attn_stages(cfg, optin, max_stages());
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_vec = vec_ok(out);
  C10_CUDA_CHECK(llmk::launch_attn_fwd(p, in.dtype, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void attention_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const optional<Tensor>& grad_lse, const optional<Tensor>& mask,
                        double dropout_p, bool is_causal, double scale, const optional<Tensor>& rng_state,
                        int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
                        const optional<Tensor>& alibi_slopes, const optional<Tensor>& sinks, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv, const optional<Tensor>& dmask) {
  const AttnInputs in = check_attention_inputs(q, k, v, mask, dropout_p, rng_state);
  const llmk::AttnShape& n = in.n;
  const RuleArgs rule{window_left, window_right, bottom_right, softcap, alibi_slopes, sinks};
  check_rule(rule, q, n, is_causal);
  check_cuda(grad_out, "grad_out", q);
  check_cuda(out, "out", q);
  check_cuda(lse, "lse", q);
  check_shape(grad_out, "grad_out", {n.B, n.Hq, n.L, n.Ev});
  check_shape(out, "out", {n.B, n.Hq, n.L, n.Ev});
  check_shape(lse, "lse", {n.B, n.Hq, n.L});
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "llmkernels_cuda: grad_out and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "llmkernels_cuda: lse must be float32, got ", lse.scalar_type());
  if (grad_lse.has_value()) {
    check_cuda(*grad_lse, "grad_lse", q);
    check_shape(*grad_lse, "grad_lse", {n.B, n.Hq, n.L});
    TORCH_CHECK(grad_lse->scalar_type() == at::kFloat, "llmkernels_cuda: grad_lse must be float32");
  }
  check_output(dq, "dq", q, q.sizes(), q.scalar_type());
  check_output(dk, "dk", q, k.sizes(), q.scalar_type());
  check_output(dv, "dv", q, v.sizes(), q.scalar_type());
  if (dmask.has_value()) {
    TORCH_CHECK(mask.has_value(), "llmkernels_cuda: dmask was given without a mask");
    check_output(*dmask, "dmask", q, {n.B, n.Hq, n.L, n.S}, at::kFloat);
  }
  const c10::cuda::CUDAGuard guard(q.device());
  if (static_cast<int64_t>(n.B) * n.Hq * n.L == 0 || n.S == 0) {
    // No (row, key) pair: every gradient is zero (empty outputs are left as they are).
    dq.zero_();
    dk.zero_();
    dv.zero_();
    if (dmask.has_value()) dmask->zero_();
    return;
  }
  const llmk::AttnConfig cfg = llmk::attn_bwd_config(in.dtype, n.E, n.Ev);
  const int optin = check_device_and_smem(q, cfg.smem_bytes, "attention_backward");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // delta = rowsum(dO * O) - grad_lse, and the fp32 dQ accumulator (scratch, not outputs).
  Tensor delta = at::empty({n.B, n.Hq, n.L}, q.options().dtype(at::kFloat));
  Tensor dq_acc = at::zeros({n.B, n.Hq, n.L, n.E}, q.options().dtype(at::kFloat));
  llmk::AttnDeltaParams dp{};
  dp.B = n.B;
  dp.H = n.Hq;
  dp.L = n.L;
  dp.Ev = n.Ev;
  dp.dout = grad_out.data_ptr();
  dp.out = out.data_ptr();
  dp.grad_lse = grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr;
  dp.delta = delta.data_ptr<float>();
  copy_strides(dp.dout_stride, grad_out);
  copy_strides(dp.out_stride, out);
  if (grad_lse.has_value()) copy_strides(dp.grad_lse_stride, *grad_lse);
  C10_CUDA_CHECK(llmk::launch_attn_bwd_delta(dp, in.dtype, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // With a float mask or ALiBi (rows far from every key: lse ~ -slope * distance), rows whose lse is too coarse to
  // hold their sum (kCoarseLse) get their max and 1 / sum from the forward kernel's statistics mode (the same m and l
  // the forward computed; no output, no dropout: l counts every weight). Tiles without such a row only copy the lse,
  // so the pass costs little where it is not needed.
  Tensor row_ref, row_inv_l;
  if ((in.mask_kind != llmk::MASK_NONE && in.mask_kind != llmk::MASK_BOOL) || alibi_slopes.has_value()) {
    row_ref = at::empty({n.B, n.Hq, n.L}, q.options().dtype(at::kFloat));
    row_inv_l = at::empty({n.B, n.Hq, n.L}, q.options().dtype(at::kFloat));
    const Tensor lse_c = lse.contiguous();
    llmk::AttnFwdParams sp{};
    // The forward's m and l: with the sink's term in them (the statistics must be the forward's).
    set_attention_inputs(sp, in, q, k, v, mask, 0.0, is_causal, scale, rng_state, rule, true);
    sp.stats_lse = lse_c.data_ptr<float>();
    sp.stats_ref = row_ref.data_ptr<float>();
    sp.stats_inv_l = row_inv_l.data_ptr<float>();
    const llmk::AttnConfig stats_cfg = llmk::attn_fwd_config(in.dtype, n.E, n.Ev);
    check_device_and_smem(q, stats_cfg.smem_bytes, "attention_backward");
    sp.stages = llmk::attn_stages(stats_cfg, optin, max_stages());
    C10_CUDA_CHECK(llmk::launch_attn_fwd(sp, in.dtype, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  llmk::AttnBwdParams p{};
  // No sinks here: P = exp(s - lse) is already right, the lse includes the sink.
  set_attention_inputs(p, in, q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule, false);
  p.dout = grad_out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq_acc = dq_acc.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dmask = dmask.has_value() ? dmask->data_ptr<float>() : nullptr;
  p.row_ref = row_ref.defined() ? row_ref.data_ptr<float>() : nullptr;
  p.row_inv_l = row_inv_l.defined() ? row_inv_l.data_ptr<float>() : nullptr;
  input_strides(p.dout_stride, grad_out);
  copy_strides(p.lse_stride, lse);
  p.dout_vec = vec_ok(grad_out);
  p.scale = static_cast<float>(scale);
  p.stages = llmk::attn_stages(cfg, optin, max_stages());
  C10_CUDA_CHECK(llmk::launch_attn_bwd(p, in.dtype, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dq.copy_(dq_acc);  // fp32 -> q's dtype
}

void dropout_keep_mask(const Tensor& rng_state, double dropout_p, const Tensor& keep) {
  TORCH_CHECK(keep.is_cuda() && keep.scalar_type() == at::kBool && keep.dim() == 4 && keep.is_contiguous(),
              "llmkernels_cuda: keep must be a contiguous 4-D bool CUDA tensor (B, H, L, S)");
  check_cuda(rng_state, "rng_state", keep);
  TORCH_CHECK(rng_state.scalar_type() == at::kLong && rng_state.numel() == 2 && rng_state.is_contiguous(),
              "llmkernels_cuda: rng_state must be a contiguous int64 tensor [seed, offset]");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "llmkernels_cuda: dropout_p must be in [0, 1), got ", dropout_p);
  const c10::cuda::CUDAGuard guard(keep.device());
  llmk::DropoutMaskParams p{keep.size(0), keep.size(1), keep.size(2), keep.size(3), rng_state.data_ptr<int64_t>(),
                            static_cast<float>(dropout_p), keep.data_ptr<bool>()};
  C10_CUDA_CHECK(llmk::launch_dropout_mask(p, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The (A, B, M, N) shape of a softmax launch.
template <typename P>
void set_rows(P& p, const Tensor& t) {
  p.A = t.size(0);
  p.B = t.size(1);
  p.M = t.size(2);
  p.N = t.size(3);
}

void masked_softmax_forward(const Tensor& x, const optional<Tensor>& mask, double scale, bool is_causal,
                            const Tensor& y) {
  check_cuda(x, "x", x);
  TORCH_CHECK(x.dim() == 4, "llmkernels_cuda: x must be 4-D (A, B, M, N), got ", x.dim(), " dims");
  const int dtype = dtype_code(x, "x");
  const int kind = mask_kind(mask);
  if (mask.has_value()) {
    check_cuda(*mask, "mask", x);
    check_shape(*mask, "mask", x.sizes());
  }
  check_output(y, "y", x, x.sizes(), x.scalar_type());
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  llmk::SoftmaxFwdParams p{};
  set_rows(p, x);
  p.x = x.data_ptr();
  p.mask = mask.has_value() ? mask->data_ptr() : nullptr;
  p.y = y.data_ptr();
  input_strides(p.x_stride, x);
  if (mask.has_value()) copy_strides(p.mask_stride, *mask);
  p.x_vec = vec_ok(x);
  p.y_vec = vec_ok(y);
  p.mask_kind = kind;
  p.causal = is_causal;
  set_score_units(p, kind, scale);
  C10_CUDA_CHECK(llmk::launch_softmax_fwd(p, dtype, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_softmax_backward(const Tensor& grad_y, const Tensor& y, double scale, const Tensor& dx) {
  check_cuda(y, "y", y);
  check_cuda(grad_y, "grad_y", y);
  TORCH_CHECK(y.dim() == 4, "llmkernels_cuda: y must be 4-D (A, B, M, N), got ", y.dim(), " dims");
  const int dtype = dtype_code(y, "y");
  check_shape(grad_y, "grad_y", y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == y.scalar_type(), "llmkernels_cuda: grad_y must have y's dtype ",
              y.scalar_type(), ", got ", grad_y.scalar_type());
  check_output(dx, "dx", y, y.sizes(), y.scalar_type());
  if (y.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  llmk::SoftmaxBwdParams p{};
  set_rows(p, y);
  p.dy = grad_y.data_ptr();
  p.y = y.data_ptr();
  p.dx = dx.data_ptr();
  input_strides(p.dy_stride, grad_y);
  input_strides(p.y_stride, y);
  p.dy_vec = vec_ok(grad_y);
  p.y_vec = vec_ok(y);
  p.dx_vec = vec_ok(dx);
  p.scale = static_cast<float>(scale);
  C10_CUDA_CHECK(llmk::launch_softmax_bwd(p, dtype, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tile configuration of the attention kernels, for cuda_ext.attention_reasons (shared memory against the device's
// limit) and the kernel report. dtype: 0 fp16, 1 bf16, 2 fp32.
py::dict attention_config(int64_t dtype, int64_t E, int64_t Ev, bool backward) {
  const llmk::AttnConfig c = backward ? llmk::attn_bwd_config(static_cast<int>(dtype), static_cast<int>(E),
                                                              static_cast<int>(Ev))
                                      : llmk::attn_fwd_config(static_cast<int>(dtype), static_cast<int>(E),
                                                              static_cast<int>(Ev));
  py::dict d;
  d["head_dim_bucket"] = c.D;
  d["block_m"] = c.BM;
  d["block_n"] = c.BN;
  d["threads"] = c.threads;
  d["smem_bytes"] = c.smem_bytes;
  d["smem_bytes_pipelined"] = c.smem_bytes_pipelined;
  return d;
}

// The block ranges the attention kernels visit (attn_key_range / attn_query_range), for their unit tests.
llmk::AttnRule range_rule(bool causal, int64_t diag, int64_t window_left, int64_t window_right) {
  llmk::AttnRule r{};
  r.causal = causal;
  r.diag = static_cast<int>(diag);
  r.window_left = static_cast<int>(window_left);
  r.window_right = static_cast<int>(window_right);
  return r;
}

std::pair<int, int> key_range(bool causal, int64_t diag, int64_t window_left, int64_t window_right, int64_t S,
                              int64_t m0, int64_t m1, int64_t BN) {
  int begin = 0, end = 0;
  llmk::attn_key_range(range_rule(causal, diag, window_left, window_right), static_cast<int>(S), static_cast<int>(m0),
                       static_cast<int>(m1), static_cast<int>(BN), &begin, &end);
  return {begin, end};
}

std::pair<int, int> query_range(bool causal, int64_t diag, int64_t window_left, int64_t window_right, int64_t L,
                                int64_t n0, int64_t n1, int64_t BM) {
  int begin = 0, end = 0;
  llmk::attn_query_range(range_rule(causal, diag, window_left, window_right), static_cast<int>(L),
                         static_cast<int>(n0), static_cast<int>(n1), static_cast<int>(BM), &begin, &end);
  return {begin, end};
}

}  // namespace

TORCH_LIBRARY(llmkernels_cuda, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, float dropout_p, bool is_causal, float scale, "
      "Tensor? rng_state, int window_left, int window_right, bool bottom_right, float softcap, "
      "Tensor? alibi_slopes, Tensor? sinks, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
      "Tensor? mask, float dropout_p, bool is_causal, float scale, Tensor? rng_state, int window_left, "
      "int window_right, bool bottom_right, float softcap, Tensor? alibi_slopes, Tensor? sinks, Tensor(a!) dq, "
      "Tensor(b!) dk, Tensor(c!) dv, Tensor(d!)? dmask) -> ()");
  m.def("masked_softmax_forward(Tensor x, Tensor? mask, float scale, bool is_causal, Tensor(a!) y) -> ()");
  m.def("masked_softmax_backward(Tensor grad_y, Tensor y, float scale, Tensor(a!) dx) -> ()");
  m.def("dropout_keep_mask(Tensor rng_state, float dropout_p, Tensor(a!) keep) -> ()");
}

TORCH_LIBRARY_IMPL(llmkernels_cuda, CUDA, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
  m.impl("masked_softmax_forward", &masked_softmax_forward);
  m.impl("masked_softmax_backward", &masked_softmax_backward);
  m.impl("dropout_keep_mask", &dropout_keep_mask);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmkernels CUDA C++ kernels; the ops are in torch.ops.llmkernels_cuda";
  m.def("attention_config", &attention_config, "tile sizes and shared memory of an attention kernel instance",
        py::arg("dtype"), py::arg("E"), py::arg("Ev"), py::arg("backward"));
  m.def("attention_key_range", &key_range,
        "the keys [begin, end) the forward visits for query rows [m0, m1) (begin a multiple of BN)",
        py::arg("causal"), py::arg("diag"), py::arg("window_left"), py::arg("window_right"), py::arg("S"),
        py::arg("m0"), py::arg("m1"), py::arg("BN"));
  m.def("attention_query_range", &query_range,
        "the query rows [begin, end) the dK/dV pass visits for keys [n0, n1) (begin a multiple of BM)",
        py::arg("causal"), py::arg("diag"), py::arg("window_left"), py::arg("window_right"), py::arg("L"),
        py::arg("n0"), py::arg("n1"), py::arg("BM"));
  m.def("softmax_variant", &llmk::softmax_variant, "which softmax kernel a row length uses", py::arg("N"));
  m.def("softmax_variant_name", &llmk::softmax_variant_name, py::arg("variant"));
}
