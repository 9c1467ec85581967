/* Fused CPU passes for a training step's MLP (see deepfm/accel/kernels.py, which compiles and loads this).
 *
 * Eager PyTorch spends 5-6 memory passes over each [batch, width] activation around a hidden layer's GEMMs
 * (bias copy, mask, multiply, ReLU; ReLU/dropout backward, scale, bias-gradient sum). Here each direction is
 * one pass. Threads: OpenMP, i.e. torch's own libgomp pool once torch is loaded (the loader checks that).
 *
 * Dropout masks are raw random bits, row-aligned: row r's bits start at byte r * row_bytes, and element j
 * of the row is kept when its k-bit field (bits j*k .. j*k+k-1, little-endian) is >= thr
 * (models.layers.FastDropout draws them and builds the same mask in numpy when this library is absent). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#ifdef DEEPFM_CLONES /* an AVX2 build next to the portable one, picked at load time */
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* Column sums over a thread's rows are kept in float for blocks of 64 rows, then added into double. */
static inline void flush_block(double *restrict acc, float *restrict blk, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        acc[j] += blk[j];
        blk[j] = 0.0f;
    }
}

/* out[j] = the sum over the nt threads of part[t * stride + j], in thread order */
static void reduce_threads(const double *part, int nt, size_t stride, int64_t cols, float *out) {
    for (int64_t j = 0; j < cols; j++) {
        double s = 0.0;
        for (int t = 0; t < nt; t++) s += part[(size_t)t * stride + j];
        out[j] = (float)s;
    }
}

/* lut[v][t]: the multiplier (scale if kept, else 0) of the t-th k-bit field of mask byte v (k <= 8) */
static void dropout_lut(float lut[256][8], int k, uint32_t thr, float scale) {
    const uint32_t mask = (1u << k) - 1;
    for (int v = 0; v < 256; v++)
        for (int t = 0; t < 8; t++)
            lut[v][t] = (t < 8 / k && ((v >> (t * k)) & mask) >= thr) ? scale : 0.0f;
}

/* E = 8 / k elements per mask byte; lut[v][t]: the multiplier (scale or 0) of the t-th element of byte v */
static inline void forward_row(float *restrict z, const float *restrict b, const uint8_t *restrict bits,
                               const float (*lut)[8], int64_t cols, const int E) {
    int64_t j = 0;
    for (; j + E <= cols; j += E) {
        const float *m = lut[bits[j / E]];
        for (int t = 0; t < E; t++) {
            float v = z[j + t] + b[j + t];
            z[j + t] = (v < 0.0f ? 0.0f : v) * m[t]; /* NaN stays NaN, as in torch.relu */
        }
    }
    for (; j < cols; j++) {
        float v = z[j] + b[j];
        z[j] = (v < 0.0f ? 0.0f : v) * lut[bits[j / E]][j % E];
    }
}

/* z [rows, cols] (the GEMM x W^T, without bias) <- dropout(relu(z + b)) in place */
CLONES void relu_dropout_forward(float *restrict z, const float *restrict b, const uint8_t *restrict bits,
                                 int64_t row_bytes, int k, uint32_t thr, float scale, int64_t rows,
                                 int64_t cols) {
    float lut[256][8] __attribute__((aligned(32)));
    if (k <= 8) dropout_lut(lut, k, thr, scale);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *restrict zr = z + r * cols;
        const uint8_t *restrict br = bits + r * row_bytes;
        switch (k) {
        case 1: forward_row(zr, b, br, (const float (*)[8])lut, cols, 8); break;
        case 2: forward_row(zr, b, br, (const float (*)[8])lut, cols, 4); break;
        case 4: forward_row(zr, b, br, (const float (*)[8])lut, cols, 2); break;
        case 8: forward_row(zr, b, br, (const float (*)[8])lut, cols, 1); break;
        default: { /* 16 */
            const uint16_t *restrict f = (const uint16_t *)br;
            for (int64_t j = 0; j < cols; j++) {
                float v = zr[j] + b[j];
                zr[j] = (v < 0.0f ? 0.0f : v) * (f[j] >= thr ? scale : 0.0f);
            }
        }
        }
    }
}

/* out = dL/dz = (y > 0 ? g * scale : 0), and gb[j] = sum_r out[r, j] (the bias gradient). Partial sums:
 * float over blocks of 64 rows, then double, per thread in a fixed order (deterministic for a thread count). */
