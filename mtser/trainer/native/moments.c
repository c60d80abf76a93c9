/* Attention-weighted moments for attentive statistics pooling, G attention heads (cohort members) at once.

   For each sample b:          mean[b,g,:] = sum_t w[b,g,t] x[b,t,:]   second[b,g,:] = sum_t w[b,g,t] x[b,t,:]^2
   and the gradient of any loss L with respect to w, given dL/dmean and dL/dsecond:
                               gw[b,g,t] = <gmean[b,g,:], x[b,t,:]> + <gsecond[b,g,:], x[b,t,:]^2>
   Layouts (row-major, float32): w and gw (B, G, T), x (B, T, D), mean, second, gmean and gsecond (B, G, D).

   Frames are read in blocks that stay in the L1 cache while every head uses them, so x is read from memory once
   for all G heads and both moments (a batched matrix product reads it once per head and per moment, and needs x^2
   written out first). Frames whose weights are zero for every head (padding, after the softmax) are skipped: they
   add nothing to the moments, and their weight gradient is written as 0 (the softmax's backward multiplies it by
   the weight, 0). The arithmetic of one head does not depend on the others (each mean and second-moment element
   sums its frames in frame order, each gradient element its dimensions in a fixed order), so a head computed in a
   cohort gives the same bits as the same head computed alone. Samples are shared out over OpenMP threads; the
   library links the libgomp that PyTorch loaded (same soname), so it runs on PyTorch's own intra-op threads.

   Built without -march (`make native`): on x86-64 each entry point also has an AVX2 + FMA clone, which the dynamic
   loader selects by the CPU's features (GCC's target_clones, an ifunc); elsewhere the plain build. */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

typedef float v8 __attribute__((vector_size(32)));
enum { FRAMES = 8, DIMS = 32, GRAD_FRAMES = 4 };

static inline v8 load(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float total(v8 v) {
    float s = 0.0f;
    for (int k = 0; k < 8; k++) s += v[k];
    return s;
}

static int all_zero(const float *w, int64_t g_count, int64_t t_count) {
    for (int64_t g = 0; g < g_count; g++)
        if (w[g * t_count] != 0.0f) return 0;
    return 1;
}

CLONES void moments_forward(const float *w, const float *x, float *mean, float *second,
                     int64_t b_count, int64_t g_count, int64_t t_count, int64_t d_count) {
    const int64_t d_vec = d_count / DIMS * DIMS;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < b_count; b++) {
        const float *wb = w + b * g_count * t_count, *xb = x + b * t_count * d_count;
        float *mb = mean + b * g_count * d_count, *sb = second + b * g_count * d_count;
        memset(mb, 0, sizeof(float) * g_count * d_count);
        memset(sb, 0, sizeof(float) * g_count * d_count);
        for (int64_t t0 = 0; t0 < t_count; t0 += FRAMES) {
            int64_t frames[FRAMES], n = 0;
            for (int64_t t = t0; t < t0 + FRAMES && t < t_count; t++)
                if (!all_zero(wb + t, g_count, t_count)) frames[n++] = t;
            for (int64_t g = 0; g < g_count; g++) {
                const float *wg = wb + g * t_count;
                float *m = mb + g * d_count, *s = sb + g * d_count;
                for (int64_t d = 0; d < d_vec; d += DIMS) {
                    v8 am[4], as[4];
                    for (int k = 0; k < 4; k++) { am[k] = load(m + d + 8 * k); as[k] = load(s + d + 8 * k); }
                    for (int64_t j = 0; j < n; j++) {
                        const float a = wg[frames[j]];
                        const float *xr = xb + frames[j] * d_count + d;
                        for (int k = 0; k < 4; k++) {
                            const v8 v = load(xr + 8 * k);
                            am[k] += a * v;
                            as[k] += a * (v * v);
                        }
                    }
                    for (int k = 0; k < 4; k++) { store(m + d + 8 * k, am[k]); store(s + d + 8 * k, as[k]); }
                }
                for (int64_t d = d_vec; d < d_count; d++)
                    for (int64_t j = 0; j < n; j++) {
                        const float a = wg[frames[j]], v = xb[frames[j] * d_count + d];
                        m[d] += a * v;
                        s[d] += a * (v * v);
                    }
            }
        }
    }
}

static float frame_dot(const float *gm, const float *gs, const float *xr, int64_t d_count) {
    const int64_t d_vec = d_count / 8 * 8;
    v8 acc = {0};
    for (int64_t d = 0; d < d_vec; d += 8) {
        const v8 v = load(xr + d);
        acc += load(gm + d) * v + load(gs + d) * (v * v);
    }
    float dot = total(acc);
    for (int64_t d = d_vec; d < d_count; d++) dot += gm[d] * xr[d] + gs[d] * (xr[d] * xr[d]);
    return dot;
}

CLONES void moments_backward(const float *w, const float *x, const float *gmean, const float *gsecond, float *gw,
                      int64_t b_count, int64_t g_count, int64_t t_count, int64_t d_count) {
    const int64_t d_vec = d_count / 8 * 8;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < b_count; b++) {
        const float *wb = w + b * g_count * t_count, *xb = x + b * t_count * d_count;
        const float *gmb = gmean + b * g_count * d_count, *gsb = gsecond + b * g_count * d_count;
        float *gwb = gw + b * g_count * t_count;
        for (int64_t t0 = 0; t0 < t_count; t0 += GRAD_FRAMES) {
            int64_t frames[GRAD_FRAMES], n = 0;
            for (int64_t t = t0; t < t0 + GRAD_FRAMES && t < t_count; t++) {
                if (all_zero(wb + t, g_count, t_count))
                    for (int64_t g = 0; g < g_count; g++) gwb[g * t_count + t] = 0.0f;
                else
                    frames[n++] = t;
            }
            for (int64_t g = 0; g < g_count; g++) {
                const float *gm = gmb + g * d_count, *gs = gsb + g * d_count;
                if (n < GRAD_FRAMES) {                        /* a block with padding: frame by frame */
                    for (int64_t j = 0; j < n; j++)
                        gwb[g * t_count + frames[j]] = frame_dot(gm, gs, xb + frames[j] * d_count, d_count);
                    continue;
                }
                v8 acc[GRAD_FRAMES] = {{0}};
                for (int64_t d = 0; d < d_vec; d += 8) {
                    const v8 m = load(gm + d), s = load(gs + d);
                    for (int j = 0; j < GRAD_FRAMES; j++) {
                        const v8 v = load(xb + frames[j] * d_count + d);
                        acc[j] += m * v + s * (v * v);
                    }
                }
                for (int j = 0; j < GRAD_FRAMES; j++) {
                    const float *xr = xb + frames[j] * d_count;
                    float dot = total(acc[j]);
                    for (int64_t d = d_vec; d < d_count; d++) dot += gm[d] * xr[d] + gs[d] * (xr[d] * xr[d]);
                    gwb[g * t_count + frames[j]] = dot;
                }
            }
        }
    }
}
