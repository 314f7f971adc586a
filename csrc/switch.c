/*
 * The L2 learning switch joining a daemon's NIs (vhost-user ports) and TAP uplinks, and
 * the data-plane loop that drives it: epoll on kick eventfds and TAP fds (or busy
 * polling), batch dequeue, learn, look up, deliver, interrupt.
 *
 * Calls go one way: the switch calls an NI's policy (policy.c), which calls its TCP engine
 * (tcp*.c); neither calls back.  The frames they produce (a held frame a scanner passed, a
 * released or rebuilt segment, a reassembled datagram, the NI's own segments) join the emit
 * queue (emit.c) with the stage they have left, and the switch drains it (emit_drain) after
 * each ingress frame and at the end of every call from the NI kernel that can release
 * frames (vn_held_release, vn_stream_*, vn_tcp_housekeeping, vn_port_inject): those public
 * functions are at the end of this file.  Guests are interrupted once per batch or call.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "vn_internal.h"

#define EV_WAKE 0ULL
#define EV_KICK 1ULL
#define EV_TAP 2ULL
#define EV_CHAN 3ULL               /* a scanner ring's kick (ring.c) */
#define EV(kind, port, q) ((kind) << 32 | (uint64_t)(port) << 8 | (q))
/* the port and queue fields of EV are 8 bits each (decoded with & 0xff in vn_switch_run) */
_Static_assert(VN_MAX_PORTS <= 256 && VN_MAX_QUEUES <= 256, "EV() packs a port and a queue in 8 bits each");

/* frames one ring or TAP may forward before the loop moves on to others (fairness) */
#define VN_BUDGET 256
/* polling: while frames move, epoll (kicks, the wake fd, scanner rings) at most this often */
#define VN_POLL_EPOLL_NS 20000ULL

uint64_t vn_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

uint64_t vn_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

int vn_switch_set_clock(struct vn_switch *sw, uint64_t now_ns)
{
    if (now_ns < sw->manual_ns || now_ns > VN_CLOCK_MAX_NS)
        return VN_EINVAL;          /* a clock handed in never goes back (not even to the system's,
                                      whose times the timers already set could not be compared
                                      with), nor wraps a timer */
    sw->manual_ns = now_ns;
    sw->now_ns = vn_clock(sw);
    return VN_OK;
}

const char *vn_strerror(int code)
{
    switch (code) {
    case VN_OK: return "ok";
    case VN_EINVAL: return "invalid argument";
    case VN_ENOMEM: return "out of memory";
    case VN_EMAP: return "cannot map guest memory region";
    case VN_ERANGE: return "value out of range";
    case VN_ESTATE: return "not allowed in the current state";
    case VN_ENOPORT: return "no such port";
    case VN_ESYS: return "system call failed";
    }
    return "unknown error";
}

const char *vn_broken_reason(int code)
{
    switch (code) {
    case VN_BROKEN_NONE: return "";
    case VN_BROKEN_RING_ADDR: return "ring address outside guest memory";
    case VN_BROKEN_AVAIL_IDX: return "avail index moved by more than the ring size";
    case VN_BROKEN_HEAD: return "avail ring head index out of range";
    case VN_BROKEN_DESC_ADDR: return "descriptor buffer outside guest memory";
    case VN_BROKEN_CHAIN_LOOP: return "descriptor chain longer than the ring (loop)";
    case VN_BROKEN_INDIRECT: return "malformed indirect descriptor table";
    case VN_BROKEN_DESC_NEXT: return "descriptor next index out of range";
    case VN_BROKEN_DESC_DIR: return "descriptor direction wrong for this queue";
    case VN_BROKEN_CHAIN_LEN: return "descriptor chain length absurd";
    case VN_BROKEN_KICK_FD: return "kick fd at end of file or failing";
    case VN_BROKEN_MEM_GONE: return "guest memory or log file shrunk under the NI";
    }
    return "unknown";
}

struct vn_switch *vn_switch_new(void)
{
    struct vn_switch *sw = calloc(1, sizeof(*sw));
    if (!sw)
        return NULL;
    sw->epfd = epoll_create1(EPOLL_CLOEXEC);
    sw->punt_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    sw->wake_fd = -1;
    /* the packet buffer: untouched pages cost nothing */
    size_t blen = sizeof(struct vn_pkt) * (VN_BATCH + 3);
    void *b = mmap(NULL, blen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int eq = vn_emit_init(&sw->emit);
    if (sw->epfd < 0 || sw->punt_fd < 0 || b == MAP_FAILED || eq < 0) {
        if (sw->epfd >= 0)
            close(sw->epfd);
        if (sw->punt_fd >= 0)
            close(sw->punt_fd);
        if (b != MAP_FAILED)
            munmap(b, blen);
        vn_emit_free(&sw->emit);
        free(sw);
        return NULL;
    }
    sw->batch = b;
    sw->held_blocks.max_bytes = VN_HELD_CACHE_BYTES;
    sw->seg = &sw->batch[VN_BATCH];
    sw->rel = &sw->batch[VN_BATCH + 1];
    sw->flood = &sw->batch[VN_BATCH + 2];
    return sw;
}

static struct vn_port *port_get(struct vn_switch *sw, int port)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind)
        return NULL;
    return &sw->ports[port];
}

static struct vn_vq *vq_get(struct vn_switch *sw, int port, unsigned q, struct vn_port **pp)
{
    struct vn_port *p = port_get(sw, port);
    if (!p || p->kind != VN_PORT_VHOST || q >= VN_MAX_QUEUES)
        return NULL;
    *pp = p;
    return &p->vq[q];
}

static void backlog_clear(struct vn_port *p)
{
    while (p->bl_count) {
        free(p->backlog[p->bl_head]);
        p->backlog[p->bl_head] = NULL;
        p->bl_head = (p->bl_head + 1) % VN_BACKLOG;
        p->bl_count--;
    }
    p->bl_head = 0;
}

static void vq_close_fds(struct vn_switch *sw, struct vn_vq *vq)
{
    if (vq->kickfd >= 0) {
        epoll_ctl(sw->epfd, EPOLL_CTL_DEL, vq->kickfd, NULL);
        close(vq->kickfd);
    }
    if (vq->callfd >= 0)
        close(vq->callfd);
    vq->kickfd = vq->callfd = -1;
}

static void vq_init(struct vn_vq *vq)
{
    memset(vq, 0, sizeof(*vq));
    vq->kickfd = vq->callfd = -1;
    /* disabled until SET_VRING_ENABLE, or SET_FEATURES without PROTOCOL_FEATURES */
    vq->enabled = 0;
}

static void mac_forget_port(struct vn_switch *sw, int port)
{
    for (unsigned i = 0; i < VN_MAC_TABLE; i++)
        if (sw->macs[i].used && sw->macs[i].port == port)
            sw->macs[i].used = 0;
}

static void live_rebuild(struct vn_switch *sw)
{
    unsigned n = 0;
    for (int i = 0; i < VN_MAX_PORTS; i++)
        if (sw->ports[i].kind)
            sw->live[n++] = (uint8_t)i;
    sw->nlive = n;
}

/* A free port slot, zeroed, with idle rings; -1 if all VN_MAX_PORTS are taken.  The
 * caller sets `kind`, which is what marks the slot used. */