CLONES int relu_dropout_backward(float *restrict out, const float *restrict g, const float *restrict y,
                                 float scale, float *restrict gb, int64_t rows, int64_t cols) {
    const int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt * (size_t)cols, sizeof(double));
    float *blocks = calloc((size_t)nt * (size_t)cols, sizeof(float));
    if (!part || !blocks) {
        free(part);
        free(blocks);
        return 1;
    }
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        double *restrict acc = part + (size_t)tid * (size_t)cols;
        float *restrict blk = blocks + (size_t)tid * (size_t)cols;
        int n = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *restrict o = out + r * cols;
            const float *restrict gr = g + r * cols;
            const float *restrict yr = y + r * cols;
            for (int64_t j = 0; j < cols; j++) {
                float v = gr[j] * (yr[j] > 0.0f ? scale : 0.0f);
                o[j] = v;
                blk[j] += v;
            }
            if (++n == 64) {
                flush_block(acc, blk, cols);
                n = 0;
            }
        }
        flush_block(acc, blk, cols);
    }
    reduce_threads(part, nt, (size_t)cols, cols, gb);
    free(part);
    free(blocks);
    return 0;
}

/* Batch norm between the GEMM and ReLU/dropout (Linear -> BatchNorm1d -> ReLU -> Dropout, training):
 * column statistics, then y = dropout(relu(a * z + c)) with a = gamma * invstd, c = beta - mean * a. */

/* mean[j] and the biased variance var[j] of the columns of z [rows, cols]; float sums over blocks of 64
 * rows, then double (E[z^2] - mean^2 in double). Returns 1 when out of memory. */
CLONES int column_stats(const float *restrict z, int64_t rows, int64_t cols, double *restrict mean,
                        double *restrict var) {
    const int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt * (size_t)cols * 2, sizeof(double));
    float *blocks = calloc((size_t)nt * (size_t)cols * 2, sizeof(float));
    if (!part || !blocks) {
        free(part);
        free(blocks);
        return 1;
    }
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        double *restrict s1 = part + (size_t)tid * (size_t)cols * 2, *restrict s2 = s1 + cols;
        float *restrict b1 = blocks + (size_t)tid * (size_t)cols * 2, *restrict b2 = b1 + cols;
        int n = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *restrict zr = z + r * cols;
            for (int64_t j = 0; j < cols; j++) {
                b1[j] += zr[j];
                b2[j] += zr[j] * zr[j];
            }
            if (++n == 64) {
                flush_block(s1, b1, cols);
                flush_block(s2, b2, cols);
                n = 0;
            }
        }
        flush_block(s1, b1, cols);
        flush_block(s2, b2, cols);
    }
    for (int64_t j = 0; j < cols; j++) {
        double a = 0.0, q = 0.0;
        for (int t = 0; t < nt; t++) {
            a += part[(size_t)t * (size_t)cols * 2 + j];
            q += part[(size_t)t * (size_t)cols * 2 + cols + j];
        }
        mean[j] = a / (double)rows;
        const double v = q / (double)rows - mean[j] * mean[j];
        var[j] = v > 0.0 ? v : 0.0;
    }
    free(part);
    free(blocks);
    return 0;
}

static inline void affine_row(const float *restrict z, float *restrict y, const float *restrict a,
                              const float *restrict c, const uint8_t *restrict bits, const float (*lut)[8],
                              int64_t cols, const int E) {
    int64_t j = 0;
    for (; j + E <= cols; j += E) {
        const float *m = lut[bits[j / E]];
        for (int t = 0; t < E; t++) {
            const float v = a[j + t] * z[j + t] + c[j + t];
            y[j + t] = (v < 0.0f ? 0.0f : v) * m[t];
        }
    }
    for (; j < cols; j++) {
        const float v = a[j] * z[j] + c[j];
        y[j] = (v < 0.0f ? 0.0f : v) * lut[bits[j / E]][j % E];
    }
}

