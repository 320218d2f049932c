// Native CPU kernels of the ffa_linear ops (C++17, OpenMP): the fused adapter backward and the clip reduce.
//
// Computes exactly fedlora_fast/reference/ffa_linear.py (maths in DESIGN.md, FFA-LoRA: Sun et al., ICLR
// 2024, arXiv 2403.12313). Samples are spread over OpenMP threads (static schedule: results do not depend
// on timing); with fewer samples than threads, the tiles of one sample are. For one sample i, G_i (T x out)
// is read once to form every P_i = s G_i^T U_i: the output is tiled into 32 columns x 8 ranks, a tile of
// accumulators that stays in registers while t runs over the tokens, so P_i is written once and its norm
// taken on the way out. V_i = G_i B is a second, row-wise sweep over G_i while it is still in L2 (T x out x
// 4 bytes = 768 KiB at BERT shapes, L2 = 2 MiB here). Sum mode (no per-sample results) runs the same tiles
// over all n x T tokens at once, unless V is needed and samples are long (then per sample, as above).
#include "ffa_linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fedlora_fast {
namespace {

constexpr int64_t kKB = 8;   // ranks per register tile (r is padded up to a multiple of 8 with zeros)
constexpr int64_t kAW = 32;  // output columns per register tile (two AVX-512 / four AVX2 vectors)
// chunks of samples whose clipped sums the backward adds in a fixed order (its parallelism in clip mode, and
// in sum mode's per-sample route, with many samples). Memory: chunks x out x r floats (+ in x r in LoRA
// mode), at most kSumChunks chunks and, for wide layers, as many as fit in kSumScratch floats (8 at
// out = 32000, r = 64).
constexpr int64_t kSumChunks = 32;
constexpr int64_t kSumScratch = int64_t{1} << 24;  // 64 MiB of float32
// sum mode: tokens per block of the pass over all n x T tokens (outer_sum_par)
constexpr int64_t kSumTokens = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// acc[k][j] = sum_t R[t][k] * L[t][j] for j < W (W = kAW, or fewer at the right edge).
template <int64_t W>
inline void tile_full(const float* L, int64_t ldL, const float* R, int64_t ldR, int64_t T, float acc[kKB][kAW]) {
    for (int64_t k = 0; k < kKB; ++k)
        for (int64_t j = 0; j < kAW; ++j) acc[k][j] = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
        const float* l = L + t * ldL;
        const float* rr = R + t * ldR;
        for (int64_t k = 0; k < kKB; ++k) {
            const float rk = rr[k];
#pragma omp simd
            for (int64_t j = 0; j < W; ++j) acc[k][j] += rk * l[j];
        }
    }
}

inline void tile_edge(const float* L, int64_t ldL, const float* R, int64_t ldR, int64_t T, int64_t w,
                      float acc[kKB][kAW]) {
    for (int64_t k = 0; k < kKB; ++k)
        for (int64_t j = 0; j < kAW; ++j) acc[k][j] = 0.0f;
    for (int64_t t = 0; t < T; ++t) {
        const float* l = L + t * ldL;
        const float* rr = R + t * ldR;
        for (int64_t k = 0; k < kKB; ++k) {
            const float rk = rr[k];
            for (int64_t j = 0; j < w; ++j) acc[k][j] += rk * l[j];
        }
    }
}

