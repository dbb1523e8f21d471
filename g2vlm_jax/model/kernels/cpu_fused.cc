// Fused flash-attention forward for XLA:CPU (an XLA FFI custom call), the CPU counterpart of the TPU kernel:
// per (query block, key block) tile the two matmuls, the mask rule, the exponentials and the running row sums
// stay in the cache and in registers, where XLA:CPU runs each of them as a separate pass over memory.
//
// Inputs (shapes as the Python side, `kernels/cpu_fused.py`, passes them):
//   q      f32[B, Lq, Hq, D]    (rotary applied; the softmax scale D^-0.5 is applied here)
//   k, v   f32[B, Lk, Hkv, D]   Hq a multiple of Hkv (grouped-query attention)
//   qmeta  i32[5, B, Lq]        query metadata: seq_order, document_ids, split_ids, split_full, geo_frame
//   kmeta  i32[5, B, Lk]        key metadata, same fields
//   parity i32[]                the layer's parity (read in mode 'mixed' only)
// Attribute: mode (0 = every pair allowed, 1 = global, 2 = frame, 3 = block_causal, 4 = mixed): the rule of
// model/mask.py, evaluated here per tile. Output: f32[B, Lq, Hq, D]; a query with no allowed key gets 0.
//
// Vectors are GCC vector extensions of the widest width the compiler targets (-march=native: 16 floats with
// AVX-512, 8 with AVX2), so the same source builds on either. Measured on a 2-core AMD EPYC with AVX-512, one
// MoT layer's attention at L = 8,320 (6/2 heads of 64, reconstruction metadata): 0.58 s, 185 GFLOP/s, against
// 0.81-0.86 s for the pure-JAX blockwise kernel; the register tiles alone run at 110-115 GFLOP/s a core.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef float vf_u __attribute__((vector_size(W * 4), aligned(4)));  // unaligned access
typedef int32_t vi __attribute__((vector_size(W * 4)));

// Tile: 96 queries x 128 keys. With AVX-512 the register tiles use 24 of the 32 vector registers as accumulators
// (12 x 2 for Q.K^T, 6 x 4 for P.V at D >= 64); on a 2-core Xeon (Sapphire Rapids class) one layer's global
// attention at L = 8,320 took 440 ms against 468 ms with 64 queries and 16-accumulator tiles (median of six
// interleaved runs each); on the AMD machine 32-128 x 128-256 tiles measured within 2 % of each other.
constexpr int BQ = 96;
constexpr int BK = 128;
constexpr int MR = W == 16 ? 12 : 4;  // rows of the Q.K^T register tile (x 2 vectors of keys)
constexpr int PR = W == 16 ? 6 : 4;   // rows of the P.V register tile
constexpr int PC_MAX = W == 16 ? 4 : 2;  // vectors of the P.V register tile's columns

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_u*>(p) = x; }
// A broadcast. (`vf{} + x` would cost a scalar add before it: 0 + -0 is +0, so the add cannot be dropped.)
template <size_t... I>
inline vf splat_lanes(float x, std::index_sequence<I...>) { return vf{((void)I, x)...}; }
inline vf splat(float x) { return splat_lanes(x, std::make_index_sequence<W>{}); }

// 2^x for x <= 0 (x = -inf gives 0): 2^n * p(f) with n = round(x), |f| <= 1/2, and Cephes' degree-6 polynomial
// for 2^f (relative error ~2e-7, float's own rounding). The logits are in base-2 units: the query tiles are
// scaled by log2(e) / sqrt(D), so exp(scaled logit - max) = 2^(logit - max) with no multiply here.
inline vf exp2_neg(vf x) {
  x = x < splat(-126.0f) ? splat(-126.0f) : x;
  const vf n = (x + splat(12582912.0f)) - splat(12582912.0f);  // round to nearest (|x| < 2^22)
  const vf f = x - n;
  vf p = splat(1.535336188319500e-4f);
  p = p * f + splat(1.339887440266574e-3f);
  p = p * f + splat(9.618437357674640e-3f);
  p = p * f + splat(5.550332471162809e-2f);
  p = p * f + splat(2.402264791363012e-1f);
  p = p * f + splat(6.931472028550421e-1f);
  p = p * f + splat(1.0f);
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return x <= splat(-126.0f) ? splat(0.0f) : p * scale;
}

