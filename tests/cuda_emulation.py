"""Run the CUDA C++ kernels of llmkernels/csrc/ on the CPU, for checking them on machines without a GPU.

The real kernel sources are compiled by the host compiler after a few mechanical rewrites, and every CUDA thread
becomes an OS thread:
  __syncthreads / __syncwarp     -> barriers over the block's / the warp's threads (__syncthreads_or: a flag
                                    written between two block barriers, read, and cleared after a third)
  __shfl_xor_sync                -> an exchange through a per-warp buffer between two warp barriers
  mma.sync.m16n8k16 (inline PTX) -> a warp-collective product that rebuilds A (16x16) and B (16x8) from all
                                    lanes' fragments with the PTX ISA layout and computes D in fp32
  cp.async.cg 16 B / commit_group / wait_group N (inline PTX)
                                 -> per thread: a copy reads its source when issued and fills its destination with
                                    0xff (NaN) at once; commit closes a group; wait N writes the real bytes of all
                                    but the newest N committed groups. So a tile read before its wait (and the
                                    barrier after it) reads NaN, and so does a warp still reading a buffer that
                                    another thread has begun to refill; a thread that ends with copies in flight
                                    fails the launch
  kernel<<<grid, block, smem>>>  -> the blocks one after another, each with its threads; shared memory starts
                                    filled with 0xff bytes (NaN as fp16/bf16/fp32), so a read of an unwritten
                                    element shows up as NaN
  bindings.cpp                   -> the same host code (checks, parameter structs, launches), registered for CPU
                                    tensors in the namespace llmkernels_emu.
What this checks: indexing, tiling and masking, the online softmax, barriers placed where the data flow needs
them, the backward math, GQA, dropout's regeneration, the host-side parameters. What it cannot check: data races
that barriers would hide anyway, the hardware's MMA layout (the emulated layout is the one the kernels assume),
memory-model and timing issues, performance, whether copies really overlap the products. Blocks run one after
another, so it is for small shapes.
"""

from __future__ import annotations

import hashlib
import os
import re

from llmkernels import cuda_build