/* y = dropout(relu(a * z + c)) (z kept: the backward needs it); mask bits as in relu_dropout_forward */
CLONES void affine_relu_dropout_forward(const float *restrict z, float *restrict y, const float *restrict a,
                                        const float *restrict c, const uint8_t *restrict bits, int64_t row_bytes,
                                        int k, uint32_t thr, float scale, int64_t rows, int64_t cols) {
    float lut[256][8] __attribute__((aligned(32)));
    if (k <= 8) dropout_lut(lut, k, thr, scale);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict zr = z + r * cols;
        float *restrict yr = y + r * cols;
        const uint8_t *restrict br = bits + r * row_bytes;
        switch (k) {
        case 1: affine_row(zr, yr, a, c, br, (const float (*)[8])lut, cols, 8); break;
        case 2: affine_row(zr, yr, a, c, br, (const float (*)[8])lut, cols, 4); break;
        case 4: affine_row(zr, yr, a, c, br, (const float (*)[8])lut, cols, 2); break;
        case 8: affine_row(zr, yr, a, c, br, (const float (*)[8])lut, cols, 1); break;
        default: {
            const uint16_t *restrict f = (const uint16_t *)br;
            for (int64_t j = 0; j < cols; j++) {
                const float v = a[j] * zr[j] + c[j];
                yr[j] = (v < 0.0f ? 0.0f : v) * (f[j] >= thr ? scale : 0.0f);
            }
        }
        }
    }
}

/* one row of each pass of bn_relu_dropout_backward (separate functions: vectorised with restrict) */
CLONES __attribute__((noinline)) static void bn_backward_row1(float *restrict o, const float *restrict g,
    const float *restrict y, const float *restrict z, const float *restrict mu, const float *restrict is,
    float scale, float *restrict b1, float *restrict b2, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        const float gu = g[j] * (y[j] > 0.0f ? scale : 0.0f);
        o[j] = gu;
        b1[j] += gu;
        b2[j] += gu * ((z[j] - mu[j]) * is[j]);
    }
}

CLONES __attribute__((noinline)) static void bn_backward_row2(float *restrict o, const float *restrict z,
    const float *restrict mu, const float *restrict is, const float *restrict k0, const float *restrict k1,
    const float *restrict k2, float *restrict blk, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        const float v = k0[j] * o[j] - k1[j] - k2[j] * ((z[j] - mu[j]) * is[j]);
        o[j] = v;
        blk[j] += v;
    }
}

/* Backward of y = dropout(relu(gamma * xhat + beta)), xhat = (z - mean) * invstd (batch statistics):
 *   gu = y > 0 ? gy * scale : 0;  dbeta = sum_r gu;  dgamma = sum_r gu * xhat
 *   dz = gamma * invstd / N * (N * gu - dbeta - xhat * dgamma);  gb = sum_r dz (the Linear's bias)
 * Pass 1 writes gu into dz and sums; pass 2 turns dz into dL/dz in place. Returns 1 when out of memory. */
CLONES int bn_relu_dropout_backward(float *restrict dz, const float *restrict gy, const float *restrict y,
                                    const float *restrict z, const float *restrict mean,
                                    const float *restrict invstd, const float *restrict gamma, float scale,
                                    float *restrict dgamma, float *restrict dbeta, float *restrict gb,
                                    int64_t rows, int64_t cols) {
    const int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt * (size_t)cols * 2, sizeof(double));
    float *blocks = calloc((size_t)nt * (size_t)cols * 2, sizeof(float));
    float *coef = malloc((size_t)cols * 3 * sizeof(float));
    if (!part || !blocks || !coef) {
        free(part);
        free(blocks);
        free(coef);
        return 1;
    }
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        double *restrict s1 = part + (size_t)tid * (size_t)cols * 2, *restrict s2 = s1 + cols;
        float *restrict b1 = blocks + (size_t)tid * (size_t)cols * 2, *restrict b2 = b1 + cols;
        /* thread-local copies of the shared pointers and scalars: lets the compiler vectorise */
        const float *restrict mu = mean, *restrict is = invstd;
        const float sc = scale;
        int n = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *restrict o = dz + r * cols;
            const float *restrict gr = gy + r * cols, *restrict yr = y + r * cols, *restrict zr = z + r * cols;
            bn_backward_row1(o, gr, yr, zr, mu, is, sc, b1, b2, cols);
            if (++n == 64) {
                flush_block(s1, b1, cols);
                flush_block(s2, b2, cols);
                n = 0;
            }
        }
        flush_block(s1, b1, cols);
        flush_block(s2, b2, cols);
