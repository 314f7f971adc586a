/*
 * Scanner rings: the NI side of the shared-memory data plane to scanners (ABI and protocol
 * in vnring.h).
 *
 * The switch's loop publishes the frames a scanner's subscriptions matched on its ring
 * (one copy, into a data area the scanner maps read-only), reads the decisions it writes
 * back and applies them to the held frames, and gives the policy's default to what the
 * scanner did not decide within the hold timeout.  No Python runs per frame: the NI kernel
 * opens and closes rings with the scanner's process and reads the counters.
 *
 * Region B is the scanner's: every word of it is loaded once into a local and validated
 * there.  The NI maps it read-only, so not even a bug here can write into it; region A is
 * sealed before the scanner gets it (no writable mapping, no resizing), and region B's size
 * is sealed too, so a scanner cannot make the NI's loads fault.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>
#include "vn_internal.h"
#include "vnring.h"

#define EV_CHAN 3ULL
#define EV(kind, port, q) (((kind) << 32) | ((uint64_t)(port) << 8) | (uint64_t)(q))
#define PAGE 4096u

_Static_assert(sizeof(struct vnr_ni) == 256, "vnr_ni layout");
_Static_assert(sizeof(struct vnr_desc) == 32, "vnr_desc layout");
_Static_assert(sizeof(struct vnr_sc) == VNR_DEC_OFF, "vnr_sc layout");
_Static_assert(sizeof(struct vnr_dec) == 16, "vnr_dec layout");
_Static_assert(offsetof(struct vnr_ni, desc_prod) == 64 && offsetof(struct vnr_ni, dec_cons) == 128 &&
               offsetof(struct vnr_ni, want_kick) == 192, "vnr_ni words");
_Static_assert(offsetof(struct vnr_sc, dec_prod) == 64 && offsetof(struct vnr_sc, want_kick) == 128,
               "vnr_sc words");

/* What the NI remembers of each descriptor until it is consumed and settled. */
struct chan_slot {
    uint64_t seq;
    uint64_t held_id;          /* 0: not held, or settled */
    uint64_t deadline_ns;      /* vn_clock time of its hold timeout */
    uint64_t data_start;       /* free-running byte position of its bytes */
};

struct vn_chan {
    int port, slot, idx;       /* idx: in sw->chans */
    int fd_ni, fd_sc, kick_sc, kick_ni;
    struct vnr_ni *ni;         /* region A, read-write here */
    size_t ni_size;
    const uint8_t *sc;         /* region B, read-only here */
    size_t sc_size;
    struct vnr_desc *desc;
    uint8_t *data;
    uint32_t desc_slots, dec_slots;
    uint64_t data_size;
    uint64_t prod;             /* descriptors filled (published up to ni->desc_prod) */
    uint64_t cons;             /* the scanner's desc_cons, validated */
    uint64_t oldest;           /* every descriptor below this is settled */
    uint64_t dec_cons;
    uint64_t data_head;        /* free-running byte positions in the data area */
    uint64_t owed;
    int dirty, armed, broken;
    struct chan_slot *slots;
    struct vn_chan_info st;
};

static inline uint64_t load_sc64(const struct vn_chan *c, size_t off)
{
    return __atomic_load_n((const uint64_t *)(c->sc + off), __ATOMIC_ACQUIRE);
}

static inline uint32_t load_sc32(const struct vn_chan *c, size_t off)
{
    return __atomic_load_n((const uint32_t *)(c->sc + off), __ATOMIC_ACQUIRE);
}

static struct vn_chan *chan_get(struct vn_switch *sw, int port, int slot)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind || slot < 0 || slot >= VN_CHANS)
        return NULL;
    return sw->ports[port].chan[slot];
}

static int pow2_in(unsigned v, unsigned lo, unsigned hi)
{
    return v >= lo && v <= hi && (v & (v - 1)) == 0;
}

