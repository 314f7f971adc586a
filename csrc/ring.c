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
#include <sched.h>
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
    uint64_t stream, end;      /* a held stream chunk: its stream, and where its bytes end */
    uint8_t sowed, sdir;       /* ... not yet passed (its direction) */
};

/* A stream this ring was given, by handle (what its stream passes name). */
struct chan_stream {
    uint64_t stream;
    uint64_t close_seq;        /* the CLOSE descriptor: the handle is free once it is consumed */
    uint8_t used, closing;
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
    struct chan_stream *strm;  /* by handle */
    uint32_t strm_cap, strm_next;
    uint32_t *closing;         /* handles whose CLOSE waits to be consumed, in order */
    uint32_t nclosing, closing_cap;
    struct vn_chan_info st;
};

static void handles_reclaim(struct vn_chan *c);

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
    free(c->strm);
    free(c->closing);
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
        for (unsigned k = 0; p->pol && k < p->pol->nstream_subs && k < VN_MAX_STREAM_SUBS; k++)
            named |= p->pol->stream_sub_chan[k] == i + 1;
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
/* A held stream chunk is settled once its holder passed it (or its stream is gone). */
static int chunk_settled(struct vn_switch *sw, struct vn_chan *c, struct chan_slot *s)
{
    if (!s->sowed)
        return 1;
    if (vn_tcp_ring_chunk(sw, s->stream, c->port, c->slot, s->sdir, s->end, 0, 0)) {
        s->sowed = 0;
        c->owed--;
        return 1;
    }
    return 0;
}

static void oldest_advance_sw(struct vn_switch *sw, struct vn_chan *c)
{
    while (c->oldest < c->prod) {
        struct chan_slot *s = &c->slots[c->oldest & (c->desc_slots - 1)];
        if (s->held_id || !chunk_settled(sw, c, s))
            break;
        c->oldest++;
    }
}


static void chan_settle_all(struct vn_switch *sw, struct vn_chan *c, int pass)
{
    for (uint64_t q = c->oldest; q < c->prod; q++) {
        struct chan_slot *s = &c->slots[q & (c->desc_slots - 1)];
        slot_settle(sw, c, s, pass);
        if (s->sowed) {
            s->sowed = 0;
            c->owed--;
        }
    }
    c->oldest = c->prod;
    /* its streams: what it held gets `pass`, or the connection is killed */
    for (uint32_t h = 0; h < c->strm_cap; h++)
        if (c->strm[h].used && !c->strm[h].closing) {
            c->strm[h].closing = 1;
            vn_tcp_ring_gone(sw, c->strm[h].stream, c->port, c->slot, pass);
        }
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
        struct chan_slot *s = &c->slots[q & (c->desc_slots - 1)];
        owed += (s->held_id && vn_held_exists(sw, s->held_id)) || s->sowed;
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
    if (c->nclosing)
        handles_reclaim(c);
    return 0;
}

/* First byte position still in use by a descriptor the scanner has not consumed. */
static uint64_t data_tail(const struct vn_chan *c)
{
    return c->cons == c->prod ? c->data_head : c->slots[c->cons & (c->desc_slots - 1)].data_start;
}

/* Room for one descriptor and `len` bytes: 0 and the bytes' free-running position, or -1
 * (counted: the ring or its data area is full). */
static int chan_reserve(struct vn_switch *sw, struct vn_chan *c, uint64_t len, uint64_t *at_pos)
{
    if (c->prod - c->oldest >= c->desc_slots || c->prod - c->cons >= c->desc_slots) {
        /* full: has the scanner moved on since we last looked? */
        if (chan_consumed(sw, c) < 0)
            return -1;
        oldest_advance_sw(sw, c);
        if (c->prod - c->oldest >= c->desc_slots || c->prod - c->cons >= c->desc_slots) {
            c->st.ring_full++;
            return -1;
        }
    }
    uint64_t need = (len + VNR_DATA_ALIGN - 1) & ~(uint64_t)(VNR_DATA_ALIGN - 1);
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
    *at_pos = pos;
    return 0;
}

/* Fills the next descriptor for `len` bytes at `pos` (already written) and queues it for
 * publication; returns its slot record. */
static struct chan_slot *chan_commit(struct vn_switch *sw, struct vn_chan *c, uint64_t pos,
                                     uint32_t len, int kind, int dir, int flags, uint64_t time_ns)
{
    uint64_t seq = c->prod;
    struct chan_slot *s = &c->slots[seq & (c->desc_slots - 1)];
    struct vnr_desc *d = &c->desc[seq & (c->desc_slots - 1)];
    d->seq = seq;
    d->time_ns = time_ns;
    d->data = (uint32_t)(pos % c->data_size);
    d->len = len;
    d->kind = (uint8_t)kind;
    d->dir = (uint8_t)dir;
    d->flags = (uint8_t)flags;
    memset(s, 0, sizeof(*s));
    s->seq = seq;
    s->data_start = pos;
    c->data_head = pos + ((len + VNR_DATA_ALIGN - 1) & ~(uint64_t)(VNR_DATA_ALIGN - 1));
    c->prod = seq + 1;
    c->st.delivered++;
    if (!c->dirty) {
        c->dirty = 1;
        sw->dirty[sw->ndirty++] = c;
    }
    return s;
}