#pragma omp barrier
#pragma omp single
        {
            for (int64_t j = 0; j < cols; j++) {
                double a = 0.0, q = 0.0;
                for (int t = 0; t < nt; t++) {
                    a += part[(size_t)t * (size_t)cols * 2 + j];
                    q += part[(size_t)t * (size_t)cols * 2 + cols + j];
                }
                dbeta[j] = (float)a;
                dgamma[j] = (float)q;
                const float k0 = gamma[j] * invstd[j];  /* dz = k0 * gu - k1 - k2 * xhat */
                coef[j] = k0;
                coef[cols + j] = k0 * (float)(a / (double)rows);
                coef[2 * cols + j] = k0 * (float)(q / (double)rows);
            }
            memset(part, 0, (size_t)nt * (size_t)cols * 2 * sizeof(double));
        }
        double *restrict acc = part + (size_t)tid * (size_t)cols;
        float *restrict blk = b1;
        for (int64_t j = 0; j < cols; j++) blk[j] = 0.0f;
        n = 0;
        const float *restrict k0 = coef, *restrict k1 = coef + cols, *restrict k2 = coef + 2 * cols;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *restrict o = dz + r * cols;
            const float *restrict zr = z + r * cols;
            bn_backward_row2(o, zr, mu, is, k0, k1, k2, blk, cols);
            if (++n == 64) {
                flush_block(acc, blk, cols);
                n = 0;
            }
        }
        flush_block(acc, blk, cols);
    }
    reduce_threads(part, nt, (size_t)cols, cols, gb);
    free(part);
    free(blocks);
    free(coef);
    return 0;
}

#define ALWAYS static inline __attribute__((always_inline))

/* Rows [b0, b1) of embed_forward, for one embedding width K (a constant where inlined: unrolled loops) */
ALWAYS void embed_rows(const float *restrict v, const int64_t K, const float *restrict w,
                       const int64_t *restrict rows, const float *restrict val, const int32_t *restrict slot_field,
                       int64_t b0, int64_t b1, int64_t S, int64_t F, float *restrict e, float *restrict fm,
                       float *restrict first, float *restrict sq) {
    for (int64_t b = b0; b < b1; b++) {
        float *restrict eb = e + b * F * K;
        memset(eb, 0, (size_t)(F * K) * sizeof(float));
        float lin = 0.0f, ss = 0.0f;
        for (int64_t s = 0; s < S; s++) {
            const int64_t r = rows[b * S + s];
            const float x = val[b * S + s];
            const float *restrict t = v + r * K;
            float *restrict o = eb + (int64_t)slot_field[s] * K;
            for (int64_t k = 0; k < K; k++) o[k] += t[k] * x;
            if (w) lin += w[r] * x;
            if (sq) {
                for (int64_t k = 0; k < K; k++) ss += t[k] * t[k];
                if (w) ss += w[r] * w[r];
            }
        }
        if (first) first[b] = lin;
        if (sq) sq[b] = ss;
        if (fm) {
            float sum[K], sq[K];
            for (int64_t k = 0; k < K; k++) sum[k] = sq[k] = 0.0f;
            for (int64_t f = 0; f < F; f++)
                for (int64_t k = 0; k < K; k++) {
                    const float x = eb[f * K + k];
                    sum[k] += x;
                    sq[k] += x * x;
                }
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += sum[k] * sum[k] - sq[k];
            fm[b] = 0.5f * acc;
        }
    }
}

/* One pass over the batch for DeepFM's three field terms (Guo et al. 2017, eq. 1-2), rows shared by the
 * two tables (w may be NULL, as may fm, first and sq):
 *   e[b, f, :] = sum over slots s of field f (slot_field[s] = f) of v[rows[b, s], :] * val[b, s]
 *   fm[b]      = 0.5 * sum_k ((sum_f e[b, f, k])^2 - sum_f e[b, f, k]^2)
 *   first[b]   = sum_s w[rows[b, s]] * val[b, s]
 *   sq[b]      = sum_s |v[rows[b, s]]|^2 + w[rows[b, s]]^2   (the embedding L2 penalty's terms) */
void embed_forward(const float *restrict v, int64_t K, const float *restrict w, const int64_t *restrict rows,
                   const float *restrict val, const int32_t *restrict slot_field, int64_t B, int64_t S,
                   int64_t F, float *restrict e, float *restrict fm, float *restrict first, float *restrict sq) {
#pragma omp parallel
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t b0 = B * t / nt, b1 = B * (t + 1) / nt;
        switch (K) {
        case 4: embed_rows(v, 4, w, rows, val, slot_field, b0, b1, S, F, e, fm, first, sq); break;
        case 8: embed_rows(v, 8, w, rows, val, slot_field, b0, b1, S, F, e, fm, first, sq); break;
        case 10: embed_rows(v, 10, w, rows, val, slot_field, b0, b1, S, F, e, fm, first, sq); break;
        case 16: embed_rows(v, 16, w, rows, val, slot_field, b0, b1, S, F, e, fm, first, sq); break;
        default: embed_rows(v, K, w, rows, val, slot_field, b0, b1, S, F, e, fm, first, sq);
        }
    }
}

