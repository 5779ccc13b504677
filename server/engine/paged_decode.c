/* Paged decode attention on the CPU: each decode row's one query over its own K/V, read in place
 * from the paged pool through the row's block table (no gather copy), with the log-sum-exp of its
 * scores so the result merges with the row's prefix part (prefix_store/attention.py).
 *
 * The pools may hold fewer heads than the query (grouped-query attention): with H query heads and
 * H_kv KV heads (H_kv divides H), query head h reads KV head h / (H / H_kv), as HF's
 * repeat_interleave of the KV heads does (GPT-2: H_kv = H).
 *
 * A row may also name a KV prefix that lives in the same pool (unified paging: a run of consecutive
 * slots from `pre_slot`): its `pre_len` positions are then read first, as the row's first keys, and
 * the softmax covers prefix and own tokens together (no separate prefix part to merge).
 *
 * q, the pools and out share one dtype: float32, bfloat16 or float16 (where the compiler has
 * _Float16; paged_decode_dtypes() says which). Every sum is float32: a half-precision key or value
 * row is widened once into scratch, the output rounded once (to nearest even). The log-sum-exp is
 * float32. Built and loaded by cpu_kernels.py (a C compiler, ctypes; no torch headers).
 * Rows are split over `threads` OpenMP threads by their token counts (see paged_decode below).
 *
 * Non-finite keys or values give non-finite outputs, as in softmax attention: the engine finds bad
 * rows by their outputs (runner._finite_rows), so nothing here may hide a NaN.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 }; /* the tensors' dtype */
#ifdef __FLT16_MAX__
#define HAVE_F16 1
#else
#define HAVE_F16 0
#endif

/* Bit 1 << dtype for each dtype this build serves. */
int paged_decode_dtypes(void) { return (1 << F32) | (1 << BF16) | (HAVE_F16 << F16); }

static const int SIZE[] = {4, 2, 2};

/* n elements of dtype at src -> float32 at dst. */
static void widen(int dtype, const void *src, float *dst, int n) {
    if (dtype == F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == BF16) {
        const uint16_t *h = src;
        for (int i = 0; i < n; i++) {
            const uint32_t u = (uint32_t)h[i] << 16;
            memcpy(dst + i, &u, 4);
        }
    }
#if HAVE_F16
    else if (dtype == F16) {
        const _Float16 *h = src;
        int i = 0;
#ifdef __F16C__ /* 8 at a time (x86's F16C; the plain loop is not vectorised there) */
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
        for (; i < n; i++) dst[i] = (float)h[i];
    }
#endif
}

/* n float32 at src -> dtype at dst, rounded to nearest even (a NaN stays a NaN). */
static void narrow(int dtype, const float *src, void *dst, int n) {
    if (dtype == F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dtype == BF16) {
        uint16_t *h = dst;
        for (int i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, src + i, 4);
            h[i] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                                    : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
        }
    }
#if HAVE_F16
    else {
        _Float16 *h = dst;
        for (int i = 0; i < n; i++) h[i] = (_Float16)src[i];
    }
#endif
}

typedef struct {
    const char *q;        /* row r's query [H, D] at q + r * q_stride elements */
    int64_t q_stride;
    const char *k, *v;    /* one layer's pool [num_blocks, block_size, H_kv, D] */
    const int64_t *table; /* [rows, nb] block ids */
    int64_t nb;
    const int32_t *lens;  /* [rows] own tokens per row (the new one included) */
    const int64_t *pre_slot; /* [rows] first pool slot of the row's in-pool prefix, or NULL */
    const int32_t *pre_len;  /* [rows] its positions (0: none), or NULL */
    int block_size, heads, kv_heads, dim, dtype; /* heads: H (the query's), kv_heads: H_kv */
    float scale;
    char *out;            /* [rows, H, D] */
    float *lse;           /* [rows, H], or NULL */
    int first, last;      /* this job's rows: first .. last-1 */
    int max_len;
} Job;

