/* Fused CPU passes for a training step's MLP (see deepfm/models/kernels.py, which compiles and loads this).
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
    if (k <= 8) {
        const uint32_t mask = (1u << k) - 1;
        for (int v = 0; v < 256; v++)
            for (int t = 0; t < 8; t++)
                lut[v][t] = (t < 8 / k && ((v >> (t * k)) & mask) >= thr) ? scale : 0.0f;
    }
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
                for (int64_t j = 0; j < cols; j++) {
                    acc[j] += blk[j];
                    blk[j] = 0.0f;
                }
                n = 0;
            }
        }
        for (int64_t j = 0; j < cols; j++) acc[j] += blk[j];
    }
    for (int64_t j = 0; j < cols; j++) {
        double s = 0.0;
        for (int t = 0; t < nt; t++) s += part[(size_t)t * (size_t)cols + j];
        gb[j] = (float)s;
    }
    free(part);
    free(blocks);
    return 0;
}

/* The field embeddings of a batch and, optionally, the FM second-order term, in one pass over the batch:
 * e[b, f, :] = sum over slots s of field f (slot_field[s] = f) of table[rows[b, s], :] * val[b, s], and
 * fm[b] = 0.5 * sum_k ((sum_f e[b, f, k])^2 - sum_f e[b, f, k]^2)   (Guo et al. 2017, eq. 2). */
void embed_forward(const float *restrict table, int64_t K, const int64_t *restrict rows,
                   const float *restrict val, const int32_t *restrict slot_field, int64_t B, int64_t S,
                   int64_t F, float *restrict e, float *restrict fm) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        float *restrict eb = e + b * F * K;
        memset(eb, 0, (size_t)(F * K) * sizeof(float));
        for (int64_t s = 0; s < S; s++) {
            const float *restrict t = table + rows[b * S + s] * K;
            const float v = val[b * S + s];
            float *restrict o = eb + (int64_t)slot_field[s] * K;
            for (int64_t k = 0; k < K; k++) o[k] += t[k] * v;
        }
        if (fm) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                float sum = 0.0f, sq = 0.0f;
                for (int64_t f = 0; f < F; f++) {
                    float x = eb[f * K + k];
                    sum += x;
                    sq += x * x;
                }
                acc += sum * sum - sq;
            }
            fm[b] = 0.5f * acc;
        }
    }
}

/* The table gradient of embed_forward: de = ge + gfm[b] * (sum_f e[b, f, :] - e[b, f, :]) into scratch
 * [B, F, K] (ge: row stride ld, may be NULL, as may gfm), then grad[rows[b, s], :] += de[b, field(s), :] *
 * val[b, s]. Each thread owns one range of table rows and adds in batch order: no races, and the same sums
 * whatever the thread count. grad [R, K] must be zeroed by the caller. */
void embed_backward(const float *restrict ge, int64_t ld, const float *restrict gfm, const float *restrict e,
                    const int64_t *restrict rows, const float *restrict val, const int32_t *restrict slot_field,
                    int64_t B, int64_t S, int64_t F, int64_t K, float *restrict scratch, float *restrict grad,
                    int64_t R) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        float *restrict d = scratch + b * F * K;
        const float *restrict eb = e + b * F * K;
        if (ge) {
            const float *restrict g = ge + b * ld;
            for (int64_t i = 0; i < F * K; i++) d[i] = g[i];
        } else {
            memset(d, 0, (size_t)(F * K) * sizeof(float));
        }
        if (gfm) {
            const float c = gfm[b];
            for (int64_t k = 0; k < K; k++) {
                float sum = 0.0f;
                for (int64_t f = 0; f < F; f++) sum += eb[f * K + k];
                for (int64_t f = 0; f < F; f++) d[f * K + k] += c * (sum - eb[f * K + k]);
            }
        }
    }
#pragma omp parallel
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t lo = R * t / nt, hi = R * (t + 1) / nt;
        for (int64_t b = 0; b < B; b++) {
            const float *restrict d = scratch + b * F * K;
            for (int64_t s = 0; s < S; s++) {
                const int64_t r = rows[b * S + s];
                if (r < lo || r >= hi) continue;
                const float v = val[b * S + s];
                const float *restrict src = d + (int64_t)slot_field[s] * K;
                float *restrict o = grad + r * K;
                for (int64_t k = 0; k < K; k++) o[k] += src[k] * v;
            }
        }
    }
}
