// flash_kda: the state update, the chunked kernel's consumer warps (kda_fwd.cuh): per prepared chunk,
// W = S Kd^T, O = S Qd^T, U = (V - W) T^T, O += U M^T, S = S diag(Gamma) + U^T Kr on the state slice held in
// MMA accumulators; the initial, final and checkpoint states move between registers and memory here.
#pragma once

#include "kda_arch.cuh"
#include "kda_chunk_layout.cuh"
#include "kda_params.cuh"

namespace flash_kda {

// ---------------------------------------------------------------- consumer

constexpr int kStateTiles = kHeadK / 8;
constexpr int kNoChunk = 0x7fffffff;  // a consumer lane's state: 16 accumulator tiles of 16x8 across the keys

// Element (row, key) index, relative to a state's first element, of a lane's accumulator tile n, half hh:
// tile n covers keys 8n..8n+7; elements 2hh, 2hh+1 sit on row row_lo + 8hh, keys 8n + 2tq + {0, 1}.
__device__ __forceinline__ long long fragment_index(int row_lo, int tq, int n, int hh) {
  return static_cast<long long>(row_lo + hh * 8) * kHeadK + n * 8 + tq * 2;
}

template <int KIND>
__device__ __forceinline__ void store_fragment(void* base, long long offset, const float (&S)[kStateTiles][4],
                                               int row_lo, int tq) {
#pragma unroll
  for (int n = 0; n < kStateTiles; ++n) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      store_state2<KIND>(base, offset + fragment_index(row_lo, tq, n, hh), S[n][hh * 2], S[n][hh * 2 + 1]);
    }
  }
}

// Checkpoint c of a sequence is the state after its first checkpoint_offsets[seq, c] tokens, stored when
// that offset is a positive multiple of kChunk within the sequence (after chunk offset / kChunk - 1).
// The first chunk after `after` that ends at a checkpoint, or kNoChunk.
__device__ __forceinline__ int next_checkpoint_chunk(const KdaParams& p, int seq, int after, int seq_len) {
  int next = kNoChunk;
  for (int c = 0; c < p.ext.ckpt.num_checkpoints; ++c) {
    const long long offset =
        load_index(p.ext.ckpt.checkpoint_offsets, p.ext.ckpt.offsets_int64, static_cast<long long>(seq) * p.ext.ckpt.num_checkpoints + c);
    if (offset > 0 && offset <= seq_len && offset % kChunk == 0) {
      const int chunk = static_cast<int>(offset / kChunk) - 1;
      if (chunk > after && chunk < next) next = chunk;
    }
  }
  return next;
}

__device__ __forceinline__ void store_checkpoints(const KdaParams& p, int seq, int h, int chunk,
                                                  const float (&S)[kStateTiles][4], int row_lo, int tq) {
  const long long tokens = static_cast<long long>(chunk + 1) * kChunk;
  for (int c = 0; c < p.ext.ckpt.num_checkpoints; ++c) {
    const long long index = static_cast<long long>(seq) * p.ext.ckpt.num_checkpoints + c;
    if (load_index(p.ext.ckpt.checkpoint_offsets, p.ext.ckpt.offsets_int64, index) != tokens) continue;
    const long long offset = (index * p.num_heads + h) * kHeadV * kHeadK;
    if (p.ext.ckpt.checkpoint_bf16) {
      store_fragment<kStateBF16>(p.ext.ckpt.checkpoint_state, offset, S, row_lo, tq);
    } else {
      store_fragment<kStateFP32>(p.ext.ckpt.checkpoint_state, offset, S, row_lo, tq);
    }
  }
}

template <class Cfg, int STATE_IN, int STATE_OUT>
__device__ void consumer(const KdaParams& p, SharedStorage<Cfg>& sm, const StatePlan& plan, int seq, int h, int v0,
                         long long bos, int seq_len, int num_chunks, int cw, int lane) {
  constexpr int VB = Cfg::kVB;
  constexpr int kSlots = Cfg::kSlots;
  constexpr int kCluster = Cfg::kCluster;
  constexpr int kTiles = kStateTiles;
  const int gq = lane >> 2, tq = lane & 3;
  const LdsmLane al = ldsm_a_lane(lane), bl = ldsm_b_lane(lane);  // ldmatrix.x4 lane addresses
  const int row_lo = v0 + cw * 16 + gq;  // value row of accumulator elements 0,1 (elements 2,3: +8)

  // S[v][k] as MMA accumulators (fragment_index gives each element's place).
  float S[kTiles][4];
#pragma unroll
  for (int n = 0; n < kTiles; ++n) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float2 val = make_float2(0.0f, 0.0f);
      if (plan.read_offset >= 0) {  // -1: no initial state, or has_initial_state said zeros
        val = load_state2<STATE_IN>(p.initial_state, plan.read_offset + fragment_index(row_lo, tq, n, hh));
      }
      S[n][hh * 2] = val.x;
      S[n][hh * 2 + 1] = val.y;
    }
  }
  int checkpoint_chunk = (p.features & kFeatureCheckpoints) ? next_checkpoint_chunk(p, seq, -1, seq_len) : kNoChunk;

  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    const int s = chunk % kSlots;
    const Stage<VB>& st = sm.stage[s];
    mbar_wait(&sm.full[s], (chunk / kSlots) & 1);

    // W^T = S Kd^T and O^T = S Qd^T (16 value rows x 16 tokens per warp).
    float W[2][4] = {}, O[2][4] = {};
