/*
 * The flow stage: per NI, a bounded table of flows (SafeCard's flow statistics), for
 * aggregate detectors (scans, worms, SYN bombs) that should not need every packet.
 *
 * A flow is the 5-tuple as the guest sees it (family, protocol, guest address and port,
 * remote address and port; ICMP echo-like messages by identifier), both directions in one
 * entry.  vn_policy_apply hands every parsed frame of a port whose policy has `flows` set
 * to vn_flow_input; what it learns goes out as events (opened, state changed, closed,
 * periodic summaries) on a bounded queue the NI kernel drains with the punt queue.
 *
 * Bounds: at most flows_max flows per NI (past it, a new flow's packet is dropped and
 * counted, or let through untracked if the policy says flows_over = pass), at most
 * flow_events_max events queued per NI and VN_FLOW_QUEUE in all (past it, the event is
 * counted and lost: the data path never waits for the kernel).
 *
 * Expiry costs only what expires: every flow sits on one of a few lists, one per timeout
 * class, in the order its deadline falls (each list has one timeout, and a flow moves to
 * its list's tail whenever its deadline is renewed), so a tick looks only at list heads.
 * A TCP handshake's deadline runs from the SYN and is not renewed by retransmissions, so a
 * SYN nobody answers is reported unanswered after flow_tcp_syn_ms however often it is
 * retried.  Summaries are produced when a packet of a flow finds its last one older than
 * flow_summary_ms: no walk over the table.
 *
 * Every byte read from a frame goes through vn_get: an ICMP error's quoted header is the
 * sender's to forge, and may be cut anywhere.
 */
#include <stdlib.h>
#include "vn_internal.h"

/* timeout classes: one list each */
enum { FC_SYN, FC_LINGER, FC_TCP, FC_UDP, FC_OTHER, FC_N };

struct vn_fent {
    struct vn_fent *hnext;         /* hash chain */
    struct vn_fent *prev, *next;   /* its class list */
    uint64_t id;
    uint64_t deadline_from;        /* ns its class's timeout runs from */
    uint64_t start_ns, last_ns;    /* switch clock (monotonic or handed in) */
    uint64_t summary_ns;           /* last summary (or start) */
    uint64_t packets[2], bytes[2];
    uint32_t hash;
    unsigned state;
    uint8_t cls;
    uint8_t family, proto, initiator;
    uint8_t gaddr[16], raddr[16];
    uint16_t gport, rport;
    int16_t icmp_type, icmp_code;
    uint8_t icmp_from[16];
    int close_reason;              /* FC_LINGER: why it will close */
    uint8_t admitted;              /* VN_DIR_* bits: a frame of it left the NI that way */
};

struct vn_ftable {
    struct vn_fent **buckets;
    uint32_t mask;
    uint32_t seed;
    unsigned count;
    struct vn_fent head[FC_N];     /* sentinels of the class lists */
};

struct vn_flows {
    struct vn_ftable *t[VN_MAX_PORTS];
    unsigned queued[VN_MAX_PORTS]; /* events of each port waiting */
    struct vn_flow_event *q;       /* VN_FLOW_QUEUE */
    unsigned qhead, qcount;
    uint64_t next_id;
};

#define DEF_TCP_IDLE_MS 600000u
#define DEF_SYN_MS 3000u
#define DEF_UDP_IDLE_MS 60000u
#define DEF_OTHER_IDLE_MS 30000u
#define MAX_BUCKETS (1u << 20)

static uint64_t ms_or(uint32_t ms, uint32_t dflt)
{
    return (uint64_t)(ms ? ms : dflt) * 1000000ULL;
}

static uint64_t class_timeout(const struct vn_policy *pol, int cls)
{
    switch (cls) {
    case FC_SYN:
    case FC_LINGER: return ms_or(pol->flow_tcp_syn_ms, DEF_SYN_MS);
    case FC_TCP: return ms_or(pol->flow_tcp_idle_ms, DEF_TCP_IDLE_MS);
    case FC_UDP: return ms_or(pol->flow_udp_idle_ms, DEF_UDP_IDLE_MS);
    default: return ms_or(pol->flow_other_idle_ms, DEF_OTHER_IDLE_MS);
    }
}

