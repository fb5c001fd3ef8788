/* Per-element work of pointwise sliced mutual information (memprobe/predict/smi.py), float32.
 *
 * Why C: PSMI evaluates n x k x C Gaussian log-densities and their log-sum-exp. With the exponential from
 * the standard library or torch this costs more than the projection matmul itself; the short polynomial
 * exp2/log2 below are accurate to float32 rounding for the ranges used here and gcc/clang vectorise the
 * loops over directions. Single-threaded: the Python side runs row blocks on threads (ctypes drops the GIL).
 * Everything is in base-2 units (log2); the caller converts.
 */
#include <stdint.h>
#include <string.h>

/* 2^x for x <= 0: x = j + f, f in [-0.5, 0.5]; 2^f by its Taylor series to degree 7 (relative error
 * below 1e-8 before float rounding); 2^j goes straight into the exponent bits. x < -126 gives 2^-126,
 * which only ever adds to a sum that is at least 1. */
static inline float exp2_nonpositive(float x) {
    x = x < -126.0f ? -126.0f : x;
    float j = (x + 12582912.0f) - 12582912.0f; /* round to nearest: adding 1.5 * 2^23 drops the fraction */
    float f = x - j;
    float p = 1.5252733804059841e-05f;        /* ln(2)^n / n!, n = 7 .. 0 */
    p = p * f + 1.5403530393381608e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.6181291076284772e-03f;
    p = p * f + 5.5504108664821580e-02f;
    p = p * f + 2.4022650695910071e-01f;
    p = p * f + 6.9314718055994531e-01f;
    p = p * f + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)j * (1 << 23);
    memcpy(&p, &bits, 4);
    return p;
}

/* log2(s) for normal s > 0: s = 2^e m with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(u), u = (m-1)/(m+1),
 * |u| < 0.172, series to u^9 (truncation error below 4e-10). */
static inline float log2_positive(float s) {
    int32_t bits;
    memcpy(&bits, &s, 4);
    int32_t e = ((bits + 0x004afb0d) >> 23) - 127; /* 0x3f800000 - bits(sqrt(1/2)): puts m in range */
    bits -= e * (1 << 23);
    float m;
    memcpy(&m, &bits, 4);
    float u = (m - 1.0f) / (m + 1.0f), u2 = u * u;
    float q = 1.0f / 9.0f;
    q = q * u2 + 1.0f / 7.0f;
    q = q * u2 + 1.0f / 5.0f;
    q = q * u2 + 1.0f / 3.0f;
    q = q * u2 + 1.0f;
    return (float)e + 2.8853900817779268f * u * q; /* 2 / ln 2 */
}

/* x[0] + ... + x[n-1] with 8 running sums, which the compiler keeps in one vector register (a single running
 * sum is a serial chain it may not reorder). */
static float sum_floats(const float *x, int64_t n) {
    float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int i = 0; i < 8; i++) part[i] += x[j + i];
    float total = 0.0f;
    for (; j < n; j++) total += x[j];
    for (int i = 0; i < 8; i++) total += part[i];
    return total;
}

/* sq[c, j] += sum over rows r of class c of (z[r, j] - mu[c, j])^2: within-class sums of squares.
 * z: (n_rows, k) row-major; own: class per row; mu, sq: (n_classes, k). */
void class_square_sums(const float *z, int64_t n_rows, int64_t k, const int64_t *own, const float *mu,
                       float *sq) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float *zr = z + r * k, *m = mu + own[r] * k;
        float *s = sq + own[r] * k;
        for (int64_t j = 0; j < k; j++) {
            float d = zr[j] - m[j];
            s[j] += d * d;
        }
    }
}

/* The row's sum over j of l_own(j) - log2 sum_c 2^{l_c(j)}, with the class maximum subtracted before the
 * exponentials: the sum is then at least 1, so nothing overflows or underflows, whatever z is.
 * work: (n_classes + 2) * k floats. */
static float exact_row(const float *zr, int64_t k, int64_t own, const float *mu, const float *inv,
                       const float *a, int64_t n_classes, float *work) {
    float *top = work + n_classes * k, *sum = top + k;
    for (int64_t j = 0; j < k; j++) {
        top[j] = -3.0e38f;
        sum[j] = 0.0f;
    }
    for (int64_t c = 0; c < n_classes; c++) {
        const float *m = mu + c * k, *iv = inv + c * k, *ac = a + c * k;
        float *l = work + c * k;
        for (int64_t j = 0; j < k; j++) {
            float d = zr[j] - m[j];
            l[j] = ac[j] + iv[j] * d * d;
            top[j] = l[j] > top[j] ? l[j] : top[j];
        }
    }
    for (int64_t c = 0; c < n_classes; c++) {
        const float *l = work + c * k;
        for (int64_t j = 0; j < k; j++) sum[j] += exp2_nonpositive(l[j] - top[j]);
    }
    const float *mine = work + own * k;
    for (int64_t j = 0; j < k; j++) sum[j] = mine[j] - top[j] - log2_positive(sum[j]);
    return sum_floats(sum, k);
}

/* out[r] += sum_j  l_own(j) - log2 sum_c 2^{l_c(j)},  l_c(j) = a[c, j] + inv[c, j] (z[r, j] - mu[c, j])^2,
 * a = log2 prior - log2 sd, inv = -log2(e) / (2 var), all (n_classes, k); z (n_rows, k); own: class per row.
 * The caller shifts a so that max_c a[c, j] = 0 (the result does not change): every term is then at most 1
 * and one pass over the classes suffices. A row so far from every class that some sum falls below 2^-100
 * has lost precision to underflow; it is redone exactly (`exact_row`). work: (n_classes + 2) * k floats. */
void log_ratio_sums(const float *z, int64_t n_rows, int64_t k, const int64_t *own, const float *mu,
                    const float *inv, const float *a, int64_t n_classes, float *out, float *work) {
    float *sum = work;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *zr = z + r * k;
        for (int64_t j = 0; j < k; j++) sum[j] = 0.0f;
        for (int64_t c = 0; c < n_classes; c++) {
            const float *m = mu + c * k, *iv = inv + c * k, *ac = a + c * k;
            for (int64_t j = 0; j < k; j++) {
                float d = zr[j] - m[j];
                sum[j] += exp2_nonpositive(ac[j] + iv[j] * d * d);
            }
        }
        const float *m = mu + own[r] * k, *iv = inv + own[r] * k, *ac = a + own[r] * k;
        int underflow = 0;
        for (int64_t j = 0; j < k; j++) {
            float d = zr[j] - m[j];
            underflow |= sum[j] < 0x1p-100f;
            sum[j] = ac[j] + iv[j] * d * d - log2_positive(sum[j]); /* the term itself, summed below */
        }
        out[r] += underflow ? exact_row(zr, k, own[r], mu, inv, a, n_classes, work) : sum_floats(sum, k);
    }
}
