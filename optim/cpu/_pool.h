/* optim's thread pool: run fn(arg, i) for i in [0, n_pieces) on the calling thread and
 * up to n_threads - 1 worker threads, and return when every piece is done.
 *
 * Pieces are claimed one at a time from a counter that also holds the job's number, so
 * a worker claims pieces only of the job it was woken for, and the caller waits only for
 * pieces a worker has claimed: a worker the OS has not scheduled yet (a busy machine)
 * costs nothing, since the caller takes its pieces. (An OpenMP parallel region instead
 * waits at its closing barrier for every thread of the team, which on a loaded machine
 * means a scheduler time slice per update.) Workers start on first use, spin briefly
 * between jobs, then sleep. One job at a time: a call made while the pool is busy (from
 * another Python thread) runs its pieces on its own thread. After fork() the child starts
 * with an empty pool. Without POSIX threads and C11 atomics every call runs inline.
 */
#ifndef OPTIM_POOL_H
#define OPTIM_POOL_H

#include <Python.h>

typedef void (*optim_piece_fn)(void *arg, Py_ssize_t piece);

#if !defined(OPTIM_NO_POOL) && !defined(_WIN32) && !defined(__STDC_NO_ATOMICS__)
#define OPTIM_POOL 1
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <time.h>

#define OPTIM_POOL_MAX_WORKERS 255
/* How long a finished worker polls for the next job before it sleeps (back-to-back
 * updates then find it awake: waking a sleeping thread costs tens of microseconds,
 * more in a virtual machine), and how long the caller polls for pieces that workers
 * still run before it sleeps too (so that the OS can move a preempted worker onto its
 * core): twice the time its own last piece took, within these bounds. */
#define OPTIM_POOL_WORKER_SPIN_NS 100000
#define OPTIM_POOL_CALLER_SPIN_MIN_NS 5000
#define OPTIM_POOL_CALLER_SPIN_MAX_NS 200000

#if defined(__x86_64__) || defined(__i386__)
#define OPTIM_PAUSE() __builtin_ia32_pause()
#else
#define OPTIM_PAUSE() ((void)0)
#endif

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;             /* sleeping workers wait here for a job */
    pthread_cond_t finished;         /* the caller waits here for claimed pieces */
    int n_workers;                   /* started (under lock) */
    atomic_int sleeping;             /* workers waiting on `wake` */
    atomic_int caller_waiting;       /* the caller waits on `finished` */
    atomic_int busy;                 /* a job is running */
    /* The current job, published seqlock-style: `seq` is odd while the caller writes
     * the fields, and seq / 2 is the job's number once it is even again. */
    atomic_uint seq;
    _Atomic(optim_piece_fn) fn;
    _Atomic(void *) arg;
    atomic_uint n_pieces;
    atomic_int wanted;               /* workers 0 .. wanted - 1 join */
    atomic_uint_fast64_t next;       /* job << 32 | next piece to claim */
    atomic_uint_fast64_t done;       /* pieces of the current job finished */
} optim_pool_t;

static optim_pool_t optim_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
                                  PTHREAD_COND_INITIALIZER};
static pthread_once_t optim_pool_once = PTHREAD_ONCE_INIT;

static int64_t optim_pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim a piece of job `job` (of n_pieces); 0 when it has none left or is over. */
static int optim_pool_claim(unsigned job, uint32_t n_pieces, uint32_t *piece) {
    uint_fast64_t v = atomic_load(&optim_pool.next);
    for (;;) {
        if ((unsigned)(v >> 32) != job || (uint32_t)v >= n_pieces)
            return 0;
        if (atomic_compare_exchange_weak(&optim_pool.next, &v, v + 1)) {
            *piece = (uint32_t)v;
            return 1;
        }
    }
}

/* Run pieces of the job until none is left; returns how long the last one took. */
static int64_t optim_pool_work(unsigned job, optim_piece_fn fn, void *arg,
                               uint32_t n_pieces) {
    optim_pool_t *p = &optim_pool;
    uint32_t piece;
    int64_t last_ns = 0;
    while (optim_pool_claim(job, n_pieces, &piece)) {
        int64_t start = optim_pool_now_ns();
        fn(arg, (Py_ssize_t)piece);
        last_ns = optim_pool_now_ns() - start;
        if (atomic_fetch_add(&p->done, 1) + 1 == n_pieces && atomic_load(&p->caller_waiting)) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_broadcast(&p->finished);
            pthread_mutex_unlock(&p->lock);
        }
    }
    return last_ns;
}