static int port_slot(struct vn_switch *sw)
{
    for (int i = 0; i < VN_MAX_PORTS; i++) {
        struct vn_port *p = &sw->ports[i];
        if (p->kind)
            continue;
        memset(p, 0, sizeof(*p));
        p->id = i;
        p->tapfd = -1;
        for (unsigned q = 0; q < VN_MAX_QUEUES; q++)
            vq_init(&p->vq[q]);
        return i;
    }
    return -1;
}

int vn_port_add_vhost(struct vn_switch *sw)
{
    int i = port_slot(sw);
    if (i < 0)
        return VN_ERANGE;
    sw->ports[i].kind = VN_PORT_VHOST;
    sw->ports[i].hdr_len = 12;
    live_rebuild(sw);
    return i;
}

int vn_port_add_tap(struct vn_switch *sw, int fd, int vnet_hdr_len)
{
    if (fd < 0 || (vnet_hdr_len != 0 && vnet_hdr_len != 12))
        return VN_EINVAL;
    int i = port_slot(sw);
    if (i < 0)
        return VN_ERANGE;
    struct vn_port *p = &sw->ports[i];
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV(EV_TAP, i, 0)};
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
        epoll_ctl(sw->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return VN_ESYS;   /* kind still 0: the slot stays free */
    p->kind = VN_PORT_TAP;
    p->tapfd = fd;
    p->tap_hdr_len = (unsigned)vnet_hdr_len;
    p->tap_readable = 1;
    live_rebuild(sw);
    return i;
}

int vn_port_add_sink(struct vn_switch *sw)
{
    int i = port_slot(sw);
    if (i < 0)
        return VN_ERANGE;
    sw->ports[i].kind = VN_PORT_SINK;
    live_rebuild(sw);
    return i;
}

/* Frees the queued sink frames of `port` (-1: of every port). */
static void sink_clear(struct vn_switch *sw, int port)
{
    struct vn_sink_rec **pp = &sw->sink_head;
    sw->sink_tail = NULL;
    while (*pp) {
        struct vn_sink_rec *r = *pp;
        if (port < 0 || r->port == port) {
            *pp = r->next;
            free(r);
            sw->sink_count--;
        } else {
            sw->sink_tail = r;
            pp = &r->next;
        }
    }
}

int vn_sink_next(struct vn_switch *sw, struct vn_sink_frame *out)
{
    free(sw->sink_last);
    sw->sink_last = NULL;
    struct vn_sink_rec *r = sw->sink_head;
    if (!r)
        return 0;
    sw->sink_head = r->next;
    if (!sw->sink_head)
        sw->sink_tail = NULL;
    sw->sink_count--;
    sw->sink_last = r;
    out->port = r->port;
    out->len = r->len;
    out->data = r->data;
    return 1;
}

int vn_port_remove(struct vn_switch *sw, int port)
{
    struct vn_port *p = port_get(sw, port);
    if (!p)
        return VN_ENOPORT;
    for (unsigned q = 0; q < VN_MAX_QUEUES; q++)
        vq_close_fds(sw, &p->vq[q]);
    if (p->tapfd >= 0) {
        epoll_ctl(sw->epfd, EPOLL_CTL_DEL, p->tapfd, NULL);
        close(p->tapfd);
    }
    vn_mem_unmap(&p->mem);
    vn_log_unmap(p);
    backlog_clear(p);
    if (p->kind == VN_PORT_SINK)
        sink_clear(sw, port);
    mac_forget_port(sw, port);
    vn_chan_port_gone(sw, port);
    vn_policy_release_port(sw, port, 0);
    vn_sigport_free(sw, port);
    free(p->pol);
    memset(p, 0, sizeof(*p));
    live_rebuild(sw);
    return VN_OK;
}

void vn_switch_free(struct vn_switch *sw)
{
    if (!sw)
        return;
    for (int i = 0; i < VN_MAX_PORTS; i++)
        if (sw->ports[i].kind)
            vn_port_remove(sw, i);
    vn_held_free_all(sw);
    sink_clear(sw, -1);
    free(sw->sink_last);
    munmap(sw->batch, sizeof(struct vn_pkt) * (VN_BATCH + 3));
    vn_emit_free(&sw->emit);
    close(sw->epfd);
    close(sw->punt_fd);
    free(sw);
}

const struct vn_port_stats *vn_port_stats(struct vn_switch *sw, int port)
{
    struct vn_port *p = port_get(sw, port);
    return p ? &p->st : NULL;
}

int vn_port_queue_stats(struct vn_switch *sw, int port, struct vn_queue_stats *out, unsigned n)
{
    struct vn_port *p = port_get(sw, port);
    if (!p || p->kind != VN_PORT_VHOST)
        return VN_ENOPORT;
    if (n > VN_MAX_QUEUES)
        return VN_EINVAL;
    for (unsigned q = 0; q < n; q++) {
        out[q].frames = p->qst[q].frames;
        out[q].bytes = p->qst[q].bytes;
        out[q].num = p->vq[q].num;
        out[q].ready = (uint8_t)vn_vq_ready(p, &p->vq[q]);
    }
    return (int)n;
}

/* Counts a frame put on a receive queue of p (per port and per queue). */
static inline void count_rx(struct vn_port *p, const struct vn_vq *vq, uint32_t len)
{
    p->st.out_frames++;
    p->st.out_bytes += len;
    p->qst[vq - p->vq].frames++;
    p->qst[vq - p->vq].bytes += len;
}

int vn_port_broken(struct vn_switch *sw, int port)
{
    struct vn_port *p = port_get(sw, port);
    return p ? p->broken : VN_ENOPORT;
}

int vn_ports_broken(struct vn_switch *sw)
{
    int n = 0;
    for (int i = 0; i < VN_MAX_PORTS; i++)
        n += sw->ports[i].kind && sw->ports[i].broken;
    return n;
}

int vn_port_set_mac(struct vn_switch *sw, int port, const uint8_t *mac)
{
    struct vn_port *p = port_get(sw, port);
    if (!p)
        return VN_ENOPORT;
    memcpy(p->mac, mac, 6);
    p->mac_set = 1;
    return VN_OK;
}

/* ---- vhost-user device configuration ---- */

int vn_dev_set_features(struct vn_switch *sw, int port, uint64_t features)
{
    struct vn_port *p = port_get(sw, port);
    if (!p || p->kind != VN_PORT_VHOST)
        return VN_ENOPORT;
    p->features = features;
    p->hdr_len = (HAS_FEATURE(features, VIRTIO_F_VERSION_1) ||
                  HAS_FEATURE(features, VIRTIO_NET_F_MRG_RXBUF)) ? 12 : 10;
    return VN_OK;
}

static void remap_rings(struct vn_port *p)
{
    for (unsigned q = 0; q < VN_MAX_QUEUES; q++) {
        struct vn_vq *vq = &p->vq[q];
        if (vq->addr_set && vn_vq_map(p, vq) < 0 && vq->started)
            vn_port_break(p, VN_BROKEN_RING_ADDR);
    }
}