static float dot(const float *a, const float *b, int n) {
    float s = 0.f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static int prefix_len(const Job *j, int r) { return j->pre_len ? j->pre_len[r] : 0; }

/* Key or value t of row r in a pool [slots, H_kv, D] as float32 ([H_kv, D]; widened into `buf` unless
 * the pool is float32): its prefix's positions, then its own tokens. */
static const float *token(const Job *j, const char *pool, int r, int t, int p, float *buf) {
    const int bs = j->block_size, width = j->kv_heads * j->dim;
    const int64_t slot = t < p ? j->pre_slot[r] + t : j->table[r * j->nb + (t - p) / bs] * bs + (t - p) % bs;
    const char *at = pool + slot * width * SIZE[j->dtype];
    if (j->dtype == F32) return (const float *)at;
    widen(j->dtype, at, buf, width);
    return buf;
}

/* One row: scores s [H, n] (scratch), then softmax, then the weighted sum of V into o [H, D] (scratch,
 * float32), stored in the output's dtype. `row` is float32 scratch for a widened [H_kv, D] row. Query
 * head h reads KV head h / G (G = H / H_kv query heads per KV head). Inlined into each of run_job's
 * loops, so that the copy for G = 1 (GPT-2) folds h / G to h: its inner loops stay free of divisions. */
static inline __attribute__((always_inline)) void attend_row(const Job *j, int r, int G, float *s, float *inv,
                                                             float *o, float *row) {
    const int H = j->heads, D = j->dim, p = prefix_len(j, r), n = p + j->lens[r];
    const char *qr = j->q + (int64_t)r * j->q_stride * SIZE[j->dtype];
    float *q = o; /* the query, widened into o's place (o is written only after the scores) */
    widen(j->dtype, qr, q, H * D);
    for (int t = 0; t < n; t++) {
        const float *kt = token(j, j->k, r, t, p, row);
        for (int h = 0; h < H; h++) s[h * n + t] = dot(q + h * D, kt + h / G * D, D) * j->scale;
    }
    for (int h = 0; h < H; h++) {
        float *sh = s + h * n, m = -INFINITY, den = 0.f;
        for (int t = 0; t < n; t++) m = sh[t] > m ? sh[t] : m; /* a NaN is skipped here ... */
        for (int t = 0; t < n; t++) den += (sh[t] = expf(sh[t] - m)); /* ... and kept here */
        inv[h] = 1.f / den;
        if (j->lse) j->lse[(int64_t)r * H + h] = m + logf(den);
        for (int d = 0; d < D; d++) o[h * D + d] = 0.f;
    }
    for (int t = 0; t < n; t++) {
        const float *vt = token(j, j->v, r, t, p, row);
        for (int h = 0; h < H; h++) {
            const float w = s[h * n + t] * inv[h];
            float *oh = o + h * D;
            const float *vh = vt + h / G * D;
            for (int d = 0; d < D; d++) oh[d] += w * vh[d];
        }
    }
    narrow(j->dtype, o, j->out + (int64_t)r * H * D * SIZE[j->dtype], H * D);
}

/* 0, or 1 when the scratch buffer could not be allocated. */
static int run_job(const Job *j) {
    const size_t scores = (size_t)j->heads * j->max_len, width = (size_t)j->heads * j->dim;
    float *s = malloc(sizeof(float) * (scores + j->heads + width + (size_t)j->kv_heads * j->dim));
    if (!s) return 1;
    float *inv = s + scores, *o = inv + j->heads, *row = o + width; /* o [H, D], row [H_kv, D] */
    const int G = j->heads / j->kv_heads;
    if (G == 1)
        for (int r = j->first; r < j->last; r++) attend_row(j, r, 1, s, inv, o, row);
    else
        for (int r = j->first; r < j->last; r++) attend_row(j, r, G, s, inv, o, row);
    free(s);
    return 0;
}

/* Thread i of n takes a contiguous range of rows holding about an equal share of the tokens. */
static void split_rows(Job *j, int rows, int64_t total, int i, int n) {
    int r = 0;
    int64_t done = 0;
    for (int k = 0; k <= i; k++) {
        j->first = r;
        const int64_t goal = total * (k + 1) / n;
        for (; r < rows && (done < goal || k == n - 1); r++) done += j->lens[r] + prefix_len(j, r);
    }
    j->last = r;
}

/* q [rows, H, D] (row r at q + r * q_stride elements), pools [num_blocks, block_size, H_kv, D] with
 * H_kv = kv_heads dividing H = heads, out [rows, H, D], lse [rows, H] or NULL.
 * Returns 0 on success, 1 when a scratch buffer could not be allocated, 2 for a dtype this build does
 * not serve (the caller raises).
 * Built with OpenMP, the rows are shared by the team of the OpenMP runtime already in the process
 * (torch's): its threads, spinning after the last matmul, pick the work up at once, and no second
 * set of threads competes with them for the cores. Built without it, one thread does all rows. */
int paged_decode(const void *q, int64_t q_stride, const void *k, const void *v, const int64_t *table,
                 int64_t nb, const int32_t *lens, const int64_t *pre_slot, const int32_t *pre_len, int rows,
                 int block_size, int heads, int kv_heads, int dim, float scale, void *out, float *lse,
                 int threads, int dtype) {
    if (rows <= 0) return 0;
    if (dtype < 0 || dtype > F16 || !(paged_decode_dtypes() & (1 << dtype))) return 2;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows;
    int64_t total = 0;
    int max_len = 1;
    for (int r = 0; r < rows; r++) {
        const int n = lens[r] + (pre_len ? pre_len[r] : 0);
        total += n;
        if (n > max_len) max_len = n;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int i = 0, n = 1;
#ifdef _OPENMP
        i = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        Job j = {q, q_stride, k, v, table, nb, lens, pre_slot, pre_len, block_size, heads, kv_heads, dim,
                 dtype, scale, out, lse, 0, 0, max_len};
        split_rows(&j, rows, total, i, n);
        failed |= run_job(&j);
    }
    return failed;
}
