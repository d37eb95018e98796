// flash_kda: chunk preparation, the chunked kernel's producer warps (kda_fwd.cuh): load a 16-token chunk,
// normalise q and k, evaluate the gate, and build the decayed operands Kd, Qd, Kr, the total decay Gamma,
// T = (I + L)^-1 diag(beta) and M into a shared-memory slot of every CTA of the cluster
// (docs/algorithm.md, section 2). Gates whose chunk decay fp32 can always factorise (Gate::kFactorised)
// use e^{+G} e^{-G}; the others pick, per chunk, that form or the centred or anchored one of
// kda_chunk_anchored.cuh.
#pragma once

#include "kda_arch.cuh"
#include "kda_chunk_anchored.cuh"
#include "kda_chunk_layout.cuh"
#include "kda_gate.cuh"
#include "kda_params.cuh"

namespace flash_kda {

// ---------------------------------------------------------------- producer

// Where one producer warp reads its sequence's inputs: the first token of head h of each input, and
// the token strides (elements; rows are 16-byte aligned, checked on the host).
struct ChunkInputs {
  const bf16 *q, *k, *g, *v, *beta;
  long long q_token, k_token, g_token, v_token, beta_token;

  __device__ __forceinline__ ChunkInputs(const KdaParams& p, bool varlen, int seq, long long bos, int h) {
    const TensorStrides sq = input_strides(p, kInputQ, kHeadK), sk = input_strides(p, kInputK, kHeadK);
    const TensorStrides sg = input_strides(p, kInputG, kHeadK), sv = input_strides(p, kInputV, kHeadV);
    const TensorStrides sb = input_strides(p, kInputBeta, 1);
    q = p.q + token_offset(sq, varlen, seq, bos, 0, h);
    k = p.k + token_offset(sk, varlen, seq, bos, 0, h);
    g = p.g + token_offset(sg, varlen, seq, bos, 0, h);
    v = p.v + token_offset(sv, varlen, seq, bos, 0, h);
    beta = p.beta + token_offset(sb, varlen, seq, bos, 0, h);
    q_token = sq.token, k_token = sk.token, g_token = sg.token, v_token = sv.token, beta_token = sb.token;
  }
};

template <int CV>
__device__ __forceinline__ void issue_chunk_load(const ChunkInputs& in, RawChunk<CV>& raw, long long t0, int valid,
                                                 int v0, int lane) {
  // q, k, g: 16 rows x 16 vectors of 8 bf16 = 256 vectors each, 8 per lane: lane l takes rows
  // l / 16 + 2i, so its source pointers advance by two tokens per step (no per-row multiply).
  // Rows past the sequence are zero-filled and read nothing; their pointers stay at row t0.
  {
    const int r0 = lane >> 4, c8 = (lane & 15) * 8;
    const bf16* q = in.q + (t0 + r0) * in.q_token + c8;
    const bf16* k = in.k + (t0 + r0) * in.k_token + c8;
    const bf16* g = in.g + (t0 + r0) * in.g_token + c8;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = r0 + 2 * i;
      const bool ok = r < valid;
      cp_async_16(&raw.q[r][c8], ok ? q : in.q, ok);
      cp_async_16(&raw.k[r][c8], ok ? k : in.k, ok);
      cp_async_16(&raw.g_ki[r][c8], ok ? g : in.g, ok);
      q += 2 * in.q_token, k += 2 * in.k_token, g += 2 * in.g_token;
    }
  }
  // v: columns v0 .. v0 + CV of 16 rows; lane l takes rows l / kVecPerRow + (32 / kVecPerRow) i.
  constexpr int kVecPerRow = CV / 8;
  constexpr int kRowsPerStep = 32 / kVecPerRow;
  {
    const int r0 = lane / kVecPerRow, c8 = (lane % kVecPerRow) * 8;
    const bf16* v = in.v + (t0 + r0) * in.v_token + v0 + c8;
#pragma unroll
    for (int i = 0; i < kChunk * kVecPerRow / 32; ++i) {
      const int r = r0 + kRowsPerStep * i;
      const bool ok = r < valid;
      cp_async_16(&raw.v[r][c8], ok ? v : in.v, ok);
      v += kRowsPerStep * in.v_token;
    }
  }
  cute::cp_async_fence();
}