/* ---- class lists ---- */

static void list_unlink(struct vn_fent *e)
{
    e->prev->next = e->next;
    e->next->prev = e->prev;
    e->prev = e->next = e;
}

/* Puts e at the tail of class `cls`, its deadline running from `from` (never earlier than
 * the tail's: the clock does not go back, so the list stays in deadline order). */
static void list_tail(struct vn_ftable *t, struct vn_fent *e, int cls, uint64_t from)
{
    struct vn_fent *h = &t->head[cls];
    if (e->next != e)
        list_unlink(e);
    e->cls = (uint8_t)cls;
    e->deadline_from = from;
    e->prev = h->prev;
    e->next = h;
    h->prev->next = e;
    h->prev = e;
}

/* ---- the table ---- */

static uint32_t key_hash(uint32_t seed, int family, int proto, const uint8_t *g, const uint8_t *r,
                         uint16_t gp, uint16_t rp)
{
    /* FNV-1a over the key, seeded per table: a guest cannot aim its flows at one chain
     * without knowing the seed, and a chain is walked only to its end anyway */
    uint32_t x = 2166136261u ^ seed;
    unsigned n = family == 4 ? 4 : 16;
    uint8_t hdr[6] = {(uint8_t)family, (uint8_t)proto, (uint8_t)(gp >> 8), (uint8_t)gp,
                      (uint8_t)(rp >> 8), (uint8_t)rp};
    for (unsigned i = 0; i < sizeof(hdr); i++)
        x = (x ^ hdr[i]) * 16777619u;
    for (unsigned i = 0; i < n; i++)
        x = (x ^ g[i]) * 16777619u;
    for (unsigned i = 0; i < n; i++)
        x = (x ^ r[i]) * 16777619u;
    return x ^ (x >> 15);
}

static struct vn_flows *stage(struct vn_switch *sw)
{
    if (!sw->flows) {
        struct vn_flows *f = calloc(1, sizeof(*f));
        if (!f)
            return NULL;
        f->q = calloc(VN_FLOW_QUEUE, sizeof(*f->q));
        if (!f->q) {
            free(f);
            return NULL;
        }
        sw->flows = f;
    }
    return sw->flows;
}

static struct vn_ftable *table_new(unsigned flows_max, uint64_t seed)
{
    struct vn_ftable *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    uint32_t nb = 1024;
    while (nb < flows_max && nb < MAX_BUCKETS)
        nb <<= 1;
    t->buckets = calloc(nb, sizeof(*t->buckets));
    if (!t->buckets) {
        free(t);
        return NULL;
    }
    t->mask = nb - 1;
    t->seed = (uint32_t)(seed ^ (seed >> 32) ^ (uintptr_t)t);
    for (int c = 0; c < FC_N; c++)
        t->head[c].prev = t->head[c].next = &t->head[c];
    return t;
}

static void table_free(struct vn_ftable *t)
{
    for (int c = 0; c < FC_N; c++) {
        struct vn_fent *h = &t->head[c];
        while (h->next != h) {
            struct vn_fent *e = h->next;
            list_unlink(e);
            free(e);
        }
    }
    free(t->buckets);
    free(t);
}

static struct vn_fent *lookup(struct vn_ftable *t, uint32_t hash, int family, int proto,
                              const uint8_t *g, const uint8_t *r, uint16_t gp, uint16_t rp)
{
    unsigned n = family == 4 ? 4 : 16;
    for (struct vn_fent *e = t->buckets[hash & t->mask]; e; e = e->hnext)
        if (e->hash == hash && e->family == family && e->proto == proto && e->gport == gp &&
            e->rport == rp && !memcmp(e->gaddr, g, n) && !memcmp(e->raddr, r, n))
            return e;
    return NULL;
}