RUNTIME = r"""
#include <torch/extension.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {
struct Barrier {
  std::mutex m;
  std::condition_variable cv;
  int n, count = 0;
  long gen = 0;
  explicit Barrier(int n_) : n(n_) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m);
    const long g = gen;
    if (++count == n) { count = 0; ++gen; cv.notify_all(); }
    else cv.wait(lock, [&] { return gen != g; });
  }
};
struct Block {
  std::unique_ptr<Barrier> block;
  int or_flag = 0;
  std::vector<std::unique_ptr<Barrier>> warps;
  float shfl[32][32];
  uint32_t a[32][32][4], b[32][32][2];
};
inline Block* g_block = nullptr;
inline thread_local uint3 t_tid;
inline uint3 g_bid;
inline dim3 g_bdim, g_gdim;
alignas(16) inline unsigned char dyn_smem[256 * 1024];

inline void syncthreads() { g_block->block->wait(); }
inline int syncthreads_or(int pred) {
  syncthreads();  // every thread has read the flag of the previous call, and thread 0 has cleared it
  if (pred) g_block->or_flag = 1;
  syncthreads();
  const int r = g_block->or_flag;
  syncthreads();
  if (t_tid.x == 0) g_block->or_flag = 0;
  return r;
}
inline void syncwarp() { g_block->warps[t_tid.x / 32]->wait(); }
inline float shfl_xor(float v, int o) {
  const int w = t_tid.x / 32, l = t_tid.x % 32;
  g_block->shfl[w][l] = v;
  syncwarp();
  const float r = g_block->shfl[w][l ^ o];
  syncwarp();
  return r;
}
inline float f16_bits(uint32_t x) { return __half2float(__ushort_as_half(static_cast<unsigned short>(x))); }
inline float bf16_bits(uint32_t x) { return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(x))); }
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: fragments per the PTX ISA (groupID g = lane / 4,
// threadID_in_group t = lane % 4).
inline void mma(float* d, const uint32_t* a, const uint32_t* b, float (*cvt)(uint32_t)) {
  const int w = t_tid.x / 32, l = t_tid.x % 32;
  for (int i = 0; i < 4; ++i) g_block->a[w][l][i] = a[i];
  for (int i = 0; i < 2; ++i) g_block->b[w][l][i] = b[i];
  syncwarp();
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L >> 2, t = (L & 3) * 2;
    const uint32_t* fa = g_block->a[w][L];
    const uint32_t* fb = g_block->b[w][L];
    A[g][t] = cvt(fa[0] & 0xffff); A[g][t + 1] = cvt(fa[0] >> 16);
    A[g + 8][t] = cvt(fa[1] & 0xffff); A[g + 8][t + 1] = cvt(fa[1] >> 16);
    A[g][t + 8] = cvt(fa[2] & 0xffff); A[g][t + 9] = cvt(fa[2] >> 16);
    A[g + 8][t + 8] = cvt(fa[3] & 0xffff); A[g + 8][t + 9] = cvt(fa[3] >> 16);
    B[t][g] = cvt(fb[0] & 0xffff); B[t + 1][g] = cvt(fb[0] >> 16);
    B[t + 8][g] = cvt(fb[1] & 0xffff); B[t + 9][g] = cvt(fb[1] >> 16);
  }
  syncwarp();
  const int g = l >> 2, t = (l & 3) * 2;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {t, t + 1, t, t + 1};
  for (int e = 0; e < 4; ++e) {
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc = std::fma(A[rows[e]][k], B[k][cols[e]], acc);
    d[e] = acc;
  }
}
// cp.async: see the module docstring. Each CUDA thread is an OS thread, so the queues are thread-local.
struct PendingCopy {
  unsigned char* dst;
  unsigned char bytes[16];
};
inline thread_local std::vector<PendingCopy> t_uncommitted;
inline thread_local std::deque<std::vector<PendingCopy>> t_groups;
inline std::atomic<int> g_copies_left{0}, g_misaligned{0};  // checked after the block (a thread must not throw)
inline void cp_async_16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) ++g_misaligned;
  PendingCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  std::memcpy(c.bytes, src, 16);
  std::memset(dst, 0xff, 16);
  t_uncommitted.push_back(c);
}
inline void cp_async_commit() {
  t_groups.push_back(std::move(t_uncommitted));
  t_uncommitted.clear();
}
inline void cp_async_wait(int n) {
  while (static_cast<int>(t_groups.size()) > n) {
    for (const PendingCopy& c : t_groups.front()) std::memcpy(c.dst, c.bytes, 16);
    t_groups.pop_front();
  }
}
inline void cp_async_thread_end() {
  if (!t_uncommitted.empty() || !t_groups.empty()) ++g_copies_left;
  t_uncommitted.clear();
  t_groups.clear();
}
inline std::mutex atomic_mutex;
inline float atomic_add(float* p, float v) {
  std::lock_guard<std::mutex> lock(atomic_mutex);
  const float old = *p;
  *p = old + v;
  return old;
}
template <typename P>
void launch(void (*kernel)(P), unsigned grid, int threads, int smem, cudaStream_t, const P& p) {
  TORCH_CHECK(threads % 32 == 0 && threads <= 1024 && smem <= static_cast<int>(sizeof(dyn_smem)), "bad launch");
  g_gdim = dim3(grid);
  g_bdim = dim3(threads);
  g_copies_left = 0;
  g_misaligned = 0;
  for (unsigned bx = 0; bx < grid; ++bx) {
    Block blk;
    blk.block = std::make_unique<Barrier>(threads);
    for (int w = 0; w < threads / 32; ++w) blk.warps.push_back(std::make_unique<Barrier>(32));
    g_block = &blk;
    g_bid = uint3{bx, 0, 0};
    std::memset(dyn_smem, 0xff, sizeof(dyn_smem));
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        t_tid = uint3{static_cast<unsigned>(t), 0, 0};
        kernel(p);
        cp_async_thread_end();
      });
    }
    for (auto& th : ts) th.join();
    TORCH_CHECK(g_copies_left == 0, "emulated kernel: ", g_copies_left.load(), " threads of block ", bx,
                " ended with cp.async copies not waited for");
    TORCH_CHECK(g_misaligned == 0, "emulated kernel: ", g_misaligned.load(), " cp.async copies of block ", bx,
                " had an address that is not 16-byte aligned");
  }
}
inline int device_attr(cudaDeviceAttr a) {
  return a == cudaDevAttrComputeCapabilityMajor ? 9 : 227 * 1024;
}
}  // namespace emu

template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
inline float atomicAdd(float* p, float v) { return emu::atomic_add(p, v); }
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
#define LLMK_CP_ASYNC 1  // the cp.async path of llmk_device.cuh, its inline PTX rewritten to emu::cp_async_*

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define threadIdx emu::t_tid
#define blockIdx emu::g_bid
#define blockDim emu::g_bdim
#define gridDim emu::g_gdim
#define __syncthreads() emu::syncthreads()
#define __syncthreads_or(pred) emu::syncthreads_or(pred)
#define __syncwarp() emu::syncwarp()
#define __shfl_xor_sync(mask, v, o) emu::shfl_xor(v, o)
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaGetLastError() cudaSuccess
#define cudaDeviceGetAttribute(ptr, attr, dev) (*(ptr) = emu::device_attr(attr), cudaSuccess)
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() do {} while (0)
"""


