/* LD_PRELOAD shim for tests/test_distributed.py: after a gloo worker thread has run a
 * collective (its future is complete, so the caller's wait() has returned), hold the worker
 * for a random 0..GLOO_HOLD_MS milliseconds (default 20) before it goes back to
 * ProcessGroupGloo::runLoop and drops its reference to the work and the work's tensors.
 * A loaded machine opens this window by chance; the test opens it on every collective, so
 * a rank that reaches interpreter shutdown with a gloo worker still running aborts
 * (docs/design.md section 8).
 *
 * runLoop calls AsyncWork::execute through the PLT, so this definition interposes it; the
 * real one is looked up in libtorch_cpu, which torch loads RTLD_LOCAL. The test checks that
 * libtorch_cpu exports the symbol before preloading this. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* c10d::ProcessGroupGloo::AsyncWork::execute(c10::intrusive_ptr<AsyncWork> const&) */
#define EXECUTE                                                                           \
    "_ZN4c10d16ProcessGroupGloo9AsyncWork7executeERKN3c1013intrusive_ptrIS1_NS2_6detail34" \
    "intrusive_target_default_null_typeIS1_EEEE"

void execute(void *work) __asm__(EXECUTE);

void execute(void *work) {
    static void (*real)(void *);
    static __thread unsigned seed;
    if (!real) {
        void *torch = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
        real = torch ? (void (*)(void *))dlsym(torch, EXECUTE) : NULL;
        if (!real) {
            fprintf(stderr, "gloo_hold: libtorch_cpu.so does not export %s\n", EXECUTE);
            abort();
        }
    }
    real(work);
    if (!seed)
        seed = (unsigned)getpid() * 2654435761u ^ (unsigned)time(NULL) ^ (unsigned)(size_t)&seed;
    const char *ms = getenv("GLOO_HOLD_MS");
    int max_us = 1000 * (ms ? atoi(ms) : 20);
    if (max_us > 0)
        usleep((useconds_t)(rand_r(&seed) % max_us));
}