static void unhash(struct vn_ftable *t, struct vn_fent *e)
{
    struct vn_fent **pp = &t->buckets[e->hash & t->mask];
    for (; *pp; pp = &(*pp)->hnext)
        if (*pp == e) {
            *pp = e->hnext;
            return;
        }
}

/* ---- events ---- */

static void emit(struct vn_switch *sw, int port, const struct vn_fent *e, int kind,
                 unsigned change, int reason)
{
    struct vn_port *p = &sw->ports[port];
    const struct vn_policy *pol = p->pol;
    struct vn_flows *f = sw->flows;
    if (!pol || !(pol->flow_events & (1u << kind)))
        return;
    unsigned cap = pol->flow_events_max ? pol->flow_events_max : 4096;
    if (f->qcount >= VN_FLOW_QUEUE || f->queued[port] >= cap) {
        p->st.flow_events_dropped++;
        return;
    }
    struct vn_flow_event *ev = &f->q[(f->qhead + f->qcount) % VN_FLOW_QUEUE];
    memset(ev, 0, sizeof(*ev));
    ev->flow = e->id;
    ev->port = port;
    ev->kind = kind;
    ev->change = change;
    ev->reason = reason;
    ev->state = e->state;
    ev->family = e->family;
    ev->proto = e->proto;
    ev->initiator = e->initiator;
    memcpy(ev->guest_addr, e->gaddr, 16);
    memcpy(ev->remote_addr, e->raddr, 16);
    ev->guest_port = e->gport;
    ev->remote_port = e->rport;
    for (int d = 0; d < 2; d++) {
        ev->packets[d] = e->packets[d];
        ev->bytes[d] = e->bytes[d];
    }
    /* Unix times from the switch's clock, read here rather than per packet: the flow
     * keeps monotonic times, shifted by the clocks' offset now (the same clock when a
     * time is handed in) */
    uint64_t real = vn_clock_real(sw), mono = vn_clock(sw);
    ev->start_ns = real - (mono > e->start_ns ? mono - e->start_ns : 0);
    ev->last_ns = real - (mono > e->last_ns ? mono - e->last_ns : 0);
    ev->time_ns = real;
    ev->icmp_type = e->icmp_type;
    ev->icmp_code = e->icmp_code;
    memcpy(ev->icmp_from, e->icmp_from, 16);
    if (f->qcount++ == 0)
        vn_punt_signal(sw);
    f->queued[port]++;
    p->st.flow_events++;
}

static void set_state(struct vn_switch *sw, int port, struct vn_fent *e, unsigned bit, int report)
{
    if (e->state & bit)
        return;
    e->state |= bit;
    if (report)
        emit(sw, port, e, VN_FLOW_EV_STATE, bit, 0);
}

static void close_flow(struct vn_switch *sw, int port, struct vn_ftable *t, struct vn_fent *e,
                       int reason)
{
    emit(sw, port, e, VN_FLOW_EV_CLOSE, 0, reason);
    unhash(t, e);
    list_unlink(e);
    free(e);
    t->count--;
    sw->ports[port].st.flows_active = t->count;
    sw->ports[port].st.flows_closed++;
}

/* ---- what a frame says ---- */

/* ICMP messages with an identifier at offset 4 that a reply echoes: (v4) echo, timestamp,
 * information and address mask requests and replies; (v6) echo.  1 request, 2 reply. */
static int icmp_echo_like(int proto, int type)
{
    if (proto == 1) {
        if (type == 8 || type == 13 || type == 15 || type == 17)
            return 1;
        if (type == 0 || type == 14 || type == 16 || type == 18)
            return 2;
        return 0;
    }
    if (type == 128)
        return 1;
    return type == 129 ? 2 : 0;
}

static int icmp_error(int proto, int type)
{
    if (proto == 1)
        return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
    return type >= 1 && type <= 4;
}

struct fkey {
    int family, proto;
    const uint8_t *g, *r;
    uint16_t gp, rp;
};

/* The packet quoted by an ICMP error at `off` (its IP header) in d[0..end): its key, as
 * the guest sees that flow (`quoted_from_guest`: the guest sent the quoted packet).
 * 0 on success, -1 if the quote is cut, malformed, a later fragment, or of no flow. */
