// Emulator version of csrc/common/mma.cuh: the same functions, computed on the CPU from the PTX
// ISA definitions (restated in csrc/common/mma.cuh), independently of how the kernels use them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace gptkernels {

inline unsigned char* dynamic_smem() { return ::emu::dynamic_smem(); }

// cp.async: both addresses 16-byte aligned, the destination in the block's shared memory (else the
// launch faults). The copy lands at issue ("early" blocks) or at the issuing thread's
// cp.async.wait_group, and only if its group was committed ("late" blocks): see emu_runtime.h.
namespace emu_detail {
struct PendingCopy {
  void* dst;
  const void* src;
  bool committed;
};
inline thread_local std::vector<PendingCopy> t_pending;  // this thread's copies in flight (late blocks)
}  // namespace emu_detail

inline void cp_async_16(void* smem_dst, const void* gmem_src) {
  if (!::emu::check_smem("cp.async (shared destination)", smem_dst, 16, 16)) return;
  if (reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "cp.async: misaligned global source %p (needs 16-byte alignment)", gmem_src);
    ::emu::fault(buf);
    return;
  }
  if (::emu::t_block->cp_async_late) {
    emu_detail::t_pending.push_back({smem_dst, gmem_src, false});
  } else {
    std::memcpy(smem_dst, gmem_src, 16);
  }
}
inline void cp_async_commit() {
  for (auto& c : emu_detail::t_pending) c.committed = true;
}
// cp.async.wait_group 0: every committed group has landed (uncommitted copies stay in flight).
inline void cp_async_wait_all() {
  auto& pending = emu_detail::t_pending;
  size_t kept = 0;
  for (size_t i = 0; i < pending.size(); ++i) {
    if (pending[i].committed) {
      std::memcpy(pending[i].dst, pending[i].src, 16);
    } else {
      pending[kept++] = pending[i];
    }
  }
  pending.resize(kept);
}

namespace emu_detail {
inline uint16_t u16_at(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * col, 2);
  return v;
}
inline uint32_t pack_u16(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// ldmatrix .x4: matrix i's row r address comes from lane 8i + r. Lane l receives, for matrix i,
// row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1; with .trans, column l / 4 of rows 2 (l % 4) and
// 2 (l % 4) + 1.
inline void ldmatrix(uint32_t (&r)[4], const void* smem_row, bool trans) {
  const int lane = ::emu::t_lane;
  // Each lane's row: 16 bytes of the block's shared memory, 16-byte aligned (else the launch faults;
  // the row reads as zeros).
  static const unsigned char kZeros[16] = {};
  if (!::emu::check_smem(trans ? "ldmatrix.trans" : "ldmatrix", smem_row, 16, 16)) smem_row = kZeros;
  ::emu::warp_exchange(&smem_row, sizeof(smem_row), [&](unsigned char (*slot)[64]) {
    auto row_addr = [&](int l) {
      const void* p;
      std::memcpy(&p, slot[l], sizeof(p));
      return p;
    };
    for (int i = 0; i < 4; ++i) {
      if (!trans) {
        const void* row = row_addr(8 * i + lane / 4);
        r[i] = pack_u16(u16_at(row, 2 * (lane % 4)), u16_at(row, 2 * (lane % 4) + 1));
      } else {
        r[i] = pack_u16(u16_at(row_addr(8 * i + 2 * (lane % 4)), lane / 4),
                        u16_at(row_addr(8 * i + 2 * (lane % 4) + 1), lane / 4));
      }
    }
    return 0;
  });
}

inline float to_f(uint16_t bits, const __half*) {
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}
inline float to_f(uint16_t bits, const __nv_bfloat16*) {
  __nv_bfloat16 h;
  std::memcpy(&h, &bits, 2);
  return __bfloat162float(h);
}
}  // namespace emu_detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { emu_detail::ldmatrix(r, smem_row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { emu_detail::ldmatrix(r, smem_row, true); }

// mma.m16n8k16.row.col, float32 accumulate. With g = lane / 4, t = lane % 4 and the low 16 bits of a
// register holding the lower column:
//   A: a0 (g, 2t..2t+1), a1 (g+8, 2t..2t+1), a2 (g, 2t+8..2t+9), a3 (g+8, 2t+8..2t+9)
//   B: b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8..2t+9, n = g)
//   C/D: c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Frag {
    uint32_t a[4];
    uint32_t b[2];
  };
  const Frag mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const int lane = ::emu::t_lane;
  ::emu::warp_exchange(&mine, sizeof(mine), [&](unsigned char (*slot)[64]) {
    float A[16][16], B[16][8];
    auto lo = [](uint32_t r) { return emu_detail::to_f(static_cast<uint16_t>(r & 0xffffu), static_cast<const T*>(nullptr)); };
    auto hi = [](uint32_t r) { return emu_detail::to_f(static_cast<uint16_t>(r >> 16), static_cast<const T*>(nullptr)); };
    for (int l = 0; l < 32; ++l) {
      Frag f;
      std::memcpy(&f, slot[l], sizeof(f));
      const int g = l / 4, t = l % 4;
      A[g][2 * t] = lo(f.a[0]);
      A[g][2 * t + 1] = hi(f.a[0]);
      A[g + 8][2 * t] = lo(f.a[1]);
      A[g + 8][2 * t + 1] = hi(f.a[1]);
      A[g][2 * t + 8] = lo(f.a[2]);
      A[g][2 * t + 9] = hi(f.a[2]);
      A[g + 8][2 * t + 8] = lo(f.a[3]);
      A[g + 8][2 * t + 9] = hi(f.a[3]);
      B[2 * t][g] = lo(f.b[0]);
      B[2 * t + 1][g] = hi(f.b[0]);
      B[2 * t + 8][g] = lo(f.b[1]);
      B[2 * t + 9][g] = hi(f.b[1]);
    }
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e / 2) * 8, col = 2 * t + e % 2;
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      d[e] += s;
    }
    return 0;
  });
}

}  // namespace gptkernels
