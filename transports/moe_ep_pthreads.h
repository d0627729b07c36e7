/* moe_ep_pthreads.h -- the in-process transport of moe_ep: N ranks as N threads -- MIT or public domain

   DO THIS
   =======
       #define MOE_EP_IMPLEMENTATION          (in exactly one file; builds the core too)
       #include "transports/moe_ep_pthreads.h"
   and link with -pthread. Mutexes and condition variables are used (no pthread_barrier_t),
   and where the compiler has them the GCC/clang __atomic builtins and, on Unix, sysconf;
   strict -std=c99 needs no feature-test macro.

   CONFIGURATION MACROS
   ====================
   MOE_EP_PTHREADS_SPIN_COUNT  20000        the polls a barrier tries before it sleeps when
                                            desc.spin_count is 0 (0: none), <= 2^20
   MOE_EP_PTHREADS_NO_SPIN     (undefined)  barriers sleep at once, whatever desc.spin_count

   HOW IT WORKS
   ============
   A world holds the shared state of R ranks. Each rank thread gets a transport with
   moe_ep_pthreads_transport_create(world, rank, &t). An all-to-all publishes each
   rank's send description, waits until all have published, then every receiver
   copies its segments straight out of the senders' buffers (each byte is copied
   once) and waits until all have finished reading.

   moe_ep_pthreads_run(world, fn, user_data, results) starts R threads, gives each
   its transport and calls fn on it, then joins them and returns the first failure.

   SPINNING
   ========
   A rank that reaches a barrier before its peers polls for them first, with the mutex
   released and the CPU's pause hint, and sleeps on the condition variable only if they
   have not come after desc.spin_count polls (default MOE_EP_PTHREADS_SPIN_COUNT, 20000:
   about 0.3 ms where a poll takes 15 ns). Waking a sleeping thread costs tens of
   microseconds, as much as the copy of a small exchange. The polls a barrier tries adapt:
   a spin that ended in time doubles them (up to spin_count), one that did not halves them
   (down to spin_count / 64). A world with more rank threads than online CPUs (sysconf,
   where the system has it) never spins, since a spinning rank would hold the CPU that the
   rank it waits for needs; neither does desc.spin_count < 0, a build with
   MOE_EP_PTHREADS_NO_SPIN, or a compiler without the GCC/clang __atomic builtins (C99 has
   no atomics). Spinning changes no result, timeout, abort or error: after its polls a rank
   waits exactly as before (an abort or a peer's return that comes during the polls is
   seen when they end; desc.spin_count is at most MOE_EP_PTHREADS_SPIN_MAX, 2^20, else
   moe_ep_pthreads_world_create returns MOE_EP_ERROR_INVALID_ARGUMENT).

   FAILURE
   =======
   Every barrier a collective is built from carries a tag: the collective's kind, its
   parameters (count, segments and row size, element count) and the core's step. The
   last rank to arrive compares them; if they differ every rank of the barrier gets the
   same verdict, MOE_EP_ERROR_OUT_OF_STEP (a rank skipped a collective or entered
   another), and no rank reads another's buffers. A rank that failed before a collective
   (the core's skip) enters its barrier with a SKIP tag: the others return
   MOE_EP_ERROR_ABORTED ("rank N failed before this collective") and every rank is at the
   same step again, so a retry with valid arguments works.

   When a rank fails (its fn returns an error) or returns while others still wait,
   the waiting ranks return MOE_EP_ERROR_ABORTED instead of waiting forever. With
   desc.timeout_ms > 0 a wait that lasts longer returns MOE_EP_ERROR_TIMEOUT on that
   rank and aborts the others (resolution: one second; the wait lasts at least
   timeout_ms and at most one second more). moe_ep_pthreads_abort()
   aborts from outside. The next moe_ep_pthreads_run starts with a clean state.
*/
#ifndef MOE_EP_PTHREADS_H_INCLUDED
#define MOE_EP_PTHREADS_H_INCLUDED

#if !defined(MOE_EP_H_INCLUDED) || (defined(MOE_EP_IMPLEMENTATION) && !defined(MOE_EP_IMPL_INCLUDED))
#ifdef MOE_EP_CORE_HEADER
#include MOE_EP_CORE_HEADER
#else
#include "../moe_ep.h"      /* headers in one flat folder: include "moe_ep.h" before this one */
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The most polls desc.spin_count may ask for (about 16 ms where a poll takes 15 ns), so that an
   abort or a timeout is noticed in that time at worst. */
#define MOE_EP_PTHREADS_SPIN_MAX (1 << 20)

typedef struct moe_ep_pthreads_desc {
    int world_size;                 /* required, > 0 */
    int timeout_ms;                 /* default 0: wait without a time limit */
    moe_ep_allocator allocator;     /* default malloc/free */
    int spin_count;                 /* default 0: MOE_EP_PTHREADS_SPIN_COUNT polls at most before a
                                       barrier sleeps; < 0: sleep at once; <= MOE_EP_PTHREADS_SPIN_MAX
                                       (see SPINNING) */
} moe_ep_pthreads_desc;

typedef struct moe_ep_pthreads_world moe_ep_pthreads_world;

/* The function each rank thread runs. */
typedef moe_ep_result (*moe_ep_pthreads_rank_fn)(const moe_ep_transport* transport, void* user_data);