// out[a * sa + k * sk] = s * sum_t L[t][a] * R[t][k] for a < na, k < nk (add: += instead of =); returns the
// squared Frobenius norm of the term (double accumulation). L: (T, na) row stride ldL; R: (T, nkp) zero-padded,
// nkp % 8 == 0.
double outer_acc(const float* L, int64_t ldL, int64_t na, const float* R, int64_t nkp, int64_t nk, int64_t T,
                 float s, float* out, int64_t sa, int64_t sk, bool add = false) {
    double norm2 = 0.0;
    alignas(64) float acc[kKB][kAW];
    for (int64_t a0 = 0; a0 < na; a0 += kAW) {
        const int64_t w = std::min(kAW, na - a0);
        // this 32-row tile's share, added whole: the very sums outer_acc_par forms per tile, so a sample's
        // norm is bitwise the same whichever of the two ran it (i.e. whatever the thread count)
        double part = 0.0;
        for (int64_t k0 = 0; k0 < nk; k0 += kKB) {
            if (w == kAW)
                tile_full<kAW>(L + a0, ldL, R + k0, nkp, T, acc);
            else
                tile_edge(L + a0, ldL, R + k0, nkp, T, w, acc);
            const int64_t kb = std::min(kKB, nk - k0);
            for (int64_t k = 0; k < kb; ++k)
                for (int64_t j = 0; j < w; ++j) {
                    const float val = s * acc[k][j];
                    float& o = out[(a0 + j) * sa + (k0 + k) * sk];
                    o = add ? o + val : val;
                    part += static_cast<double>(val) * val;
                }
        }
        norm2 += part;
    }
    return norm2;
}

// V[t][k] = sum_o G[t][o] * Bt[k][o] for one sample: Vp (T, nkp) zero-padded; Bt (nkp, out) zero-padded.
void rows_times_B(const float* G, int64_t T, int64_t out, const float* Bt, int64_t nkp, float* Vp) {
    constexpr int64_t VW = 16;
    const int64_t out_main = out / VW * VW;
    for (int64_t t = 0; t < T; ++t) {
        const float* gr = G + t * out;
        for (int64_t k0 = 0; k0 < nkp; k0 += kKB) {
            alignas(64) float acc[kKB][VW] = {};
            for (int64_t o = 0; o < out_main; o += VW) {
                for (int64_t k = 0; k < kKB; ++k) {
                    const float* b = Bt + (k0 + k) * out + o;
#pragma omp simd
                    for (int64_t j = 0; j < VW; ++j) acc[k][j] += gr[o + j] * b[j];
                }
            }
            for (int64_t k = 0; k < kKB; ++k) {
                float sum = 0.0f;
                for (int64_t j = 0; j < VW; ++j) sum += acc[k][j];
                const float* b = Bt + (k0 + k) * out;
                for (int64_t o = out_main; o < out; ++o) sum += gr[o] * b[o];
                Vp[t * nkp + k0 + k] = sum;
            }
        }
    }
}

// outer_acc with its 32-column tiles spread over threads (one sample, fewer samples than threads). The
// per-tile norms are summed in tile order afterwards, so the result does not depend on timing.
double outer_acc_par(const float* L, int64_t ldL, int64_t na, const float* R, int64_t nkp, int64_t nk, int64_t T,
                     float s, float* out, int64_t sa, int64_t sk, bool add = false) {
    const int64_t ntiles = (na + kAW - 1) / kAW;
    std::vector<double> part(ntiles, 0.0);
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t a0 = tile * kAW;
        part[tile] = outer_acc(L + a0, ldL, std::min(kAW, na - a0), R, nkp, nk, T, s, out + a0 * sa, sa, sk, add);
    }
    double norm2 = 0.0;
    for (double v : part) norm2 += v;
    return norm2;
}

// out += s * sum_t L[t][a] * R[t][k] over all T rows, as outer_acc, in blocks of kSumTokens rows each summed in
// float32 and added into out (no float32 sum runs over more rows than that); the 32-column tiles go to threads
// in one parallel region. Tiles and blocks are fixed by the shape: the same bits for every thread count.
void outer_sum_par(const float* L, int64_t ldL, int64_t na, const float* R, int64_t nkp, int64_t nk, int64_t T,
                   float s, float* out, int64_t sa, int64_t sk) {
    const int64_t ntiles = (na + kAW - 1) / kAW;
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t tile = 0; tile < ntiles; ++tile) {
        const int64_t a0 = tile * kAW, w = std::min(kAW, na - a0);
        for (int64_t t0 = 0; t0 < T; t0 += kSumTokens)
            outer_acc(L + t0 * ldL + a0, ldL, w, R + t0 * nkp, nkp, nk, std::min(kSumTokens, T - t0), s,
                      out + a0 * sa, sa, sk, true);
    }
}

