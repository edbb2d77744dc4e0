/*
 * CPU kernels of MoLFAdamW's native path (fp32, contiguous tensors), built on first use by
 * molf/optim/native.py and called through ctypes.
 *
 * The step takes two passes over memory instead of a score pre-pass plus a full AdamW pass:
 *
 *   molf_moments_scores  every expert tensor: the AdamW moment update (m, v written back), the sum
 *                        of the routing score term, and the AdamW increment
 *                        x = (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps) written over the gradient;
 *   molf_apply           the winners only: p = p * (1 - lr * wd) + x.
 *
 * It also holds the CPU dropout of the LoRA inputs (molf/model/dropout.py), molf_dropout: element i
 * is kept iff a hash of (key, i) is at least p * 2^32, so the backward pass regenerates the mask from
 * the key instead of storing it, and the mask does not depend on the number of threads.
 *
 * The arithmetic follows torch's fused CPU AdamW element by element (m as one fma, v as an fma whose
 * operand order differs between ATen's vector code and its scalar tail, one division for the
 * denominator and one for the increment). ATen's vector body covers numel - numel % tail_width
 * elements; its compiled tail loop takes the next epilogue_width elements with vector code too when
 * that many are left, and the rest one by one. With every expert
 * winning the result equals torch.optim.AdamW(fused=True) bit for bit on the x86-64 Linux wheels
 * (tests/optim/test_native.py checks it). Compile with -ffp-contract=off: every fma is written out. Score sums are accumulated in double per block of a fixed size, then per tensor in block
 * order, so they do not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16

enum { SCORE_RATIO_TIMES_M = 0, SCORE_RATIO_SQUARED = 1 };

typedef struct {
    float w, wm1, b2, c2, eps, score_eps;
    int small_weight, kind;
} Consts;

/* One element: update m and v in place, write the increment over g, return the score term. The
 * constants come by value, so after inlining they are locals that no store through g, m or v can
 * change: the branches on them are then loop-invariant and the loop vectorises on AVX2 as well as on
 * AVX-512 (through a pointer, a float store might alias a float constant, and GCC leaves the loop
 * scalar where it cannot mask). */
static inline float element(float *g, float *m, float *v, float neg_step_size, float bc2_sqrt,
                            const Consts c, int tail) {
    float gi = *g, mi = *m, vi = *v;
    mi = c.small_weight ? fmaf(c.w, gi - mi, mi) : fmaf(c.wm1, gi - mi, gi);
    vi = tail ? fmaf(vi, c.b2, (c.c2 * gi) * gi) : fmaf(c.c2 * gi, gi, vi * c.b2);
    float root = sqrtf(vi);
    *m = mi;
    *v = vi;
    *g = (neg_step_size * mi) / (root / bc2_sqrt + c.eps);
    float ratio = mi / (root + c.score_eps);
    return c.kind == SCORE_RATIO_TIMES_M ? ratio * mi : ratio * ratio;
}

void molf_moments_scores(float **grads, float **exp_avgs, float **exp_avg_sqs, const int64_t *numels,
                         const double *neg_step_sizes, const double *bc2_sqrts, double beta1, double beta2,
                         double eps, double score_eps, int score_kind, const int64_t *block_tensor,
                         const int64_t *block_start, int64_t num_blocks, int64_t block_size,
                         double *block_sums, int64_t num_tensors, double *tensor_sums, int64_t tail_width,
                         int64_t epilogue_width, int num_threads) {
    Consts c;
    c.w = (float)(1.0 - beta1);
    c.wm1 = c.w - 1.0f;
    c.small_weight = fabsf(c.w) < 0.5f;
    c.b2 = (float)beta2;
    c.c2 = (float)(1.0 - beta2);
    c.eps = (float)eps;
    c.score_eps = (float)score_eps;
    c.kind = score_kind;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < num_blocks; b++) {
        const Consts cb = c;
        const int64_t t = block_tensor[b], start = block_start[b];
        const int64_t stop = start + block_size < numels[t] ? start + block_size : numels[t];
        float *restrict g = grads[t], *restrict m = exp_avgs[t], *restrict v = exp_avg_sqs[t];
        const float nss = (float)neg_step_sizes[t], bc = (float)bc2_sqrts[t];
        const int64_t body = numels[t] - numels[t] % tail_width;  /* ATen's vector body */
        const int64_t body_end = body + (numels[t] - body >= epilogue_width ? epilogue_width : 0);
        const int64_t vec_stop = stop < body_end ? stop : body_end;
        double acc[LANES] = {0};
        int64_t i = start;
        for (; i + LANES <= vec_stop; i += LANES) {
            for (int l = 0; l < LANES; l++) {
                acc[l] += (double)element(g + i + l, m + i + l, v + i + l, nss, bc, cb, 0);
            }
        }
        double total = 0.0;
        for (; i < stop; i++) {
            total += (double)element(g + i, m + i, v + i, nss, bc, cb, i >= body_end);
        }
        for (int l = 0; l < LANES; l++) {
            total += acc[l];
        }
        block_sums[b] = total;
    }
    for (int64_t t = 0; t < num_tensors; t++) {
        tensor_sums[t] = 0.0;
    }
    for (int64_t b = 0; b < num_blocks; b++) {
        tensor_sums[block_tensor[b]] += block_sums[b];
    }
}

void molf_apply(float **params, float **increments, const int64_t *numels, const float *decays,
                const int64_t *block_tensor, const int64_t *block_start, int64_t num_blocks, int64_t block_size,
                int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < num_blocks; b++) {
        const int64_t t = block_tensor[b], start = block_start[b];
        const int64_t stop = start + block_size < numels[t] ? start + block_size : numels[t];
        float *p = params[t];
        const float *x = increments[t];
        const float f = decays[t];
        if (f != 1.0f) {
            for (int64_t i = start; i < stop; i++) {
                p[i] = p[i] * f + x[i];
            }
        } else {
            for (int64_t i = start; i < stop; i++) {
                p[i] = p[i] + x[i];
            }
        }
    }
}

/* "lowbias32", a 32-bit integer finaliser (shift-xor-multiply with published constants). */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* out[i] = in[i] * (keep(i) ? scale : 0) with keep(i) = mix32(mix32(lo32(i) ^ k0) ^ k1 ^ hi32(i)) >= threshold.
 * Multiplying (rather than selecting 0) lets a NaN in a dropped position through, as torch's dropout
 * does. Blocks of block_size (a power of two below 2^32) never straddle a 2^32 boundary, so hi32(i)
 * is constant per block and the inner loop is plain 32-bit integer code that vectorises. */
void molf_dropout(const float *in, float *out, int64_t n, uint32_t k0, uint32_t k1, uint32_t threshold,
                  float scale, int64_t block_size, int num_threads) {
    const int64_t num_blocks = (n + block_size - 1) / block_size;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < num_blocks; b++) {
        const int64_t start = b * block_size;
        const int64_t stop = start + block_size < n ? start + block_size : n;
        const uint32_t key = k1 ^ (uint32_t)((uint64_t)start >> 32);
        const uint32_t lo = (uint32_t)start;
        const int64_t len = stop - start;
        const float *x = in + start;
        float *y = out + start;
        for (int64_t j = 0; j < len; j++) {
            const uint32_t h = mix32(mix32((lo + (uint32_t)j) ^ k0) ^ key);
            y[j] = x[j] * (h >= threshold ? scale : 0.0f);
        }
    }
}