#pragma unroll
    for (int ks = 0; ks < kHeadK / 16; ++ks) {
      uint32_t af[4] = {pack_bf16(S[2 * ks][0], S[2 * ks][1]), pack_bf16(S[2 * ks][2], S[2 * ks][3]),
                        pack_bf16(S[2 * ks + 1][0], S[2 * ks + 1][1]), pack_bf16(S[2 * ks + 1][2], S[2 * ks + 1][3])};
      uint32_t kb[4], qb[4];
      ldsm_x4(&st.kd[bl.row][ks * 16 + bl.col], kb[0], kb[1], kb[2], kb[3]);
      ldsm_x4(&st.qd[bl.row][ks * 16 + bl.col], qb[0], qb[1], qb[2], qb[3]);
      mma16816(W[0], af, kb[0], kb[1]);
      mma16816(W[1], af, kb[2], kb[3]);
      mma16816(O[0], af, qb[0], qb[1]);
      mma16816(O[1], af, qb[2], qb[3]);
    }

    // X^T = V^T - W^T as an A fragment (value rows x tokens); V^T by a transposed ldmatrix.
    uint32_t xf[4];
    {
      uint32_t vf[4];
      ldsm_x4_t(&st.v[bl.row][cw * 16 + bl.col], vf[0], vf[1], vf[2], vf[3]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int nt = e >> 1, hh = e & 1;
        const float2 v2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&vf[e]));
        xf[e] = pack_bf16(v2.x - W[nt][hh * 2], v2.y - W[nt][hh * 2 + 1]);
      }
    }
    // U^T = X^T T^T: B[k][n] = T[n][k].
    float U[2][4] = {};
    {
      uint32_t tb[4];
      ldsm_x4(&st.t[bl.row][bl.col], tb[0], tb[1], tb[2], tb[3]);
      mma16816(U[0], xf, tb[0], tb[1]);
      mma16816(U[1], xf, tb[2], tb[3]);
    }
    const uint32_t uf[4] = {pack_bf16(U[0][0], U[0][1]), pack_bf16(U[0][2], U[0][3]), pack_bf16(U[1][0], U[1][1]),
                            pack_bf16(U[1][2], U[1][3])};
    // O^T += U^T M^T: B[k][n] = M[n][k].
    {
      uint32_t mb[4];
      ldsm_x4(&st.m[bl.row][bl.col], mb[0], mb[1], mb[2], mb[3]);
      mma16816(O[0], uf, mb[0], mb[1]);
      mma16816(O[1], uf, mb[2], mb[3]);
    }
    // S = S diag(Gamma) + U^T Kr: B[k = token][n = key] from Kr (transposed load).
#pragma unroll
    for (int n = 0; n < kTiles; n += 2) {
      uint32_t rb[4];
      ldsm_x4_t(&st.kr[al.row][n * 8 + al.col], rb[0], rb[1], rb[2], rb[3]);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float2 gm = *reinterpret_cast<const float2*>(&st.gamma[(n + j) * 8 + tq * 2]);
        S[n + j][0] *= gm.x;
        S[n + j][1] *= gm.y;
        S[n + j][2] *= gm.x;
        S[n + j][3] *= gm.y;
      }
      mma16816(S[n], uf, rb[0], rb[1]);
      mma16816(S[n + 1], uf, rb[2], rb[3]);
    }
    if (chunk == checkpoint_chunk) {  // S is now the state after this chunk's last token
      store_checkpoints(p, seq, h, chunk, S, row_lo, tq);
      checkpoint_chunk = next_checkpoint_chunk(p, seq, chunk, seq_len);
    }
    // The slot is no longer needed here: tell its producing CTA (rank s % kCluster).
    if (chunk + kSlots < num_chunks) {
      if constexpr (kCluster == 1) {
        mbar_arrive(&sm.empty[s]);
      } else {
        mbar_arrive_cluster(map_to_rank(smem_addr(&sm.empty[s]), s % kCluster));
      }
    }

    // out: stage O (value rows x tokens) through shared memory, then 16-byte stores.
    bf16(*os)[kSmallPad] = sm.out[cw];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int nt = e >> 2, hh = (e >> 1) & 1, lo = e & 1;
      os[nt * 8 + tq * 2 + lo][gq + hh * 8] = __float2bfloat16_rn(O[nt][hh * 2 + lo]);
    }
    __syncwarp();
    {
      const int tok = lane >> 1, half = lane & 1;
      const int t = chunk * kChunk + tok;
      if (t < seq_len) {
        const long long off = ((bos + t) * p.num_heads + h) * kHeadV + v0 + cw * 16 + half * 8;
        *reinterpret_cast<uint4*>(p.out + off) = *reinterpret_cast<const uint4*>(&os[tok][half * 8]);
      }
    }
    __syncwarp();
  }

  if (p.final_state != nullptr) store_fragment<STATE_OUT>(p.final_state, plan.write_offset, S, row_lo, tq);
}

}  // namespace flash_kda