static void chan_unmap(struct vn_chan *c)
{
    if (c->ni && c->ni != MAP_FAILED)
        munmap(c->ni, c->ni_size);
    if (c->sc && c->sc != MAP_FAILED)
        munmap((void *)c->sc, c->sc_size);
    int fds[4] = {c->fd_ni, c->fd_sc, c->kick_sc, c->kick_ni};
    for (int i = 0; i < 4; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(c->slots);
    free(c);
}

int vn_chan_open(struct vn_switch *sw, int port, unsigned desc_slots, unsigned dec_slots,
                 uint64_t data_bytes)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind)
        return VN_ENOPORT;
    if (!pow2_in(desc_slots, 64, 65536) || !pow2_in(dec_slots, 64, 65536) ||
        data_bytes < (256u << 10) || data_bytes > (1ULL << 30))
        return VN_EINVAL;
    struct vn_port *p = &sw->ports[port];
    /* a free slot the port's policy does not name: a subscription still routed to a
     * closed ring must never reach another scanner's (until the kernel installs a policy
     * without it, its frames get the default) */
    int slot = -1;
    for (int i = 0; i < VN_CHANS && slot < 0; i++) {
        if (p->chan[i])
            continue;
        int named = 0;
        for (unsigned k = 0; p->pol && k < p->pol->nsubs && k < VN_MAX_SUBS; k++)
            named |= p->pol->sub_chan[k] == i + 1;
        if (!named)
            slot = i;
    }
    if (slot < 0 || sw->nchans >= VN_CHAN_MAX)
        return VN_ERANGE;
    struct vn_chan *c = calloc(1, sizeof(*c));
    if (!c)
        return VN_ENOMEM;
    c->fd_ni = c->fd_sc = c->kick_sc = c->kick_ni = -1;
    c->slots = calloc(desc_slots, sizeof(*c->slots));
    data_bytes = (data_bytes + PAGE - 1) & ~(uint64_t)(PAGE - 1);
    uint64_t desc_off = PAGE;
    uint64_t data_off = desc_off + (((uint64_t)desc_slots * sizeof(struct vnr_desc) + PAGE - 1) & ~(uint64_t)(PAGE - 1));
    c->ni_size = data_off + data_bytes;
    c->sc_size = (VNR_DEC_OFF + (size_t)dec_slots * sizeof(struct vnr_dec) + PAGE - 1) & ~(size_t)(PAGE - 1);
    c->fd_ni = memfd_create("vhostni-ring-ni", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    c->fd_sc = memfd_create("vhostni-ring-sc", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    c->kick_sc = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    c->kick_ni = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!c->slots || c->fd_ni < 0 || c->fd_sc < 0 || c->kick_sc < 0 || c->kick_ni < 0 ||
        ftruncate(c->fd_ni, (off_t)c->ni_size) < 0 || ftruncate(c->fd_sc, (off_t)c->sc_size) < 0)
        goto fail;
    c->ni = mmap(NULL, c->ni_size, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd_ni, 0);
    c->sc = mmap(NULL, c->sc_size, PROT_READ, MAP_SHARED, c->fd_sc, 0);
    if (c->ni == MAP_FAILED || c->sc == MAP_FAILED)
        goto fail;
    /* the scanner may map region A only read-only and resize neither: sealed before it
     * ever sees the fds (our own writable mapping of A predates the seal and stays) */
    if (fcntl(c->fd_ni, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) < 0 ||
        fcntl(c->fd_sc, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
        goto fail;
    c->ni->magic = VNR_MAGIC;
    c->ni->version = VNR_VERSION;
    c->ni->desc_slots = desc_slots;
    c->ni->dec_slots = dec_slots;
    c->ni->desc_off = desc_off;
    c->ni->data_off = data_off;
    c->ni->data_size = data_bytes;
    c->ni->size = c->ni_size;
    c->ni->sc_size = c->sc_size;
    c->desc = (struct vnr_desc *)((uint8_t *)c->ni + desc_off);
    c->data = (uint8_t *)c->ni + data_off;
    c->desc_slots = desc_slots;
    c->dec_slots = dec_slots;
    c->data_size = data_bytes;
    c->port = port;
    c->slot = slot;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV(EV_CHAN, port, slot)};
    if (epoll_ctl(sw->epfd, EPOLL_CTL_ADD, c->kick_ni, &ev) < 0)
        goto fail;
    c->st.ni_fd = c->fd_ni;
    c->st.sc_fd = c->fd_sc;
    c->st.kick_scanner_fd = c->kick_sc;
    c->st.kick_ni_fd = c->kick_ni;
    c->idx = (int)sw->nchans;
    sw->chans[sw->nchans++] = c;
    p->chan[slot] = c;
    return slot;
fail:
    chan_unmap(c);
    return VN_ESYS;
}

/* Settles descriptor slot `s` of the ring (held frame or not) with `pass`. */
static void slot_settle(struct vn_switch *sw, struct vn_chan *c, struct chan_slot *s, int pass)
{
    uint64_t id = s->held_id;
    if (!id)
        return;
    s->held_id = 0;
    c->owed--;
    vn_held_settle(sw, id, 1ULL << c->slot, pass);
}

/* Every descriptor below `oldest` is settled: moves it up past settled ones. */
static void oldest_advance(struct vn_chan *c)
{
    while (c->oldest < c->prod && !c->slots[c->oldest & (c->desc_slots - 1)].held_id)
        c->oldest++;
}

static void chan_settle_all(struct vn_switch *sw, struct vn_chan *c, int pass)
{
    for (uint64_t q = c->oldest; q < c->prod; q++)
        slot_settle(sw, c, &c->slots[q & (c->desc_slots - 1)], pass);
    c->oldest = c->prod;
}

static int port_default_pass(struct vn_switch *sw, int port)
{
    const struct vn_policy *pol = sw->ports[port].pol;
    return pol ? pol->hold_default_pass : 0;
}

static void chan_break(struct vn_switch *sw, struct vn_chan *c, int why)
{
    if (c->broken)
        return;
    c->broken = why;
    c->st.broken = why;
    __atomic_store_n(&c->ni->broken, (uint32_t)why, __ATOMIC_RELEASE);
    chan_settle_all(sw, c, port_default_pass(sw, c->port));
    vn_punt_signal(sw);        /* the NI kernel kills the scanner: wake it */
}

static void chan_remove(struct vn_switch *sw, struct vn_chan *c)
{
    epoll_ctl(sw->epfd, EPOLL_CTL_DEL, c->kick_ni, NULL);
    for (unsigned i = 0; i < sw->ndirty; i++)
        if (sw->dirty[i] == c)
            sw->dirty[i] = sw->dirty[--sw->ndirty];
    sw->chans[c->idx] = sw->chans[--sw->nchans];
    sw->chans[c->idx]->idx = c->idx;
    sw->ports[c->port].chan[c->slot] = NULL;
    chan_unmap(c);
}

int vn_chan_close_core(struct vn_switch *sw, int port, int slot, int pass)
{
    struct vn_chan *c = chan_get(sw, port, slot);
    if (!c)
        return VN_ENOPORT;
    chan_settle_all(sw, c, pass);
    chan_remove(sw, c);
    return VN_OK;
}

void vn_chan_port_gone(struct vn_switch *sw, int port)
{
    for (int i = 0; i < VN_CHANS; i++) {
        struct vn_chan *c = sw->ports[port].chan[i];
        if (c) {
            chan_settle_all(sw, c, 0);
            chan_remove(sw, c);
        }
    }
}

int vn_chan_info(struct vn_switch *sw, int port, int slot, struct vn_chan_info *out)
{
    struct vn_chan *c = chan_get(sw, port, slot);
    if (!c)
        return VN_ENOPORT;
    *out = c->st;
    /* held frames it still owes a decision on: not those another party settled already */
    uint64_t owed = 0;
    for (uint64_t q = c->oldest; q < c->prod; q++) {
        uint64_t id = c->slots[q & (c->desc_slots - 1)].held_id;
        owed += id && vn_held_exists(sw, id);
    }
    out->owed = owed;
    out->desc_prod = c->prod;
    out->desc_cons = c->cons;
    out->dec_cons = c->dec_cons;
    return VN_OK;
}

/* The scanner's desc_cons, validated: frees descriptor slots and data. */
static int chan_consumed(struct vn_switch *sw, struct vn_chan *c)
{
    uint64_t v = load_sc64(c, offsetof(struct vnr_sc, desc_cons));
    if (v == c->cons)
        return 0;
    if (v < c->cons || v > c->prod) {
        chan_break(sw, c, VNR_BROKEN_DESC_CONS);
        return -1;
    }
    c->cons = v;
    return 0;
}

/* First byte position still in use by a descriptor the scanner has not consumed. */
static uint64_t data_tail(const struct vn_chan *c)
{
    return c->cons == c->prod ? c->data_head : c->slots[c->cons & (c->desc_slots - 1)].data_start;
}

int vn_chan_push(struct vn_switch *sw, int port, int slot, const struct vn_pkt *pkt, int dir,
                 uint64_t held_id)
{
    struct vn_chan *c = chan_get(sw, port, slot);
    struct vn_port *p = &sw->ports[port];
    if (!c || c->broken)
        return -1;
    if (c->prod - c->oldest >= c->desc_slots || c->prod - c->cons >= c->desc_slots) {
        /* full: has the scanner moved on since we last looked? */
        if (chan_consumed(sw, c) < 0)
            return -1;
        oldest_advance(c);
        if (c->prod - c->oldest >= c->desc_slots || c->prod - c->cons >= c->desc_slots) {
            c->st.ring_full++;
            return -1;
        }
    }
    uint64_t need = ((uint64_t)pkt->len + VNR_DATA_ALIGN - 1) & ~(uint64_t)(VNR_DATA_ALIGN - 1);
    uint64_t pos = c->data_head;
    uint64_t at = pos % c->data_size;
    if (at + need > c->data_size)
        pos += c->data_size - at;          /* does not fit before the end: wrap */
    if (pos + need - data_tail(c) > c->data_size) {
        if (chan_consumed(sw, c) < 0)
            return -1;
        if (pos + need - data_tail(c) > c->data_size) {
            c->st.ring_full++;
            return -1;
        }
    }
    uint64_t seq = c->prod;
    struct chan_slot *s = &c->slots[seq & (c->desc_slots - 1)];
    uint32_t off = (uint32_t)(pos % c->data_size);
    memcpy(c->data + off, pkt->data, pkt->len);
    struct vnr_desc *d = &c->desc[seq & (c->desc_slots - 1)];
    d->seq = seq;
    d->time_ns = vn_clock_real(sw);
    d->data = off;
    d->len = pkt->len;
    d->kind = VNR_KIND_FRAME;
    d->dir = (uint8_t)dir;
    d->flags = held_id ? VNR_F_HELD : 0;
    s->seq = seq;
    s->data_start = pos;
    s->held_id = held_id;
    if (held_id) {
        const struct vn_policy *pol = p->pol;
        uint64_t ms = pol && pol->hold_timeout_ms ? pol->hold_timeout_ms : 1000;
        s->deadline_ns = vn_clock(sw) + ms * 1000000ULL;
        c->owed++;
        c->st.held++;
    }
    c->data_head = pos + need;
    c->prod = seq + 1;
    c->st.delivered++;
    p->st.ring_frames++;
    if (!c->dirty) {
        c->dirty = 1;
        sw->dirty[sw->ndirty++] = c;
    }
    return 0;
}

static void kick(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) < 0) {
        /* EAGAIN at 2^64-2 pending kicks: the scanner has enough of them */
    }
}