static int quoted_key(const uint8_t *d, uint32_t end, uint32_t off, int family,
                      int quoted_from_guest, struct fkey *k)
{
    const uint8_t *ip, *src, *dst;
    uint32_t l4;
    int proto;
    if (family == 4) {
        if (!(ip = vn_get(d, end, off, 20)) || (ip[0] >> 4) != 4 || (ip[0] & 15) < 5)
            return -1;
        uint32_t ihl = (ip[0] & 15) * 4u;
        if (!vn_get(d, end, off, ihl))
            return -1;
        if (vn_rd16(ip + 6) & 0x1fff)
            return -1;         /* a later fragment: no transport header to key by */
        proto = ip[9];
        src = ip + 12;
        dst = ip + 16;
        l4 = off + ihl;
    } else {
        if (!(ip = vn_get(d, end, off, 40)) || (ip[0] >> 4) != 6)
            return -1;
        proto = ip[6];
        src = ip + 8;
        dst = ip + 24;
        l4 = off + 40;
        /* extension headers, a few and bounded: hop-by-hop, routing, destination options,
         * fragment (first only) */
        for (int i = 0; i < 8 && (proto == 0 || proto == 43 || proto == 60 || proto == 44); i++) {
            const uint8_t *x = vn_get(d, end, l4, 8);
            if (!x)
                return -1;
            if (proto == 44) {
                if (vn_rd16(x + 2) & 0xfff8)
                    return -1;
                proto = x[0];
                l4 += 8;
            } else {
                proto = x[0];
                l4 += (x[1] + 1u) * 8u;
            }
        }
        if (proto == 0 || proto == 43 || proto == 60 || proto == 44)
            return -1;
    }
    const uint8_t *t = vn_get(d, end, l4, proto == 1 || proto == 58 ? 8 : 4);
    uint16_t sp = 0, dp = 0;
    if (proto == 6 || proto == 17 || proto == 132) {
        if (!t)
            return -1;         /* RFC 792 quotes 8 bytes: the ports must be there */
        sp = vn_rd16(t);
        dp = vn_rd16(t + 2);
    } else if (proto == 1 || proto == 58) {
        if (!t || icmp_echo_like(proto, t[0]) != 1)
            return -1;         /* an error about an error, or about no echo request */
        sp = dp = vn_rd16(t + 4);
    }
    k->family = family;
    k->proto = proto;
    k->g = quoted_from_guest ? src : dst;
    k->r = quoted_from_guest ? dst : src;
    k->gp = quoted_from_guest ? sp : dp;
    k->rp = quoted_from_guest ? dp : sp;
    return 0;
}

static void on_icmp_error(struct vn_switch *sw, int port, int dir, struct vn_ftable *t,
                          const struct vn_pkt *pkt, const struct vn_hdrs *h)
{
    struct vn_port *p = &sw->ports[port];
    struct fkey k;
    /* an error coming to the guest quotes a packet the guest sent, and v.v. */
    if (h->frag_later || h->l4_off <= 0 ||
        quoted_key(pkt->data, h->ip_end, (uint32_t)h->l4_off + 8, h->family,
                   dir == VN_DIR_TO_GUEST, &k) < 0) {
        p->st.flow_icmp_unmatched++;
        return;
    }
    uint32_t hash = key_hash(t->seed, k.family, k.proto, k.g, k.r, k.gp, k.rp);
    struct vn_fent *e = lookup(t, hash, k.family, k.proto, k.g, k.r, k.gp, k.rp);
    if (!e) {
        p->st.flow_icmp_unmatched++;
        return;
    }
    p->st.flow_icmp_errors++;
    e->icmp_type = (int16_t)h->icmp_type;
    e->icmp_code = (int16_t)h->icmp_code;
    memset(e->icmp_from, 0, 16);
    memcpy(e->icmp_from, h->src, h->family == 4 ? 4 : 16);
    set_state(sw, port, e, VN_FLOW_ICMP_ERROR, 1);
}

