/* pool_init with its Nth allocation failing (argv[1]; -1: none), then pool_free, as
 * module.c does on an error: prints pool_init's result and exits 0 when pool_free joined
 * exactly the threads pool_init started, 1 otherwise (a crash exits by its signal). Built
 * by test_pool_alloc_failure.py with the linker wrapping calloc, malloc and the pthreads. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "native.h"

void *__real_calloc(size_t n, size_t size);
void *__real_malloc(size_t size);
int __real_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*f)(void *), void *arg);
int __real_pthread_join(pthread_t t, void **ret);

static int fail_at = -1, n_allocs = 0, n_started = 0, n_joined = 0, bad_join = 0;
static pthread_t started[64];

void *__wrap_calloc(size_t n, size_t size) {
    return n_allocs++ == fail_at ? NULL : __real_calloc(n, size);
}
void *__wrap_malloc(size_t size) { return n_allocs++ == fail_at ? NULL : __real_malloc(size); }

int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*f)(void *), void *arg) {
    int err = __real_pthread_create(t, a, f, arg);
    if (!err) started[n_started++] = *t;
    return err;
}

int __wrap_pthread_join(pthread_t t, void **ret) {
    int known = 0;
    for (int i = 0; i < n_started; i++) known |= pthread_equal(started[i], t);
    if (!known) {
        bad_join = 1; /* a thread that never started: joining it is undefined */
        return 0;
    }
    n_joined++;
    return __real_pthread_join(t, ret);
}

/* pool.c's one symbol from another file */
size_t blocked_act_stride(size_t n_super) { return n_super; }

int main(int argc, char **argv) {
    fail_at = argc > 1 ? atoi(argv[1]) : -1;
    Pool pool;
    int err = pool_init(&pool, 4);
    pool_free(&pool);
    printf("%d %d %d\n", err, n_started, n_joined);
    return bad_join || n_joined != n_started;
}