// The factorised form's operands, from the cumulative log2 decays G[r][j] (|G| <= 80 nats: bounded gates
// with lower_bound >= -5, or a chunk the other gates' vote found that small): Kd, Qd, Kr, Gamma into the
// stage and Ki = k^ e^{-G} into raw.g_ki.
template <int VB, int CV>
__device__ __forceinline__ void build_factorised_operands(const float (&G)[kChunk][4], RawChunk<CV>& raw,
                                                          const ProducerScratch& scr, Stage<VB>& st, int lane) {
  const int c0 = lane * 4;
  float gamma_total[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) gamma_total[j] = ex2(G[kChunk - 1][j]);
  *reinterpret_cast<float4*>(&st.gamma[c0]) = make_float4(gamma_total[0], gamma_total[1], gamma_total[2],
                                                          gamma_total[3]);
#pragma unroll
  for (int r = 0; r < kChunk; ++r) {
    const uint2 kv = *reinterpret_cast<const uint2*>(&raw.k[r][c0]);
    const uint2 qv = *reinterpret_cast<const uint2*>(&raw.q[r][c0]);
    const float2 k01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kv.x));
    const float2 k23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kv.y));
    const float2 q01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qv.x));
    const float2 q23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qv.y));
    const float rk = scr.inv_norm_k[r], rq = scr.inv_norm_q[r];
    const float kh[4] = {k01.x * rk, k01.y * rk, k23.x * rk, k23.y * rk};
    const float qh[4] = {q01.x * rq, q01.y * rq, q23.x * rq, q23.y * rq};
    float kd[4], qd[4], ki[4], kr[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float e = ex2(G[r][j]);
      const float ei = ex2(-G[r][j]);
      kd[j] = kh[j] * e;
      qd[j] = qh[j] * e;
      ki[j] = kh[j] * ei;
      kr[j] = kh[j] * (ei * gamma_total[j]);  // e^{G_last - G}
    }
    *reinterpret_cast<uint2*>(&st.kd[r][c0]) = make_uint2(pack_bf16(kd[0], kd[1]), pack_bf16(kd[2], kd[3]));
    *reinterpret_cast<uint2*>(&st.qd[r][c0]) = make_uint2(pack_bf16(qd[0], qd[1]), pack_bf16(qd[2], qd[3]));
    *reinterpret_cast<uint2*>(&st.kr[r][c0]) = make_uint2(pack_bf16(kr[0], kr[1]), pack_bf16(kr[2], kr[3]));
    *reinterpret_cast<uint2*>(&raw.g_ki[r][c0]) = make_uint2(pack_bf16(ki[0], ki[1]), pack_bf16(ki[2], ki[3]));
  }
}

// L = Kd Ki^T and M = Qd Ki^T (16x16, reduction over 128 channels) in the m16n8k16 accumulator layout:
// left_k(row, col) and left_q(row, col) address the left operands' bf16 elements (the forms keep them in
// different tiles), raw.g_ki holds the right operand.
template <int CV, class LeftK, class LeftQ>
__device__ __forceinline__ void pair_products(LeftK left_k, LeftQ left_q, const RawChunk<CV>& raw, int lane,
                                              float (&accL)[2][4], float (&accM)[2][4]) {
  const LdsmLane al = ldsm_a_lane(lane), bl = ldsm_b_lane(lane);
#pragma unroll
  for (int ks = 0; ks < kHeadK / 16; ++ks) {
    uint32_t kdf[4], qdf[4], kib[4];
    ldsm_x4(left_k(al.row, ks * 16 + al.col), kdf[0], kdf[1], kdf[2], kdf[3]);
    ldsm_x4(left_q(al.row, ks * 16 + al.col), qdf[0], qdf[1], qdf[2], qdf[3]);
    ldsm_x4(&raw.g_ki[bl.row][ks * 16 + bl.col], kib[0], kib[1], kib[2], kib[3]);
    mma16816(accL[0], kdf, kib[0], kib[1]);
    mma16816(accL[1], kdf, kib[2], kib[3]);
    mma16816(accM[0], qdf, kib[0], kib[1]);
    mma16816(accM[1], qdf, kib[2], kib[3]);
  }
}