MOE_EP_API moe_ep_result moe_ep_pthreads_world_create(const moe_ep_pthreads_desc* desc, moe_ep_pthreads_world** out);
/* Destroys a root world. Groups split from it must have been released first. */
MOE_EP_API void moe_ep_pthreads_world_destroy(moe_ep_pthreads_world* world);
/* The transport of one rank; it stays valid while the world lives. */
MOE_EP_API moe_ep_result moe_ep_pthreads_transport_create(moe_ep_pthreads_world* world, int rank, moe_ep_transport* out);
MOE_EP_API void moe_ep_pthreads_transport_destroy(moe_ep_transport* transport);
/* Groups (EP, TP, DP) come from transport.split (or moe_ep_layout_split); a group's
   transport must be destroyed with moe_ep_pthreads_transport_destroy before the world. */
/* Runs fn on world_size new threads, one per rank, and waits for all of them.
   results: optional [world_size] out, each rank's return value. Returns OK if every
   rank returned OK, else the lowest rank's error that is not ABORTED (or ABORTED). */
MOE_EP_API moe_ep_result moe_ep_pthreads_run(moe_ep_pthreads_world* world, moe_ep_pthreads_rank_fn fn, void* user_data,
                                             moe_ep_result* results);
/* Wakes every rank blocked in the world with MOE_EP_ERROR_ABORTED. Thread safety: any thread. */
MOE_EP_API void moe_ep_pthreads_abort(moe_ep_pthreads_world* world);

#ifdef __cplusplus
}
#endif
#endif /* MOE_EP_PTHREADS_H_INCLUDED */

#if defined(MOE_EP_IMPLEMENTATION) && !defined(MOE_EP_PTHREADS_IMPLEMENTATION)
#define MOE_EP_PTHREADS_IMPLEMENTATION
#endif

#ifdef MOE_EP_PTHREADS_IMPLEMENTATION
#ifndef MOE_EP_PTHREADS_IMPL_INCLUDED
#define MOE_EP_PTHREADS_IMPL_INCLUDED

#include <pthread.h>
#include <time.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__unix) || (defined(__APPLE__) && defined(__MACH__))
#include <unistd.h>         /* sysconf: how many CPUs may run spinning ranks */
#endif

#ifndef MOE_EP_PRIVATE
#define MOE_EP_PRIVATE static
#endif

#ifndef MOE_EP_PTHREADS_SPIN_COUNT
#define MOE_EP_PTHREADS_SPIN_COUNT 20000
#endif
#if MOE_EP_PTHREADS_SPIN_COUNT < 0 || MOE_EP_PTHREADS_SPIN_COUNT > MOE_EP_PTHREADS_SPIN_MAX
#error "MOE_EP_PTHREADS_SPIN_COUNT must be in [0, MOE_EP_PTHREADS_SPIN_MAX]"
#endif

/* A barrier may poll its generation with the mutex released, which needs an atomic load
   and store: the GCC and clang __atomic builtins where the compiler has them (C99 has no
   atomics). Without them every barrier sleeps at once, as with desc.spin_count < 0. */
#if defined(__ATOMIC_ACQUIRE) && defined(__ATOMIC_RELEASE) && !defined(MOE_EP_PTHREADS_NO_SPIN)
#define MOE_EP__PTHREADS_CAN_SPIN 1
#define MOE_EP__PTHREADS_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define MOE_EP__PTHREADS_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#else
#define MOE_EP__PTHREADS_CAN_SPIN 0
#define MOE_EP__PTHREADS_LOAD(p) (*(p))
#define MOE_EP__PTHREADS_STORE(p, v) (*(p) = (v))
#endif
/* the CPU's spin-wait hint: it frees the core's shared resources for its sibling thread */
#if MOE_EP__PTHREADS_CAN_SPIN && (defined(__x86_64__) || defined(__i386__))
#define MOE_EP__PTHREADS_PAUSE() __asm__ __volatile__("pause" ::: "memory")
#elif MOE_EP__PTHREADS_CAN_SPIN && defined(__aarch64__)
#define MOE_EP__PTHREADS_PAUSE() __asm__ __volatile__("yield" ::: "memory")
#else
#define MOE_EP__PTHREADS_PAUSE() ((void)0)
#endif

/* A world is either the root (made by moe_ep_pthreads_world_create) or a group split
   from another world. Groups share the root's mutex and condition variable, so an abort
   or a returning rank wakes every waiter of every group. */
/* What a rank brings to a barrier; ranks of one barrier must bring the same. */
typedef struct moe_ep__pthreads_tag {
    int kind;                       /* moe_ep__pthreads_kind */
    int64_t param, step;
} moe_ep__pthreads_tag;

/* The verdict of one barrier, computed by its last rank. */
typedef struct moe_ep__pthreads_verdict {
    moe_ep_result result;
    int skipped_rank;               /* ABORTED: the rank that skipped */
    char text[192];
} moe_ep__pthreads_verdict;