int vn_dev_set_mem(struct vn_switch *sw, int port, unsigned n,
                   const struct vn_region_spec *regions, const int *fds)
{
    struct vn_port *p = port_get(sw, port);
    if (!p || p->kind != VN_PORT_VHOST)
        return VN_ENOPORT;
    int r = vn_mem_map(&p->mem, n, regions, fds);
    if (r < 0)
        return r;
    remap_rings(p);
    return VN_OK;
}

int vn_dev_reset(struct vn_switch *sw, int port)
{
    struct vn_port *p = port_get(sw, port);
    if (!p || p->kind != VN_PORT_VHOST)
        return VN_ENOPORT;
    for (unsigned q = 0; q < VN_MAX_QUEUES; q++) {
        vq_close_fds(sw, &p->vq[q]);
        vq_init(&p->vq[q]);
    }
    vn_mem_unmap(&p->mem);
    vn_log_unmap(p);
    backlog_clear(p);
    mac_forget_port(sw, port);
    p->features = 0;
    p->hdr_len = 12;
    p->broken = 0;
    return VN_OK;
}

int vn_dev_set_log(struct vn_switch *sw, int port, int fd, uint64_t size, uint64_t offset)
{
    struct vn_port *p = port_get(sw, port);
    if (!p || p->kind != VN_PORT_VHOST)
        return VN_ENOPORT;
    if (size == 0) {
        vn_log_unmap(p);
        return VN_OK;
    }
    return vn_log_map(p, fd, size, offset);
}

int vn_vq_set_log(struct vn_switch *sw, int port, unsigned q, int on, uint64_t used_gpa)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    if (!vq)
        return VN_ENOPORT;
    if (!on) {
        vq->log_used = 0;
        return VN_OK;
    }
    /* the used ring must be where the log says it is: the same host bytes through both
     * translations, or we would log pages other than those we write */
    if (vq->num == 0 || !vq->used)
        return VN_ESTATE;
    uint64_t len = 6 + 8ULL * vq->num;
    uint8_t *h = vn_mem_gpa(&p->mem, used_gpa, len);
    if (h != (uint8_t *)vq->used)
        return VN_EMAP;
    vq->log_used = 1;
    vq->log_used_gpa = used_gpa;
    return VN_OK;
}

int vn_vq_set_num(struct vn_switch *sw, int port, unsigned q, unsigned num)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    if (!vq)
        return VN_ENOPORT;
    /* split rings: a power of two, at most 32768 */
    if (num == 0 || num > VN_MAX_QUEUE_SIZE || (num & (num - 1)))
        return VN_ERANGE;
    if (vq->started)
        return VN_ESTATE;
    vq->num = num;
    if (vq->addr_set && vn_vq_map(p, vq) < 0)
        vq->addr_set = 0;
    return VN_OK;
}

int vn_vq_set_addr(struct vn_switch *sw, int port, unsigned q,
                   uint64_t desc_uva, uint64_t used_uva, uint64_t avail_uva)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    if (!vq)
        return VN_ENOPORT;
    if (vq->num == 0)
        return VN_ESTATE;
    vq->desc_uva = desc_uva;
    vq->used_uva = used_uva;
    vq->avail_uva = avail_uva;
    vq->addr_set = 1;
    if (vn_vq_map(p, vq) < 0) {
        vq->addr_set = 0;
        return VN_EMAP;
    }
    /* the frontend re-initialising a ring is how a broken device comes back */
    p->broken = 0;
    vq->used_idx = vq->used->idx;
    vq->nshadow = 0;
    vq->signalled_valid = 0;
    return VN_OK;
}

int vn_vq_set_base(struct vn_switch *sw, int port, unsigned q, unsigned base)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    if (!vq)
        return VN_ENOPORT;
    if (base > 0xffff)
        return VN_ERANGE;
    if (vq->started)
        return VN_ESTATE;
    vq->last_avail = (uint16_t)base;
    vq->avail_known = 0;
    vq->used_idx = (uint16_t)base;
    vq->nshadow = 0;
    return VN_OK;
}

int vn_vq_get_base(struct vn_switch *sw, int port, unsigned q)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    if (!vq)
        return VN_ENOPORT;
    /* everything written to the ring is visible (and logged) before the frontend reads
     * the state it hands over */
    if (vq->used && vq->call_pending) {
        vn_vq_publish_used(p, vq);
        vn_vq_signal(p, vq);
    }
    vq->started = 0;
    vq->active = 0;
    if (vq->kickfd >= 0) {
        epoll_ctl(sw->epfd, EPOLL_CTL_DEL, vq->kickfd, NULL);
        close(vq->kickfd);
        vq->kickfd = -1;
    }
    if (q % 2 == 0)
        backlog_clear(p);
    return vq->last_avail;
}

int vn_vq_set_kick(struct vn_switch *sw, int port, unsigned q, int fd)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    if (!vq) {
        if (fd >= 0)
            close(fd);
        return VN_ENOPORT;
    }
    if (vq->kickfd >= 0) {
        epoll_ctl(sw->epfd, EPOLL_CTL_DEL, vq->kickfd, NULL);
        close(vq->kickfd);
    }
    vq->kickfd = fd;
    if (fd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV(EV_KICK, port, q)};
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
            epoll_ctl(sw->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            vq->kickfd = -1;
            return VN_ESYS;
        }
    }
    vq->started = 1;
    vq->active = 1;   /* the driver may have queued buffers before telling us */
    if (q / 2 + 1 > p->nqp)
        p->nqp = q / 2 + 1;
    return VN_OK;
}

int vn_vq_set_call(struct vn_switch *sw, int port, unsigned q, int fd)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    if (!vq) {
        if (fd >= 0)
            close(fd);
        return VN_ENOPORT;
    }
    if (vq->callfd >= 0)
        close(vq->callfd);
    vq->callfd = fd;
    if (fd >= 0) {
        /* the interrupt write must never block the one thread every NI runs on: a counter
         * the frontend filled gives EAGAIN, an interrupt already pending */
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
            close(fd);
            vq->callfd = -1;
            return VN_ESYS;
        }
    }
    return VN_OK;
}

int vn_vq_set_enable(struct vn_switch *sw, int port, unsigned q, int enable)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    if (!vq)
        return VN_ENOPORT;
    vq->enabled = !!enable;
    vq->active = vq->enabled;
    return VN_OK;
}

int vn_vq_started(struct vn_switch *sw, int port, unsigned q)
{
    struct vn_port *p;
    struct vn_vq *vq = vq_get(sw, port, q, &p);
    return vq ? vq->started : VN_ENOPORT;
}

int vn_switch_set_wake_fd(struct vn_switch *sw, int fd)
{
    if (sw->wake_fd >= 0)
        epoll_ctl(sw->epfd, EPOLL_CTL_DEL, sw->wake_fd, NULL);
    sw->wake_fd = fd;
    if (fd < 0)
        return VN_OK;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EV(EV_WAKE, 0, 0)};
    return epoll_ctl(sw->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? VN_ESYS : VN_OK;
}

/* ---- forwarding ---- */

static unsigned mac_hash(const uint8_t *m)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < 6; i++)
        h = (h ^ m[i]) * 16777619u;
    return h & (VN_MAC_TABLE - 1);
}

