/*
 * A null scanner in C against the documented rings (csrc/vnring.h): proof that a scanner
 * needs no Python and nothing of vhostni but that header.
 *
 * It speaks just enough of the socket protocol (vhostni/scanner/wire.py): reads the hello,
 * asks to hold frames (argv[1]: a match as JSON; default: everything from the guest) and
 * for the ring, waits for both replies; then it passes every held frame, in batches, gives
 * back each batch's bytes (desc_cons) as it goes, sleeps with the want_kick protocol, and
 * answers every sync once it has taken in and decided every descriptor published before
 * it.  It exits 0 when the kernel closes the socket, 2 on anything it does not understand.
 *
 * Its JSON "parser" only looks for the keys it needs in the kernel's compact JSON: a
 * scanner for real use wants a JSON library.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vnring.h"

#define MAX_MSG 65600
#define BATCH 64

static int sock;
static const struct vnr_ni *ni;
static const struct vnr_desc *descs;
static struct vnr_sc *sc;
static struct vnr_dec *decs;
static int kick_scanner, kick_ni;
static uint64_t next_desc, dec_prod;
static unsigned char msg[MAX_MSG + 1];
static long long early_syncs[16];       /* syncs that came while awaiting replies */
static int n_early;

static void die(const char *why)
{
    fprintf(stderr, "null_ring_scanner: %s (%s)\n", why, strerror(errno));
    exit(2);
}

static void send_json(const char *json)
{
    size_t n = strlen(json);
    char buf[1024];
    if (n + 1 > sizeof buf)
        die("request too long");
    buf[0] = 'J';
    memcpy(buf + 1, json, n);
    if (send(sock, buf, n + 1, 0) != (ssize_t)(n + 1))
        die("send");
}

/* The next message (NUL-terminated); 0 when the kernel closed the socket. */
static ssize_t recv_msg(void)
{
    ssize_t n = recv(sock, msg, MAX_MSG, 0);
    if (n < 0)
        die("recv");
    msg[n] = 0;
    return n;
}

static int is_op(const char *op)
{
    char key[64];
    snprintf(key, sizeof key, "\"op\":\"%s\"", op);
    return msg[0] == 'J' && strstr((const char *)msg, key) != NULL;
}

static long long int_field(const char *name, int *found)
{
    char key[64];
    snprintf(key, sizeof key, "\"%s\":", name);
    const char *p = strstr((const char *)msg, key);
    *found = p != NULL;
    return p ? strtoll(p + strlen(key), NULL, 10) : 0;
}

/* Waits for the reply to request ``id``; exits if it is not ok. */
static void await_reply(long long id)
{
    for (;;) {
        if (recv_msg() == 0)
            exit(0);
        int found;
        if (is_op("reply") && int_field("id", &found) == id && found) {
            if (!strstr((const char *)msg, "\"ok\":true")) {
                fprintf(stderr, "null_ring_scanner: refused: %s\n", msg + 1);
                exit(2);
            }
            return;
        }
        if (is_op("sync") && n_early < 16) {     /* the ready sync (-1) comes first */
            int found;
            early_syncs[n_early++] = int_field("id", &found);
        }
    }
}

static void map_rings(const char *env)
{
    int fd_ni, fd_sc;
    if (!env || sscanf(env, "%d,%d,%d,%d", &fd_ni, &fd_sc, &kick_scanner, &kick_ni) != 4)
        die("no " VNR_ENV);
    struct stat st;
    if (fstat(fd_ni, &st) < 0 || (uint64_t)st.st_size < sizeof(struct vnr_ni))
        die("region A");
    uint64_t size_a = st.st_size;
    void *a = mmap(NULL, size_a, PROT_READ, MAP_SHARED, fd_ni, 0);
    if (a == MAP_FAILED)
        die("mmap region A");
    ni = a;
    uint32_t ds = ni->desc_slots, cs = ni->dec_slots;
    if (ni->magic != VNR_MAGIC || ni->version != VNR_VERSION || !ds || (ds & (ds - 1))
        || !cs || (cs & (cs - 1)) || ni->size > size_a
        || ni->desc_off < sizeof(struct vnr_ni) || ni->desc_off % 8
        || ni->desc_off > ni->size || (ni->size - ni->desc_off) / sizeof(struct vnr_desc) < ds
        || ni->data_off > ni->size || ni->data_size > ni->size - ni->data_off)
        die("bad ring header");
    if (fstat(fd_sc, &st) < 0 || ni->sc_size > (uint64_t)st.st_size
        || ni->sc_size < VNR_DEC_OFF || (ni->sc_size - VNR_DEC_OFF) / sizeof(struct vnr_dec) < cs)
        die("bad region B");
    void *b = mmap(NULL, ni->sc_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_sc, 0);
    if (b == MAP_FAILED)
        die("mmap region B");
    descs = (const struct vnr_desc *)((const char *)a + ni->desc_off);
    sc = b;
    decs = (struct vnr_dec *)((char *)b + VNR_DEC_OFF);
    next_desc = __atomic_load_n(&sc->desc_cons, __ATOMIC_ACQUIRE);
    dec_prod = __atomic_load_n(&sc->dec_prod, __ATOMIC_ACQUIRE);
}