/* From `now`: a held frame's, the switch's clock as the data path last read it (each pass,
 * injection and drain reads it once: not a clock read per held frame), so at most one
 * burst's work early; stream data's, the clock (it is also published from API calls, which
 * do not read the clock first). */
static uint64_t hold_deadline(struct vn_switch *sw, int port, uint64_t now)
{
    const struct vn_policy *pol = sw->ports[port].pol;
    uint64_t ms = pol && pol->hold_timeout_ms ? pol->hold_timeout_ms : 1000;
    return now + ms * 1000000ULL;
}

int vn_chan_push(struct vn_switch *sw, int port, int slot, const struct vn_pkt *pkt, int dir,
                 uint64_t held_id, uint64_t time_ns)
{
    struct vn_chan *c = chan_get(sw, port, slot);
    uint64_t pos;
    if (!c || c->broken || chan_reserve(sw, c, pkt->len, &pos) < 0)
        return -1;
    memcpy(c->data + pos % c->data_size, pkt->data, pkt->len);
    struct chan_slot *s = chan_commit(sw, c, pos, pkt->len, VNR_KIND_FRAME, dir,
                                      held_id ? VNR_F_HELD : 0, time_ns);
    s->held_id = held_id;
    if (held_id) {
        s->deadline_ns = hold_deadline(sw, port, sw->now_ns ? sw->now_ns : vn_clock(sw));
        c->owed++;
        c->st.held++;
    }
    sw->ports[port].st.ring_frames++;
    return 0;
}

/* ---- TCP streams on rings ---- */

int vn_chan_stream_handle(struct vn_switch *sw, int port, int slot, uint64_t stream, uint32_t *handle)
{
    struct vn_chan *c = chan_get(sw, port, slot);
    if (!c || c->broken)
        return -1;
    for (uint32_t n = 0; n < c->strm_cap; n++) {
        uint32_t h = (c->strm_next + n) % c->strm_cap;
        if (!c->strm[h].used) {
            c->strm_next = h + 1;
            c->strm[h] = (struct chan_stream){.stream = stream, .used = 1};
            *handle = h;
            return 0;
        }
    }
    uint32_t cap = c->strm_cap ? c->strm_cap * 2 : 64;
    if (cap > VN_CHAN_STREAMS)
        return -1;
    struct chan_stream *n = realloc(c->strm, cap * sizeof(*n));
    if (!n)
        return -1;
    memset(n + c->strm_cap, 0, (cap - c->strm_cap) * sizeof(*n));
    c->strm = n;
    *handle = c->strm_cap;
    c->strm[*handle] = (struct chan_stream){.stream = stream, .used = 1};
    c->strm_next = *handle + 1;
    c->strm_cap = cap;
    return 0;
}

/* Handles whose CLOSE the scanner consumed are free again. */
static void handles_reclaim(struct vn_chan *c)
{
    unsigned k = 0;
    while (k < c->nclosing && c->strm[c->closing[k]].close_seq < c->cons) {
        c->strm[c->closing[k]].used = 0;
        k++;
    }
    if (k) {
        memmove(c->closing, c->closing + k, (c->nclosing - k) * sizeof(*c->closing));
        c->nclosing -= k;
    }
}

int vn_chan_stream_push(struct vn_switch *sw, int port, int slot, int kind, uint32_t handle,
                        uint64_t stream, int dir, uint64_t offset, uint32_t len, int held,
                        uint32_t reason, const void *extra, uint32_t extra_len,
                        vn_chan_copy_fn copy, void *arg)
{
    struct vn_chan *c = chan_get(sw, port, slot);
    uint64_t pos;
    if (!c || c->broken || handle >= c->strm_cap || !c->strm[handle].used ||
        chan_reserve(sw, c, sizeof(struct vnr_stream) + extra_len + len, &pos) < 0)
        return -1;
    uint8_t *at = c->data + pos % c->data_size;
    struct vnr_stream hdr = {.stream = stream, .offset = offset, .handle = handle, .reason = reason};
    memcpy(at, &hdr, sizeof(hdr));
    if (extra_len)
        memcpy(at + sizeof(hdr), extra, extra_len);
    if (len)
        copy(arg, at + sizeof(hdr) + extra_len, offset, len);
    struct chan_slot *s = chan_commit(sw, c, pos, (uint32_t)(sizeof(hdr) + extra_len + len), kind,
                                      kind == VNR_KIND_STREAM_OPEN || kind == VNR_KIND_STREAM_CLOSE ? 0 : dir,
                                      held ? VNR_F_HELD : 0, vn_clock_real(sw));
    if (held) {
        s->stream = stream;
        s->end = offset + len;
        s->sdir = (uint8_t)dir;
        s->sowed = 1;
        s->deadline_ns = hold_deadline(sw, port, vn_clock(sw));
        c->owed++;
        c->st.held++;
    }
    if (kind == VNR_KIND_STREAM_DATA) {
        sw->ports[port].st.ring_stream_bytes += len;
        c->st.stream_bytes += len;
    } else if (kind == VNR_KIND_STREAM_OPEN) {
        c->st.streams++;
    }
    return 0;
}