struct moe_ep_pthreads_world {
    int world_size, timeout_ms;
    int spin_count;                 /* resolved: the most polls before sleeping, 0 = none */
    int spin_limit;                 /* the polls a barrier tries now, adapted (see moe_ep__pthreads_spin) */
    int cpus;                       /* online CPUs (0: unknown) */
    moe_ep_allocator allocator;
    struct moe_ep_pthreads_world* root;
    pthread_mutex_t mutex;          /* used on the root only */
    pthread_cond_t cond;            /* used on the root only */
    int arrived;
    unsigned long generation;
    int aborted;                    /* sticky until the next run */
    int* rank_exited;               /* root: [R] rank threads of the current run that have returned */
    int* global_rank;               /* [R] the root rank of each member */
    int references;                 /* groups: transports still using it */
    const int64_t** count_send;     /* [R] published by exchange_counts */
    const moe_ep_a2a_args** a2a;    /* [R] published by all_to_all_v */
    float** reduce_data;            /* [R] published by all_reduce_sum */
    int64_t* reduce_count;          /* [R] */
    int* split_color;               /* [R] published by split */
    int* split_key;                 /* [R] */
    struct moe_ep_pthreads_world** split_group;   /* [R] the group a split leader made */
    /* by generation parity: a rank that left barrier g may reach g + 1 (and write the other
       half) before a slower one has read g's verdict, but not g + 2 */
    moe_ep__pthreads_tag* tags[2];  /* [R] each */
    moe_ep__pthreads_verdict verdict[2];
    struct moe_ep__pthreads_rank* ranks;
};

typedef struct moe_ep__pthreads_rank {
    moe_ep_pthreads_world* world;
    int rank;
    moe_ep_pthreads_rank_fn fn;
    void* user_data;
    moe_ep_result result;
} moe_ep__pthreads_rank;

MOE_EP_PRIVATE void moe_ep__pthreads_world_free(moe_ep_pthreads_world* w) {
    moe_ep_allocator a = w->allocator;
    moe_ep_free(&a, (void*)w->count_send);
    moe_ep_free(&a, (void*)w->a2a);
    moe_ep_free(&a, w->reduce_data);
    moe_ep_free(&a, w->reduce_count);
    moe_ep_free(&a, w->split_color);
    moe_ep_free(&a, w->split_key);
    moe_ep_free(&a, w->split_group);
    moe_ep_free(&a, w->tags[0]);
    moe_ep_free(&a, w->tags[1]);
    moe_ep_free(&a, w->rank_exited);
    moe_ep_free(&a, w->global_rank);
    moe_ep_free(&a, w->ranks);
    moe_ep_free(&a, w);
}

MOE_EP_PRIVATE void* moe_ep__pthreads_calloc(const moe_ep_allocator* a, size_t count, size_t each) {
    void* p = count <= SIZE_MAX / each ? moe_ep_alloc(a, count * each) : NULL;
    if (p) memset(p, 0, count * each);
    return p;
}

/* Allocates a world of `size` ranks (root == NULL makes a root). */
MOE_EP_PRIVATE moe_ep_pthreads_world* moe_ep__pthreads_world_alloc(const moe_ep_allocator* a, int size, int timeout_ms,
                                                                   int spin_count, moe_ep_pthreads_world* root) {
    size_t R = (size_t)size;
    int r;
    moe_ep_pthreads_world* w = (moe_ep_pthreads_world*)moe_ep_alloc(a, sizeof *w);
    if (!w) return NULL;
    memset(w, 0, sizeof *w);
    w->world_size = size;
    w->timeout_ms = timeout_ms;
    w->spin_count = w->spin_limit = spin_count;
    w->cpus = root ? root->cpus : 0;
    w->allocator = *a;
    w->root = root ? root : w;
    /* zeroed: a slot is only read after its barrier, but never read as garbage either */
    w->count_send = (const int64_t**)moe_ep__pthreads_calloc(a, R, sizeof *w->count_send);
    w->a2a = (const moe_ep_a2a_args**)moe_ep__pthreads_calloc(a, R, sizeof *w->a2a);
    w->reduce_data = (float**)moe_ep__pthreads_calloc(a, R, sizeof *w->reduce_data);
    w->reduce_count = (int64_t*)moe_ep__pthreads_calloc(a, R, sizeof *w->reduce_count);
    w->split_color = (int*)moe_ep__pthreads_calloc(a, R, sizeof *w->split_color);
    w->split_key = (int*)moe_ep__pthreads_calloc(a, R, sizeof *w->split_key);
    w->split_group = (moe_ep_pthreads_world**)moe_ep__pthreads_calloc(a, R, sizeof *w->split_group);
    w->global_rank = (int*)moe_ep__pthreads_calloc(a, R, sizeof *w->global_rank);
    w->ranks = (moe_ep__pthreads_rank*)moe_ep__pthreads_calloc(a, R, sizeof *w->ranks);
    w->tags[0] = (moe_ep__pthreads_tag*)moe_ep__pthreads_calloc(a, R, sizeof(moe_ep__pthreads_tag));
    w->tags[1] = (moe_ep__pthreads_tag*)moe_ep__pthreads_calloc(a, R, sizeof(moe_ep__pthreads_tag));
    if (!root) w->rank_exited = (int*)moe_ep__pthreads_calloc(a, R, sizeof *w->rank_exited);
    if (!w->count_send || !w->a2a || !w->reduce_data || !w->reduce_count || !w->split_color || !w->split_key ||
        !w->split_group || !w->global_rank || !w->ranks || !w->tags[0] || !w->tags[1] || (!root && !w->rank_exited)) {
        moe_ep__pthreads_world_free(w);
        return NULL;
    }
    for (r = 0; r < size; ++r) {
        w->global_rank[r] = r;
        w->split_group[r] = NULL;
        w->ranks[r].world = w;
        w->ranks[r].rank = r;
        if (!root) w->rank_exited[r] = 0;
    }
    return w;
}