/* scratch[b, f, :] = dL/de[b, f, :] = ge + gfm[b] * (sum_f' e[b, f', :] - e[b, f, :]) for rows [b0, b1) */
ALWAYS void embed_grad_rows(const float *restrict ge, int64_t ld, const float *restrict gfm,
                            const float *restrict e, int64_t b0, int64_t b1, int64_t F, const int64_t K,
                            float *restrict scratch) {
    for (int64_t b = b0; b < b1; b++) {
        float *restrict d = scratch + b * F * K;
        const float *restrict eb = e + b * F * K;
        if (ge)
            memcpy(d, ge + b * ld, (size_t)(F * K) * sizeof(float));
        else
            memset(d, 0, (size_t)(F * K) * sizeof(float));
        if (gfm) {
            const float c = gfm[b];
            float sum[K];
            for (int64_t k = 0; k < K; k++) sum[k] = 0.0f;
            for (int64_t f = 0; f < F; f++)
                for (int64_t k = 0; k < K; k++) sum[k] += eb[f * K + k];
            for (int64_t f = 0; f < F; f++)
                for (int64_t k = 0; k < K; k++) d[f * K + k] += c * (sum[k] - eb[f * K + k]);
        }
    }
}

/* grad_v[rows[p]] += scratch[at[i]] * val[p] + c * v[rows[p]] and grad_w[rows[p]] += gfirst[b] * val[p]
 * + c * w[rows[p]] for the listed pairs p = list[i] = b * S + s (bs[i] = b); c: the L2 penalty's 2 x dL/dpen */
ALWAYS void embed_scatter(const int32_t *restrict list, const int32_t *restrict at, const int32_t *restrict bs,
                          int64_t n, const int64_t *restrict rows, const float *restrict val, const int64_t K,
                          const float *restrict scratch, float *restrict grad_v, const float *restrict gfirst,
                          float *restrict grad_w, const float *restrict v, const float *restrict w, float c) {
    for (int64_t i = 0; i < n; i++) {
        const int32_t p = list[i];
        const int64_t r = rows[p];
        const float x = val[p];
        if (grad_v) {
            const float *restrict src = scratch + (int64_t)at[i] * K;
            float *restrict o = grad_v + r * K;
            if (c != 0.0f) {
                const float *restrict t = v + r * K;
                for (int64_t k = 0; k < K; k++) o[k] += src[k] * x + c * t[k];
            } else {
                for (int64_t k = 0; k < K; k++) o[k] += src[k] * x;
            }
        }
        if (grad_w) grad_w[r] += (gfirst ? gfirst[bs[i]] * x : 0.0f) + c * w[r];
    }
}

/* The table gradients of embed_forward (dense over the R table rows, zeroed by the caller; grad_v and/or
 * grad_w may be NULL when not wanted, ge/gfm/gfirst when their output got no gradient; c = 2 x dL/dpenalty
 * adds the L2 penalty's gradient, c * row, per use of a row, from the tables v and w). Each thread owns
 * one range of table rows and adds its pairs in batch order: no races, and the same sums whatever the
 * thread count. Returns 1 when out of memory. */