// rows_times_B with blocks of 16 rows spread over threads.
void rows_times_B_par(const float* G, int64_t T, int64_t out, const float* Bt, int64_t nkp, float* Vp) {
    constexpr int64_t rows = 16;
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int64_t t0 = 0; t0 < T; t0 += rows)
        rows_times_B(G + t0 * out, std::min(rows, T - t0), out, Bt, nkp, Vp + t0 * nkp);
}

void require(bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument(msg);
}

void check_bwd(const FfaLinearBwdParams& p) {
    require(p.n >= 0 && p.T >= 0, "ffa_linear_bwd: n and T must be >= 0, got n=" + std::to_string(p.n) +
                                      " T=" + std::to_string(p.T));
    require(p.out >= 1 && p.r >= 1, "ffa_linear_bwd: out and r must be >= 1, got out=" + std::to_string(p.out) +
                                        " r=" + std::to_string(p.r));
    require(p.mode == MODE_SUM || p.mode == MODE_PER_SAMPLE || p.mode == MODE_CLIP,
            "ffa_linear_bwd: mode: expected 0 (sum), 1 (per-sample) or 2 (clip), got " + std::to_string(p.mode));
    require(std::isfinite(p.scale), "ffa_linear_bwd: scale must be finite");
    const bool lora = p.xa != nullptr;
    require(p.g && p.u && p.B, "ffa_linear_bwd: g, u and B must be given");
    require(p.gB != nullptr, "ffa_linear_bwd: gB output must be given");
    if (p.mode != MODE_SUM) require(p.nuB != nullptr, "ffa_linear_bwd: nuB output must be given unless mode is sum");
    if (p.mode == MODE_CLIP)
        require(std::isfinite(p.clip_B) && p.clip_B >= 0.0f,
                "ffa_linear_bwd: clip_B must be finite and >= 0 in clip mode, got " + std::to_string(p.clip_B));
    if (lora) {
        require(p.in >= 1, "ffa_linear_bwd: in must be >= 1 in LoRA mode, got " + std::to_string(p.in));
        require(p.gA != nullptr, "ffa_linear_bwd: gA output must be given in LoRA mode (xa given)");
        if (p.mode != MODE_SUM)
            require(p.nuA != nullptr, "ffa_linear_bwd: nuA output must be given unless mode is sum");
        if (p.mode == MODE_CLIP)
            require(std::isfinite(p.clip_A) && p.clip_A >= 0.0f,
                    "ffa_linear_bwd: clip_A must be finite and >= 0 in clip mode, got " + std::to_string(p.clip_A));
    }
}

}  // namespace

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

float clip_coef(float norm2, float max_norm) {
    const float norm = std::sqrt(norm2);
    if (!std::isfinite(norm)) return 0.0f;
    return std::min(1.0f, max_norm / (norm + kNormEps));
}

