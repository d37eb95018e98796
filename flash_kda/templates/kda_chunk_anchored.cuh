// flash_kda: the chunk forms for gates that may decay a chunk by more than fp32 can factorise (the
// softplus gate, lower_bound < -5): the producer's operands and L, M without overflow for any gate.
// docs/algorithm.md ("The general gate: anchored pairs") derives them. With D(x, y) = the sum of gamma
// over rows x < t <= y (<= 0), a pair (i, j), j <= i, of L or M can be split at any anchor a with
// j <= a <= i:  e^{D(j, i)} = e^{D(a, i)} e^{D(j, a)}, both factors in [0, 1]. The producer picks one of
// three forms per chunk (a warp vote on the gate values, choose_chunk_form): the factorised one of the
// bounded kernel when the whole chunk decays by at most 80 nats in every channel, else
//   * centred: when each half of the chunk (rows 0-7, 8-15) decays by at most 80 nats in every channel
//     (always for lower_bound >= -10). Every pair is factorised through row 7, (k^ e^{G_i - G_7}) .
//     (k^ e^{G_7 - G_j}), each factor within e^{+-80}: the factorised form's products, its left operands
//     in the raw q and k tiles;
//   * anchored: any gate. Pairs across the halves use a = 7 (level 1); pairs across the two quarters of
//     one half (rows 4-7 x 0-3, 12-15 x 8-11) use a = 3 or 11 (level 2); pairs inside one quarter
//     ("near" pairs) and M's diagonal are summed directly in fp32. Every factor is a running product of
//     the per-token decays 2^gamma2 (one MUFU per token and channel), not ex2 of a sum.
// Level products are computed for all 16 x 16 positions and each position takes the one that owns it;
// the others are finite (every operand is), so nothing leaks.
#pragma once

#include "kda_arch.cuh"
#include "kda_chunk_layout.cuh"
#include "kda_params.cuh"