int embed_backward(const float *restrict ge, int64_t ld, const float *restrict gfm, const float *restrict gfirst,
                   const float *restrict e, const int64_t *restrict rows, const float *restrict val,
                   const int32_t *restrict slot_field, int64_t B, int64_t S, int64_t F, int64_t K,
                   float *restrict scratch, float *restrict grad_v, float *restrict grad_w, int64_t R,
                   const float *restrict v, const float *restrict w, float c) {
    const int nt = omp_get_max_threads();
    int32_t *lists = malloc((size_t)nt * (size_t)(B * S) * 3 * sizeof(int32_t));
    if (!lists) return 1;
#pragma omp parallel num_threads(nt)
    {
        const int n = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t b0 = B * t / n, b1 = B * (t + 1) / n;
        if (grad_v) switch (K) {
            case 10: embed_grad_rows(ge, ld, gfm, e, b0, b1, F, 10, scratch); break;
            default: embed_grad_rows(ge, ld, gfm, e, b0, b1, F, K, scratch);
            }
        /* this thread's pairs, listed without branches, with where each one's dL/de sits in scratch */
        const int64_t lo = R * t / n, hi = R * (t + 1) / n;
        int32_t *restrict list = lists + (size_t)t * (size_t)(B * S) * 3, *restrict at = list + B * S,
                *restrict bs = at + B * S;
        int64_t m = 0;
        for (int64_t b = 0; b < B; b++)
            for (int64_t s = 0; s < S; s++) {
                const int64_t p = b * S + s, r = rows[p];
                list[m] = (int32_t)p;
                at[m] = (int32_t)(b * F + slot_field[s]);
                bs[m] = (int32_t)b;
                m += (r >= lo) & (r < hi);
            }
#pragma omp barrier
        switch (K) {
        case 10: embed_scatter(list, at, bs, m, rows, val, 10, scratch, grad_v, gfirst, grad_w, v, w, c); break;
        default: embed_scatter(list, at, bs, m, rows, val, K, scratch, grad_v, gfirst, grad_w, v, w, c);
        }
    }
    free(lists);
    return 0;
}

/* ---- bf16 activations (bf16 autocast, train.precision bf16/auto): the same passes over bfloat16 [rows, cols]
 * GEMM outputs (uint16 storage), math in float, parameters, statistics and sums in float/double as above.
 * Rounding float -> bf16 is to nearest even, as torch's; a NaN stays a NaN. */
static inline float bf2f(uint16_t h) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)h << 16;
    return x.f;
}

static inline uint16_t f2bf(float f) {
    union { float f; uint32_t u; } x;
    x.f = f;
    const uint32_t u = x.u;
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r);
}

/* the multiplier (scale or 0) of element j of a row's mask bits, for any k */
static inline float keep_at(const uint8_t *restrict bits, int k, uint32_t thr, float scale, int64_t j) {
    uint32_t f;
    if (k == 16) f = ((const uint16_t *)bits)[j];
    else if (k == 8) f = bits[j];
    else f = (bits[(j * k) >> 3] >> ((j * k) & 7)) & ((1u << k) - 1);
    return f >= thr ? scale : 0.0f;
}

/* one row's multipliers (scale or 0) into m[cols], from the lut for k <= 8 */
static inline void row_mask(float *restrict m, const uint8_t *restrict bits, const float (*lut)[8], int k,
                            uint32_t thr, float scale, int64_t cols) {
    if (k <= 8) {
        const int E = 8 / k;
        int64_t j = 0;
        for (; j + E <= cols; j += E) {
            const float *l = lut[bits[j / E]];
            for (int t = 0; t < E; t++) m[j + t] = l[t];
        }
        for (; j < cols; j++) m[j] = lut[bits[j / E]][j % E];
    } else {
        for (int64_t j = 0; j < cols; j++) m[j] = keep_at(bits, k, thr, scale, j);
    }
}

CLONES __attribute__((noinline)) static void bf_forward_row(uint16_t *restrict z, const float *restrict b,
                                                            const float *restrict m, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        const float v = bf2f(z[j]) + b[j];
        z[j] = f2bf((v < 0.0f ? 0.0f : v) * m[j]);
    }
}

/* z [rows, cols] bf16 (the GEMM x W^T) <- dropout(relu(z + b)) in place (b float) */
CLONES void relu_dropout_forward_bf16(uint16_t *restrict z, const float *restrict b, const uint8_t *restrict bits,
                                      int64_t row_bytes, int k, uint32_t thr, float scale, int64_t rows,
                                      int64_t cols) {
    float lut[256][8] __attribute__((aligned(32)));
    if (k <= 8) dropout_lut(lut, k, thr, scale);
#pragma omp parallel
    {
        float *m = malloc((size_t)cols * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            row_mask(m, bits + r * row_bytes, (const float (*)[8])lut, k, thr, scale, cols);
            bf_forward_row(z + r * cols, b, m, cols);
        }
        free(m);
    }
}

CLONES __attribute__((noinline)) static void bf_backward_row(uint16_t *restrict o, const uint16_t *restrict g,
                                                             const uint16_t *restrict y, float scale,
                                                             float *restrict blk, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        const float v = bf2f(g[j]) * (bf2f(y[j]) > 0.0f ? scale : 0.0f);
        o[j] = f2bf(v);
        blk[j] += v;
    }
}

