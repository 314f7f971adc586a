/*
 * The null scanner of the ring benchmarks, in C against csrc/vnring.h alone: it serves one
 * ring with no socket (the benchmark opens the ring itself, no NI kernel in between) and
 * passes everything held: frames, and stream bytes up to the end of each chunk.  It
 * consumes as it goes, publishes its decisions once per batch, and sleeps on its kick
 * eventfd only after saying so (want_kick), as the ABI describes.  It exits when the
 * benchmark closes its end of the pipe on fd 0 (or dies: PR_SET_PDEATHSIG).
 *
 *   VHOSTNI_RING_FDS=ni,sc,kick_scanner,kick_ni ringnull < pipe
 */
#define _GNU_SOURCE
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>
#include "vnring.h"

static inline uint64_t ld64(const volatile void *p)
{
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}

static inline void st64(volatile void *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}

int main(void)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    const char *env = getenv(VNR_ENV);
    int fd[4];
    if (!env || sscanf(env, "%d,%d,%d,%d", &fd[0], &fd[1], &fd[2], &fd[3]) != 4) {
        fprintf(stderr, "ringnull: $%s unset\n", VNR_ENV);
        return 2;
    }
    struct vnr_ni *ni = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd[0], 0);
    if (ni == MAP_FAILED || ni->magic != VNR_MAGIC || ni->version != VNR_VERSION) {
        fprintf(stderr, "ringnull: not a ring\n");
        return 2;
    }
    size_t size = ni->size, sc_size = ni->sc_size;
    uint32_t nd = ni->desc_slots, nk = ni->dec_slots;
    munmap(ni, 4096);
    uint8_t *a = mmap(NULL, size, PROT_READ, MAP_SHARED, fd[0], 0);
    uint8_t *b = mmap(NULL, sc_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd[1], 0);
    if (a == MAP_FAILED || b == MAP_FAILED)
        return 2;
    ni = (struct vnr_ni *)a;
    struct vnr_sc *sc = (struct vnr_sc *)b;
    const struct vnr_desc *desc = (const struct vnr_desc *)(a + ni->desc_off);
    const uint8_t *data = a + ni->data_off;
    struct vnr_dec *dec = (struct vnr_dec *)(b + VNR_DEC_OFF);
    uint64_t seen = 0, prod_dec = 0;
    struct pollfd pf[2] = {{.fd = fd[2], .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        uint64_t prod = ld64(&ni->desc_prod);
        for (int spin = 0; prod == seen && spin < 40; spin++) {
            sched_yield();             /* the NI's next burst usually follows at once; it */
            prod = ld64(&ni->desc_prod);   /* may need this CPU to make it */
        }
        if (prod == seen) {
            __atomic_store_n(&sc->want_kick, 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (ld64(&ni->desc_prod) == seen) {
                if (poll(pf, 2, -1) < 0)
                    continue;
                if (pf[1].revents)
                    return 0;      /* the benchmark is done */
                uint64_t v;
                if (read(fd[2], &v, sizeof(v)) < 0) {
                    /* EAGAIN: nothing */
                }
            }
            __atomic_store_n(&sc->want_kick, 0, __ATOMIC_RELAXED);
            continue;
        }
        for (uint64_t s = seen; s < prod; s++) {
            const struct vnr_desc *d = &desc[s & (nd - 1)];
            if (!(d->flags & VNR_F_HELD))
                continue;
            /* at most dec_slots outstanding: wait for the NI to read what we wrote */
            while (prod_dec - ld64(&ni->dec_cons) >= nk) {
                st64(&sc->dec_prod, prod_dec);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                if (__atomic_load_n(&ni->want_kick, __ATOMIC_RELAXED)) {
                    uint64_t one = 1;
                    if (write(fd[3], &one, sizeof(one)) < 0) {
                    }
                }
                sched_yield();
            }
            struct vnr_dec *e = &dec[prod_dec & (nk - 1)];
            if (d->kind == VNR_KIND_FRAME) {
                e->seq = d->seq;
                e->verdict = VNR_PASS;
                e->handle = 0;
            } else if (d->kind == VNR_KIND_STREAM_DATA) {
                struct vnr_stream h;
                memcpy(&h, data + d->data, sizeof(h));
                e->seq = h.offset + (d->len - sizeof(h));
                e->verdict = VNR_STREAM_PASS | d->dir;
                e->handle = h.handle;
            } else {
                continue;
            }
            prod_dec++;
        }
        seen = prod;
        st64(&sc->desc_cons, seen);
        st64(&sc->dec_prod, prod_dec);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&ni->want_kick, __ATOMIC_RELAXED)) {
            uint64_t one = 1;
            if (write(fd[3], &one, sizeof(one)) < 0) {
                /* EAGAIN: it has kicks pending */
            }
        }
    }
}