namespace flash_kda {

// The level operands live in 16 x 128 bf16 tiles without padding: 16-byte column blocks are
// XOR-permuted by row, so that ldmatrix's 8 row addresses hit 8 different bank groups.
__device__ __forceinline__ int swizzled(int row, int col) {
  return row * kHeadK + ((col >> 3) ^ (row & 7)) * 8 + (col & 7);
}

// Storage rows of the level operands, by logical row (A: rows i; B: columns j). Level 1 keeps rows
// 8-15 (left) and 0-7 (right) in 8 storage rows; level 2 keeps 4-7 and 12-15 (left), 0-3 and 8-11
// (right). A logical row a level does not own maps to some stored row: its products are discarded.
__device__ __forceinline__ int level1_row(int r) { return r & 7; }
__device__ __forceinline__ int level2_row(int r) { return (r & 3) | ((r >> 3) << 2); }

// Where the anchored operands go in a producer warp's raw chunk once its inputs have been read:
//   left1 (raw.g_ki): k^ e^{D(7, i)} for i = 8..15 in rows 0-7, the same with scale q^ in rows 8-15;
//   left2 (raw.q):    k^ e^{D(3, i)} / e^{D(11, i)} for i in 4-7, 12-15, rows 0-7; scale q^ in rows 8-15;
//   right (raw.k):    k^ e^{D(j, 7)} for j = 0..7 in rows 0-7; k^ e^{D(j, 3)} / e^{D(j, 11)} for j in
//                     0-3, 8-11 in rows 8-15.
template <int CV>
struct AnchoredTiles {
  bf16 *left1, *left2, *right;
  __device__ __forceinline__ explicit AnchoredTiles(RawChunk<CV>& raw)
      : left1(&raw.g_ki[0][0]), left2(&raw.q[0][0]), right(&raw.k[0][0]) {}
};

__device__ __forceinline__ void store_bf16x4(bf16* tile, int row, int col, const float (&x)[4]) {
  *reinterpret_cast<uint2*>(tile + swizzled(row, col)) = make_uint2(pack_bf16(x[0], x[1]), pack_bf16(x[2], x[3]));
}

__device__ __forceinline__ void load_row4(const bf16* row, int c0, float (&x)[4], float scale) {
  const uint2 raw = *reinterpret_cast<const uint2*>(row + c0);
  const float4 f = unpack_bf16x4(raw);
  x[0] = f.x * scale, x[1] = f.y * scale, x[2] = f.z * scale, x[3] = f.w * scale;
}

// Near pairs of one quarter, in the order the reduce-scatter hands them out: L (1,0) (2,0) (2,1) (3,0)
// (3,1) (3,2), then M for the same pairs, then M's diagonal (0,0) .. (3,3) (rows within the quarter).
__device__ __forceinline__ constexpr int near_pair(int i, int j) { return i * (i - 1) / 2 + j; }

// The producer's operands for one chunk, from its per-token decays decay[r][j] = 2^gamma2 (rows past
// the sequence: 1) and the raw chunk (each lane reads and writes its own channels c0 .. c0 + 3 of the
// rows). Writes Kd, Qd, Kr, Gamma into the stage, the level operands into the raw chunk's tiles and
// the near pairs' sums into `near_sums`.
// Every factor e^{D(x, y)} is the running product of the decays of rows x+1 .. y: one MUFU per token
// and channel in all (the factorised form takes two per element for e^{+-G} alone), and each product
// of n <= 16 factors is as exact as ex2 of the range sum (n ulp-scale errors; docs/algorithm.md).
template <int VB, int CV>
__device__ __forceinline__ void build_anchored_operands(const float (&decay)[kChunk][4], RawChunk<CV>& raw,
                                                        const ProducerScratch& scr, NearPairs& near_sums,
                                                        Stage<VB>& st, int lane) {
  const int c0 = lane * 4;
  const AnchoredTiles<CV> tiles(raw);

  // Forward over the rows: Kd, Qd, the left operands (held for left2: raw.q is still being read) and
  // the near pairs.
  float from_start[4] = {1.0f, 1.0f, 1.0f, 1.0f};        // e^{D(-1, r)}
  float from7[4] = {}, from_quarter[4] = {};             // e^{D(7, r)} (rows 8-15), e^{D(3|11, r)} (4-7, 12-15)
  float carried[3][4];                                   // k^_j e^{D(j, r)} for the earlier rows j of the quarter
  float near[16];
  uint2 left2_k[8], left2_q[8];
#pragma unroll
  for (int r = 0; r < kChunk; ++r) {
    float kh[4], qh[4];
    load_row4(raw.k[r], c0, kh, scr.inv_norm_k[r]);
    load_row4(raw.q[r], c0, qh, scr.inv_norm_q[r]);
    const int i = r & 3;
    const bool level1_left = r >= 8, level2_left = (r >> 2) & 1;  // rows 4-7 and 12-15
    float kd[4], qd[4], l1k[4], l1q[4], l2k[4], l2q[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      from_start[c] *= decay[r][c];
      kd[c] = kh[c] * from_start[c], qd[c] = qh[c] * from_start[c];
      if (level1_left) {
        from7[c] = (r == 8 ? 1.0f : from7[c]) * decay[r][c];
        l1k[c] = kh[c] * from7[c], l1q[c] = qh[c] * from7[c];
      }
      if (level2_left) {
        from_quarter[c] = (i == 0 ? 1.0f : from_quarter[c]) * decay[r][c];
        l2k[c] = kh[c] * from_quarter[c], l2q[c] = qh[c] * from_quarter[c];
      }
    }
    *reinterpret_cast<uint2*>(&st.kd[r][c0]) = make_uint2(pack_bf16(kd[0], kd[1]), pack_bf16(kd[2], kd[3]));
    *reinterpret_cast<uint2*>(&st.qd[r][c0]) = make_uint2(pack_bf16(qd[0], qd[1]), pack_bf16(qd[2], qd[3]));
    if (level1_left) {  // raw.g_ki is free: the gate pass has read it
      store_bf16x4(tiles.left1, level1_row(r), c0, l1k);
      store_bf16x4(tiles.left1, 8 + level1_row(r), c0, l1q);
    }
    if (level2_left) {
      left2_k[level2_row(r)] = make_uint2(pack_bf16(l2k[0], l2k[1]), pack_bf16(l2k[2], l2k[3]));
      left2_q[level2_row(r)] = make_uint2(pack_bf16(l2q[0], l2q[1]), pack_bf16(l2q[2], l2q[3]));
    }
    // Near pairs: carry each earlier row of the quarter one token further, then take the products.
    if (i == 0) {
#pragma unroll
      for (int n = 0; n < 16; ++n) near[n] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < i; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        carried[j][c] *= decay[r][c];
        near[near_pair(i, j)] = fmaf(kh[c], carried[j][c], near[near_pair(i, j)]);
        near[6 + near_pair(i, j)] = fmaf(qh[c], carried[j][c], near[6 + near_pair(i, j)]);
      }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) near[12 + i] = fmaf(qh[c], kh[c], near[12 + i]);
    if (i < 3) {
#pragma unroll
      for (int c = 0; c < 4; ++c) carried[i][c] = kh[c];
    } else {
      // lanes 2m and 2m + 1 end with value m of the quarter
      const float sum = warp_reduce_scatter(near, lane);
      const int m = (lane >> 1) & 15, pair = m % 6;
      const int pi = pair == 0 ? 1 : pair < 3 ? 2 : 3, pj = pair - near_pair(pi, 0);
      const int quarter = r & ~3;
      if ((lane & 1) == 0) {
        if (m < 6) {
          near_sums.l[quarter + pi][pj] = sum;
        } else if (m < 12) {
          near_sums.m[quarter + pi][pj] = sum;
        } else {
          near_sums.m[quarter + m - 12][m - 12] = sum;
        }
      }
    }
  }
  *reinterpret_cast<float4*>(&st.gamma[c0]) = make_float4(from_start[0], from_start[1], from_start[2], from_start[3]);
  __syncwarp();  // every lane has read raw.q
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    *reinterpret_cast<uint2*>(tiles.left2 + swizzled(s, c0)) = left2_k[s];
    *reinterpret_cast<uint2*>(tiles.left2 + swizzled(8 + s, c0)) = left2_q[s];
  }

  // Backward over the rows: Kr and the right operands (held: raw.k is still being read).
  float to_end[4] = {1.0f, 1.0f, 1.0f, 1.0f};  // e^{D(r, 15)}
  float to7[4] = {}, to_quarter[4] = {};       // e^{D(r, 7)} (rows 0-7), e^{D(r, 3|11)} (rows 0-3, 8-11)
  uint2 right[16];