void vn_chan_flush(struct vn_switch *sw)
{
    for (unsigned i = 0; i < sw->ndirty; i++) {
        struct vn_chan *c = sw->dirty[i];
        c->dirty = 0;
        __atomic_store_n(&c->ni->desc_prod, c->prod, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (load_sc32(c, offsetof(struct vnr_sc, want_kick)))
            kick(c->kick_sc);
    }
    sw->ndirty = 0;
}

/* Reads the decisions published on one ring; returns how many were applied. */
static int chan_decisions(struct vn_switch *sw, struct vn_chan *c)
{
    if (c->broken || chan_consumed(sw, c) < 0)
        return 0;
    uint64_t prod = load_sc64(c, offsetof(struct vnr_sc, dec_prod));
    if (prod == c->dec_cons)
        return 0;
    if (prod < c->dec_cons || prod - c->dec_cons > c->dec_slots) {
        chan_break(sw, c, VNR_BROKEN_DEC_PROD);
        return 0;
    }
    int n = 0;
    const struct vnr_dec *ring = (const struct vnr_dec *)(c->sc + VNR_DEC_OFF);
    for (uint64_t q = c->dec_cons; q < prod; q++) {
        const struct vnr_dec *e = &ring[q & (c->dec_slots - 1)];
        uint64_t seq = __atomic_load_n(&e->seq, __ATOMIC_RELAXED);
        uint32_t verdict = __atomic_load_n(&e->verdict, __ATOMIC_RELAXED);
        if (seq >= c->prod) {
            chan_break(sw, c, VNR_BROKEN_DEC_SEQ);
            return n;
        }
        if (verdict != VNR_PASS && verdict != VNR_CUT) {
            chan_break(sw, c, VNR_BROKEN_VERDICT);
            return n;
        }
        struct chan_slot *s = &c->slots[seq & (c->desc_slots - 1)];
        if (seq < c->oldest || s->seq != seq || !s->held_id) {
            c->st.stale++;
            continue;
        }
        if (verdict == VNR_PASS)
            c->st.passed++;
        else
            c->st.cut++;
        c->st.timeouts_in_a_row = 0;
        slot_settle(sw, c, s, verdict == VNR_PASS);
        n++;
    }
    c->dec_cons = prod;
    __atomic_store_n(&c->ni->dec_cons, prod, __ATOMIC_RELEASE);
    oldest_advance(c);
    return n;
}

/* Held frames past their hold timeout get the policy's default. */
static void chan_timeouts(struct vn_switch *sw, struct vn_chan *c, uint64_t now)
{
    oldest_advance(c);
    while (c->oldest < c->prod) {
        struct chan_slot *s = &c->slots[c->oldest & (c->desc_slots - 1)];
        if (s->held_id) {
            if (s->deadline_ns > now)
                break;
            /* a frame another party cut (or the kernel released) meanwhile was not the
             * scanner's to miss: settled without counting against it */
            if (vn_held_exists(sw, s->held_id)) {
                c->st.timeouts++;
                c->st.timeouts_in_a_row++;
            }
            slot_settle(sw, c, s, port_default_pass(sw, c->port));
        }
        c->oldest++;
    }
}

int vn_chan_service(struct vn_switch *sw)
{
    int n = 0;
    uint64_t now = vn_clock(sw);
    for (unsigned i = 0; i < sw->nchans; i++) {
        struct vn_chan *c = sw->chans[i];
        if (c->armed) {
            c->armed = 0;
            __atomic_store_n(&c->ni->want_kick, 0, __ATOMIC_RELAXED);
        }
        n += chan_decisions(sw, c);
        if (c->owed)
            chan_timeouts(sw, c, now);
    }
    return n;
}

uint64_t vn_chan_deadline(struct vn_switch *sw)
{
    uint64_t t = UINT64_MAX;
    for (unsigned i = 0; i < sw->nchans; i++) {
        struct vn_chan *c = sw->chans[i];
        if (!c->owed)
            continue;
        oldest_advance(c);
        if (c->oldest < c->prod) {
            uint64_t d = c->slots[c->oldest & (c->desc_slots - 1)].deadline_ns;
            if (d < t)
                t = d;
        }
    }
    return t;
}

int vn_chan_arm(struct vn_switch *sw)
{
    int waiting = 0;
    for (unsigned i = 0; i < sw->nchans; i++) {
        struct vn_chan *c = sw->chans[i];
        if (c->broken)
            continue;
        c->armed = 1;
        __atomic_store_n(&c->ni->want_kick, 1, __ATOMIC_RELAXED);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (unsigned i = 0; i < sw->nchans && !waiting; i++) {
        struct vn_chan *c = sw->chans[i];
        if (!c->broken && load_sc64(c, offsetof(struct vnr_sc, dec_prod)) != c->dec_cons)
            waiting = 1;
    }
    return waiting;
}

void vn_chan_kicked(struct vn_switch *sw, int port, int slot)
{
    struct vn_chan *c = chan_get(sw, port, slot);
    if (!c)
        return;
    uint64_t v;
    while (read(c->kick_ni, &v, sizeof(v)) == sizeof(v))
        ;
}