// Horizontal max and sum of a vector: a tree of lane swaps (log2 W steps), not a chain of W scalar operations.
inline vf swap_lanes(vf x, int half) {
#if defined(__AVX512F__)
  static const vi masks[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                              {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                              {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                              {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
  return __builtin_shuffle(x, masks[half]);
#else
  static const vi masks[3] = {{4, 5, 6, 7, 0, 1, 2, 3}, {2, 3, 0, 1, 6, 7, 4, 5}, {1, 0, 3, 2, 5, 4, 7, 6}};
  return __builtin_shuffle(x, masks[half]);
#endif
}
constexpr int REDUCE_STEPS = W == 16 ? 4 : 3;

inline float hmax(vf x) {
  for (int step = 0; step < REDUCE_STEPS; ++step) {
    const vf y = swap_lanes(x, step);
    x = y > x ? y : x;
  }
  return x[0];
}
inline float hsum(vf x) {
  for (int step = 0; step < REDUCE_STEPS; ++step) x += swap_lanes(x, step);
  return x[0];
}

struct Meta {  // one side's metadata of one batch row: five int32[L] fields
  const int32_t *order, *doc, *split, *full, *geo;
};

// What a block of tokens' metadata allows to be decided for a whole tile without looking at each pair.
struct Summary {
  int32_t doc_min, doc_max, order_min, order_max;
  bool all_geo;
};

Summary summarize(const Meta& m, int64_t start, int64_t n) {
  Summary s{m.doc[start], m.doc[start], m.order[start], m.order[start], true};
  for (int64_t i = start; i < start + n; ++i) {
    s.doc_min = std::min(s.doc_min, m.doc[i]), s.doc_max = std::max(s.doc_max, m.doc[i]);
    s.order_min = std::min(s.order_min, m.order[i]), s.order_max = std::max(s.order_max, m.order[i]);
    s.all_geo = s.all_geo && m.geo[i] >= 0;
  }
  return s;
}

// 0 when the rule allows no pair of the tile, 1 when it allows every pair, 2 when each pair must be evaluated.
int classify(int mode, bool odd, const Summary& q, const Summary& k) {
  if (q.doc_max <= 0 || k.doc_max <= 0 || q.doc_max < k.doc_min || k.doc_max < q.doc_min) return 0;
  if (!(q.doc_min == q.doc_max && k.doc_min == k.doc_max && q.doc_min == k.doc_min)) return 2;
  const bool causal = k.order_max <= q.order_min;  // every key precedes every query in reading order
  const bool global = mode == 1 || (mode == 4 && odd);
  if (global && (causal || (q.all_geo && k.all_geo))) return 1;
  if (mode == 3 && causal) return 1;
  return 2;
}

// Keys of one tile, padded to BK with document 0 (a key no query may see).
struct KeyTile {
  alignas(64) int32_t order[BK], doc[BK], split[BK], geo[BK];
};

// The mask of one tile (model/mask.py's mask_rule): allowed[i * BK / W + j / W] lane j % W is -1 where query
// q0 + i may see key j of the tile, 0 elsewhere. Returns whether any pair is allowed.
bool tile_mask(int mode, bool odd, const Meta& q, int64_t q0, int nq, const KeyTile& kt, vi* allowed) {
  vi any{};
  for (int i = 0; i < BQ; ++i) {
    vi* row = allowed + i * (BK / W);
    if (i >= nq) {
      for (int j = 0; j < BK / W; ++j) row[j] = vi{};
      continue;
    }
    const int64_t qi = q0 + i;
    const vi qdoc = vi{} + q.doc[qi], qord = vi{} + q.order[qi], qsplit = vi{} + q.split[qi], qgeo = vi{} + q.geo[qi];
    const vi qfull = vi{} + (q.full[qi] ? -1 : 0), qpos = vi{} + (q.doc[qi] > 0 ? -1 : 0);
    const vi qg = vi{} + (q.geo[qi] >= 0 ? -1 : 0), odd_v = vi{} + (odd ? -1 : 0);
    for (int j = 0; j < BK; j += W) {
      const vi kdoc = *reinterpret_cast<const vi*>(kt.doc + j), kgeo = *reinterpret_cast<const vi*>(kt.geo + j);
      const vi same_doc = (kdoc == qdoc) & qpos;
      const vi base = (*reinterpret_cast<const vi*>(kt.order + j) <= qord) |
                      (qfull & (*reinterpret_cast<const vi*>(kt.split + j) == qsplit));
      const vi both_geo = qg & (kgeo >= 0);
      const vi other_frame = both_geo & (kgeo != qgeo);
      vi ok;
      switch (mode) {
        case 1: ok = base | both_geo; break;
        case 2: ok = base & ~other_frame; break;
        case 3: ok = base | ((kgeo >= 0) & (kgeo <= qgeo)); break;
        default: ok = (base | (both_geo & odd_v)) & ~(other_frame & ~odd_v); break;
      }
      row[j / W] = ok & same_doc;
      any |= row[j / W];
    }
  }
  for (int l = 0; l < W; ++l)
    if (any[l]) return true;
  return false;
}

// s[i, j] = sum_d qs[i, d] * kt[d, j] for i < BQ, j < BK (kt: the key tile transposed, [D][BK]).
template <int D>
void qk_tile(const float* qs, const float* kt, float* s) {
  for (int i0 = 0; i0 < BQ; i0 += MR) {
    for (int j0 = 0; j0 < BK; j0 += 2 * W) {
      vf acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = vf{};
      for (int d = 0; d < D; ++d) {
        const vf k0 = load(kt + d * BK + j0), k1 = load(kt + d * BK + j0 + W);
        for (int r = 0; r < MR; ++r) {
          const vf qv = splat(qs[(i0 + r) * D + d]);
          acc[r][0] += qv * k0;
          acc[r][1] += qv * k1;
        }
      }
      for (int r = 0; r < MR; ++r) {
        store(s + (i0 + r) * BK + j0, acc[r][0]);
        store(s + (i0 + r) * BK + j0 + W, acc[r][1]);
      }
    }
  }
}

// o[i, :] += sum_j p[i, j] * vt[j, :] for i < BQ (vt: the value tile, [BK][D]).
template <int D>
void pv_tile(const float* p, const float* vt, float* o) {
  constexpr int PC = std::min(PC_MAX, D / W);
  for (int i0 = 0; i0 < BQ; i0 += PR) {
    for (int c0 = 0; c0 < D; c0 += PC * W) {
      vf acc[PR][PC];
      for (int r = 0; r < PR; ++r)
        for (int c = 0; c < PC; ++c) acc[r][c] = load(o + (i0 + r) * D + c0 + c * W);
      for (int j = 0; j < BK; ++j) {
        vf vv[PC];
        for (int c = 0; c < PC; ++c) {
          vv[c] = load(vt + j * D + c0 + c * W);
          asm("" : "+v"(vv[c]));  // keep it in a register: GCC would fold it into each row's FMA (PR loads, not 1)
        }
        for (int r = 0; r < PR; ++r) {
          const vf pv = splat(p[(i0 + r) * BK + j]);
          for (int c = 0; c < PC; ++c) acc[r][c] += pv * vv[c];
        }
      }
      for (int r = 0; r < PR; ++r)
        for (int c = 0; c < PC; ++c) store(o + (i0 + r) * D + c0 + c * W, acc[r][c]);
    }
  }
}

struct Problem {
  int64_t b, lq, lk, hq, hkv, d;
  const float *q, *k, *v;
  float* out;
  const int32_t *qmeta, *kmeta;
  int mode;
  bool odd;
  int64_t nqb, nkb;
  std::vector<float> kt, vt;  // packed keys [b][hkv][nkb][D][BK] and values [b][hkv][nkb][BK][D], zero padded
  std::vector<KeyTile> key_tiles;  // [b][nkb] key metadata (masked modes)
  std::vector<Summary> q_summary, k_summary;  // [b][nqb], [b][nkb]
};

Meta meta_of(const int32_t* base, int64_t b, int64_t batch, int64_t len) {
  const int64_t field = batch * len;
  const int32_t* row = base + b * len;
  return Meta{row, row + field, row + 2 * field, row + 3 * field, row + 4 * field};
}

template <int D>
void pack_kv(Problem& pr, int64_t b, int64_t h) {
  for (int64_t kb = 0; kb < pr.nkb; ++kb) {
    float* kt = pr.kt.data() + (((b * pr.hkv + h) * pr.nkb + kb) * D * BK);
    float* vt = pr.vt.data() + (((b * pr.hkv + h) * pr.nkb + kb) * BK * D);
    for (int j = 0; j < BK; ++j) {
      const int64_t key = kb * BK + j;
      if (key >= pr.lk) break;  // the tile buffers were zero-filled
      const float* ksrc = pr.k + ((b * pr.lk + key) * pr.hkv + h) * D;
      const float* vsrc = pr.v + ((b * pr.lk + key) * pr.hkv + h) * D;
      for (int d = 0; d < D; ++d) kt[d * BK + j] = ksrc[d];
      std::memcpy(vt + j * D, vsrc, D * sizeof(float));
    }
  }
}

// One work item: query block qb of batch row b, all the query heads of K/V head h.
template <int D>
void run_block(const Problem& pr, int64_t b, int64_t h, int64_t qb) {
  const int64_t group = pr.hq / pr.hkv;
  const int64_t q0 = qb * BQ;
  const int nq = static_cast<int>(std::min<int64_t>(BQ, pr.lq - q0));
  const float scale = 1.4426950408889634f / std::sqrt(static_cast<float>(D));  // log2(e) / sqrt(D)
  alignas(64) float s[BQ * BK];
  vi allowed[BQ * BK / W];
  // the query tiles of the group's heads, scaled (rows past Lq are zero), then the running output, max and sum
  std::vector<float> qs(group * BQ * D, 0.0f), o(group * BQ * D, 0.0f), m(group * BQ, -INFINITY);
  std::vector<vf> l(group * BQ, vf{});  // row sums kept per lane, added across lanes once at the end
  for (int64_t g = 0; g < group; ++g)
    for (int i = 0; i < nq; ++i) {
      const float* src = pr.q + ((b * pr.lq + q0 + i) * pr.hq + h * group + g) * D;
      for (int d = 0; d < D; ++d) qs[(g * BQ + i) * D + d] = src[d] * scale;
    }
  const Meta qm = pr.mode != 0 ? meta_of(pr.qmeta, b, pr.b, pr.lq) : Meta{};
  for (int64_t kb = 0; kb < pr.nkb; ++kb) {
    const int nk = static_cast<int>(std::min<int64_t>(BK, pr.lk - kb * BK));
    // 1: every pair of the tile allowed (the padding keys past Lk aside), 2: the mask `allowed` decides
    int kind = 1;
    if (pr.mode != 0) {
      kind = classify(pr.mode, pr.odd, pr.q_summary[b * pr.nqb + qb], pr.k_summary[b * pr.nkb + kb]);
      if (kind == 2 && !tile_mask(pr.mode, pr.odd, qm, q0, nq, pr.key_tiles[b * pr.nkb + kb], allowed)) kind = 0;
      if (kind == 0) continue;
    }
    const float* kt = pr.kt.data() + (((b * pr.hkv + h) * pr.nkb + kb) * D * BK);
    const float* vt = pr.vt.data() + (((b * pr.hkv + h) * pr.nkb + kb) * BK * D);
    for (int64_t g = 0; g < group; ++g) {
      qk_tile<D>(qs.data() + g * BQ * D, kt, s);
      float* og = o.data() + g * BQ * D;
      float* mg = m.data() + g * BQ;
      vf* lg = l.data() + g * BQ;
      for (int i = 0; i < BQ; ++i) {
        float* row = s + i * BK;
        if (i >= nq) {
          std::memset(row, 0, BK * sizeof(float));
          continue;
        }
        if (kind == 2) {
          for (int j = 0; j < BK; j += W) store(row + j, allowed[i * (BK / W) + j / W] ? load(row + j) : splat(-INFINITY));
        } else {
          for (int j = nk; j < BK; ++j) row[j] = -INFINITY;
        }
        vf vmax = splat(-INFINITY);
        for (int j = 0; j < BK; j += W) { const vf x = load(row + j); vmax = x > vmax ? x : vmax; }
        const float tile_max = hmax(vmax);
        if (tile_max == -INFINITY) {  // nothing allowed in this row of the tile
          std::memset(row, 0, BK * sizeof(float));
          continue;
        }
        const float m_new = std::max(mg[i], tile_max);
        // the vector polynomial on one lane: libm's scalar exp2f was 2.5 % of a 518x392 reconstruction's samples
        const float alpha = mg[i] == -INFINITY ? 0.0f : exp2_neg(splat(mg[i] - m_new))[0];
        vf vsum{};
        const vf vm = splat(m_new);
        for (int j = 0; j < BK; j += W) {
          const vf p = exp2_neg(load(row + j) - vm);
          store(row + j, p);
          vsum += p;
        }
        lg[i] = lg[i] * splat(alpha) + vsum;
        mg[i] = m_new;
        if (alpha != 1.0f) {
          const vf va = splat(alpha);
          for (int d = 0; d < D; d += W) store(og + i * D + d, load(og + i * D + d) * va);
        }
      }
      pv_tile<D>(s, vt, og);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const int64_t head = h * group + g;
    for (int i = 0; i < nq; ++i) {
      const float li = hsum(l[g * BQ + i]);
      const float inv = li > 0 ? 1.0f / li : 0.0f;
      float* dst = pr.out + ((b * pr.lq + q0 + i) * pr.hq + head) * D;
      const float* src = o.data() + (g * BQ + i) * D;
      for (int d = 0; d < D; ++d) dst[d] = src[d] * inv;
    }
  }
}

// Runs fn(item) for item in [0, n) on the caller and on helpers from the XLA intra-op thread pool. The caller
// waits only for helpers that have started: XLA may run several custom calls at once on that pool, so a helper
// can sit in its queue behind the very calls that wait for it. A helper that starts after the caller returned
// finds no item left and touches nothing but the shared counters.
struct ParallelState {
  std::atomic<int64_t> next{0}, active{0};
  std::mutex mu;
  std::condition_variable cv;
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t n = 0;

  void work() {
    active.fetch_add(1);
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) (*fn)(i);
    std::lock_guard<std::mutex> lock(mu);
    if (active.fetch_sub(1) == 1) cv.notify_all();
  }
};

void parallel_for(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  auto state = std::make_shared<ParallelState>();
  state->fn = &fn, state->n = n;
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->work(); });
  state->work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->active.load() == 0; });
}