#pragma unroll
  for (int r = kChunk - 1; r >= 0; --r) {
    float kh[4];
    load_row4(raw.k[r], c0, kh, scr.inv_norm_k[r]);
    const bool level1_right = r < 8, level2_right = !((r >> 2) & 1);  // rows 0-3 and 8-11
    float kr[4], r1[4], r2[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      kr[c] = kh[c] * to_end[c];
      to_end[c] *= decay[r][c];
      if (level1_right) {
        if (r == 7) to7[c] = 1.0f;
        r1[c] = kh[c] * to7[c];
        to7[c] *= decay[r][c];
      }
      if (level2_right) {
        if (r == 3 || r == 11) to_quarter[c] = 1.0f;
        r2[c] = kh[c] * to_quarter[c];
        to_quarter[c] *= decay[r][c];
      }
    }
    *reinterpret_cast<uint2*>(&st.kr[r][c0]) = make_uint2(pack_bf16(kr[0], kr[1]), pack_bf16(kr[2], kr[3]));
    if (level1_right) right[level1_row(r)] = make_uint2(pack_bf16(r1[0], r1[1]), pack_bf16(r1[2], r1[3]));
    if (level2_right) right[8 + level2_row(r)] = make_uint2(pack_bf16(r2[0], r2[1]), pack_bf16(r2[2], r2[3]));
  }
  __syncwarp();  // every lane has read raw.k
#pragma unroll
  for (int s = 0; s < 16; ++s) *reinterpret_cast<uint2*>(tiles.right + swizzled(s, c0)) = right[s];
}