static void mac_learn(struct vn_switch *sw, const uint8_t *mac, int port)
{
    if (mac[0] & 1)
        return;   /* never learn a group address as a source */
    /* a burst mostly comes from one sender: the entry the last frame found (a MAC has at
     * most one entry, in its probe window, so this is the one the probe would find) */
    struct vn_mac_entry *c = sw->mac_hint_src;
    if (c && c->used && !memcmp(c->mac, mac, 6)) {
        c->port = (int16_t)port;
        c->seen_ns = sw->now_ns;
        return;
    }
    unsigned h = mac_hash(mac);
    struct vn_mac_entry *victim = NULL;
    for (unsigned i = 0; i < 8; i++) {
        struct vn_mac_entry *e = &sw->macs[(h + i) & (VN_MAC_TABLE - 1)];
        if (e->used && !memcmp(e->mac, mac, 6)) {
            e->port = (int16_t)port;
            e->seen_ns = sw->now_ns;
            sw->mac_hint_src = e;
            return;
        }
        if (!victim && (!e->used || sw->now_ns - e->seen_ns > VN_MAC_AGE_NS))
            victim = e;
    }
    if (!victim)   /* probe window full: replace the oldest */
        for (unsigned i = 0; i < 8; i++) {
            struct vn_mac_entry *e = &sw->macs[(h + i) & (VN_MAC_TABLE - 1)];
            if (!victim || e->seen_ns < victim->seen_ns)
                victim = e;
        }
    memcpy(victim->mac, mac, 6);
    victim->used = 1;
    victim->port = (int16_t)port;
    victim->seen_ns = sw->now_ns;
    sw->mac_hint_src = victim;
}

static inline int mac_found(struct vn_switch *sw, struct vn_mac_entry *e)
{
    if (sw->now_ns - e->seen_ns > VN_MAC_AGE_NS) {
        e->used = 0;
        return -1;
    }
    sw->mac_hint_dst = e;
    return e->port;
}

static int mac_lookup(struct vn_switch *sw, const uint8_t *mac)
{
    struct vn_mac_entry *c = sw->mac_hint_dst;   /* as in mac_learn */
    if (c && c->used && !memcmp(c->mac, mac, 6))
        return mac_found(sw, c);
    unsigned h = mac_hash(mac);
    for (unsigned i = 0; i < 8; i++) {
        struct vn_mac_entry *e = &sw->macs[(h + i) & (VN_MAC_TABLE - 1)];
        if (e->used && !memcmp(e->mac, mac, 6))
            return mac_found(sw, e);
    }
    return -1;
}

/* The receive queue a frame for port p goes to: the enabled pair picked by a flow hash. */
static struct vn_vq *rx_queue(struct vn_port *p, const struct vn_pkt *pkt)
{
    struct vn_vq *cand[VN_MAX_QUEUE_PAIRS];
    unsigned n = 0;
    for (unsigned qp = 0; qp < p->nqp; qp++)
        if (vn_vq_ready(p, &p->vq[2 * qp]))
            cand[n++] = &p->vq[2 * qp];
    if (n == 0)
        return NULL;
    const uint8_t *a = vn_get(pkt->data, pkt->len, 26, 8);
    if (n == 1 || !a)
        return cand[0];
    /* FNV-1a over the addresses and, for TCP and UDP, the ports of an untagged frame: one
     * flow, one queue, and the connections between two hosts spread over the pairs.  A
     * fragment hashes without ports, so every fragment of a datagram takes one queue. */
    const uint8_t *d = pkt->data;
    uint16_t type = (uint16_t)(d[12] << 8 | d[13]);
    unsigned lo = 26, hi = 34, l4 = 0;
    if (type == 0x0800) {
        unsigned ihl = (d[14] & 0x0f) * 4u;
        if ((d[23] == 6 || d[23] == 17) && !(d[20] & 0x3f) && !d[21] && ihl >= 20)
            l4 = 14 + ihl;
    } else if (type == 0x86dd && pkt->len >= 54) {
        lo = 22, hi = 54;
        if (d[20] == 6 || d[20] == 17)
            l4 = 54;
    }
    uint32_t h = 2166136261u;
    for (unsigned i = lo; i < hi; i++)
        h = (h ^ d[i]) * 16777619u;
    const uint8_t *ports = l4 ? vn_get(d, pkt->len, l4, 4) : NULL;
    if (ports)
        for (unsigned i = 0; i < 4; i++)
            h = (h ^ ports[i]) * 16777619u;
    return cand[(h ^ (h >> 16)) % n];
}

static void backlog_push(struct vn_port *p, const struct vn_pkt *pkt,
                         const struct vn_net_hdr *hdr)
{
    if (p->bl_count >= VN_BACKLOG) {
        p->st.drop_no_rx_buffer++;
        return;
    }
    struct vn_backlog_frame *f = malloc(sizeof(*f) + pkt->len);
    if (!f) {
        p->st.drop_no_rx_buffer++;
        return;
    }
    f->len = pkt->len;
    f->hdr = *hdr;
    memcpy(f->data, pkt->data, pkt->len);
    p->backlog[(p->bl_head + p->bl_count) % VN_BACKLOG] = f;
    p->bl_count++;
    if (p->bl_count > p->st.backlog_max)
        p->st.backlog_max = p->bl_count;
}

/* Delivers queued frames while the guest has buffers.  1 if the backlog is now empty. */
static int backlog_flush(struct vn_switch *sw, struct vn_port *p)
{
    while (p->bl_count) {
        struct vn_backlog_frame *f = p->backlog[p->bl_head];
        struct vn_vq *vq = NULL;
        int r = VN_PUSH_NOBUF;
        /* the first enabled receive queue with a buffer (with MQ, one pair's ring may be full
         * while another's has room); if none has one, ask each for a kick and look once more:
         * buffers may have arrived between our look and the flag */
        for (int pass = 0; pass < 2 && r == VN_PUSH_NOBUF; pass++)
            for (unsigned qp = 0; qp < p->nqp && r == VN_PUSH_NOBUF; qp++) {
                struct vn_vq *c = &p->vq[2 * qp];
                if (!vn_vq_ready(p, c))
                    continue;
                if (pass)
                    vn_vq_notify_enable(p, c, 1);
                vq = c;
                r = vn_vq_push_rx(sw, p, c, &f->hdr, f->data, f->len, NULL);
            }
        if (r == VN_PUSH_NOBUF)
            return 0;     /* no enabled queue (vq NULL), or no buffer on any */
        if (r == VN_PUSH_OK) {
            count_rx(p, vq, f->len);
        } else if (r == VN_PUSH_TOOBIG) {
            p->st.drop_oversize++;
        } else {
            p->st.drop_broken++;
        }
        free(f);
        p->backlog[p->bl_head] = NULL;
        p->bl_head = (p->bl_head + 1) % VN_BACKLOG;
        p->bl_count--;
    }
    return 1;
}

static void deliver_final(struct vn_switch *sw, int port, struct vn_pkt *pkt);