MOE_EP_API moe_ep_result moe_ep_pthreads_world_create(const moe_ep_pthreads_desc* desc, moe_ep_pthreads_world** out) {
    moe_ep_pthreads_world* w;
    if (!desc || !out || desc->world_size <= 0 || desc->timeout_ms < 0 || desc->spin_count > MOE_EP_PTHREADS_SPIN_MAX ||
        (desc->allocator.alloc_fn == NULL) != (desc->allocator.free_fn == NULL))
        return MOE_EP_ERROR_INVALID_ARGUMENT;
    w = moe_ep__pthreads_world_alloc(&desc->allocator, desc->world_size, desc->timeout_ms,
                                     desc->spin_count < 0 || !MOE_EP__PTHREADS_CAN_SPIN ? 0 :
                                     desc->spin_count > 0 ? desc->spin_count : MOE_EP_PTHREADS_SPIN_COUNT, NULL);
    if (!w) return MOE_EP_ERROR_OUT_OF_MEMORY;
#ifdef _SC_NPROCESSORS_ONLN
    {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        w->cpus = cpus > 0 && cpus < 1 << 30 ? (int)cpus : 0;
    }
#endif
    if (pthread_mutex_init(&w->mutex, NULL) != 0) {
        moe_ep__pthreads_world_free(w);
        return MOE_EP_ERROR_INTERNAL;
    }
    if (pthread_cond_init(&w->cond, NULL) != 0) {
        pthread_mutex_destroy(&w->mutex);
        moe_ep__pthreads_world_free(w);
        return MOE_EP_ERROR_INTERNAL;
    }
    *out = w;
    return MOE_EP_OK;
}

/* Destroys a root world. Groups split from it must have been released (their transports destroyed). */
MOE_EP_API void moe_ep_pthreads_world_destroy(moe_ep_pthreads_world* w) {
    if (!w || w->root != w) return;
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->mutex);
    moe_ep__pthreads_world_free(w);
}


MOE_EP_API void moe_ep_pthreads_abort(moe_ep_pthreads_world* w) {
    moe_ep_pthreads_world* root;
    if (!w) return;
    root = w->root;
    pthread_mutex_lock(&root->mutex);
    root->aborted = 1;
    pthread_cond_broadcast(&root->cond);
    pthread_mutex_unlock(&root->mutex);
}

/* The barriers a collective is made of. CLOSE ends every collective, so that slots are not
   overwritten while a peer still reads them. */
enum moe_ep__pthreads_kind {
    MOE_EP__PTHREADS_EXCHANGE = 1, MOE_EP__PTHREADS_A2A, MOE_EP__PTHREADS_REDUCE, MOE_EP__PTHREADS_BARRIER,
    MOE_EP__PTHREADS_SPLIT, MOE_EP__PTHREADS_SPLIT_MADE, MOE_EP__PTHREADS_SKIP, MOE_EP__PTHREADS_CLOSE
};

MOE_EP_PRIVATE const char* moe_ep__pthreads_kind_name(int kind) {
    static const char* const names[] = { "?", "exchange_counts", "all_to_all_v", "all_reduce_sum", "barrier",
                                         "split", "split", "skip", "the end of a collective" };
    return kind > 0 && kind <= MOE_EP__PTHREADS_CLOSE ? names[kind] : "?";
}

/* The verdict of a full barrier: a skip names its rank (ABORTED); any other difference is
   OUT_OF_STEP. Called by the last rank to arrive, with the root's mutex held. */
MOE_EP_PRIVATE void moe_ep__pthreads_judge(moe_ep_pthreads_world* w, const moe_ep__pthreads_tag* tags,
                                           moe_ep__pthreads_verdict* v) {
    int R = w->world_size, q;
    v->result = MOE_EP_OK;
    v->skipped_rank = -1;
    v->text[0] = '\0';
    for (q = 0; q < R; ++q)
        if (tags[q].kind == MOE_EP__PTHREADS_SKIP) {
            v->result = MOE_EP_ERROR_ABORTED;
            v->skipped_rank = q;
            snprintf(v->text, sizeof v->text, "rank %d failed before this collective and skipped it", q);
            return;
        }
    for (q = 1; q < R; ++q)
        if (tags[q].kind != tags[0].kind || tags[q].param != tags[0].param || tags[q].step != tags[0].step) {
            v->result = MOE_EP_ERROR_OUT_OF_STEP;
            snprintf(v->text, sizeof v->text, "rank 0 is in %s (%lld, step %llx), rank %d in %s (%lld, step %llx): a "
                     "rank skipped a collective or entered another", moe_ep__pthreads_kind_name(tags[0].kind),
                     (long long)tags[0].param, (unsigned long long)tags[0].step, q,
                     moe_ep__pthreads_kind_name(tags[q].kind), (long long)tags[q].param,
                     (unsigned long long)tags[q].step);
            return;
        }
}

