// Flash attention forward on tensor cores (mma.sync m16n8k16 + ldmatrix, sm_80+), FlashAttention-2
// style: one thread block = 64 query rows of one (batch, head) at a time (it strides over the
// sequence's query blocks when the grid is smaller), 4 warps of 16 rows each; it walks the key
// blocks of 64 keys that its rows can see (causal / sliding-window band skipping), keeps the running
// max and sum of every row (online softmax) and the output accumulator in registers, and writes out
// and lse at the end.
//
// Included only by the per-(dtype, head dim) translation units flash_fwd_hdim*_*.cu, each of which
// instantiates launch_flash_fwd<T, D> once, so the builds of the instantiations run in parallel.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "attention/flash_fwd.h"
#include "attention/flash_fwd_launch.h"
#include "common/device.cuh"
#include "common/launch.cuh"
#include "common/mma.cuh"

namespace gptkernels {
namespace flash {

constexpr int kBlockM = 64;  // query rows per thread block
constexpr int kBlockN = 64;  // keys per iteration
constexpr int kWarps = 4;    // warp w owns query rows 16w .. 16w+15 of the block
constexpr int kThreads = kWarps * 32;

// Shared memory: Q (kBlockM rows), K and V (kBlockN rows each), rows of D elements padded to D + 8.
// The pad makes consecutive rows start 16 bytes apart modulo 128 (D + 8 is an odd multiple of 8
// when D % 16 == 0), so the 8 row addresses of one ldmatrix hit 8 different bank groups.
template <int D>
struct Smem {
  static constexpr int kStride = D + 8;  // elements between consecutive rows
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kBlockM * kStride;
  static constexpr int kV = kK + kBlockN * kStride;
  static constexpr int kElems = kV + kBlockN * kStride;
};

// Copies a ROWS x D tile into shared memory (row stride Smem<D>::kStride). Row r comes from
// row_ptr(r), a pointer to its D contiguous elements, or nullptr when the row does not exist (past
// the sequence, or a masked bad index): those rows are zero-filled, so that a masked key's V row
// is 0, never stale data (0 * NaN would poison the output). The work is split in 16-byte chunks
// (8 elements) over the whole thread block; the copies are cp.async: call cp_async_commit() after.
template <typename T, int D, int ROWS, typename RowPtr>
__device__ __forceinline__ void load_tile(T* smem, const RowPtr& row_ptr) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kIters = (ROWS * kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int c = threadIdx.x + it * kThreads;  // chunk index in the tile
    if (c >= ROWS * kChunks) break;
    const int r = c / kChunks;   // tile row
    const int ch = c % kChunks;  // chunk within the row: elements 8ch .. 8ch+7
    T* dst = smem + r * Smem<D>::kStride + ch * 8;
    const T* src = row_ptr(r);
    if (src != nullptr) {
      cp_async_16(dst, src + ch * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) flash_fwd_kernel(const FlashFwdParams p) {
  static_assert(D % 16 == 0, "head dim must be a multiple of 16 (mma k-steps of 16)");
  using S = Smem<D>;
  constexpr int kKSteps = D / 16;        // k-steps of S = Q K^T (reduction over the head dim)
  constexpr int kNTiles = kBlockN / 8;   // n8 tiles of S (over the keys of the block)
  constexpr int kDTiles = D / 8;         // n8 tiles of O (over the head dim)
  constexpr int kPSteps = kBlockN / 16;  // k-steps of O += P V (reduction over the keys)

  T* smem = reinterpret_cast<T*>(dynamic_smem());
  T* sQ = smem + S::kQ;
  T* sK = smem + S::kK;
  T* sV = smem + S::kV;

  const int h = blockIdx.y;  // query head
  const int b = blockIdx.z;  // sequence
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // mma groupID: this thread's rows are g and g + 8 of its warp's 16
  const int t = lane % 4;  // mma threadID_in_group: its columns are 2t, 2t+1 of every n8 tile

  // ---- this sequence's rows ---------------------------------------------------------------------
  // Bounds read from cu_seqlens / seqlens_k are clamped to the tensors' extents (Tq, Tk, or the
  // block table's capacity), as the Triton kernels and the torch backend clamp them: unchecked bad
  // values give a wrong answer (GPTKERNELS_DEBUG=1 refuses them), never an out-of-bounds access.
  int q_start = 0, seqlen_q = p.seqlen_q;  // query row i of the sequence is row q_start + i of q
  if (p.cu_seqlens_q != nullptr) {
    q_start = min(max(p.cu_seqlens_q[b], 0), p.total_q);
    seqlen_q = min(max(p.cu_seqlens_q[b + 1], q_start), p.total_q) - q_start;
  }
  int k_start = 0, seqlen_k = p.seqlen_k;  // key j of the sequence is row k_start + j of k (not paged)
  if (p.block_table != nullptr) {
    seqlen_k = min(max(p.seqlens_k[b], 0), p.max_blocks_per_seq * p.block_size);
  } else if (p.cu_seqlens_k != nullptr) {
    k_start = min(max(p.cu_seqlens_k[b], 0), p.total_k);
    seqlen_k = min(max(p.cu_seqlens_k[b + 1], k_start), p.total_k) - k_start;
  }

  const int hk = h / (p.num_heads_q / p.num_heads_kv);        // GQA: the kv head of query head h
  const int shift = p.bottom_right ? seqlen_k - seqlen_q : 0;  // query row i sits at position i + shift

  const T* q_base = static_cast<const T*>(p.q) + (int64_t)b * p.q_batch_stride + (int64_t)h * p.q_head_stride;
  const T* k_base = static_cast<const T*>(p.k) + (int64_t)hk * p.k_head_stride;
  const T* v_base = static_cast<const T*>(p.v) + (int64_t)hk * p.v_head_stride;

  // Key j of this sequence in k (or v), if it exists: paged through the block table, else a row.
  auto kv_row = [&](int j, const T* base, int64_t batch_stride, int64_t row_stride) -> const T* {
    if (j >= seqlen_k) return nullptr;
    if (p.block_table != nullptr) {
      const int blk = p.block_table[(int64_t)b * p.block_table_batch_stride + j / p.block_size];
      if (blk < 0 || blk >= p.num_cache_blocks) return nullptr;  // bad table entry: masked, never read
      return base + (int64_t)blk * batch_stride + (int64_t)(j % p.block_size) * row_stride;
    }
    return base + (int64_t)b * batch_stride + (int64_t)(k_start + j) * row_stride;  // < Tk: clamped above
  };

  // Query blocks m_block of this sequence: the grid is sized from max_seqlen_q, which may understate
  // the longest sequence, so each thread block strides over them (every row is computed whatever
  // max_seqlen_q says). Under causal masking the last query blocks see the most keys: the first
  // thread blocks start with them.
  for (int m_block = gridDim.x - 1 - blockIdx.x; (int64_t)m_block * kBlockM < seqlen_q; m_block += gridDim.x) {
    const int m0 = m_block * kBlockM;  // first query row of this block

    // Tile row r of the Q tile: query row m0 + r, if it exists.
    auto q_row = [&](int r) -> const T* {
      const int i = m0 + r;
      if (i >= seqlen_q) return nullptr;
      return q_base + (int64_t)(q_start + i) * p.q_row_stride;  // < Tq: clamped above
    };

    // ---- the key blocks some row of this block can see (band skipping) ---------------------------
    int n_lo = 0, n_hi = seqlen_k;  // keys [n_lo, n_hi)
    if (p.causal) {
      const int last_row = min(m0 + kBlockM, seqlen_q) - 1;
      n_hi = min(n_hi, last_row + shift + 1);  // row i sees keys j <= i + shift
      if (p.window > 0) n_lo = max(0, m0 + shift - p.window + 1);  // row m0 sees keys j > m0 + shift - W
    }
    const int nb_lo = n_lo / kBlockN;
    const int nb_hi = n_hi > n_lo ? ceil_div(n_hi, kBlockN) : nb_lo;  // no block: every row sees no key

    // ---- prologue: Q and the first K tile in flight -------------------------------------------------
    load_tile<T, D, kBlockM>(sQ, q_row);
    if (nb_lo < nb_hi) {
      load_tile<T, D, kBlockN>(sK, [&](int r) {
        return kv_row(nb_lo * kBlockN + r, k_base, p.k_batch_stride, p.k_row_stride);
      });
    }
    cp_async_commit();

    float acc[kDTiles][4];  // O accumulator, C layout per n8 tile of the head dim
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[dt][e] = 0.f;
    }
    // Rows g (index 0) and g + 8 (index 1): running max of the scaled scores in log2 units (the same
    // in the 4 threads of the row), and this thread's part of the running sum of exp2(score - max).
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};
    uint32_t qf[kKSteps][4];  // Q fragments (A operand) of this warp's 16 rows, loaded once

    for (int nb = nb_lo; nb < nb_hi; ++nb) {
      cp_async_wait_all();
      __syncthreads();  // K tile nb (and Q) visible to all; every warp is done with V tile nb - 1

      if (nb == nb_lo) {
        // A operand, k-step ks: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7),
        // (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) of the warp's 16 x 16 block: lane l gives
        // the address of row l % 16, column 8 * (l / 16).
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          ldmatrix_x4(qf[ks], sQ + (warp * 16 + lane % 16) * S::kStride + ks * 16 + (lane / 16) * 8);
        }
      }

      // V tile nb streams in while S = Q K^T is computed.
      load_tile<T, D, kBlockN>(sV, [&](int r) {
        return kv_row(nb * kBlockN + r, v_base, p.v_batch_stride, p.v_row_stride);
      });
      cp_async_commit();

      // ---- S = Q K^T: 16 rows x 64 keys per warp ----
      float s[kNTiles][4];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
      }
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          // B operand of key tiles 2np and 2np+1 (keys 16np .. 16np+15) at k-step ks. B[k][n] =
          // K[key n][dim k], and sK is [key][dim], so no transpose: matrices (keys 0-7, dims 0-7) = b0
          // and (keys 0-7, dims 8-15) = b1 of tile 2np, then the same for keys 8-15 (tile 2np+1).
          // Lane l gives row 16np + l % 8 + 8 * (l / 16), column 16ks + 8 * ((l / 8) % 2).
          uint32_t kb[4];
          ldmatrix_x4(kb, sK + (np * 16 + lane % 8 + (lane / 16) * 8) * S::kStride + ks * 16 + ((lane / 8) % 2) * 8);
          mma_16816<T>(s[2 * np], qf[ks], kb[0], kb[1]);
          mma_16816<T>(s[2 * np + 1], qf[ks], kb[2], kb[3]);
        }
      }