void vn_chan_stream_closed(struct vn_switch *sw, int port, int slot, uint32_t handle, int pushed)
{
    struct vn_chan *c = chan_get(sw, port, slot);
    if (!c || handle >= c->strm_cap || !c->strm[handle].used || c->strm[handle].closing)
        return;
    c->strm[handle].closing = 1;
    if (!pushed) {             /* the scanner never hears of its end: free it now */
        c->strm[handle].used = 0;
        return;
    }
    c->strm[handle].close_seq = c->prod - 1;
    if (c->nclosing == c->closing_cap) {
        uint32_t cap = c->closing_cap ? c->closing_cap * 2 : 64;
        uint32_t *n = realloc(c->closing, cap * sizeof(*n));
        if (!n) {
            c->strm[handle].used = 0;   /* no room to wait: freed now (a late pass is stale) */
            return;
        }
        c->closing = n;
        c->closing_cap = cap;
    }
    c->closing[c->nclosing++] = handle;
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
        sw->chan_pub_ns = vn_now_ns();
    }
    sw->ndirty = 0;
}

int vn_chan_spin(struct vn_switch *sw)
{
    /* a scanner that owes decisions on what was just published usually answers within
     * microseconds: look at the decision rings for a little while before sleeping (two
     * sleeps and wake-ups, the NI's and the scanner's, cost far more) */
    if (!sw->nchans || vn_now_ns() - sw->chan_pub_ns > VN_CHAN_SPIN_AFTER_NS)
        return 0;
    int owed = 0;
    for (unsigned i = 0; i < sw->nchans && !owed; i++)
        owed = sw->chans[i]->owed && !sw->chans[i]->broken;
    if (!owed)
        return 0;
    uint64_t end = vn_now_ns() + VN_CHAN_SPIN_NS;
    do {
        for (unsigned i = 0; i < sw->nchans; i++) {
            struct vn_chan *c = sw->chans[i];
            if (!c->broken && load_sc64(c, offsetof(struct vnr_sc, dec_prod)) != c->dec_cons)
                return 1;
        }
        /* not a pause: a scanner sharing this CPU (its cgroup's cpuset, a small host) gets
         * to run and answer; with a CPU of its own it is a few hundred ns of looking */
        sched_yield();
    } while (vn_now_ns() < end);
    return 0;
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
        if ((verdict & ~3u) == VNR_STREAM_PASS && (verdict & 3u)) {
            /* a stream pass: seq is the offset, handle the stream */
            uint32_t h = __atomic_load_n(&e->handle, __ATOMIC_RELAXED);
            int dir = (int)(verdict & 3u);
            if (h >= c->strm_cap || dir == 3) {
                chan_break(sw, c, h >= c->strm_cap ? VNR_BROKEN_HANDLE : VNR_BROKEN_VERDICT);
                return n;
            }
            struct chan_stream *cs = &c->strm[h];
            if (!cs->used || cs->closing ||
                vn_tcp_ring_pass(sw, cs->stream, c->port, c->slot, dir, seq) < 0) {
                c->st.stale++;
                continue;
            }
            c->st.passed++;
            c->st.timeouts_in_a_row = 0;
            n++;
            continue;
        }
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
    oldest_advance_sw(sw, c);
    return n;
}

/* Held frames past their hold timeout get the policy's default. */
static void chan_timeouts(struct vn_switch *sw, struct vn_chan *c, uint64_t now)
{
    oldest_advance_sw(sw, c);
    while (c->oldest < c->prod) {
        struct chan_slot *s = &c->slots[c->oldest & (c->desc_slots - 1)];
        if (s->sowed && !chunk_settled(sw, c, s)) {
            if (s->deadline_ns > now)
                break;
            /* a stream chunk its scanner did not pass in time: the default for it */
            c->st.timeouts++;
            c->st.timeouts_in_a_row++;
            s->sowed = 0;
            c->owed--;
            vn_tcp_ring_chunk(sw, s->stream, c->port, c->slot, s->sdir, s->end, 1,
                              port_default_pass(sw, c->port));
        }
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
    vn_tcp_ring_service(sw);
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
        oldest_advance_sw(sw, c);
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