/* Whether a barrier of w can no longer complete: an abort, or a member that has returned.
   Called with the root's mutex held. */
MOE_EP_PRIVATE const char* moe_ep__pthreads_broken(const moe_ep_pthreads_world* w) {
    const moe_ep_pthreads_world* root = w->root;
    int r;
    if (root->aborted || w->aborted) return "another rank failed";
    for (r = 0; r < w->world_size; ++r)
        if (root->rank_exited[w->global_rank[r]]) return "another rank returned early";
    return NULL;
}

/* Polls the generation of the barrier this rank waits in, with the mutex released, at most
   spin_limit times, or until the barrier completes. Called and returns with
   the root's mutex held. A world with more rank threads than online CPUs never spins (a
   spinning rank would hold the CPU that a rank it waits for needs). The limit adapts to
   what the count of CPUs cannot tell (other processes, OpenMP threads): a spin that ended
   in time doubles it (up to spin_count), one that did not halves it (down to
   spin_count / 64). */
MOE_EP_PRIVATE void moe_ep__pthreads_spin(moe_ep_pthreads_world* w, unsigned long generation) {
    moe_ep_pthreads_world* root = w->root;
    int i, limit = w->spin_limit, least = w->spin_count / 64 > 0 ? w->spin_count / 64 : 1;
    if (w->spin_count <= 0 || (w->cpus > 0 && root->world_size > w->cpus)) return;
    pthread_mutex_unlock(&root->mutex);
    for (i = 0; i < limit && MOE_EP__PTHREADS_LOAD(&w->generation) == generation; ++i) MOE_EP__PTHREADS_PAUSE();
    pthread_mutex_lock(&root->mutex);
    if (w->generation != generation)
        w->spin_limit = w->spin_limit <= w->spin_count / 2 ? 2 * w->spin_limit : w->spin_count;
    else
        w->spin_limit = w->spin_limit / 2 >= least ? w->spin_limit / 2 : least;
}

/* The barrier every collective is built from: each rank brings a tag (kind, param, step),
   and every rank leaves with the verdict on all of them. A barrier that some rank can
   never reach (aborted, or a rank of this run already returned) fails instead of waiting. */
MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_barrier(moe_ep__pthreads_rank* me, int kind, int64_t param, int64_t step,
                                                      char* err_text, size_t err_size) {
    moe_ep_pthreads_world* w = me->world;
    moe_ep_pthreads_world* root = w->root;
    moe_ep_result res = MOE_EP_OK;
    unsigned long generation;
    struct timespec deadline;
    const char* broken;
    moe_ep__pthreads_tag* tag;
    pthread_mutex_lock(&root->mutex);
    if (root->aborted || w->aborted) {
        pthread_mutex_unlock(&root->mutex);
        if (err_text) snprintf(err_text, err_size, "the world was aborted");
        return MOE_EP_ERROR_ABORTED;
    }
    generation = w->generation;
    tag = &w->tags[generation & 1][me->rank];
    tag->kind = kind;
    tag->param = param;
    tag->step = step;
    if (++w->arrived == w->world_size) {
        moe_ep__pthreads_judge(w, w->tags[generation & 1], &w->verdict[generation & 1]);
        w->arrived = 0;
        MOE_EP__PTHREADS_STORE(&w->generation, generation + 1);    /* spinners poll it without the mutex */
        pthread_cond_broadcast(&root->cond);
    } else {
        /* whole seconds, rounded up plus one: the timeout is a lower bound, never cut short */
        deadline.tv_sec = time(NULL) + (time_t)((w->timeout_ms + 999) / 1000) + 1;
        deadline.tv_nsec = 0;
        if (!moe_ep__pthreads_broken(w)) moe_ep__pthreads_spin(w, generation);
        while (generation == w->generation) {
            if ((broken = moe_ep__pthreads_broken(w)) != NULL) {
                res = MOE_EP_ERROR_ABORTED;
                if (err_text) snprintf(err_text, err_size, "%s", broken);
                break;
            }
            if (w->timeout_ms > 0) {
                if (pthread_cond_timedwait(&root->cond, &root->mutex, &deadline) == ETIMEDOUT &&
                    generation == w->generation) {
                    res = MOE_EP_ERROR_TIMEOUT;
                    if (err_text) snprintf(err_text, err_size, "no progress for %d ms", w->timeout_ms);
                    root->aborted = 1;  /* the others cannot complete without this rank either */
                    pthread_cond_broadcast(&root->cond);
                    break;
                }
            } else {
                pthread_cond_wait(&root->cond, &root->mutex);
            }
        }
    }
    if (res == MOE_EP_OK) {
        const moe_ep__pthreads_verdict* v = &w->verdict[generation & 1];
        /* the skipping rank already holds its own cause */
        if (v->result != MOE_EP_OK && !(v->result == MOE_EP_ERROR_ABORTED && kind == MOE_EP__PTHREADS_SKIP)) {
            res = v->result;
            if (err_text) snprintf(err_text, err_size, "%s", v->text);
        }
    }
    pthread_mutex_unlock(&root->mutex);
    return res;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_barrier_cb(void* impl, char* err_text, size_t err_size) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)impl;
    return moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_BARRIER, 0, 0, err_text, err_size);
}