static void *optim_pool_worker(void *index_ptr) {
    int index = (int)(intptr_t)index_ptr;
    optim_pool_t *p = &optim_pool;
    unsigned seen = atomic_load(&p->seq) >> 1;
    for (;;) {
        int64_t until = optim_pool_now_ns() + OPTIM_POOL_WORKER_SPIN_NS;
        while ((atomic_load(&p->seq) >> 1) == seen && optim_pool_now_ns() < until)
            OPTIM_PAUSE();
        if ((atomic_load(&p->seq) >> 1) == seen) {
            pthread_mutex_lock(&p->lock);
            atomic_fetch_add(&p->sleeping, 1);
            while ((atomic_load(&p->seq) >> 1) == seen)
                pthread_cond_wait(&p->wake, &p->lock);
            atomic_fetch_sub(&p->sleeping, 1);
            pthread_mutex_unlock(&p->lock);
        }
        unsigned s1, s2;
        optim_piece_fn fn;
        void *arg;
        uint32_t n_pieces;
        int wanted;
        do {  /* a consistent snapshot of the job */
            s1 = atomic_load(&p->seq);
            fn = atomic_load(&p->fn);
            arg = atomic_load(&p->arg);
            n_pieces = atomic_load(&p->n_pieces);
            wanted = atomic_load(&p->wanted);
            s2 = atomic_load(&p->seq);
        } while (s1 != s2 || (s1 & 1));
        seen = s1 >> 1;
        if (index < wanted)
            optim_pool_work(seen, fn, arg, n_pieces);
    }
    return NULL;
}

/* In a forked child the workers do not exist and the lock may be held: start over. */
static void optim_pool_after_fork(void) {
    optim_pool_t *p = &optim_pool;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->finished, NULL);
    p->n_workers = 0;
    atomic_store(&p->sleeping, 0);
    atomic_store(&p->caller_waiting, 0);
    atomic_store(&p->busy, 0);
}

static void optim_pool_register_fork(void) {
    pthread_atfork(NULL, NULL, optim_pool_after_fork);
}

/* Start workers until there are `count` (as many as the OS gives). */
static void optim_pool_grow(int count) {
    optim_pool_t *p = &optim_pool;
    pthread_attr_t attr;
    pthread_t thread;
    if (count > OPTIM_POOL_MAX_WORKERS)
        count = OPTIM_POOL_MAX_WORKERS;
    if (p->n_workers >= count)
        return;
    pthread_once(&optim_pool_once, optim_pool_register_fork);
    pthread_mutex_lock(&p->lock);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (p->n_workers < count &&
           pthread_create(&thread, &attr, optim_pool_worker,
                          (void *)(intptr_t)p->n_workers) == 0)
        p->n_workers++;
    pthread_attr_destroy(&attr);
    pthread_mutex_unlock(&p->lock);
}

static void optim_parallel(optim_piece_fn fn, void *arg, Py_ssize_t n_pieces, int n_threads) {
    optim_pool_t *p = &optim_pool;
    if (n_threads <= 1 || n_pieces <= 1 || n_pieces > UINT32_MAX ||
        atomic_exchange(&p->busy, 1)) {
        for (Py_ssize_t i = 0; i < n_pieces; i++)
            fn(arg, i);
        return;
    }
    if (n_threads > n_pieces)
        n_threads = (int)n_pieces;  /* no worker without a piece to take */
    optim_pool_grow(n_threads - 1);
    unsigned seq = atomic_load(&p->seq);
    unsigned job = (seq >> 1) + 1;
    atomic_store(&p->seq, seq + 1);
    atomic_store(&p->fn, fn);
    atomic_store(&p->arg, arg);
    atomic_store(&p->n_pieces, (unsigned)n_pieces);
    atomic_store(&p->wanted, n_threads - 1);
    atomic_store(&p->done, 0);
    atomic_store(&p->next, (uint_fast64_t)job << 32);
    atomic_store(&p->seq, seq + 2);
    if (atomic_load(&p->sleeping)) {
        pthread_mutex_lock(&p->lock);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->lock);
    }
    int64_t spin = 2 * optim_pool_work(job, fn, arg, (uint32_t)n_pieces);
    /* Wait for the pieces workers claimed: spinning about as long as a piece takes,
     * then asleep, so that the OS can move a preempted worker onto this core. */
    if (spin < OPTIM_POOL_CALLER_SPIN_MIN_NS)
        spin = OPTIM_POOL_CALLER_SPIN_MIN_NS;
    if (spin > OPTIM_POOL_CALLER_SPIN_MAX_NS)
        spin = OPTIM_POOL_CALLER_SPIN_MAX_NS;
    int64_t until = optim_pool_now_ns() + spin;
    while (atomic_load(&p->done) < (uint_fast64_t)n_pieces && optim_pool_now_ns() < until)
        OPTIM_PAUSE();
    if (atomic_load(&p->done) < (uint_fast64_t)n_pieces) {
        atomic_store(&p->caller_waiting, 1);
        pthread_mutex_lock(&p->lock);
        while (atomic_load(&p->done) < (uint_fast64_t)n_pieces)
            pthread_cond_wait(&p->finished, &p->lock);
        pthread_mutex_unlock(&p->lock);
        atomic_store(&p->caller_waiting, 0);
    }
    atomic_store(&p->busy, 0);
}

#else
#define OPTIM_POOL 0

static void optim_parallel(optim_piece_fn fn, void *arg, Py_ssize_t n_pieces, int n_threads) {
    (void)n_threads;
    for (Py_ssize_t i = 0; i < n_pieces; i++)
        fn(arg, i);
}
#endif

#endif