// Producer warp `warp` of cluster rank `rank` prepares the chunks c with c % kCluster == rank and
// (c / kCluster) % kProducerWarps == warp, i.e. chunk slot + k * kSlots, k = 0, 1, ..., always into
// slot `slot` = warp * kCluster + rank of every CTA of the cluster.  `cv0`: the cluster's first
// value column.
template <class Cfg, class Gate>
__device__ void producer(const KdaParams& p, SharedStorage<Cfg>& sm, int seq, int h, int cv0, long long bos,
                         int seq_len, int num_chunks, int rank, int warp_index, int lane_index) {
  constexpr int VB = Cfg::kVB;
  constexpr int kSlots = Cfg::kSlots;
  constexpr int kCluster = Cfg::kCluster;
  const int lane = lane_index;  // the loop below takes its own copy where Cfg::kProducerRemat
  const int slot = warp_index * Cfg::kCluster + rank;
  // What goes to the other CTAs: the slot up to its V-slice by one bulk copy, the V-slice by st.async.
  constexpr uint32_t kBulkBytes = sizeof(Stage<VB>) - sizeof(Stage<VB>::v);  // v is the last member
  constexpr uint32_t kRemoteBytes = kBulkBytes + kChunk * VB * sizeof(bf16);
  static_assert(kBulkBytes % 16 == 0, "bulk copies move 16-byte multiples");
  const int c0 = lane * 4;  // key channels c0..c0+3 owned in the element-wise pass
  const Gate gate(p, h, c0);
  const ChunkInputs in(p, is_varlen(p), seq, bos, h);

  auto chunk_valid = [&](int chunk) { return min(kChunk, seq_len - chunk * kChunk); };
  auto load_beta = [&](int chunk) {
    const int r = chunk * kChunk + lane;
    return (lane < kChunk && r < seq_len) ? __bfloat162float(in.beta[r * in.beta_token]) : 0.0f;
  };

  float beta_raw = 0.0f;
  if (slot < num_chunks) {
    issue_chunk_load(in, sm.raw[warp_index], static_cast<long long>(slot) * kChunk, chunk_valid(slot), cv0, lane);
    beta_raw = load_beta(slot);
  }
  for (int chunk = slot; chunk < num_chunks; chunk += kSlots) {
    // Cfg::kProducerRemat: this chunk's indices are opaque copies, so the addresses below (and every
    // lane offset in the helpers) are recomputed per chunk rather than kept live across the loop.
    const int lane = Cfg::kProducerRemat ? opaque(lane_index) : lane_index;
    const int warp = Cfg::kProducerRemat ? opaque(warp_index) : warp_index;
    const int slot = warp * Cfg::kCluster + rank;
    RawChunk<Cfg::kClusterV>& raw = sm.raw[warp];
    ProducerScratch& scr = sm.scratch[warp];
    Stage<VB>& st = sm.stage[slot];
    const int valid = chunk_valid(chunk);
    const float bsig = lane < valid ? sigmoid(beta_raw) : 0.0f;  // beta of row `lane` (lanes < 16)
    cute::cp_async_wait<0>();
    __syncwarp();

    // Row norms: lanes 0-15 take even rows, 16-31 odd rows; 8 channels per lane.
#pragma unroll
    for (int i = 0; i < kChunk / 2; ++i) {
      const int r = 2 * i + (lane >> 4), c8 = (lane & 15) * 8;
      const uint4 qv = *reinterpret_cast<const uint4*>(&raw.q[r][c8]);
      const uint4 kv = *reinterpret_cast<const uint4*>(&raw.k[r][c8]);
      const uint32_t qw[4] = {qv.x, qv.y, qv.z, qv.w}, kw[4] = {kv.x, kv.y, kv.z, kv.w};
      float sq = 0.0f, sk = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 qf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&qw[j]));
        const float2 kf = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&kw[j]));
        sq += qf.x * qf.x + qf.y * qf.y;
        sk += kf.x * kf.x + kf.y * kf.y;
      }
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        sq += __shfl_xor_sync(0xffffffffu, sq, off);
        sk += __shfl_xor_sync(0xffffffffu, sk, off);
      }
      if ((lane & 15) == 0) {
        scr.inv_norm_q[r] = rsqrtf(sq + 1e-6f) * p.scale;
        scr.inv_norm_k[r] = rsqrtf(sk + 1e-6f);
      }
    }

    // Gate pass: the cumulative log2 decay G2 over 16 rows x 4 channels (rows past the sequence repeat
    // the last one).
    auto raw_gate = [&](int r, float (&gr)[4]) {
      const float4 g = unpack_bf16x4(*reinterpret_cast<const uint2*>(&raw.g_ki[r][c0]));
      gr[0] = g.x, gr[1] = g.y, gr[2] = g.z, gr[3] = g.w;
    };
    float G[kChunk][4];
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < kChunk; ++r) {
      float gr[4];
      raw_gate(r, gr);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[j] = r < valid ? gate.accumulate(acc[j], gr[j], j) : acc[j];
        G[r][j] = acc[j];
      }
    }
    // The chunk form (kda_chunk_anchored.cuh): factorised gates always factorise; the others by a warp
    // vote on how far each half of this chunk decays. The anchored form reads each token's decay
    // 2^gamma2, evaluated again from the raw gate (differences of G would cancel).
    ChunkForm form = kFactorisedForm;
    if constexpr (!Gate::kFactorised) {
      form = choose_chunk_form(G);
      if (form == kAnchoredForm) {
#pragma unroll
        for (int r = 0; r < kChunk; ++r) {
          float gr[4];
          raw_gate(r, gr);
#pragma unroll
          for (int j = 0; j < 4; ++j) G[r][j] = r < valid ? ex2(gate.accumulate(0.0f, gr[j], j)) : 1.0f;
        }
      }
    }

    // The slot must have been released by the consumers of every CTA (chunk - kSlots consumed).
    if (chunk >= kSlots) mbar_wait(&sm.empty[slot], (chunk / kSlots - 1) & 1);
    if constexpr (kCluster > 1) {
      if (lane == 0) {
#pragma unroll
        for (int j = 1; j < kCluster; ++j) {
          mbar_expect_tx(map_to_rank(smem_addr(&sm.full[slot]), (rank + j) % kCluster), kRemoteBytes);
        }
      }
    }
    __syncwarp();  // inverse norms visible, raw.g read by every lane (ki overwrites it)

    if (form == kFactorisedForm) {
      build_factorised_operands<VB>(G, raw, scr, st, lane);
    } else if (form == kCentredForm) {
      build_centred_operands<VB>(G, raw, scr, st, lane);
    } else {
      build_anchored_operands<VB>(G, raw, scr, sm.near[warp], st, lane);
    }
    // V: the cluster's slice j (columns j*VB ...) into the slot of its CTA of rank j (16-byte vectors).
    // A lane's columns are the same in every row it copies, so is its destination.
    {
      constexpr int kVecPerRow = Cfg::kClusterV / 8;
      const int c8 = (lane % kVecPerRow) * 8, to = c8 / VB;
      uint32_t to_full = 0;  // mapa exists from sm_90 on: only the clustered variant asks for it
      if constexpr (kCluster > 1) to_full = map_to_rank(smem_addr(&sm.full[slot]), to);
#pragma unroll
      for (int i = 0; i < kChunk * kVecPerRow / 32; ++i) {
        const int r = (lane + i * 32) / kVecPerRow;
        const uint4 val = *reinterpret_cast<const uint4*>(&raw.v[r][c8]);
        uint4* dst = reinterpret_cast<uint4*>(&st.v[r][c8 % VB]);
        if (kCluster == 1 || to == rank) {
          *dst = val;
        } else {
          st_async_16(map_to_rank(smem_addr(dst), to), val, to_full);
        }
      }
    }
    __syncwarp();  // stage operands and ki written

    // L = Kd Ki^T and M = Qd Ki^T (16x16, reduction over 128 channels).
    const int gq = lane >> 2, tq = lane & 3;
    float accL[2][4] = {}, accM[2][4] = {};
    if (form == kFactorisedForm) {
      pair_products([&](int r, int c) { return &st.kd[r][c]; }, [&](int r, int c) { return &st.qd[r][c]; }, raw, lane,
                    accL, accM);
    } else if (form == kCentredForm) {
      const CentredTiles<Cfg::kClusterV> tiles(raw);  // same products, the left operands in the raw q and k tiles
      pair_products([&](int r, int c) { return tiles.left_k + swizzled(r, c); },
                    [&](int r, int c) { return tiles.left_q + swizzled(r, c); }, raw, lane, accL, accM);
    } else {
      anchored_products(raw, sm.near[warp], lane, accL, accM);
    }
    __syncwarp();  // raw (ki included) fully read
    // Prefetch this warp's next chunk while the rest of this one is finished.
    if (chunk + kSlots < num_chunks) {
      issue_chunk_load(in, raw, static_cast<long long>(chunk + kSlots) * kChunk, chunk_valid(chunk + kSlots), cv0,
                       lane);
      beta_raw = load_beta(chunk + kSlots);
    }
    const float beta_lo = __shfl_sync(0xffffffffu, bsig, gq), beta_hi = __shfl_sync(0xffffffffu, bsig, gq + 8);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = gq + hh * 8, j = nt * 8 + tq * 2;
        const float b = hh ? beta_hi : beta_lo;
        scr.l[i][j] = i > j ? b * accL[nt][hh * 2] : 0.0f;
        scr.l[i][j + 1] = i > j + 1 ? b * accL[nt][hh * 2 + 1] : 0.0f;
        const float m0 = i >= j ? accM[nt][hh * 2] : 0.0f;
        const float m1 = i >= j + 1 ? accM[nt][hh * 2 + 1] : 0.0f;
        *reinterpret_cast<uint32_t*>(&st.m[i][j]) = pack_bf16(m0, m1);
      }
    }
    __syncwarp();
    if (lane < kChunk) {
      // Forward substitution (fp32), right-looking so each step's updates are independent:
      // column `lane` of X = (I + L)^-1 diag(beta).
      float x[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) x[i] = i == lane ? bsig : 0.0f;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
#pragma unroll
        for (int i = j + 1; i < kChunk; ++i) x[i] -= scr.l[i][j] * x[j];
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) st.t[i][lane] = __float2bfloat16_rn(x[i]);
    }
    if constexpr (kCluster > 1) {
      // The slot is complete here: copy it to the other CTAs of the cluster.
      fence_proxy_async_smem();
      __syncwarp();
      if (lane == 0) {
#pragma unroll
        for (int j = 1; j < kCluster; ++j) {
          const uint32_t to = (rank + j) % kCluster;
          bulk_copy_to_cluster(map_to_rank(smem_addr(&st), to), &st, kBulkBytes,
                               map_to_rank(smem_addr(&sm.full[slot]), to));
        }
      }
    }
    if constexpr (kCluster == 1) {
      mbar_arrive(&sm.full[slot]);
    } else {
#pragma unroll
      for (int j = 0; j < kCluster; ++j) {  // every lane, on every CTA's barrier (its own first)
        mbar_arrive_cluster(j == 0 ? smem_addr(&sm.full[slot])
                                   : map_to_rank(smem_addr(&sm.full[slot]), (rank + j) % kCluster));
      }
    }
  }
}

}  // namespace flash_kda