void ffa_linear_bwd(const FfaLinearBwdParams& p) {
    check_bwd(p);
    const int64_t n = p.n, T = p.T, out = p.out, r = p.r, in = p.in;
    const bool lora = p.xa != nullptr;
    const bool per_sample = p.mode == MODE_PER_SAMPLE;
    const bool need_v = lora || p.v != nullptr;
    const int64_t rp = round_up(r, kKB);
    const int64_t szB = out * r, szA = lora ? r * in : 0;

    // B^T zero-padded to rp rows: the rows_times_B operand (rp x out, 48 KiB at out=1536, r=8).
    std::vector<float> Bt(need_v ? rp * out : 0, 0.0f);
    if (need_v)
        for (int64_t o = 0; o < out; ++o)
            for (int64_t k = 0; k < r; ++k) Bt[k * out + o] = p.B[o * r + k];

    // Everything for sample i. Scratch: Up, Vp (T x rp), PB, PA (one P_i, Q_i in sum / clip modes);
    // sB, sA: the running sums of c_i P_i, c_i Q_i. par: spread the tiles of this one sample over threads.
    auto sample = [&](int64_t i, float* Up, float* Vp, float* PB, float* PA, float* sB, float* sA, bool par) {
        const float* Gi = p.g + i * T * out;
        for (int64_t t = 0; t < T; ++t) std::memcpy(&Up[t * rp], p.u + (i * T + t) * r, sizeof(float) * r);
        if (need_v) {
            (par ? rows_times_B_par : rows_times_B)(Gi, T, out, Bt.data(), rp, Vp);
            if (p.v)
                for (int64_t t = 0; t < T; ++t) std::memcpy(p.v + (i * T + t) * r, &Vp[t * rp], sizeof(float) * r);
        }
        auto reduce = [&](double norm2, float clip, float* nu, const float* P, float* sum, int64_t size) {
            if (p.mode != MODE_SUM) nu[i] = static_cast<float>(norm2);
            if (per_sample) return;
            const float c = p.mode == MODE_CLIP ? clip_coef(static_cast<float>(norm2), clip) : 1.0f;
            if (c != 0.0f)  // c = 0 drops the sample, NaNs included
                for (int64_t e = 0; e < size; ++e) sum[e] += c * P[e];
        };
        // B: P_i = s G_i^T U_i, (out, r)
        float* dstB = per_sample ? p.gB + i * szB : PB;
        const double nB = (par ? outer_acc_par : outer_acc)(Gi, out, out, Up, rp, r, T, p.scale, dstB, r, 1, false);
        reduce(nB, p.clip_B, p.nuB, PB, sB, szB);
        if (!lora) return;
        // A (LoRA mode): Q_i = s V_i^T Xa_i, (r, in)
        float* dstA = per_sample ? p.gA + i * szA : PA;
        const double nA = (par ? outer_acc_par : outer_acc)(p.xa + i * T * in, in, in, Vp, rp, r, T, p.scale, dstA,
                                                            1, in, false);
        reduce(nA, p.clip_A, p.nuA, PA, sA, szA);
    };

    // Sum mode needs no per-sample results: G^T U (and Xa^T V) over all n x T tokens at once (outer_sum_par),
    // without per-sample or per-chunk buffers (~100x faster than the per-sample route at 64 samples of a
    // 32000-wide layer, r = 64; bench/NOTES.md). Where V = G B is needed too, that route reads G from memory
    // twice, while the per-sample route makes its second sweep over G_i in L2 and pays ~3 passes over each
    // P_i instead: it is the cheaper one when T > 3 r (MiniLM's T = 128, r = 8: 20-28 % faster, measured).
    if (p.mode == MODE_SUM && (!need_v || T <= 3 * r)) {
        std::fill(p.gB, p.gB + szB, 0.0f);
        if (lora) std::fill(p.gA, p.gA + szA, 0.0f);
        const int64_t NT = n * T;
        std::vector<float> Up(NT * rp, 0.0f), Vp(need_v ? NT * rp : 0, 0.0f);
        for (int64_t t = 0; t < NT; ++t) std::memcpy(&Up[t * rp], p.u + t * r, sizeof(float) * r);
        if (need_v) {
            rows_times_B_par(p.g, NT, out, Bt.data(), rp, Vp.data());
            if (p.v)
                for (int64_t t = 0; t < NT; ++t) std::memcpy(p.v + t * r, &Vp[t * rp], sizeof(float) * r);
        }
        outer_sum_par(p.g, out, out, Up.data(), rp, r, NT, p.scale, p.gB, r, 1);
        if (lora) outer_sum_par(p.xa, in, in, Vp.data(), rp, r, NT, p.scale, p.gA, 1, in);
        return;
    }
    // Clip (and per-sample-route sum) mode: the sums of c_i P_i over fixed chunks of consecutive samples (chunk
    // c holds samples [c n / chunks, (c + 1) n / chunks)), each summed in sample order by one thread, then
    // added in chunk order. The chunks depend on n and the layer's size alone, so the result is bitwise the
    // same for every thread count.
    const int64_t nchunks =
        per_sample ? 0 : std::min<int64_t>({n, kSumChunks, std::max<int64_t>(1, kSumScratch / (szB + szA))});
    // Samples (chunks) over threads; with fewer samples than threads (n = 1), or where the memory cap left a
    // wide layer fewer chunks than threads, the tiles of each sample instead (the same bits: outer_acc_par
    // forms the very per-tile sums).
    const int64_t threads = max_threads();
    const bool capped = nchunks < std::min<int64_t>(n, kSumChunks);
    const bool by_tiles = n < threads || (capped && nchunks < threads);
    const int nthreads = by_tiles ? 1 : static_cast<int>(std::min<int64_t>(threads, n));
    std::vector<float> sumB(nchunks * szB, 0.0f);
    std::vector<float> sumA(lora ? nchunks * szA : 0, 0.0f);
    auto chunk = [&](int64_t c, float* Up, float* Vp, float* PB, float* PA, bool par) {
        for (int64_t i = c * n / nchunks; i < (c + 1) * n / nchunks; ++i)
            sample(i, Up, Vp, PB, PA, &sumB[c * szB], lora ? &sumA[c * szA] : nullptr, par);
    };
    if (by_tiles) {
        std::vector<float> Up(T * rp, 0.0f), Vp(need_v ? T * rp : 0, 0.0f);
        std::vector<float> PB(per_sample ? 0 : szB), PA(per_sample ? 0 : szA);
        if (per_sample)
            for (int64_t i = 0; i < n; ++i) sample(i, Up.data(), Vp.data(), nullptr, nullptr, nullptr, nullptr, true);
        else
            for (int64_t c = 0; c < nchunks; ++c) chunk(c, Up.data(), Vp.data(), PB.data(), PA.data(), true);
    } else {
        std::string error;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
        {
            try {
                std::vector<float> Up(T * rp, 0.0f), Vp(need_v ? T * rp : 0, 0.0f);
                std::vector<float> PB(per_sample ? 0 : szB), PA(per_sample ? 0 : szA);
                if (per_sample) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
                    for (int64_t i = 0; i < n; ++i)
                        sample(i, Up.data(), Vp.data(), nullptr, nullptr, nullptr, nullptr, false);
                } else {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
                    for (int64_t c = 0; c < nchunks; ++c) chunk(c, Up.data(), Vp.data(), PB.data(), PA.data(), false);
                }
            } catch (const std::exception& e) {  // exceptions must not cross the OpenMP region
#ifdef _OPENMP
#pragma omp critical
#endif
                error = e.what();
            }
        }
        if (!error.empty()) throw std::runtime_error("ffa_linear_bwd: " + error);
    }
    if (per_sample) return;
    std::fill(p.gB, p.gB + szB, 0.0f);
    for (int64_t c = 0; c < nchunks; ++c)
        for (int64_t e = 0; e < szB; ++e) p.gB[e] += sumB[c * szB + e];
    if (lora) {
        std::fill(p.gA, p.gA + szA, 0.0f);
        for (int64_t c = 0; c < nchunks; ++c)
            for (int64_t e = 0; e < szA; ++e) p.gA[e] += sumA[c * szA + e];
    }
}