/* This rank will not enter its next collective: it meets the peers at that collective's
   first barrier with a SKIP tag, so that they fail it instead of waiting. */
MOE_EP_PRIVATE void moe_ep__pthreads_skip(void* impl, moe_ep_result status) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)impl;
    moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_SKIP, (int64_t)status, 0, NULL, 0);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_exchange(void* impl, const int64_t* send, int64_t* recv, int count,
                                                       char* err_text, size_t err_size) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)impl;
    moe_ep_pthreads_world* w = me->world;
    moe_ep_result res;
    int q;
    w->count_send[me->rank] = send;
    res = moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_EXCHANGE, count, 0, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    for (q = 0; q < w->world_size; ++q)
        memcpy(recv + (size_t)q * (size_t)count, w->count_send[q] + (size_t)me->rank * (size_t)count,
               sizeof(int64_t) * (size_t)count);
    return moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_CLOSE, 0, 0, err_text, err_size);
}

/* One word for an all_to_all_v's shape: its segments and row size. */
MOE_EP_PRIVATE int64_t moe_ep__pthreads_a2a_param(const moe_ep_a2a_args* args) {
    return (int64_t)args->segments * 1000003 + (int64_t)args->row_bytes;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_a2a_begin(void* impl, const moe_ep_a2a_args* args, void** request,
                                                        char* err_text, size_t err_size) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)impl;
    moe_ep_result res;
    if (args->memory_space == MOE_EP_MEMORY_DEVICE) {
        if (err_text) snprintf(err_text, err_size, "device memory is not supported by the pthreads transport");
        return MOE_EP_ERROR_UNSUPPORTED;    /* symmetric: every rank passes the same memory space */
    }
    if (args->send_rows) {
        /* every index the peers will read, checked before they can read it; a bad one fails
           this rank and, through the skip, the peers' same exchange */
        int q, s, S = args->segments;
        for (q = 0; q < me->world->world_size; ++q)
            for (s = 0; s < S; ++s) {
                int64_t first = args->send_offsets[q * S + s], r;
                for (r = first; r < first + args->send_counts[q * S + s]; ++r)
                    if (args->send_rows[r] < 0 || args->send_rows[r] >= args->send_buffer_rows) {
                        if (err_text)
                            snprintf(err_text, err_size, "moe_ep_a2a_args.send_rows[%lld] is %lld: a row of send must "
                                     "be in [0, send_buffer_rows = %lld)", (long long)r, (long long)args->send_rows[r],
                                     (long long)args->send_buffer_rows);
                        moe_ep__pthreads_skip(impl, MOE_EP_ERROR_INVALID_ARGUMENT);
                        return MOE_EP_ERROR_INVALID_ARGUMENT;
                    }
            }
    }
    me->world->a2a[me->rank] = args;
    res = moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_A2A, moe_ep__pthreads_a2a_param(args), args->step, err_text,
                                   err_size);
    if (res == MOE_EP_OK) *request = me;    /* end reads the args back from a2a[rank]: no const cast */
    return res;
}

/* Pull this rank's segments out of every sender's buffer, then wait until all have pulled.
   The begin's barrier saw the same segments and row size on every rank. */
MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_a2a_end(void* impl, void* request, char* err_text, size_t err_size) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)impl;
    moe_ep_pthreads_world* w = me->world;
    const moe_ep_a2a_args* mine = w->a2a[me->rank];
    moe_ep_result res = MOE_EP_OK;
    int q, s, S = mine->segments;
    size_t rb = mine->row_bytes;
    (void)request;
    for (q = 0; q < w->world_size && res == MOE_EP_OK; ++q) {
        const moe_ep_a2a_args* peer = w->a2a[q];
        for (s = 0; s < S; ++s) {
            int64_t rows = peer->send_counts[me->rank * S + s];
            if (rows != mine->recv_counts[q * S + s]) {
                if (err_text) snprintf(err_text, err_size, "rank %d sends %lld rows in segment %d, rank %d expects %lld",
                                       q, (long long)rows, s, me->rank, (long long)mine->recv_counts[q * S + s]);
                res = MOE_EP_ERROR_TRANSPORT;
                break;
            }
            if (rows > 0 && mine->recv_fn) {
                /* handed over where they lie; the peers wait at the closing barrier below */
                const char* src = (const char*)peer->send;
                int64_t first = mine->recv_offsets[q * S + s], r;
                if (!peer->send_rows) {
                    mine->recv_fn(mine->recv_user, first, src + (size_t)peer->send_offsets[me->rank * S + s] * rb, rows);
                } else {
                    for (r = 0; r < rows; ++r)
                        mine->recv_fn(mine->recv_user, first + r, src + (size_t)peer->send_rows[
                                          peer->send_offsets[me->rank * S + s] + r] * rb, 1);
                }
            } else if (rows > 0 && peer->send_rows) {
                /* gathered by index: the peer's begin checked every index */
                char* dst = (char*)mine->recv + (size_t)mine->recv_offsets[q * S + s] * rb;
                const int64_t* index = peer->send_rows + peer->send_offsets[me->rank * S + s];
                int64_t r;
                for (r = 0; r < rows; ++r)
                    memcpy(dst + (size_t)r * rb, (const char*)peer->send + (size_t)index[r] * rb, rb);
            } else if (rows > 0) {
                memcpy((char*)mine->recv + (size_t)mine->recv_offsets[q * S + s] * rb,
                       (const char*)peer->send + (size_t)peer->send_offsets[me->rank * S + s] * rb, (size_t)rows * rb);
            }
        }
    }
    if (res == MOE_EP_OK && mine->recv_done_fn) mine->recv_done_fn(mine->recv_user);    /* before the peers go on */
    {
        /* always reach the closing barrier, so that a local error does not strand the peers */
        char barrier_err[192] = "";
        moe_ep_result closing = moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_CLOSE, 0, 0, barrier_err,
                                                         sizeof barrier_err);
        if (res == MOE_EP_OK && closing != MOE_EP_OK) {
            if (err_text) snprintf(err_text, err_size, "%s", barrier_err);
            res = closing;
        }
    }
    return res;
}

MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_a2a(void* impl, const moe_ep_a2a_args* args, char* err_text,
                                                  size_t err_size) {
    void* request = NULL;
    moe_ep_result res = moe_ep__pthreads_a2a_begin(impl, args, &request, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    return moe_ep__pthreads_a2a_end(impl, request, err_text, err_size);
}

MOE_EP_PRIVATE void moe_ep__pthreads_abort_cb(void* impl) {
    moe_ep_pthreads_abort(((moe_ep__pthreads_rank*)impl)->world);
}

/* Each rank sums its own slice of the elements over all ranks, in rank order, and writes
   the sum back to every rank's buffer: one pass, the same bytes everywhere. The barrier
   compares the element counts. */
MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_all_reduce(void* impl, float* data, int64_t count,
                                                         moe_ep_memory_space memory_space, void* stream,
                                                         char* err_text, size_t err_size) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)impl;
    moe_ep_pthreads_world* w = me->world;
    moe_ep_result res = MOE_EP_OK;
    int R = w->world_size, q;
    int64_t i, begin, end;
    (void)stream;
    if (memory_space == MOE_EP_MEMORY_DEVICE) {
        if (err_text) snprintf(err_text, err_size, "device memory is not supported by the pthreads transport");
        return MOE_EP_ERROR_UNSUPPORTED;
    }
    w->reduce_data[me->rank] = data;
    w->reduce_count[me->rank] = count;
    res = moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_REDUCE, count, 0, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    begin = count * me->rank / R;
    end = count * (me->rank + 1) / R;
    for (i = begin; i < end; ++i) {
        float sum = w->reduce_data[0][i];
        for (q = 1; q < R; ++q) sum += w->reduce_data[q][i];
        for (q = 0; q < R; ++q) w->reduce_data[q][i] = sum;
    }
    return moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_CLOSE, 0, 0, err_text, err_size);
}

MOE_EP_PRIVATE void moe_ep__pthreads_release(void* impl) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)impl;
    moe_ep_pthreads_world* w = me->world;
    moe_ep_pthreads_world* root = w->root;
    int last;
    pthread_mutex_lock(&root->mutex);
    last = --w->references == 0;
    pthread_mutex_unlock(&root->mutex);
    if (last) moe_ep__pthreads_world_free(w);
}

MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_split(void* impl, int color, int key, moe_ep_transport* out,
                                                    char* err_text, size_t err_size);

MOE_EP_API moe_ep_result moe_ep_pthreads_transport_create(moe_ep_pthreads_world* w, int rank, moe_ep_transport* out) {
    moe_ep_transport t;
    if (!w || !out || rank < 0 || rank >= w->world_size) return MOE_EP_ERROR_INVALID_ARGUMENT;
    w->ranks[rank].world = w;
    w->ranks[rank].rank = rank;
    memset(&t, 0, sizeof t);
    t.impl = &w->ranks[rank];
    t.name = "pthreads";
    t.rank = rank;
    t.world_size = w->world_size;
    t.local_ranks = w->world_size;
    t.exchange_counts = moe_ep__pthreads_exchange;
    t.all_to_all_v = moe_ep__pthreads_a2a;
    t.all_to_all_v_begin = moe_ep__pthreads_a2a_begin;
    t.all_to_all_v_end = moe_ep__pthreads_a2a_end;
    t.barrier = moe_ep__pthreads_barrier_cb;
    t.abort = moe_ep__pthreads_abort_cb;
    t.all_reduce_sum = moe_ep__pthreads_all_reduce;
    t.split = moe_ep__pthreads_split;
    t.skip = moe_ep__pthreads_skip;
    t.row_lists = 1;
    if (w->root != w) t.destroy = moe_ep__pthreads_release;
    *out = t;
    return MOE_EP_OK;
}

MOE_EP_API void moe_ep_pthreads_transport_destroy(moe_ep_transport* transport) {
    if (!transport) return;
    if (transport->destroy && transport->impl) transport->destroy(transport->impl);
    memset(transport, 0, sizeof *transport);
}

/* Ranks publish (color, key); the first member of each color (by key, then rank) makes
   the group and publishes it; the others attach. Every outcome is seen by all members. */