/* The TCP handshake as the flow sees it (both directions through this one NI). */
static void tcp_track(struct vn_switch *sw, int port, struct vn_ftable *t, struct vn_fent *e,
                      int fwd, uint8_t flags, uint64_t now)
{
    if (flags & 0x04) {                                   /* RST */
        set_state(sw, port, e, VN_FLOW_RESET, 1);
        e->close_reason = VN_FLOW_END_RESET;
        list_tail(t, e, FC_LINGER, now);
        return;
    }
    if ((flags & 0x12) == 0x02 && fwd) {                  /* SYN */
        e->state |= VN_FLOW_SYN;
    } else if ((flags & 0x12) == 0x12 && !fwd && (e->state & VN_FLOW_SYN)) {
        e->state |= VN_FLOW_ANSWERED;
        set_state(sw, port, e, VN_FLOW_SYNACK, 1);
    } else if ((flags & 0x12) == 0x10 && fwd && (e->state & VN_FLOW_SYNACK) &&
               !(e->state & VN_FLOW_ESTABLISHED)) {
        set_state(sw, port, e, VN_FLOW_ESTABLISHED, 1);
        list_tail(t, e, FC_TCP, now);
    }
    if (flags & 0x01) {                                   /* FIN */
        e->state |= fwd ? VN_FLOW_FIN_INIT : VN_FLOW_FIN_RESP;
        if ((e->state & (VN_FLOW_FIN_INIT | VN_FLOW_FIN_RESP)) ==
            (VN_FLOW_FIN_INIT | VN_FLOW_FIN_RESP) && !(e->state & VN_FLOW_RESET)) {
            e->close_reason = VN_FLOW_END_FIN;
            list_tail(t, e, FC_LINGER, now);
        }
    }
}