      // ---- scale to log2 units and mask: s[nt][e] is row g + 8 * (e / 2), key 8nt + 2t + e % 2 ----
      const int key0 = nb * kBlockN;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        // The keys that exist: inside the sequence and, when paged, behind a table entry inside the
        // cache. A masked entry's K row was zero-filled, which alone would still give it the score
        // 0: it must not be seen (the Triton kernels and the torch backend skip it too).
        bool key_ok[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          key_ok[c] = kv_row(key0 + nt * 8 + 2 * t + c, k_base, p.k_batch_stride, p.k_row_stride) != nullptr;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = m0 + warp * 16 + g + (e / 2) * 8;  // query row within the sequence
          const int j = key0 + nt * 8 + 2 * t + (e % 2);   // key within the sequence
          bool visible = key_ok[e % 2];
          if (p.causal) {
            const int pos = i + shift;
            visible = visible && j <= pos && (p.window == 0 || j > pos - p.window);
          }
          // Mask after scaling: a negative softmax_scale must not turn -inf into +inf.
          s[nt][e] = visible ? s[nt][e] * p.scale_log2 : -INFINITY;
        }
      }

      // ---- online softmax: rescale the accumulators to the new row max, P = exp2(S - max) ----
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = group_max<4>(mx);  // the 4 threads of a quad hold the same row
        const float m_new = fmaxf(row_max[r], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: keep exp2 finite
        const float corr = exp2f(row_max[r] - m_use);          // 0 while row_max is -inf
        row_max[r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            const float pv = exp2f(s[nt][e] - m_use);  // masked: exp2(-inf) = 0
            s[nt][e] = pv;
            sum += pv;
          }
        }
        row_sum[r] = row_sum[r] * corr + sum;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          acc[dt][2 * r] *= corr;
          acc[dt][2 * r + 1] *= corr;
        }
      }

      cp_async_wait_all();
      __syncthreads();  // V tile nb visible to all; every warp is done reading K tile nb
      // The next K tile streams in while O += P V is computed.
      if (nb + 1 < nb_hi) {
        load_tile<T, D, kBlockN>(sK, [&](int r) {
          return kv_row((nb + 1) * kBlockN + r, k_base, p.k_batch_stride, p.k_row_stride);
        });
      }
      cp_async_commit();

      // ---- O += P V ----