def _device_header(text: str) -> str:
    def repl(m):
        asm = m.group(0)
        if "cp.async.cg.shared.global" in asm:
            return "emu::cp_async_16(dst, src);"
        if "cp.async.commit_group" in asm:
            return "emu::cp_async_commit();"
        if "cp.async.wait_group" in asm:
            return "emu::cp_async_wait(N);"
        if "mma.sync" not in asm:
            raise ValueError(f"the emulation does not know this inline PTX: {asm}")
        kind = "bf16" if ".bf16" in asm else "f16"
        return f"emu::mma(d, a, b, emu::{kind}_bits);"
    text = re.sub(r"asm volatile\(.*?\);", repl, text, flags=re.S)
    return _launches(text.replace("#pragma once", ""))


def _launches(text: str) -> str:
    """kernel<<<grid, threads, smem, stream>>>(p) -> emu::launch(kernel, grid, threads, smem, stream, p)."""
    return re.sub(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((\w+)\)", r"emu::launch(\1, \2, \3)", text)


def _kernels(text: str) -> str:
    text = text.replace('#include "llmk_device.cuh"', "")
    text = text.replace("extern __shared__ __align__(16) unsigned char smem_raw[];",
                        "unsigned char* smem_raw = emu::dyn_smem;")
    return _launches(text)


def _bindings(text: str) -> str:
    text = re.sub(r"#include <c10/cuda/\w+\.h>", "", text)
    text = text.replace("TORCH_LIBRARY(llmkernels_cuda, m)", "TORCH_LIBRARY(llmkernels_emu, m)")
    text = text.replace("TORCH_LIBRARY_IMPL(llmkernels_cuda, CUDA, m)", "TORCH_LIBRARY_IMPL(llmkernels_emu, CPU, m)")
    text = text.replace(".is_cuda()", ".is_cpu()")
    text = re.sub(r"const c10::cuda::CUDAGuard guard\([^;]*\);", "", text)
    return text.replace("c10::cuda::getCurrentCUDAStream()", "static_cast<cudaStream_t>(nullptr)")


def source() -> str:
    csrc = cuda_build.CSRC
    parts = [RUNTIME, '#include "llmk_params.h"', _device_header((csrc / "llmk_device.cuh").read_text())]
    for name in ("attention_fwd.cu", "attention_bwd.cu", "softmax.cu"):
        parts.append(_kernels((csrc / name).read_text()))
    parts.append(_bindings((csrc / "bindings.cpp").read_text()))
    return "\n".join(parts)


_loaded = None


def load():
    """Build (cached by source hash) and load the emulation; its ops are torch.ops.llmkernels_emu.*."""
    global _loaded
    if _loaded is not None:
        return _loaded
    home = cuda_build.prepare_environment()
    text = source()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    from llmkernels import cuda_ext
    build_dir = cuda_ext.cache_root() / f"emu-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    src = build_dir / "emulation.cpp"
    src.write_text(text)
    from torch.utils.cpp_extension import load as load_ext
    _loaded = load_ext(name=f"llmkernels_emu_{digest}", sources=[str(src)], build_directory=str(build_dir),
                       extra_cflags=["-O2", "-pthread", "-w"], extra_ldflags=["-pthread"],
                       extra_include_paths=[str(cuda_build.CSRC), os.path.join(home, "include")], with_cuda=False,
                       verbose=False)
    return _loaded
