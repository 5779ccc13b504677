/* Paged decode attention on the CPU: each decode row's one query over its own K/V, read in place
 * from the paged pool through the row's block table (no gather copy), with the log-sum-exp of its
 * scores so the result merges with the row's prefix part (prefix_store/attention.py).
 *
 * float32 only. Built and loaded by cpu_kernels.py (a C compiler, ctypes; no torch headers).
 * Rows are split over `threads` POSIX threads by their token counts; the caller's thread works too.
 *
 * Non-finite keys or values give non-finite outputs, as in softmax attention: the engine finds bad
 * rows by their outputs (runner._finite_rows), so nothing here may hide a NaN.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const float *q;       /* row r's query [H, D] at q + r * q_stride */
    int64_t q_stride;
    const float *k, *v;   /* one layer's pool [num_blocks, block_size, H, D] */
    const int64_t *table; /* [rows, nb] block ids */
    int64_t nb;
    const int32_t *lens;  /* [rows] own tokens per row (the new one included) */
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

/* One row: scores s [H, n] (scratch), then softmax, then the weighted sum of V. */
static void attend_row(const Job *j, int r, float *s, float *inv) {
    const int H = j->heads, D = j->dim, bs = j->block_size, n = j->lens[r];
    const int64_t tok = (int64_t)H * D;
    const float *q = j->q + r * j->q_stride;
    const int64_t *blocks = j->table + r * j->nb;
    float *o = j->out + (int64_t)r * tok;
    for (int t = 0; t < n; t++) {
        const float *kt = j->k + (blocks[t / bs] * bs + t % bs) * tok;
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
        const float *vt = j->v + (blocks[t / bs] * bs + t % bs) * tok;
        for (int h = 0; h < H; h++) {
            const float p = s[h * n + t] * inv[h];
            float *oh = o + h * D;
            const float *vh = vt + h * D;
            for (int d = 0; d < D; d++) oh[d] += p * vh[d];
        }
    }
}

static void *run_job(void *arg) {
    const Job *j = (const Job *)arg;
    float *s = malloc(sizeof(float) * ((size_t)j->heads * j->max_len + j->heads));
    if (!s) return (void *)1;
    for (int r = j->first; r < j->last; r++) attend_row(j, r, s, s + (size_t)j->heads * j->max_len);
    free(s);
    return NULL;
}

#define MAX_THREADS 64

/* Returns 0 on success, nonzero when a scratch buffer could not be allocated (the caller raises).
 * A thread that cannot be started is not an error: the calling thread does its rows. */
int paged_decode(const float *q, int64_t q_stride, const float *k, const float *v, const int64_t *table,
                 int64_t nb, const int32_t *lens, int rows, int block_size, int heads, int dim, float scale,
                 float *out, float *lse, int threads) {
    if (rows <= 0) return 0;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = rows;
    int64_t total = 0;
    int max_len = 1;
    for (int r = 0; r < rows; r++) {
        total += lens[r];
        if (lens[r] > max_len) max_len = lens[r];
    }
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int r = 0, failed = 0;
    int64_t done = 0;
    for (int i = 0; i < threads; i++) { /* contiguous row ranges of about equal token counts */
        Job *j = &jobs[i];
        *j = (Job){q, q_stride, k, v, table, nb, lens, block_size, heads, dim, scale, out, lse, r, r, max_len};
        const int64_t goal = total * (i + 1) / threads;
        while (r < rows && (done < goal || i == threads - 1)) done += lens[r++];
        j->last = r;
    }
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], NULL, run_job, &jobs[i]) == 0;
    for (int i = 1; i < threads; i++)
        if (!started[i]) failed |= run_job(&jobs[i]) != NULL; /* no thread: do it here */
    failed |= run_job(&jobs[0]) != NULL;
    for (int i = 1; i < threads; i++) {
        void *res = NULL;
        if (started[i]) {
            pthread_join(ids[i], &res);
            failed |= res != NULL;
        }
    }
    return failed;
}