int vn_flow_input(struct vn_switch *sw, int port, int dir, const struct vn_pkt *pkt,
                  struct vn_hdrs *h)
{
    struct vn_port *p = &sw->ports[port];
    const struct vn_policy *pol = p->pol;
    if (!pol || !pol->flows || (h->family != 4 && h->family != 6))
        return 0;
    struct vn_flows *f = stage(sw);
    struct vn_ftable *t = f ? f->t[port] : NULL;
    uint64_t now = sw->now_ns ? sw->now_ns : vn_clock(sw);
    if (f && !t)
        t = f->t[port] = table_new(pol->flows_max, now);
    if (!t) {
        /* no memory for the stage itself: as a full table */
        p->st.flows_over++;
        return pol->flows_over_pass ? 0 : 1;
    }
    int proto = h->proto;
    if (proto < 0)
        return 0;
    if ((proto == 1 && h->family == 4) || (proto == 58 && h->family == 6)) {
        if (h->icmp_type >= 0 && icmp_error(proto, h->icmp_type)) {
            on_icmp_error(sw, port, dir, t, pkt, h);
            return 0;
        }
    }
    struct fkey k = {h->family, proto, NULL, NULL, 0, 0};
    int from = dir == VN_DIR_FROM_GUEST;
    k.g = from ? h->src : h->dst;
    k.r = from ? h->dst : h->src;
    if (proto == 1 || proto == 58) {
        /* echo-like messages by identifier; a later fragment has no header to read it in */
        const uint8_t *ic = h->frag_later || h->l4_off <= 0 ? NULL
                            : vn_get(pkt->data, h->ip_end, (uint32_t)h->l4_off, 8);
        if (!ic || (proto == 1) != (h->family == 4) || !icmp_echo_like(proto, ic[0])) {
            p->st.flow_unattributed++;
            return 0;
        }
        k.gp = k.rp = vn_rd16(ic + 4);
    } else if (proto == 6 || proto == 17 || proto == 132) {
        if (!h->l4_known) {
            p->st.flow_unattributed++;
            return 0;
        }
        k.gp = from ? h->sport : h->dport;
        k.rp = from ? h->dport : h->sport;
    }
    uint32_t hash = key_hash(t->seed, k.family, k.proto, k.g, k.r, k.gp, k.rp);
    struct vn_fent *e = lookup(t, hash, k.family, k.proto, k.g, k.r, k.gp, k.rp);
    int d = from ? 0 : 1;
    int opened = 0;
    if (!e) {
        if (t->count >= pol->flows_max) {
            p->st.flows_over++;
            return pol->flows_over_pass ? 0 : 1;
        }
        e = calloc(1, sizeof(*e));
        if (!e) {
            p->st.flows_over++;
            return pol->flows_over_pass ? 0 : 1;
        }
        e->id = ++f->next_id;
        e->hash = hash;
        e->family = (uint8_t)k.family;
        e->proto = (uint8_t)k.proto;
        e->initiator = (uint8_t)dir;
        memcpy(e->gaddr, k.g, k.family == 4 ? 4 : 16);
        memcpy(e->raddr, k.r, k.family == 4 ? 4 : 16);
        e->gport = k.gp;
        e->rport = k.rp;
        e->icmp_type = e->icmp_code = -1;
        e->start_ns = e->summary_ns = now;
        e->prev = e->next = e;
        e->hnext = t->buckets[hash & t->mask];
        t->buckets[hash & t->mask] = e;
        t->count++;
        p->st.flows_active = t->count;
        p->st.flows_opened++;
        opened = 1;
        int cls = FC_OTHER;
        if (proto == 6) {
            /* a handshake waits for its answer from the SYN; anything else is picked up
             * mid-stream (a later fragment's flags are its first fragment's: no SYN) */
            if (!h->l4_from_first && (h->tcp_flags & 0x16) == 0x02)
                cls = FC_SYN;
            else {
                e->state |= VN_FLOW_MIDSTREAM;
                cls = FC_TCP;
            }
        } else if (proto == 17) {
            cls = FC_UDP;
        }
        list_tail(t, e, cls, now);
    }
    /* for subscriptions to flow-opening frames (vn_match.flow_new) */
    h->flow_id = e->id;
    h->flow_hash = e->hash;
    h->flow_admitted = (e->admitted & dir) != 0;
    e->packets[d]++;
    if (h->ip_end > (uint32_t)h->l3_off)
        e->bytes[d] += h->ip_end - (uint32_t)h->l3_off;
    e->last_ns = now;
    int fwd = dir == e->initiator;
    if (opened) {
        if (proto == 6 && !h->l4_from_first && (h->tcp_flags & 0x12) == 0x02)
            e->state |= VN_FLOW_SYN;
        emit(sw, port, e, VN_FLOW_EV_OPEN, 0, 0);
    }
    if (proto == 6 && !h->l4_from_first) {
        if (!opened || (h->tcp_flags & 0x05))
            tcp_track(sw, port, t, e, fwd, h->tcp_flags, now);
    } else if (proto != 6 && !fwd) {
        set_state(sw, port, e, VN_FLOW_ANSWERED, 1);
    }
    if (proto == 6 && !fwd)
        e->state |= VN_FLOW_ANSWERED;
    /* renew the idle deadline (a handshake's runs from its SYN, a lingering flow's from
     * the RST or last FIN) */
    if (e->cls != FC_SYN && e->cls != FC_LINGER)
        list_tail(t, e, e->cls, now);
    uint64_t every = (uint64_t)pol->flow_summary_ms * 1000000ULL;
    if (every && now - e->summary_ns >= every) {
        e->summary_ns = now;
        emit(sw, port, e, VN_FLOW_EV_SUMMARY, 0, 0);
    }
    return 0;
}

void vn_flow_admit(struct vn_switch *sw, int port, int dir, uint64_t id, uint32_t hash)
{
    struct vn_ftable *t;
    if (!id || !sw->flows || port < 0 || port >= VN_MAX_PORTS || !(t = sw->flows->t[port]))
        return;
    /* by id, not by pointer: the flow may have expired (and its memory gone) while the
     * frame waited for its scanners */
    for (struct vn_fent *e = t->buckets[hash & t->mask]; e; e = e->hnext)
        if (e->id == id) {
            e->admitted |= (uint8_t)(dir & (VN_DIR_FROM_GUEST | VN_DIR_TO_GUEST));
            return;
        }
}