void ffa_linear_clip_reduce(const ClipReduceParams& p) {
    require(p.n >= 0 && p.numel >= 0, "ffa_linear_clip_reduce: n and numel must be >= 0, got n=" +
                                          std::to_string(p.n) + " numel=" + std::to_string(p.numel));
    require(p.out != nullptr || p.numel == 0, "ffa_linear_clip_reduce: out must be given");
    require((p.P != nullptr && p.coef != nullptr) || p.n * p.numel == 0,
            "ffa_linear_clip_reduce: P and coef must be given");
    const int64_t n = p.n, numel = p.numel;
    // each thread owns a contiguous slice of the output and walks the samples in order
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n * numel > 32768)
#endif
    for (int64_t e0 = 0; e0 < numel; e0 += 1024) {
        const int64_t e1 = std::min(numel, e0 + 1024);
        float* o = p.out + e0;
        std::fill(o, o + (e1 - e0), 0.0f);
        for (int64_t i = 0; i < n; ++i) {
            const float c = p.coef[i];
            if (c == 0.0f) continue;
            const float* src = p.P + i * numel + e0;
#pragma omp simd
            for (int64_t e = 0; e < e1 - e0; ++e) o[e] += c * src[e];
        }
    }
}

void check_lowrank(const LowRankParams& p, const char* fn) {
    require(p.N >= 0 && p.cols >= 1 && p.r >= 1, std::string(fn) + ": expected N >= 0, cols >= 1, r >= 1, got N=" +
                                                      std::to_string(p.N) + " cols=" + std::to_string(p.cols) +
                                                      " r=" + std::to_string(p.r));
    require(p.N == 0 || (p.X && p.R && p.out), std::string(fn) + ": X, R and out must be given");
}