static void kick(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof one) < 0 && errno != EAGAIN)
        die("kick");
}

/* Publishes decisions written below dec_prod; kicks the NI if it sleeps. */
static void publish(void)
{
    __atomic_store_n(&sc->dec_prod, dec_prod, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&ni->want_kick, __ATOMIC_ACQUIRE))
        kick(kick_ni);
}

static void decide(uint64_t seq, uint32_t verdict)
{
    struct timespec pause = {0, 50000}, t0 = {0, 0}, t;
    while (dec_prod - __atomic_load_n(&ni->dec_cons, __ATOMIC_ACQUIRE) >= ni->dec_slots) {
        clock_gettime(CLOCK_MONOTONIC, &t);     /* only when it waits: not a read per frame */
        if (t0.tv_sec == 0 && t0.tv_nsec == 0)
            t0 = t;
        /* patience in time, not in tries: a loaded machine stretches every sleep */
        if (__atomic_load_n(&ni->broken, __ATOMIC_ACQUIRE) || t.tv_sec - t0.tv_sec > 30)
            die("the NI does not read decisions");
        publish();                      /* full: let the NI see what is there */
        nanosleep(&pause, NULL);
    }
    struct vnr_dec *d = &decs[dec_prod & (ni->dec_slots - 1)];
    d->seq = seq;
    d->verdict = verdict;
    dec_prod++;
}

/* Takes in every descriptor published so far: passes the held ones, gives back the bytes. */
static void drain(void)
{
    for (;;) {
        uint64_t prod = __atomic_load_n(&ni->desc_prod, __ATOMIC_ACQUIRE);
        if (prod == next_desc)
            break;
        if (prod - next_desc > ni->desc_slots)
            die("desc_prod jumped");
        uint64_t before = dec_prod;
        for (; next_desc != prod; next_desc++) {
            const struct vnr_desc *d = &descs[next_desc & (ni->desc_slots - 1)];
            if (d->seq != next_desc || (uint64_t)d->data + d->len > ni->data_size)
                die("bad descriptor");
            if (d->flags & VNR_F_HELD)
                decide(d->seq, VNR_PASS);
            if (dec_prod - before >= BATCH) {
                publish();
                before = dec_prod;
            }
        }
        publish();
        __atomic_store_n(&sc->desc_cons, next_desc, __ATOMIC_RELEASE);
    }
}

int main(int argc, char **argv)
{
    const char *fd_env = getenv("VHOSTNI_SCANNER_FD");
    if (!fd_env)
        die("no VHOSTNI_SCANNER_FD");
    sock = atoi(fd_env);
    map_rings(getenv(VNR_ENV));         /* before anything arrives on it */
    do {
        if (recv_msg() == 0)
            return 0;
    } while (!is_op("hello"));
    char req[900];
    snprintf(req, sizeof req, "{\"op\":\"subscribe\",\"id\":1,\"match\":%s,\"contain\":true}",
             argc > 1 ? argv[1] : "{\"direction\":\"from_guest\"}");
    send_json(req);
    await_reply(1);
    send_json("{\"op\":\"ring\",\"version\":1,\"id\":2}");
    await_reply(2);
    for (int i = 0; i < n_early; i++) {     /* subscribed: ready */
        char ans[64];
        snprintf(ans, sizeof ans, "{\"op\":\"synced\",\"id\":%lld}", early_syncs[i]);
        send_json(ans);
    }
    for (;;) {
        drain();
        __atomic_store_n(&sc->want_kick, 1, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&ni->desc_prod, __ATOMIC_ACQUIRE) != next_desc) {
            __atomic_store_n(&sc->want_kick, 0, __ATOMIC_RELEASE);
            continue;
        }
        struct pollfd p[2] = {{kick_scanner, POLLIN, 0}, {sock, POLLIN, 0}};
        if (poll(p, 2, -1) < 0 && errno != EINTR)
            die("poll");
        __atomic_store_n(&sc->want_kick, 0, __ATOMIC_RELEASE);
        if (p[0].revents & POLLIN) {
            uint64_t n;
            if (read(kick_scanner, &n, sizeof n) < 0 && errno != EAGAIN)
                die("read kick");
        }
        if (p[1].revents & (POLLIN | POLLHUP)) {
            if (recv_msg() == 0)
                return 0;
            if (is_op("sync")) {
                int found;
                long long id = int_field("id", &found);
                drain();                /* everything published before the sync, decided */
                char ans[64];
                snprintf(ans, sizeof ans, "{\"op\":\"synced\",\"id\":%lld}", id);
                send_json(ans);
            }
        }
    }
}