#pragma unroll
      for (int kk = 0; kk < kPSteps; ++kk) {
        // A operand (P, rows x keys 16kk .. 16kk+15) straight from the S accumulators: the C layout of
        // key tiles 2kk and 2kk+1 is the A layout of this k-step (a0/a1 from tile 2kk, a2/a3 from 2kk+1).
        uint32_t pa[4];
        pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);          // row g,     keys 16kk + 2t, +1
        pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);          // row g + 8, keys 16kk + 2t, +1
        pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);  // row g,     keys 16kk + 8 + 2t, +1
        pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);  // row g + 8, keys 16kk + 8 + 2t, +1
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
          // B operand of dim tiles 2dp, 2dp+1: B[k][n] = V[key k][dim n] and sV is [key][dim], so
          // transposed loads: matrices (keys 0-7, dims 0-7) = b0 and (keys 8-15, dims 0-7) = b1 of
          // tile 2dp, then the same for dims 8-15 (tile 2dp+1). Lane l gives row
          // 16kk + l % 8 + 8 * ((l / 8) % 2), column 16dp + 8 * (l / 16).
          uint32_t vb[4];
          ldmatrix_x4_trans(vb,
                            sV + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * S::kStride + dp * 16 + (lane / 16) * 8);
          mma_16816<T>(acc[2 * dp], pa, vb[0], vb[1]);
          mma_16816<T>(acc[2 * dp + 1], pa, vb[2], vb[3]);
        }
      }
    }
    cp_async_wait_all();  // nothing may be left in flight (e.g. Q when no key block was visited)

    // ---- epilogue: out = acc / sum, lse = ln(sum) + max; rows that saw no key: 0 and -inf --
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = group_sum<4>(row_sum[r]);
      const int i = m0 + warp * 16 + g + r * 8;  // query row within the sequence
      const int row = q_start + i;  // < Tq: clamped above
      if (i < seqlen_q) {
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        T* o = static_cast<T*>(p.out) + (int64_t)b * p.o_batch_stride + (int64_t)row * p.o_row_stride +
               (int64_t)h * p.o_head_stride;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          // acc[dt][2r], acc[dt][2r+1]: dims 8dt + 2t, +1 (4-byte aligned: out is contiguous, D even)
          *reinterpret_cast<uint32_t*>(o + dt * 8 + 2 * t) = pack2<T>(acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
        }
        if (t == 0) {
          // sum = sum_j exp2(x_j - max) with x = score * scale * log2(e): ln(sum_j exp(score_j * scale))
          // = max * ln(2) + ln(sum).
          p.lse[(int64_t)b * p.lse_batch_stride + (int64_t)h * p.lse_head_stride + row] =
              sum > 0.f ? row_max[r] * kLn2 + logf(sum) : -INFINITY;
        }
      }
    }
    __syncthreads();  // every warp is done with this block's tiles before the next prologue refills them
  }
}

}  // namespace flash

template <typename T, int D>
cudaError_t launch_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  using S = flash::Smem<D>;
  const int smem_bytes = S::kElems * static_cast<int>(sizeof(T));
  auto kernel = flash::flash_fwd_kernel<T, D>;
  if (smem_bytes > 48 * 1024) {
    // Over the default 48 KiB of dynamic shared memory: opt in (sm_80: up to 163 KiB, sm_90: 227 KiB).
    const cudaError_t err = allow_dynamic_smem(kernel, smem_bytes);
    if (err != cudaSuccess) return err;
  }
  // At least one query block per sequence (max_seqlen_q may be 0: the blocks stride over each sequence).
  const int64_t m_blocks = (static_cast<int64_t>(params.seqlen_q) + flash::kBlockM - 1) / flash::kBlockM;
  const dim3 grid(static_cast<unsigned>(m_blocks > 1 ? m_blocks : 1), params.num_heads_q, params.batch);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  GPTKERNELS_LAUNCH(kernel, grid, flash::kThreads, smem_bytes, stream, params);
  return launch_status();
}

}  // namespace gptkernels