void lowrank_in(const LowRankParams& p) {
    check_lowrank(p, "lowrank_in");
    const int64_t rp = round_up(p.r, kKB), rows = 64;
    std::vector<float> Rp(rp * p.cols, 0.0f);  // zero-padded to whole 8-rank tiles
    std::copy(p.R, p.R + p.r * p.cols, Rp.begin());
#ifdef _OPENMP
#pragma omp parallel if (p.N * p.cols * p.r > 65536)
#endif
    {
        std::vector<float> Vp(rows * rp);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t t0 = 0; t0 < p.N; t0 += rows) {
            const int64_t nt = std::min(rows, p.N - t0);
            rows_times_B(p.X + t0 * p.cols, nt, p.cols, Rp.data(), rp, Vp.data());
            for (int64_t t = 0; t < nt; ++t) std::memcpy(p.out + (t0 + t) * p.r, &Vp[t * rp], sizeof(float) * p.r);
        }
    }
}

void lowrank_out(const LowRankParams& p) {
    check_lowrank(p, "lowrank_out");
    const int64_t r = p.r, cols = p.cols;
    const float s = p.scale;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (p.N * cols * r > 65536)
#endif
    for (int64_t t = 0; t < p.N; ++t) {
        const float* l = p.X + t * r;
        float* o = p.out + t * cols;
        constexpr int64_t W = 64;
        for (int64_t c0 = 0; c0 < cols; c0 += W) {
            const int64_t w = std::min(W, cols - c0);
            alignas(64) float acc[W];
            for (int64_t j = 0; j < W; ++j) acc[j] = 0.0f;
            for (int64_t k = 0; k < r; ++k) {
                const float lk = l[k];
                const float* rk = p.R + k * cols + c0;
                if (w == W) {
#pragma omp simd
                    for (int64_t j = 0; j < W; ++j) acc[j] += lk * rk[j];
                } else {
                    for (int64_t j = 0; j < w; ++j) acc[j] += lk * rk[j];
                }
            }
            // s after the rank-r product, as the reference: s * L_t would overflow (or fall into denormals)
            // where s * (L R)_t does not
            if (p.accumulate)
                for (int64_t j = 0; j < w; ++j) o[c0 + j] += s * acc[j];
            else
                for (int64_t j = 0; j < w; ++j) o[c0 + j] = s * acc[j];
        }
    }
}

}  // namespace fedlora_fast