MOE_EP_PRIVATE moe_ep_result moe_ep__pthreads_split(void* impl, int color, int key, moe_ep_transport* out,
                                                    char* err_text, size_t err_size) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)impl;
    moe_ep_pthreads_world* w = me->world;
    moe_ep_pthreads_world* group;
    int R = w->world_size, q, n = 0, index = 0, leader = -1;
    moe_ep_result res;
    w->split_color[me->rank] = color;
    w->split_key[me->rank] = key;
    w->split_group[me->rank] = NULL;
    res = moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_SPLIT, 0, 0, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    /* my position: members before me in (key, rank) order; the leader is the first */
    for (q = 0; q < R; ++q) {
        int before;
        if (w->split_color[q] != color) continue;
        n++;
        before = w->split_key[q] < key || (w->split_key[q] == key && q < me->rank);
        index += before;
        if (leader < 0 || w->split_key[q] < w->split_key[leader] ||
            (w->split_key[q] == w->split_key[leader] && q < leader))
            leader = q;
    }
    if (leader == me->rank) {
        group = moe_ep__pthreads_world_alloc(&w->allocator, n, w->timeout_ms, w->root->spin_count, w->root);
        if (group) {
            int i = 0;
            group->references = n;
            /* members in (key, rank) order: repeated selection keeps it simple for small R */
            for (i = 0; i < n; ++i) {
                int best = -1;
                for (q = 0; q < R; ++q) {
                    int k, taken = 0;
                    if (w->split_color[q] != color) continue;
                    for (k = 0; k < i; ++k) taken |= group->global_rank[k] == w->global_rank[q];
                    if (taken) continue;
                    if (best < 0 || w->split_key[q] < w->split_key[best]) best = q;
                }
                group->global_rank[i] = w->global_rank[best];
            }
        }
        w->split_group[me->rank] = group;
    }
    res = moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_SPLIT_MADE, 0, 0, err_text, err_size);
    if (res != MOE_EP_OK) return res;
    group = w->split_group[leader];
    /* a closing barrier, so the published slots are not overwritten by the next split too early */
    res = moe_ep__pthreads_barrier(me, MOE_EP__PTHREADS_CLOSE, 0, 0, err_text, err_size);
    if (!group) {
        if (err_text) snprintf(err_text, err_size, "split: out of memory for a group of %d ranks", n);
        return MOE_EP_ERROR_OUT_OF_MEMORY;
    }
    moe_ep_pthreads_transport_create(group, index, out);
    if (res != MOE_EP_OK) {
        moe_ep_pthreads_transport_destroy(out);
        return res;
    }
    return MOE_EP_OK;
}

MOE_EP_PRIVATE void* moe_ep__pthreads_main(void* arg) {
    moe_ep__pthreads_rank* me = (moe_ep__pthreads_rank*)arg;
    moe_ep_pthreads_world* w = me->world;
    moe_ep_transport t;
    me->result = moe_ep_pthreads_transport_create(w, me->rank, &t);
    if (me->result == MOE_EP_OK) me->result = me->fn(&t, me->user_data);
    pthread_mutex_lock(&w->mutex);
    w->rank_exited[me->rank] = 1;
    if (me->result != MOE_EP_OK) w->aborted = 1;
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->mutex);
    return NULL;
}

MOE_EP_API moe_ep_result moe_ep_pthreads_run(moe_ep_pthreads_world* w, moe_ep_pthreads_rank_fn fn, void* user_data,
                                             moe_ep_result* results) {
    pthread_t* threads;
    int r, started = 0;
    moe_ep_result res = MOE_EP_OK;
    if (!w || !fn || w->root != w) return MOE_EP_ERROR_INVALID_ARGUMENT;
    threads = (pthread_t*)moe_ep_alloc(&w->allocator, sizeof(pthread_t) * (size_t)w->world_size);
    if (!threads) return MOE_EP_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&w->mutex);
    w->aborted = 0;
    w->arrived = 0;
    for (r = 0; r < w->world_size; ++r) w->rank_exited[r] = 0;
    pthread_mutex_unlock(&w->mutex);
    for (r = 0; r < w->world_size; ++r) {
        w->ranks[r].world = w;
        w->ranks[r].rank = r;
        w->ranks[r].fn = fn;
        w->ranks[r].user_data = user_data;
        w->ranks[r].result = MOE_EP_ERROR_INTERNAL;
    }
    for (r = 0; r < w->world_size; ++r) {
        if (pthread_create(&threads[r], NULL, moe_ep__pthreads_main, &w->ranks[r]) != 0) {
            moe_ep_pthreads_abort(w);   /* the started ranks must not wait for the missing ones */
            res = MOE_EP_ERROR_INTERNAL;
            break;
        }
        started++;
    }
    for (r = 0; r < started; ++r) pthread_join(threads[r], NULL);
    moe_ep_free(&w->allocator, threads);
    for (r = 0; r < w->world_size; ++r) {
        moe_ep_result rr = r < started ? w->ranks[r].result : MOE_EP_ERROR_INTERNAL;
        if (results) results[r] = rr;
        if (rr != MOE_EP_OK && (res == MOE_EP_OK || (res == MOE_EP_ERROR_ABORTED && rr != MOE_EP_ERROR_ABORTED)))
            res = rr;
    }
    return res;
}

#endif /* MOE_EP_PTHREADS_IMPL_INCLUDED */
#endif /* MOE_EP_PTHREADS_IMPLEMENTATION */