template <int D>
void run(Problem& pr, ffi::ThreadPool& pool) {
  pr.kt.assign(pr.b * pr.hkv * pr.nkb * D * BK, 0.0f);
  pr.vt.assign(pr.b * pr.hkv * pr.nkb * BK * D, 0.0f);
  parallel_for(pool, pr.b * pr.hkv, [&](int64_t i) { pack_kv<D>(pr, i / pr.hkv, i % pr.hkv); });
  if (pr.mode != 0) {
    pr.key_tiles.assign(pr.b * pr.nkb, KeyTile{});  // zero: padding keys are in document 0
    for (int64_t b = 0; b < pr.b; ++b) {
      const Meta qm = meta_of(pr.qmeta, b, pr.b, pr.lq), km = meta_of(pr.kmeta, b, pr.b, pr.lk);
      for (int64_t qb = 0; qb < pr.nqb; ++qb)
        pr.q_summary.push_back(summarize(qm, qb * BQ, std::min<int64_t>(BQ, pr.lq - qb * BQ)));
      for (int64_t kb = 0; kb < pr.nkb; ++kb) {
        const int64_t k0 = kb * BK, nk = std::min<int64_t>(BK, pr.lk - k0);
        pr.k_summary.push_back(summarize(km, k0, nk));
        KeyTile& t = pr.key_tiles[b * pr.nkb + kb];
        std::memcpy(t.order, km.order + k0, nk * 4), std::memcpy(t.doc, km.doc + k0, nk * 4);
        std::memcpy(t.split, km.split + k0, nk * 4), std::memcpy(t.geo, km.geo + k0, nk * 4);
      }
    }
  }
  const int64_t per_row = pr.hkv * pr.nqb;
  parallel_for(pool, pr.b * per_row, [&](int64_t i) {
    run_block<D>(pr, i / per_row, (i % per_row) / pr.nqb, i % pr.nqb);
  });
}