/* out = dL/dz = (y > 0 ? g * scale : 0) in bf16, gb = its column sums (in float/double, before rounding) */
CLONES int relu_dropout_backward_bf16(uint16_t *restrict out, const uint16_t *restrict g, const uint16_t *restrict y,
                                      float scale, float *restrict gb, int64_t rows, int64_t cols) {
    const int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt * (size_t)cols, sizeof(double));
    float *blocks = calloc((size_t)nt * (size_t)cols, sizeof(float));
    if (!part || !blocks) {
        free(part);
        free(blocks);
        return 1;
    }
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        double *restrict acc = part + (size_t)tid * (size_t)cols;
        float *restrict blk = blocks + (size_t)tid * (size_t)cols;
        int n = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            bf_backward_row(out + r * cols, g + r * cols, y + r * cols, scale, blk, cols);
            if (++n == 64) {
                flush_block(acc, blk, cols);
                n = 0;
            }
        }
        flush_block(acc, blk, cols);
    }
    reduce_threads(part, nt, (size_t)cols, cols, gb);
    free(part);
    free(blocks);
    return 0;
}

CLONES __attribute__((noinline)) static void bf_stats_row(const uint16_t *restrict z, float *restrict b1,
                                                          float *restrict b2, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        const float v = bf2f(z[j]);
        b1[j] += v;
        b2[j] += v * v;
    }
}

/* column mean and biased variance of bf16 z, as column_stats */
CLONES int column_stats_bf16(const uint16_t *restrict z, int64_t rows, int64_t cols, double *restrict mean,
                             double *restrict var) {
    const int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt * (size_t)cols * 2, sizeof(double));
    float *blocks = calloc((size_t)nt * (size_t)cols * 2, sizeof(float));
    if (!part || !blocks) {
        free(part);
        free(blocks);
        return 1;
    }
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        double *restrict s1 = part + (size_t)tid * (size_t)cols * 2, *restrict s2 = s1 + cols;
        float *restrict b1 = blocks + (size_t)tid * (size_t)cols * 2, *restrict b2 = b1 + cols;
        int n = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            bf_stats_row(z + r * cols, b1, b2, cols);
            if (++n == 64) {
                flush_block(s1, b1, cols);
                flush_block(s2, b2, cols);
                n = 0;
            }
        }
        flush_block(s1, b1, cols);
        flush_block(s2, b2, cols);
    }
    for (int64_t j = 0; j < cols; j++) {
        double a = 0.0, q = 0.0;
        for (int t = 0; t < nt; t++) {
            a += part[(size_t)t * (size_t)cols * 2 + j];
            q += part[(size_t)t * (size_t)cols * 2 + cols + j];
        }
        mean[j] = a / (double)rows;
        const double v = q / (double)rows - mean[j] * mean[j];
        var[j] = v > 0.0 ? v : 0.0;
    }
    free(part);
    free(blocks);
    return 0;
}

CLONES __attribute__((noinline)) static void bf_affine_row(const uint16_t *restrict z, uint16_t *restrict y,
                                                           const float *restrict a, const float *restrict c,
                                                           const float *restrict m, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        const float v = a[j] * bf2f(z[j]) + c[j];
        y[j] = f2bf((v < 0.0f ? 0.0f : v) * m[j]);
    }
}

/* y = dropout(relu(a * z + c)) in bf16 from bf16 z (kept for the backward) */
CLONES void affine_relu_dropout_forward_bf16(const uint16_t *restrict z, uint16_t *restrict y, const float *restrict a,
                                             const float *restrict c, const uint8_t *restrict bits, int64_t row_bytes,
                                             int k, uint32_t thr, float scale, int64_t rows, int64_t cols) {
    float lut[256][8] __attribute__((aligned(32)));
    if (k <= 8) dropout_lut(lut, k, thr, scale);
#pragma omp parallel
    {
        float *m = malloc((size_t)cols * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            row_mask(m, bits + r * row_bytes, (const float (*)[8])lut, k, thr, scale, cols);
            bf_affine_row(z + r * cols, y + r * cols, a, c, m, cols);
        }
        free(m);
    }
}