/* ---- the kernel's side ---- */

int vn_flow_pending(struct vn_switch *sw)
{
    return sw->flows && sw->flows->qcount;
}

int vn_flow_next(struct vn_switch *sw, struct vn_flow_event *ev)
{
    struct vn_flows *f = sw->flows;
    while (f && f->qcount) {
        *ev = f->q[f->qhead];
        f->qhead = (f->qhead + 1) % VN_FLOW_QUEUE;
        f->qcount--;
        if (ev->port < 0)
            continue;          /* its port went away before the kernel saw it */
        if (ev->port < VN_MAX_PORTS && f->queued[ev->port])
            f->queued[ev->port]--;
        return 1;
    }
    return 0;
}

/* Expires the heads of one table's class lists; returns flows closed. */
static int expire(struct vn_switch *sw, int port, struct vn_ftable *t, uint64_t now)
{
    const struct vn_policy *pol = sw->ports[port].pol;
    int n = 0;
    for (int c = 0; c < FC_N; c++) {
        uint64_t to = class_timeout(pol, c);
        struct vn_fent *h = &t->head[c];
        while (h->next != h) {
            struct vn_fent *e = h->next;
            if (now < e->deadline_from || now - e->deadline_from < to)
                break;
            if (c == FC_SYN) {
                /* the handshake's time is up: unanswered (no SYN-ACK) or never completed;
                 * it lingers a while so retransmissions still find it */
                set_state(sw, port, e, e->state & VN_FLOW_SYNACK ? VN_FLOW_INCOMPLETE
                                                                 : VN_FLOW_UNANSWERED, 1);
                e->close_reason = VN_FLOW_END_UNANSWERED;
                list_tail(t, e, FC_LINGER, now);
                continue;
            }
            close_flow(sw, port, t, e, c == FC_LINGER ? e->close_reason : VN_FLOW_END_IDLE);
            n++;
        }
    }
    return n;
}

int vn_flow_housekeeping(struct vn_switch *sw)
{
    struct vn_flows *f = sw->flows;
    if (!f)
        return 0;
    uint64_t now = vn_clock(sw);
    int n = 0;
    for (int i = 0; i < VN_MAX_PORTS; i++) {
        struct vn_ftable *t = f->t[i];
        if (!t)
            continue;
        struct vn_port *p = &sw->ports[i];
        if (!p->kind || !p->pol || !p->pol->flows) {
            vn_flow_port_gone(sw, i);   /* the stage was turned off: nobody reads them */
            continue;
        }
        n += expire(sw, i, t, now);
    }
    return n;
}

int vn_flow_count(struct vn_switch *sw, int port)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind)
        return VN_ENOPORT;
    return sw->flows && sw->flows->t[port] ? (int)sw->flows->t[port]->count : 0;
}

void vn_flow_port_gone(struct vn_switch *sw, int port)
{
    struct vn_flows *f = sw->flows;
    if (!f || port < 0 || port >= VN_MAX_PORTS)
        return;
    /* events still queued must not reach whoever gets this port index next */
    if (f->queued[port]) {
        for (unsigned i = 0; i < f->qcount; i++) {
            struct vn_flow_event *ev = &f->q[(f->qhead + i) % VN_FLOW_QUEUE];
            if (ev->port == port)
                ev->port = -1;
        }
        f->queued[port] = 0;
    }
    if (!f->t[port])
        return;
    sw->ports[port].st.flows_closed += f->t[port]->count;
    sw->ports[port].st.flows_active = 0;
    table_free(f->t[port]);
    f->t[port] = NULL;
}

void vn_flow_free_all(struct vn_switch *sw)
{
    struct vn_flows *f = sw->flows;
    if (!f)
        return;
    for (int i = 0; i < VN_MAX_PORTS; i++)
        if (f->t[i])
            table_free(f->t[i]);
    free(f->q);
    free(f);
    sw->flows = NULL;
}