// L = Kd Ki^T and M = Qd Ki^T in the factorised form's accumulator layout (two 16 x 8 n-tiles of the
// m16n8k16 atom), from the level products and the near sums. Call after a __syncwarp that follows
// build_anchored_operands.
template <int CV>
__device__ __forceinline__ void anchored_products(RawChunk<CV>& raw, const NearPairs& near_sums, int lane,
                                                  float (&accL)[2][4], float (&accM)[2][4]) {
  const AnchoredTiles<CV> tiles(raw);
  const LdsmLane al = ldsm_a_lane(lane), bl = ldsm_b_lane(lane);
  float l1[4] = {}, m1[4] = {}, l2[2][4] = {}, m2[2][4] = {};  // level 1: n-tile 0 only (columns 0-7)
#pragma unroll
  for (int ks = 0; ks < kHeadK / 16; ++ks) {
    uint32_t a1k[4], a1q[4], a2k[4], a2q[4], b1[4], b2[4];
    const int acol = ks * 16 + al.col, bcol = ks * 16 + bl.col;
    ldsm_x4(tiles.left1 + swizzled(level1_row(al.row), acol), a1k[0], a1k[1], a1k[2], a1k[3]);
    ldsm_x4(tiles.left1 + swizzled(8 + level1_row(al.row), acol), a1q[0], a1q[1], a1q[2], a1q[3]);
    ldsm_x4(tiles.left2 + swizzled(level2_row(al.row), acol), a2k[0], a2k[1], a2k[2], a2k[3]);
    ldsm_x4(tiles.left2 + swizzled(8 + level2_row(al.row), acol), a2q[0], a2q[1], a2q[2], a2q[3]);
    ldsm_x4(tiles.right + swizzled(level1_row(bl.row), bcol), b1[0], b1[1], b1[2], b1[3]);
    ldsm_x4(tiles.right + swizzled(8 + level2_row(bl.row), bcol), b2[0], b2[1], b2[2], b2[3]);
    mma16816(l1, a1k, b1[0], b1[1]);
    mma16816(m1, a1q, b1[0], b1[1]);
    mma16816(l2[0], a2k, b2[0], b2[1]);
    mma16816(l2[1], a2k, b2[2], b2[3]);
    mma16816(m2[0], a2q, b2[0], b2[1]);
    mma16816(m2[1], a2q, b2[2], b2[3]);
  }
  // Each position takes its owner: near (same quarter), level 1 (different halves), else level 2.
  // Positions above the diagonal are masked by the caller.
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = gq + (e >> 1) * 8, j = nt * 8 + tq * 2 + (e & 1);
      const bool near = (i >> 2) == (j >> 2), level1 = nt == 0 && i >= 8;
      accL[nt][e] = near ? near_sums.l[i][j & 3] : level1 ? l1[e] : l2[nt][e];
      accM[nt][e] = near ? near_sums.m[i][j & 3] : level1 ? m1[e] : m2[nt][e];
    }
  }
}

// ---------------------------------------------------------------- choosing the form

enum ChunkForm { kFactorisedForm, kCentredForm, kAnchoredForm };

// How far a chunk (or half of one) may decay in every channel for e^{+-G} to be factorised from its
// first row: 80 nats, the bounded kernel's worst case over a whole chunk (lower_bound = -5, 16 tokens);
// log2 units.
constexpr float kFactorLimit2 = -80.0f * kLog2e;

// The cheapest exact form for a chunk, from its cumulative log2 decays G2 (warp-uniform: one vote over the
// warp's 128 channels): factorised when the whole chunk fits the limit, centred when each half does,
// else anchored. (A G2 that overflowed to -inf, or a NaN difference of two, votes anchored.)
__device__ __forceinline__ ChunkForm choose_chunk_form(const float (&G2)[kChunk][4]) {
  bool whole_fits = true, halves_fit = true;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float first = G2[kChunk / 2 - 1][j], whole = G2[kChunk - 1][j];
    whole_fits = whole_fits && whole >= kFactorLimit2;
    halves_fit = halves_fit && first >= kFactorLimit2 && whole - first >= kFactorLimit2;
  }
  if (__all_sync(kFullMask, whole_fits)) return kFactorisedForm;
  return __all_sync(kFullMask, halves_fit) ? kCentredForm : kAnchoredForm;
}

// ---------------------------------------------------------------- the centred form

// Where the centred form's left operands go once a half of the raw chunk has been read: k^ e^{G - G_7}
// in the raw k tile and scale q^ e^{G - G_7} in the raw q tile, 16 x 128 bf16 each, swizzled like the
// anchored form's tiles. The right operand, k^ e^{G_7 - G}, takes raw.g_ki as the factorised form's Ki does.
template <int CV>
struct CentredTiles {
  bf16 *left_k, *left_q;
  __device__ __forceinline__ explicit CentredTiles(RawChunk<CV>& raw) : left_k(&raw.k[0][0]), left_q(&raw.q[0][0]) {}
};