CLONES __attribute__((noinline)) static void bf_bn_row1(const uint16_t *restrict g, const uint16_t *restrict y,
    const uint16_t *restrict z, const float *restrict mu, const float *restrict is, float scale,
    float *restrict b1, float *restrict b2, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        const float gu = bf2f(g[j]) * (bf2f(y[j]) > 0.0f ? scale : 0.0f);
        b1[j] += gu;
        b2[j] += gu * ((bf2f(z[j]) - mu[j]) * is[j]);
    }
}

CLONES __attribute__((noinline)) static void bf_bn_row2(uint16_t *restrict o, const uint16_t *restrict g,
    const uint16_t *restrict y, const uint16_t *restrict z, const float *restrict mu, const float *restrict is,
    float scale, const float *restrict k0, const float *restrict k1, const float *restrict k2,
    float *restrict blk, int64_t cols) {
    for (int64_t j = 0; j < cols; j++) {
        const float gu = bf2f(g[j]) * (bf2f(y[j]) > 0.0f ? scale : 0.0f);
        const float v = k0[j] * gu - k1[j] - k2[j] * ((bf2f(z[j]) - mu[j]) * is[j]);
        o[j] = f2bf(v);
        blk[j] += v;
    }
}

/* bn_relu_dropout_backward over bf16 gy, y, z, writing bf16 dz: pass 1 only sums (gu is recomputed in pass 2
 * rather than stored rounded to bf16 in dz) */
CLONES int bn_relu_dropout_backward_bf16(uint16_t *restrict dz, const uint16_t *restrict gy, const uint16_t *restrict y,
                                         const uint16_t *restrict z, const float *restrict mean,
                                         const float *restrict invstd, const float *restrict gamma, float scale,
                                         float *restrict dgamma, float *restrict dbeta, float *restrict gb,
                                         int64_t rows, int64_t cols) {
    const int nt = omp_get_max_threads();
    double *part = calloc((size_t)nt * (size_t)cols * 2, sizeof(double));
    float *blocks = calloc((size_t)nt * (size_t)cols * 2, sizeof(float));
    float *coef = malloc((size_t)cols * 3 * sizeof(float));
    if (!part || !blocks || !coef) {
        free(part);
        free(blocks);
        free(coef);
        return 1;
    }
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        double *restrict s1 = part + (size_t)tid * (size_t)cols * 2, *restrict s2 = s1 + cols;
        float *restrict b1 = blocks + (size_t)tid * (size_t)cols * 2, *restrict b2 = b1 + cols;
        const float *restrict mu = mean, *restrict is = invstd;
        const float sc = scale;
        int n = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            bf_bn_row1(gy + r * cols, y + r * cols, z + r * cols, mu, is, sc, b1, b2, cols);
            if (++n == 64) {
                flush_block(s1, b1, cols);
                flush_block(s2, b2, cols);
                n = 0;
            }
        }
        flush_block(s1, b1, cols);
        flush_block(s2, b2, cols);
#pragma omp barrier
#pragma omp single
        {
            for (int64_t j = 0; j < cols; j++) {
                double a = 0.0, q = 0.0;
                for (int t = 0; t < nt; t++) {
                    a += part[(size_t)t * (size_t)cols * 2 + j];
                    q += part[(size_t)t * (size_t)cols * 2 + cols + j];
                }
                dbeta[j] = (float)a;
                dgamma[j] = (float)q;
                const float k0 = gamma[j] * invstd[j];
                coef[j] = k0;
                coef[cols + j] = k0 * (float)(a / (double)rows);
                coef[2 * cols + j] = k0 * (float)(q / (double)rows);
            }
            memset(part, 0, (size_t)nt * (size_t)cols * 2 * sizeof(double));
        }
        double *restrict acc = part + (size_t)tid * (size_t)cols;
        float *restrict blk = b1;
        for (int64_t j = 0; j < cols; j++) blk[j] = 0.0f;
        n = 0;
        const float *restrict k0 = coef, *restrict k1 = coef + cols, *restrict k2 = coef + 2 * cols;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            bf_bn_row2(dz + r * cols, gy + r * cols, y + r * cols, z + r * cols, mu, is, sc, k0, k1, k2, blk, cols);
            if (++n == 64) {
                flush_block(acc, blk, cols);
                n = 0;
            }
        }
        flush_block(acc, blk, cols);
    }
    reduce_threads(part, nt, (size_t)cols, cols, gb);
    free(part);
    free(blocks);
    free(coef);
    return 0;
}
