/* Paged decode attention on the CPU: each decode row's one query over its own K/V, read in place
 * from the paged pool through the row's block table (no gather copy), with the log-sum-exp of its
 * scores so the result merges with the row's prefix part (prefix_store/attention.py).
 *
 * A row may also name a KV prefix that lives in the same pool (unified paging: a run of consecutive
 * slots from `pre_slot`): its `pre_len` positions are then read first, as the row's first keys, and
 * the softmax covers prefix and own tokens together (no separate prefix part to merge).
 *
 * float32 only. Built and loaded by cpu_kernels.py (a C compiler, ctypes; no torch headers).
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

typedef struct {
    const float *q;       /* row r's query [H, D] at q + r * q_stride */
    int64_t q_stride;
    const float *k, *v;   /* one layer's pool [num_blocks, block_size, H, D] */
    const int64_t *table; /* [rows, nb] block ids */
    int64_t nb;
    const int32_t *lens;  /* [rows] own tokens per row (the new one included) */
    const int64_t *pre_slot; /* [rows] first pool slot of the row's in-pool prefix, or NULL */
    const int32_t *pre_len;  /* [rows] its positions (0: none), or NULL */
    int block_size, heads, dim;
    float scale;
    float *out;           /* [rows, H, D] */
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

/* Key or value t of row r in a pool [slots, H, D]: its prefix's positions, then its own tokens. */
static const float *token(const Job *j, const float *pool, int r, int t, int p) {
    const int bs = j->block_size;
    const int64_t slot = t < p ? j->pre_slot[r] + t : j->table[r * j->nb + (t - p) / bs] * bs + (t - p) % bs;
    return pool + slot * j->heads * j->dim;
}

/* One row: scores s [H, n] (scratch), then softmax, then the weighted sum of V. */
static void attend_row(const Job *j, int r, float *s, float *inv) {
    const int H = j->heads, D = j->dim, p = prefix_len(j, r), n = p + j->lens[r];
    const float *q = j->q + r * j->q_stride;
    float *o = j->out + (int64_t)r * H * D;
    for (int t = 0; t < n; t++) {
        const float *kt = token(j, j->k, r, t, p);
        for (int h = 0; h < H; h++) s[h * n + t] = dot(q + h * D, kt + h * D, D) * j->scale;
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
        const float *vt = token(j, j->v, r, t, p);
        for (int h = 0; h < H; h++) {
            const float w = s[h * n + t] * inv[h];
            float *oh = o + h * D;
            const float *vh = vt + h * D;
            for (int d = 0; d < D; d++) oh[d] += w * vh[d];
        }
    }
}

/* 0, or 1 when the scratch buffer could not be allocated. */
static int run_job(const Job *j) {
    float *s = malloc(sizeof(float) * ((size_t)j->heads * j->max_len + j->heads));
    if (!s) return 1;
    for (int r = j->first; r < j->last; r++) attend_row(j, r, s, s + (size_t)j->heads * j->max_len);
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

/* Returns 0 on success, nonzero when a scratch buffer could not be allocated (the caller raises).
 * Built with OpenMP, the rows are shared by the team of the OpenMP runtime already in the process
 * (torch's): its threads, spinning after the last matmul, pick the work up at once, and no second
 * set of threads competes with them for the cores. Built without it, one thread does all rows. */
int paged_decode(const float *q, int64_t q_stride, const float *k, const float *v, const int64_t *table,
                 int64_t nb, const int32_t *lens, const int64_t *pre_slot, const int32_t *pre_len, int rows,
                 int block_size, int heads, int dim, float scale, float *out, float *lse, int threads) {
    if (rows <= 0) return 0;
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
        Job j = {q, q_stride, k, v, table, nb, lens, pre_slot, pre_len, block_size, heads, dim, scale,
                 out, lse, 0, 0, max_len};
        split_rows(&j, rows, total, i, n);
        failed |= run_job(&j);
    }
    return failed;
}
