// fedlora_fast native CPU kernels of the ffa_linear ops: torch-free parameter structs and host API.
//
// Follows the maths of DESIGN.md (FFA-LoRA, Sun et al., ICLR 2024, arXiv 2403.12313) and computes the
// same functions as fedlora_fast/reference/ffa_linear.py. Parameters live in plain structs (as
// flash-attention's Flash_fwd_params), the host API validates them, the pybind11 layer (bindings.cpp)
// only fills them from Python buffers. All tensors are float32, C-contiguous, row-major.
#pragma once

#include <cstdint>

namespace fedlora_fast {

// Modes of ffa_linear_bwd: what it returns for the trainable adapter tensors (as in the reference).
enum Mode : int { MODE_SUM = 0, MODE_PER_SAMPLE = 1, MODE_CLIP = 2 };

// c_i = min(1, C / (N_i + eps)), 0 when N_i is not finite (opacus' epsilon, the reference's NORM_EPS).
constexpr float kNormEps = 1e-6f;

// The adapter part of the fused backward: one pass over G per sample gives V = G B (when asked),
// every P_i = s G_i^T U_i with nu_i = |P_i|_F^2, reduced according to mode; in LoRA mode (xa != null)
// also Q_i = s V_i^T Xa_i with its own norms. The base input gradient G W is left to the caller.
struct FfaLinearBwdParams {
    // inputs
    const float* g = nullptr;   // (n, T, out)   upstream gradient
    const float* u = nullptr;   // (n, T, r)     U = xa A^T saved by the forward
    const float* B = nullptr;   // (out, r)
    const float* xa = nullptr;  // (n, T, in)    LoRA mode only; null in FFA mode
    // outputs
    float* v = nullptr;         // (n, T, r)     V = G B, optional (needed for s V A); scratch if null
    float* gB = nullptr;        // (n, out, r) for MODE_PER_SAMPLE, else (out, r)
    float* nuB = nullptr;       // (n,) squared per-sample norms; unused (may be null) for MODE_SUM
    float* gA = nullptr;        // (n, r, in) for MODE_PER_SAMPLE, else (r, in); LoRA mode only
    float* nuA = nullptr;       // (n,) LoRA mode only, not MODE_SUM
    // sizes
    int64_t n = 0, T = 0, in = 0, out = 0, r = 0;
    // scalars
    float scale = 1.0f;
    int mode = MODE_SUM;
    float clip_B = 0.0f, clip_A = 0.0f;  // per-tensor thresholds for MODE_CLIP (> 0)
};

// sum_i coef_i P_i over samples with coef_i != 0 (a NaN in a dropped P_i stays out).
struct ClipReduceParams {
    const float* P = nullptr;     // (n, numel)
    const float* coef = nullptr;  // (n,)
    float* out = nullptr;         // (numel,)
    int64_t n = 0, numel = 0;
};

// Rank-r products of the forward and of the split input gradient, row by row over N = n*T tokens:
//   lowrank_in:  out (N, r)    = X (N, in) R^T       with R (r, in):   U = Xa A^T
//   lowrank_out: out (N, cols) (+)= s L (N, r) R     with R (r, cols): Y += s U B^T (R = B^T), dXa = s V A
struct LowRankParams {
    const float* X = nullptr;  // lowrank_in: (N, cols); lowrank_out: L (N, r)
    const float* R = nullptr;  // (r, cols)
    float* out = nullptr;      // lowrank_in: (N, r); lowrank_out: (N, cols)
    int64_t N = 0, cols = 0, r = 0;
    float scale = 1.0f;
    bool accumulate = false;   // lowrank_out: add into out instead of overwriting it
};

// Host API: validate the parameters (std::invalid_argument naming the field), then run.
void ffa_linear_bwd(const FfaLinearBwdParams& p);
void ffa_linear_clip_reduce(const ClipReduceParams& p);
void lowrank_in(const LowRankParams& p);
void lowrank_out(const LowRankParams& p);

// Clipping factor of one squared norm: the reference's clip_coef in float32, to 1 ulp (torch computes
// C / x as C * (1 / x), this a true division).
float clip_coef(float norm2, float max_norm);

// Number of OpenMP threads the kernels use (1 without OpenMP).
int max_threads();

}  // namespace fedlora_fast