// The centred form's operands, from the cumulative log2 decays G2[r][j] (rows past the sequence repeat
// the last row): every pair anchored at row 7, so that each factor e^{G_r - G_7} or e^{G_7 - G_r} lies
// within e^{+-80} when each half of the chunk decays by at most 80 nats. Writes Kd, Qd, Kr, Gamma into the
// stage (from the same two exponentials per element: e^{G_r} = e^{G_r - G_7} e^{G_7}, e^{G_last - G_r} =
// e^{G_7 - G_r} e^{G_last - G_7}, each product of two factors in range), the right operand into raw.g_ki
// (each lane its own channels, as it reads them), and the left ones into the CentredTiles half a chunk
// at a time: a swizzled row holds other lanes' raw channels, so a half is written once every lane has
// read it. L and M are then the factorised form's products of these operands (pair_products,
// kda_chunk_prepare.cuh); their entries above the diagonal may overflow (e^{G_i - G_j} > 1 for j > i),
// and the caller's selects drop them.
template <int VB, int CV>
__device__ __forceinline__ void build_centred_operands(const float (&G2)[kChunk][4], RawChunk<CV>& raw,
                                                       const ProducerScratch& scr, Stage<VB>& st, int lane) {
  constexpr int kHalf = kChunk / 2;
  const int c0 = lane * 4;
  const CentredTiles<CV> tiles(raw);
  float to7[4], rest[4];  // e^{G_7} and e^{G_last - G_7}: the two halves' total decays
#pragma unroll
  for (int c = 0; c < 4; ++c) to7[c] = ex2(G2[kHalf - 1][c]), rest[c] = ex2(G2[kChunk - 1][c] - G2[kHalf - 1][c]);
  *reinterpret_cast<float4*>(&st.gamma[c0]) =
      make_float4(to7[0] * rest[0], to7[1] * rest[1], to7[2] * rest[2], to7[3] * rest[3]);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    uint2 left_k[kHalf], left_q[kHalf];
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const int r = half * kHalf + i;
      float kh[4], qh[4];
      load_row4(raw.k[r], c0, kh, scr.inv_norm_k[r]);
      load_row4(raw.q[r], c0, qh, scr.inv_norm_q[r]);
      float kd[4], qd[4], kr[4], ki[4], lk[4], lq[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // six products an element: the producers' issue slots are the limit
        const float from7 = G2[r][c] - G2[kHalf - 1][c];
        const float e = ex2(from7), ei = ex2(-from7);  // e^{G_r - G_7}, e^{G_7 - G_r}
        lk[c] = kh[c] * e, lq[c] = qh[c] * e;
        kd[c] = lk[c] * to7[c], qd[c] = lq[c] * to7[c];
        ki[c] = kh[c] * ei;
        kr[c] = ki[c] * rest[c];
      }
      *reinterpret_cast<uint2*>(&st.kd[r][c0]) = make_uint2(pack_bf16(kd[0], kd[1]), pack_bf16(kd[2], kd[3]));
      *reinterpret_cast<uint2*>(&st.qd[r][c0]) = make_uint2(pack_bf16(qd[0], qd[1]), pack_bf16(qd[2], qd[3]));
      *reinterpret_cast<uint2*>(&st.kr[r][c0]) = make_uint2(pack_bf16(kr[0], kr[1]), pack_bf16(kr[2], kr[3]));
      *reinterpret_cast<uint2*>(&raw.g_ki[r][c0]) = make_uint2(pack_bf16(ki[0], ki[1]), pack_bf16(ki[2], ki[3]));
      left_k[i] = make_uint2(pack_bf16(lk[0], lk[1]), pack_bf16(lk[2], lk[3]));
      left_q[i] = make_uint2(pack_bf16(lq[0], lq[1]), pack_bf16(lq[2], lq[3]));
    }
    __syncwarp();  // every lane has read this half of raw.q and raw.k
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      *reinterpret_cast<uint2*>(tiles.left_k + swizzled(half * kHalf + i, c0)) = left_k[i];
      *reinterpret_cast<uint2*>(tiles.left_q + swizzled(half * kHalf + i, c0)) = left_q[i];
    }
  }
}

}  // namespace flash_kda