ffi::Error attention_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qmeta, ffi::Buffer<ffi::S32> kmeta,
                          ffi::Buffer<ffi::S32> parity, ffi::ResultBuffer<ffi::F32> out, int64_t mode) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("cpu_fused attention: q, k, v must be rank 4");
  Problem pr;
  pr.b = qd[0], pr.lq = qd[1], pr.hq = qd[2], pr.d = qd[3], pr.lk = kd[1], pr.hkv = kd[2];
  if (kd[0] != pr.b || kd[3] != pr.d || pr.hq % pr.hkv) return ffi::Error::InvalidArgument("cpu_fused attention: q/k/v shapes");
  pr.q = q.typed_data(), pr.k = k.typed_data(), pr.v = v.typed_data(), pr.out = out->typed_data();
  pr.qmeta = qmeta.typed_data(), pr.kmeta = kmeta.typed_data();
  pr.mode = static_cast<int>(mode);
  pr.odd = mode == 4 ? (parity.typed_data()[0] % 2 != 0) : 0;
  pr.nqb = (pr.lq + BQ - 1) / BQ, pr.nkb = (pr.lk + BK - 1) / BK;
  switch (pr.d) {
    case 32: run<32>(pr, pool); break;
    case 64: run<64>(pr, pool); break;
    case 128: run<128>(pr, pool); break;
    default: return ffi::Error::InvalidArgument("cpu_fused attention: head dim must be 32, 64 or 128");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(G2vlmCpuFusedAttention, attention_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode"));