/* Delivers to one port, adapting offloads to what that port negotiated. */
static void deliver(struct vn_switch *sw, int port, struct vn_pkt *pkt)
{
    struct vn_port *p = &sw->ports[port];
    uint8_t gso = pkt->hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
    int can_gso, can_csum;
    if (p->kind == VN_PORT_TAP) {
        can_gso = can_csum = p->tap_hdr_len != 0;
    } else {
        uint64_t f = p->features;   /* 0 for a sink: no offloads */
        can_csum = HAS_FEATURE(f, VIRTIO_NET_F_GUEST_CSUM);
        can_gso = can_csum &&
                  ((gso == VIRTIO_NET_HDR_GSO_TCPV4 && HAS_FEATURE(f, VIRTIO_NET_F_GUEST_TSO4)) ||
                   (gso == VIRTIO_NET_HDR_GSO_TCPV6 && HAS_FEATURE(f, VIRTIO_NET_F_GUEST_TSO6))) &&
                  (!(pkt->hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN) ||
                   HAS_FEATURE(f, VIRTIO_NET_F_GUEST_ECN));
    }
    if (gso != VIRTIO_NET_HDR_GSO_NONE && !can_gso) {
        vn_pkt_fill(pkt);
        if (vn_gso_segment(sw, port, pkt, deliver_final) < 0)
            p->st.drop_bad_offload++;
        else
            p->st.tso_segmented++;
        return;
    }
    if ((pkt->hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && !can_csum) {
        /* completing in place is right for every later receiver of this frame too */
        vn_pkt_fill(pkt);
        if (vn_csum_complete(pkt) < 0) {
            p->st.drop_bad_offload++;
            return;
        }
        p->st.csum_completed++;
    }
    deliver_final(sw, port, pkt);
}

/* Queues a frame delivered to a sink port for vn_sink_next(). */
static void sink_push(struct vn_switch *sw, struct vn_port *p, const struct vn_pkt *pkt)
{
    struct vn_sink_rec *r = NULL;
    if (sw->sink_count < VN_SINK_QUEUE)
        r = malloc(sizeof(*r) + pkt->len);
    if (!r) {
        p->st.drop_no_rx_buffer++;
        return;
    }
    r->next = NULL;
    r->port = p->id;
    r->len = pkt->len;
    memcpy(r->data, pkt->data, pkt->len);
    if (sw->sink_tail)
        sw->sink_tail->next = r;
    else
        sw->sink_head = r;
    sw->sink_tail = r;
    sw->sink_count++;
    p->st.out_frames++;
    p->st.out_bytes += pkt->len;
}

static void deliver_final(struct vn_switch *sw, int port, struct vn_pkt *pkt)
{
    struct vn_port *p = &sw->ports[port];
    if (p->kind != VN_PORT_VHOST)
        vn_pkt_fill(pkt);
    if (p->kind == VN_PORT_SINK) {
        if (p->sink_discard) {
            p->st.out_frames++;
            p->st.out_bytes += pkt->len;
            return;
        }
        sink_push(sw, p, pkt);
        return;
    }
    if (p->kind == VN_PORT_TAP) {
        ssize_t w;
        if (p->tap_hdr_len) {
            struct vn_net_hdr h = pkt->hdr;
            h.num_buffers = 0;
            struct iovec v[2] = {{&h, 12}, {pkt->data, pkt->len}};
            w = writev(p->tapfd, v, 2);
        } else {
            w = write(p->tapfd, pkt->data, pkt->len);
        }
        if (w < 0) {
            p->st.drop_tap_write++;
        } else {
            p->st.out_frames++;
            p->st.out_bytes += pkt->len;
        }
        return;
    }
    if (p->broken) {
        p->st.drop_broken++;
        return;
    }
    struct vn_vq *vq = rx_queue(p, pkt);
    if (!vq) {
        p->st.drop_link_down++;   /* driver not loaded yet, or the frontend is away */
        return;
    }
    /* Without GUEST_CSUM the device must set flags to zero (virtio 1.x 5.1.6.4.1): no
     * DATA_VALID from a completed checksum or a segment; the checksums are complete. */
    struct vn_net_hdr h = pkt->hdr;
    if (!HAS_FEATURE(p->features, VIRTIO_NET_F_GUEST_CSUM))
        memset(&h, 0, sizeof(h));
    if (p->bl_count == 0) {
        int r = vn_vq_push_rx(sw, p, vq, &h, pkt->data, pkt->len, pkt);
        if (r == VN_PUSH_OK) {
            count_rx(p, vq, pkt->len);
            return;
        }
        if (r == VN_PUSH_TOOBIG) {
            p->st.drop_oversize++;
            return;
        }
        if (r == VN_PUSH_BROKEN) {
            p->st.drop_broken++;
            return;
        }
        /* ask for a kick when buffers come, then look once more: buffers posted between
         * our look and the flag would otherwise wait for the next housekeeping pass (the
         * frame whole first: its tail is read once, whatever becomes of it) */
        vn_pkt_fill(pkt);
        vn_vq_notify_enable(p, vq, 1);
        r = vn_vq_push_rx(sw, p, vq, &h, pkt->data, pkt->len, NULL);
        if (r == VN_PUSH_OK) {
            count_rx(p, vq, pkt->len);
            return;
        }
        if (r != VN_PUSH_NOBUF) {
            if (r == VN_PUSH_TOOBIG)
                p->st.drop_oversize++;
            else
                p->st.drop_broken++;
            return;
        }
    }
    vn_pkt_fill(pkt);
    backlog_push(p, pkt, &h);
}

/* Egress: the destination NI's policy, then delivery. */
static void deliver_policy(struct vn_switch *sw, int port, struct vn_pkt *pkt)
{
    if (sw->ports[port].pol) {
        vn_pkt_fill(pkt);
        if (vn_policy_apply(sw, port, VN_DIR_TO_GUEST, port, pkt))
            return;
    }
    deliver(sw, port, pkt);
}

/* Switching proper: learn the source, find the destination (or flood), deliver. */
static void vn_forward_switch(struct vn_switch *sw, int in, struct vn_pkt *pkt)
{
    struct vn_port *src = &sw->ports[in];
    mac_learn(sw, pkt->data + 6, in);
    const uint8_t *dst = pkt->data;
    int out = (dst[0] & 1) ? -1 : mac_lookup(sw, dst);
    if (out == in) {
        src->st.drop_same_port++;   /* the destination sits behind the port it came from */
        return;
    }
    if (out >= 0 && sw->ports[out].kind) {
        deliver_policy(sw, out, pkt);
        return;
    }
    if (!(dst[0] & 1))
        src->st.unknown_unicast++;
    if (pkt->tail_len) {
        /* a tail is read once: only one receiver without a policy may take it straight */
        unsigned nd = 0;
        int pol = 0;
        for (unsigned k = 0; k < sw->nlive; k++) {
            int i = sw->live[k];
            if (i != in && sw->ports[i].kind) {
                nd++;
                pol |= sw->ports[i].pol != NULL;
            }
        }
        if (nd != 1 || pol)
            vn_pkt_fill(pkt);
    }
    /* every port gets the frame as it came: a port whose egress may edit it (its policy's
     * TCP engine rewrites the segments of an edited connection, a subscription completes a
     * checksum) gets its own copy */
    for (unsigned k = 0; k < sw->nlive; k++) {
        int i = sw->live[k];
        if (i == in || !sw->ports[i].kind)
            continue;
        if (sw->ports[i].pol) {
            struct vn_pkt *c = sw->flood;
            c->len = pkt->len;
            c->hdr = pkt->hdr;
            c->tail_len = 0;
            memcpy(c->data, pkt->data, pkt->len);
            deliver_policy(sw, i, c);
        } else {
            deliver_policy(sw, i, pkt);
        }
    }
}

/* A request to have a checksum completed (NEEDS_CSUM) names where the sum goes.  The switch
 * writes it late (for a receiver without GUEST_CSUM, in the TCP engine), after the policy has
 * read the frame: anywhere but the frame's own TCP or UDP checksum field a guest would pick the
 * 16 bits written (a port, an address, an ARP sender) past the checks they were made for.  A
 * request for that field stays a request; any other is completed here, before anything reads
 * the frame (the checks then see what receivers will), or refused (0) on a GSO frame, whose
 * segments need the transport's own sum. */
static int csum_request_ok(struct vn_pkt *pkt)
{
    struct vn_net_hdr *n = &pkt->hdr;
    if (!(n->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM))
        return 1;
    struct vn_hdrs h;
    vn_parse(pkt, &h);
    if (pkt->tail_len && (h.unparsed || !h.l4_known ||
                          (uint32_t)h.l4_off + 20 > pkt->len - pkt->tail_len)) {
        vn_pkt_fill(pkt);              /* headers past the copied head: read them for real */
        vn_parse(pkt, &h);
    }
    if (!h.unparsed && !h.frag && h.l4_known && n->csum_start == (uint32_t)h.l4_off &&
        ((h.proto == 6 && n->csum_offset == 16) || (h.proto == 17 && n->csum_offset == 6)))
        return 1;
    if ((n->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_NONE)
        return 0;
    vn_pkt_fill(pkt);
    return vn_csum_complete(pkt) == 0;
}

/* Ingress: validate, count, apply the source NI's policy, switch. */
static void forward(struct vn_switch *sw, int in, struct vn_pkt *pkt)
{
    struct vn_port *src = &sw->ports[in];
    if (pkt->len < 14) {
        src->st.drop_runt++;
        return;
    }
    if (vn_offload_check(pkt) < 0 || !csum_request_ok(pkt)) {
        src->st.drop_bad_offload++;
        return;
    }
    pkt->hdr.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM;   /* DATA_VALID is not a sender's claim */
    src->st.in_frames++;
    src->st.in_bytes += pkt->len;
    if (src->pol) {
        vn_pkt_fill(pkt);
        if (vn_policy_apply(sw, in, VN_DIR_FROM_GUEST, -1, pkt))
            return;
    }
    vn_forward_switch(sw, in, pkt);
}

/* Sends on what the policy and the TCP engines produced, oldest first, each frame through
 * the stages it has left, exactly those a frame made there went through when policy and
 * engine called the switch themselves: a reassembled datagram the whole policy of its NI, a
 * segment a stream released that NI's frame subscriptions, then the switch (and the
 * destination NI's policy, its to_guest stage) or, for a frame on its way to a guest, that
 * guest.  What they produce in turn joins the queue's end and goes in the same loop. */
static void emit_drain(struct vn_switch *sw)
{
    if (sw->draining)
        return;                    /* never: nothing below calls back into the switch */
    sw->draining = 1;
    struct vn_pkt *pkt = sw->rel;
    struct vn_emit_to m;
    unsigned n = 0;
    while (vn_emit_pop(&sw->emit, &m, pkt)) {
        if (!sw->ports[m.port].kind)
            continue;              /* its NI went, and with it where it was going */
        if (++n > VN_EMIT_DRAIN_MAX) {
            /* frames whose sending makes more frames (NIs answering each other's forged
             * segments) cannot keep the data plane here: the rest is dropped, counted */
            sw->ports[m.port].st.drop_emit_queue_full++;
            continue;
        }
        if ((n & 63) == 1)
            sw->now_ns = vn_clock(sw);     /* once a burst's worth of frames: a long drain
                                              (thousands) does not run on a stale clock */
        if (m.stage == VN_EMIT_POLICY) {
            if (vn_policy_apply(sw, m.port, m.dir, m.egress_to, pkt))
                continue;
        } else if (m.stage == VN_EMIT_SUBS) {
            struct vn_hdrs h;
            vn_parse(pkt, &h);
            h.flow_id = m.flow_id;
            h.flow_hash = m.flow_hash;
            h.flow_admitted = m.flow_admitted;
            if (vn_policy_subs(sw, m.port, m.dir, m.egress_to, pkt, &h))
                continue;
        }
        if (m.egress_to < 0)
            vn_forward_switch(sw, m.port, pkt);
        else if (sw->ports[m.egress_to].kind)
            deliver(sw, m.egress_to, pkt);
    }
    sw->draining = 0;
}

/* One frame into the switch from port `in`, and what its policy produced meanwhile. */
static inline void forward_drain(struct vn_switch *sw, int in, struct vn_pkt *pkt)
{
    forward(sw, in, pkt);
    if (sw->emit.count)
        emit_drain(sw);
}

static void vn_signal_all(struct vn_switch *sw)
{
    if (sw->ndirty)
        vn_chan_flush(sw);     /* scanner rings: one publication per burst */
    for (unsigned k = 0; k < sw->nlive; k++) {
        struct vn_port *p = &sw->ports[sw->live[k]];
        if (p->kind != VN_PORT_VHOST)
            continue;
        for (unsigned q = 0; q < 2 * p->nqp; q++) {
            struct vn_vq *vq = &p->vq[q];
            if (vq->call_pending && vq->used) {
                vn_vq_publish_used(p, vq);
                vn_vq_signal(p, vq);
            }
        }
    }
}

/* Forwards up to VN_BUDGET frames from a guest TX queue.  Returns frames forwarded; sets
 * vq->active when more may be waiting. */
static int service_tx(struct vn_switch *sw, int port, struct vn_vq *vq, int poll_mode)
{
    struct vn_port *p = &sw->ports[port];
    int done = 0, dropped = 0;
    struct vn_qcount *qs = &p->qst[vq - p->vq];
    /* polling or not, no kicks while we are on it (polling: never re-armed below) */
    vn_vq_notify_enable(p, vq, 0);
    /* frames may leave their tails in the guest's buffers (read once, straight into the
     * receiver's) when no policy of this NI looks at them first */
    int direct = p->pol == NULL;
    for (;;) {
        unsigned n = 0;
        int tails = 0;
        while (n < VN_BATCH && done + dropped + (int)n < VN_BUDGET) {
            int r = vn_vq_pop_tx(sw, p, vq, &sw->batch[n], direct);
            if (r == 1)
                tails |= sw->batch[n++].tail_len != 0;
            else if (r == 2)
                dropped++;
            else
                break;
        }
        /* return the TX buffers first, the guest may reuse them while we deliver; but
         * not those frames' tails are still in (vn_signal_all below returns them) */
        if (vq->call_pending && !tails) {
            vn_vq_publish_used(p, vq);
        }
        for (unsigned i = 0; i < n; i++) {
            qs->bytes += sw->batch[i].len;   /* before forward: it may segment in place */
            forward_drain(sw, port, &sw->batch[i]);
        }
        qs->frames += n;
        done += n;
        vn_signal_all(sw);
        if (p->broken) {
            vq->active = 0;
            return done;
        }
        if (done + dropped >= VN_BUDGET) {
            vq->active = 1;
            return done;
        }
        if (n == VN_BATCH)
            continue;
        if (poll_mode) {
            vq->active = 0;
            return done;
        }
        /* drained: re-arm kicks, then look once more for what raced with that */
        vn_vq_notify_enable(p, vq, 1);
        int more = vn_vq_avail_count(p, vq);
        if (more <= 0) {
            vq->active = 0;
            return done;
        }
        vn_vq_notify_enable(p, vq, 0);
    }
}

static int service_tap(struct vn_switch *sw, int port)
{
    struct vn_port *p = &sw->ports[port];
    int done = 0;
    while (done < VN_BUDGET) {
        unsigned n = 0;
        for (; n < VN_BATCH; n++) {
            struct vn_pkt *pkt = &sw->batch[n];
            ssize_t r;
            if (p->tap_hdr_len) {
                /* the TAP writes its virtio-net header, then the frame: one read, two pieces
                 * (not one read across both fields, which writes past the header's) */
                struct iovec iov[2] = {{&pkt->hdr, 12}, {pkt->data, VN_MAX_FRAME}};
                r = readv(p->tapfd, iov, 2);
                if (r >= 0 && r < 12) {
                    p->st.drop_runt++;
                    n--;
                    continue;
                }
                r -= 12;
            } else {
                memset(&pkt->hdr, 0, sizeof(pkt->hdr));
                r = read(p->tapfd, pkt->data, VN_MAX_FRAME);
            }
            if (r < 0)
                break;
            pkt->hdr.num_buffers = 0;
            pkt->len = (uint32_t)r;
            pkt->tail_len = 0;
        }
        for (unsigned i = 0; i < n; i++)
            forward_drain(sw, port, &sw->batch[i]);
        done += n;
        vn_signal_all(sw);
        if (n < VN_BATCH) {
            p->tap_readable = 0;
            return done;
        }
    }
    p->tap_readable = 1;
    return done;
}

/* One pass over everything marked active (or everything, polling).  Returns frames moved
 * and sets *busy when some source still has work. */
static int service_pass(struct vn_switch *sw, int poll_mode, int *busy)
{
    int total = 0;
    *busy = 0;
    sw->now_ns = vn_clock(sw);
    if (sw->nchans) {
        /* scanner rings: decisions and hold timeouts, before new frames come */
        if (vn_chan_service(sw) || sw->emit.count) {
            emit_drain(sw);
            vn_signal_all(sw);
        }
    }
    for (unsigned k = 0; k < sw->nlive; k++) {
        int i = sw->live[k];
        struct vn_port *p = &sw->ports[i];
        if (p->kind == VN_PORT_TAP) {
            if (p->tap_readable || poll_mode)
                total += service_tap(sw, i);
            *busy |= p->tap_readable;
            continue;
        }
        if (p->kind != VN_PORT_VHOST)
            continue;
        if (__builtin_expect(p->mem.faulted | p->log_faulted, 0) && !p->broken)
            vn_port_break(p, VN_BROKEN_MEM_GONE);
        if (p->bl_count) {
            backlog_flush(sw, p);
            vn_signal_all(sw);
        }
        for (unsigned q = 1; q < 2 * p->nqp; q += 2) {
            struct vn_vq *vq = &p->vq[q];
            if (!(vq->active || poll_mode) || !vn_vq_ready(p, vq))
                continue;
            if (poll_mode && !vq->active)
                p->st.kicks_suppressed++;
            total += service_tx(sw, i, vq, poll_mode);
            if (vq->kickfd < 0)
                vq->active = 1;   /* a frontend that will not kick asked to be polled */
            *busy |= vq->active;
        }
    }
    return total;
}

int vn_switch_service(struct vn_switch *sw)
{
    int busy;
    int n = service_pass(sw, 0, &busy);
    return n;
}

int vn_port_inject_from(struct vn_switch *sw, int port, const uint8_t *frame, unsigned len)
{
    if (!port_get(sw, port))
        return VN_ENOPORT;
    if (len < 14 || len > VN_MAX_FRAME)
        return VN_EINVAL;
    struct vn_pkt *pkt = sw->seg;
    memset(&pkt->hdr, 0, sizeof(pkt->hdr));
    memcpy(pkt->data, frame, len);
    pkt->len = len;
    sw->now_ns = vn_clock(sw);
    forward_drain(sw, port, pkt);
    vn_signal_all(sw);
    return VN_OK;
}

int vn_port_sink_discard(struct vn_switch *sw, int port, int on)
{
    struct vn_port *p = port_get(sw, port);
    if (!p || p->kind != VN_PORT_SINK)
        return VN_ENOPORT;
    p->sink_discard = on ? 1 : 0;
    return VN_OK;
}

int vn_port_inject_batch(struct vn_switch *sw, int port, const uint8_t *frames,
                         const uint32_t *lens, unsigned n)
{
    if (!port_get(sw, port))
        return VN_ENOPORT;
    struct vn_pkt *pkt = sw->seg;
    unsigned i;
    size_t off = 0;
    sw->now_ns = vn_clock(sw);
    for (i = 0; i < n; i++) {
        if (lens[i] < 14 || lens[i] > VN_MAX_FRAME)
            break;
        memset(&pkt->hdr, 0, sizeof(pkt->hdr));
        memcpy(pkt->data, frames + off, lens[i]);
        pkt->len = lens[i];
        off += lens[i];
        forward_drain(sw, port, pkt);
    }
    vn_signal_all(sw);
    return i == 0 && n ? VN_EINVAL : (int)i;
}

/* One read takes an eventfd's whole counter (the device checks at SET_VRING_KICK that the fd is
 * one, in counter mode: a semaphore one would give it back one by one).  0 if the fd is no
 * use: end of file, or an error other than "nothing to read". */
static int drain_eventfd(int fd)
{
    uint64_t v;
    ssize_t n = read(fd, &v, sizeof(v));
    if (n == (ssize_t)sizeof(v))
        return 1;
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 1;
    return 0;
}

/* A kick fd that can only wake the loop for nothing (at end of file, failing): out of the epoll
 * set, and the port broken until its frontend sets the ring up again. */
static void kick_fd_failed(struct vn_switch *sw, struct vn_port *p, struct vn_vq *vq)
{
    epoll_ctl(sw->epfd, EPOLL_CTL_DEL, vq->kickfd, NULL);
    close(vq->kickfd);
    vq->kickfd = -1;
    vn_port_break(p, VN_BROKEN_KICK_FD);
}

int vn_switch_run(struct vn_switch *sw, int timeout_ms, int poll_mode)
{
    uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : vn_now_ns() + (uint64_t)timeout_ms * 1000000ULL;
    struct epoll_event evs[64];
    int busy = 1, moved = 0;
    uint64_t last_wait = 0;
    for (;;) {
        int wait_ms;
        uint64_t t = vn_now_ns();
        if (t >= deadline)
            return VN_RUN_TIMEOUT;
        if (poll_mode && moved && t - last_wait < VN_POLL_EPOLL_NS) {
            /* polling and frames moving: every ring is serviced anyway, and what only epoll
             * tells (the wake fd, scanner kicks) waits a few microseconds, not a system
             * call per pass (an idle pass still makes it: a pause between looks at rings
             * the driver is writing) */
            moved = service_pass(sw, poll_mode, &busy);
            continue;
        }
        last_wait = t;
        if (busy || poll_mode)
            wait_ms = 0;
        else if (deadline == UINT64_MAX)
            wait_ms = -1;
        else
            wait_ms = (int)((deadline - t + 999999) / 1000000);
        if (wait_ms != 0 && sw->nchans) {
            /* scanner rings: a moment's look for decisions, else ask for a kick before
             * sleeping, and wake for hold timeouts */
            if (vn_chan_spin(sw) || vn_chan_arm(sw)) {
                wait_ms = 0;
            } else {
                uint64_t dl = vn_chan_deadline(sw), now = vn_clock(sw);
                if (dl != UINT64_MAX) {
                    uint64_t ms = dl > now ? (dl - now + 999999) / 1000000 : 0;
                    if (wait_ms < 0 || ms < (uint64_t)wait_ms)
                        wait_ms = (int)ms;
                }
            }
        }
        int n = epoll_wait(sw->epfd, evs, 64, wait_ms);
        if (n < 0 && errno != EINTR)
            return VN_ESYS;
        int woke = 0;
        for (int i = 0; i < n; i++) {
            uint64_t d = evs[i].data.u64;
            unsigned kind = (unsigned)(d >> 32), port = (d >> 8) & 0xff, q = d & 0xff;
            if (kind == EV_WAKE) {
                woke = 1;
            } else if (kind == EV_KICK && port < VN_MAX_PORTS && q < VN_MAX_QUEUES) {
                struct vn_port *p = &sw->ports[port];
                struct vn_vq *vq = &p->vq[q];
                if (vq->kickfd >= 0 && !drain_eventfd(vq->kickfd)) {
                    kick_fd_failed(sw, p, vq);
                    continue;
                }
                p->st.kicks++;
                vq->active = 1;
            } else if (kind == EV_TAP && port < VN_MAX_PORTS) {
                sw->ports[port].tap_readable = 1;
            } else if (kind == EV_CHAN && port < VN_MAX_PORTS && q < VN_CHANS) {
                vn_chan_kicked(sw, (int)port, (int)q);
            }
        }
        moved = service_pass(sw, poll_mode, &busy);
        if (woke)
            return VN_RUN_WAKE;
    }
}

int vn_switch_step(struct vn_switch *sw, int timeout_ms)
{
    struct epoll_event evs[64];
    if (timeout_ms != 0 && sw->nchans && (vn_chan_spin(sw) || vn_chan_arm(sw)))
        timeout_ms = 0;            /* a scanner's decisions wait already */
    int n = epoll_wait(sw->epfd, evs, 64, timeout_ms);
    if (n < 0 && errno != EINTR)
        return VN_ESYS;
    for (int i = 0; i < n; i++) {
        uint64_t d = evs[i].data.u64;
        unsigned kind = (unsigned)(d >> 32), port = (d >> 8) & 0xff, q = d & 0xff;
        if (kind == EV_KICK && port < VN_MAX_PORTS && q < VN_MAX_QUEUES) {
            struct vn_vq *vq = &sw->ports[port].vq[q];
            if (vq->kickfd >= 0 && !drain_eventfd(vq->kickfd)) {
                kick_fd_failed(sw, &sw->ports[port], vq);
                continue;
            }
            sw->ports[port].st.kicks++;
            vq->active = 1;
        } else if (kind == EV_TAP && port < VN_MAX_PORTS) {
            sw->ports[port].tap_readable = 1;
        } else if (kind == EV_CHAN && port < VN_MAX_PORTS && q < VN_CHANS) {
            vn_chan_kicked(sw, (int)port, (int)q);
        }
    }
    int busy;
    service_pass(sw, 0, &busy);
    return n < 0 ? 0 : n;
}

/* ---- calls from the NI kernel that send frames: each drains the emit queue, then
 * interrupts the guests once ---- */

static int drained(struct vn_switch *sw, int ret)
{
    emit_drain(sw);
    vn_signal_all(sw);
    return ret;
}

int vn_port_inject(struct vn_switch *sw, int port, int dir, const uint8_t *frame, unsigned len)
{
    if (!port_get(sw, port))
        return VN_ENOPORT;
    if (len < 14 || len > VN_MAX_FRAME || (dir != VN_DIR_FROM_GUEST && dir != VN_DIR_TO_GUEST))
        return VN_EINVAL;
    struct vn_pkt *pkt = sw->seg;
    memset(&pkt->hdr, 0, sizeof(pkt->hdr));
    memcpy(pkt->data, frame, len);
    pkt->len = len;
    sw->now_ns = vn_clock(sw);
    sw->ports[port].st.injected++;
    if (dir == VN_DIR_FROM_GUEST) {
        /* As if the guest had sent it: anti-spoofing, prevent rules, subscriptions, MAC learning
         * of the guest's own address only.  A registered frame in another host's name must not
         * leave this port, nor teach the switch that host lives here. */
        forward_drain(sw, port, pkt);
        vn_signal_all(sw);
        return VN_OK;
    }
    deliver(sw, port, pkt);
    return drained(sw, VN_OK);
}

int vn_held_release(struct vn_switch *sw, uint64_t id, int pass)
{
    return drained(sw, vn_policy_release(sw, id, pass));
}

int vn_held_release_port(struct vn_switch *sw, int port, int pass)
{
    return drained(sw, vn_policy_release_port(sw, port, pass));
}

int vn_stream_pass(struct vn_switch *sw, uint64_t stream, int dir, uint64_t upto)
{
    return drained(sw, vn_tcp_stream_pass(sw, stream, dir, upto));
}

int vn_stream_kill(struct vn_switch *sw, uint64_t stream)
{
    return drained(sw, vn_tcp_stream_kill(sw, stream));
}

int vn_stream_cut(struct vn_switch *sw, uint64_t stream, int dir, uint64_t from, uint64_t to)
{
    return drained(sw, vn_tcp_stream_cut(sw, stream, dir, from, to));
}

int vn_stream_inject(struct vn_switch *sw, uint64_t stream, int dir, uint64_t at,
                     const uint8_t *bytes, uint32_t len)
{
    return drained(sw, vn_tcp_stream_inject(sw, stream, dir, at, bytes, len));
}

int vn_stream_more(struct vn_switch *sw, uint64_t stream, int dir)
{
    return drained(sw, vn_tcp_stream_more(sw, stream, dir));
}

int vn_tcp_housekeeping(struct vn_switch *sw)
{
    sw->now_ns = vn_clock(sw);
    vn_chan_service(sw);
    return drained(sw, vn_tcp_timers(sw));
}

int vn_held_decide(struct vn_switch *sw, uint64_t id, int pass)
{
    return drained(sw, vn_held_settle(sw, id, VN_NEED_KERNEL, pass));
}

int vn_chan_close(struct vn_switch *sw, int port, int slot, int pass)
{
    return drained(sw, vn_chan_close_core(sw, port, slot, pass));
}

int vn_stream_ring_pass(struct vn_switch *sw, uint64_t stream, int port, int slot, int dir,
                        uint64_t upto)
{
    return drained(sw, vn_tcp_stream_ring_pass(sw, stream, port, slot, dir, upto));
}

int vn_chan_poll(struct vn_switch *sw)
{
    sw->now_ns = vn_clock(sw);
    return drained(sw, vn_chan_service(sw));
}
