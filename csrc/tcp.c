/*
 * TCP stream reconstruction for stream subscriptions (Siphon 3.2/4.3, SafeCard 3.1).
 *
 * Each NI (port) with stream subscriptions keeps a bounded flow table.  A flow shadows both
 * endpoints of one connection on a subscribed server port: the ISN each side chose (from
 * the handshake), how far the receiver acknowledged and the right edge of its window (from
 * its ACKs and window scale), FIN and RST.  Every data segment of a direction that a
 * scanner reads is kept as a held-frame record (struct vn_held, the frame as it arrived:
 * one copy out of the ring batch, none after) and the direction keeps a sorted list of
 * references to the payload inside those records: zero-copy reassembly.  The NI kernel
 * reads the in-order, contiguous bytes through pointers into the records
 * (vn_stream_read), and a direction held for contain scanners sends a segment on only
 * once every byte of it was passed (vn_stream_pass).
 *
 * Conservative rules, so that scanners see exactly the bytes the receiver will:
 *  - the first copy of a byte wins: a segment whose bytes differ from a copy seen before
 *    (held, or sent on and not yet acknowledged by the receiver) is dropped, in either
 *    order; identical retransmissions pass (or wait for the held copy);
 *  - records stay until the receiver acknowledges them, so a later, different copy of
 *    bytes the receiver may have missed is still recognised;
 *  - gaps are never bridged: out-of-order segments wait (within tcp_depth_max);
 *  - bad IPv4 header or TCP checksums, data beyond the receiver's window, data beyond a
 *    FIN, data on SYN, SYN-ACK or RST, RSTs outside the window, and ACKs of unsent data
 *    (the receiver discards such a segment whole) are dropped;
 *  - the urgent flag and pointer are cleared (checksum fixed): the receiver keeps the
 *    urgent byte in the stream, where the scanners saw it;
 *  - with timestamps on, segments older than the sender's last in-order one are dropped
 *    (PAWS, as the receiver does);
 *  - IP fragments of TCP are reassembled first (overlapping ones dropped, see frag_input);
 *  - data on a subscribed port of no tracked connection (established before the
 *    subscription or a restart of the NI, forgotten, over the flow limit) gets the
 *    policy's midstream exception policy (VN_MIDSTREAM_*): dropped, reset both ways (forged
 *    RSTs each end accepts, so applications learn at once instead of hanging), passed
 *    uninspected, or adopted (inspected from the byte each receiver says it expects next,
 *    see adopt_probe); nothing reaches a receiver as if a scanner had seen it.
 * Every limit (flows, bytes kept, out-of-order depth) has an exception policy: drop (fail
 * closed, the default) or pass (the connection goes on uninspected: "bypass").
 *
 * Editing (vn_stream_cut, vn_stream_inject): a held direction keeps its edits in stream
 * order and maps sender offsets to what the receiver sees (out_pos) and the receiver's
 * acknowledgements back (orig_ack).  Once a direction was edited, every frame of the
 * connection is rewritten on its way (sequence and acknowledgement numbers, SACK blocks,
 * windows); records an edit falls into are sent as pieces; injected bytes go as segments
 * of the NI's own, resent until acknowledged; cut bytes are acknowledged to the sender by
 * the NI.  `more` (vn_stream_more) has the NI acknowledge held bytes on the receiver's
 * behalf; it then resends them to the receiver itself until acknowledged.
 *
 * The signature stage (sigstage.c) is a holder like a contain scanner: connections its stream
 * rules' ports fit are tracked even without a subscription, the new in-order bytes are scanned
 * as soon as they are contiguous (seg_data), and a record goes on only below both frontiers,
 * the scanners' (`passed`) and the stage's (`sig_ok`).  A connection a rule stopped drops every
 * later frame (sig_flow_blocked).
 *
 * The engine never sends a frame itself: what it releases, rebuilds, reassembles or forges
 * goes into the switch's emit queue (send_built, forge_seg, frag_input, and seg_data's
 * segment that only the signature stage held, which goes on as the frame itself), which the switch
 * drains once the engine has returned.  A released frame meets the destination NI's policy
 * and engine then, never from inside this one's: nothing nests, one scratch frame suffices.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mman.h>
#include "tcp_internal.h"

/* ---- tables ---- */

static struct vn_tcp *tcp_get(struct vn_switch *sw)
{
    if (sw->tcp)
        return sw->tcp;
    struct vn_tcp *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    void *b = mmap(NULL, sizeof(struct vn_pkt), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED) {
        free(t);
        return NULL;
    }
    t->scratch = b;
    t->seg_blocks.max_bytes = VN_SEG_CACHE_BYTES;
    sw->tcp = t;
    return t;
}

struct vn_tcp_port *tport(struct vn_switch *sw, int port, int create)
{
    struct vn_tcp *t = create ? tcp_get(sw) : sw->tcp;
    if (!t)
        return NULL;
    if (!t->ports[port] && create)
        t->ports[port] = calloc(1, sizeof(struct vn_tcp_port));
    return t->ports[port];
}

static unsigned flow_hash(int family, const uint8_t *ga, const uint8_t *ra, uint16_t gp, uint16_t rp)
{
    uint32_t h = 2166136261u;
    unsigned n = family == 4 ? 4 : 16;
    for (unsigned i = 0; i < n; i++)
        h = (h ^ ga[i]) * 16777619u;
    for (unsigned i = 0; i < n; i++)
        h = (h ^ ra[i]) * 16777619u;
    h = (h ^ gp) * 16777619u;
    h = (h ^ rp) * 16777619u;
    return h & (VN_TCP_HASH - 1);
}

static struct vn_flow *flow_find(struct vn_tcp_port *tp, int family, const uint8_t *ga,
                                 const uint8_t *ra, uint16_t gp, uint16_t rp)
{
    if (!tp)
        return NULL;
    unsigned n = family == 4 ? 4 : 16;
    for (struct vn_flow *f = tp->buckets[flow_hash(family, ga, ra, gp, rp)]; f; f = f->next)
        if (f->family == family && f->gport == gp && f->rport == rp && !memcmp(f->gaddr, ga, n) &&
            !memcmp(f->raddr, ra, n))
            return f;
    return NULL;
}

struct vn_flow *flow_by_id(struct vn_switch *sw, uint64_t id)
{
    if (!sw->tcp)
        return NULL;
    for (struct vn_flow *f = sw->tcp->ids[id % VN_TCP_ID_HASH]; f; f = f->id_next)
        if (f->id == id)
            return f;
    return NULL;
}

static void table_unlink(struct vn_switch *sw, struct vn_flow *f)
{
    if (!f->in_table)
        return;
    struct vn_tcp_port *tp = sw->tcp->ports[f->port];
    struct vn_flow **pp = &tp->buckets[flow_hash(f->family, f->gaddr, f->raddr, f->gport, f->rport)];
    for (; *pp; pp = &(*pp)->next)
        if (*pp == f) {
            *pp = f->next;
            break;
        }
    f->in_table = 0;
    tp->nflows--;
}

static void mark_dirty(struct vn_switch *sw, struct vn_flow *f)
{
    struct vn_tcp *t = sw->tcp;
    if (f->dirty || !f->announced)
        return;
    f->dirty = 1;
    f->dirty_next = NULL;
    if (t->dirty_tail)
        t->dirty_tail->dirty_next = f;
    else
        t->dirty_head = f;
    t->dirty_tail = f;
    vn_punt_signal(sw);
}

/* ---- segments ---- */

static void seg_free(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf, struct vn_seg *s)
{
    if (hf->adv == s)
        hf->adv = NULL;
    if (s->prev)
        s->prev->next = s->next;
    else
        hf->head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    else
        hf->tail = s->prev;
    struct vn_tcp_port *tp = sw->tcp->ports[f->port];
    if (tp)
        tp->bytes -= s->rec->len;
    vn_blk_put(&sw->tcp->seg_blocks, s, seg_size(s->rec->len));
}

/* A new segment block holding a copy of the frame (see seg_blocks); NULL if out of memory. */
static struct vn_seg *seg_new(struct vn_switch *sw, const struct vn_pkt *pkt, int port, int dir,
                              int egress_to)
{
    struct vn_seg *s = vn_blk_get(&sw->tcp->seg_blocks, seg_size(pkt->len));
    if (!s)
        return NULL;
    memset(s, 0, sizeof(*s));
    s->rec = (struct vn_held *)(s + 1);
    vn_held_init(s->rec, pkt, port, dir, egress_to, 0, 0, 0);
    return s;
}

/* Frees the records the receiver acknowledged and the kernel read (oldest first). */
void half_trim(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
{
    while (hf->head) {
        struct vn_seg *s = hf->head;
        uint64_t end = seg_end(s) + s->fin;
        if (!s->released || end > hf->acked || (hf->read && seg_end(s) > hf->consumed))
            break;
        seg_free(sw, f, hf, s);
    }
}

/* Drops every record not yet sent on (a reset or killed connection's held data). */
static void half_drop_held(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
{
    for (struct vn_seg *s = hf->head, *n; s; s = n) {
        n = s->next;
        if (!s->released)
            seg_free(sw, f, hf, s);
    }
    hf->ooo = 0;
}

void half_free_all(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
{
    while (hf->head)
        seg_free(sw, f, hf, hf->head);
}

/* Advances contig over the records that join up (one pass in start order, from the
 * record that last moved it); recounts the out-of-order bytes, which are then exactly the
 * records starting beyond contig: a suffix of the list. */
static int half_advance(struct vn_half *hf)
{
    uint64_t before = hf->contig;
    for (struct vn_seg *s = hf->adv ? hf->adv : hf->head; s && s->start <= hf->contig; s = s->next) {
        if (seg_end(s) > hf->contig) {
            hf->contig = seg_end(s);
            hf->adv = s;
        }
    }
    hf->ooo = 0;
    for (struct vn_seg *s = hf->tail; s && seg_end(s) > hf->contig; s = s->prev)
        hf->ooo += seg_end(s) - (s->start > hf->contig ? s->start : hf->contig);
    int eof = hf->fin && hf->contig == hf->fin_off && !hf->eof;
    if (eof)
        hf->eof = 1;
    return hf->contig != before || eof;
}

/* ---- life and death of flows ---- */

void flow_close(struct vn_switch *sw, struct vn_flow *f, int reason)
{
    if (f->state == ST_CLOSED)
        return;
    f->state = ST_CLOSED;
    f->reason = reason;
    sring_close(sw, f, reason);    /* VN_CLOSE_* and VNR_CLOSE_* agree */
    table_unlink(sw, f);
    if (reason != VN_CLOSE_FIN)
        for (int i = 0; i < 2; i++)
            half_drop_held(sw, f, &f->half[i]);
    if (f->announced) {
        f->report_close = 1;
        mark_dirty(sw, f);
    }
}

void flow_free(struct vn_switch *sw, struct vn_flow *f)
{
    struct vn_tcp *t = sw->tcp;
    table_unlink(sw, f);
    sring_close(sw, f, VN_CLOSE_GONE);
    for (int i = 0; i < 2; i++) {
        half_free_all(sw, f, &f->half[i]);
        edits_free(sw, f, &f->half[i]);
    }
    sig_flow_free(sw, f);
    struct vn_flow **pp = &t->ids[f->id % VN_TCP_ID_HASH];
    for (; *pp; pp = &(*pp)->id_next)
        if (*pp == f) {
            *pp = f->id_next;
            break;
        }
    if (f->dirty) {                /* unlink from the dirty list */
        struct vn_flow *prev = NULL;
        for (struct vn_flow *x = t->dirty_head; x; prev = x, x = x->dirty_next)
            if (x == f) {
                if (prev)
                    prev->dirty_next = f->dirty_next;
                else
                    t->dirty_head = f->dirty_next;
                if (t->dirty_tail == f)
                    t->dirty_tail = prev;
                break;
            }
    }
    free(f);
}

/* A flow that stays announced is closed and waits for its report; the rest go at once. */
static void flow_end(struct vn_switch *sw, struct vn_flow *f, int reason)
{
    flow_close(sw, f, reason);
    if (!f->announced)
        flow_free(sw, f);
}

/* Gives up inspecting a connection (an exception policy said pass): what is held goes on
 * in order, the scanners hear it closed, later frames pass untouched. */
static void flow_bypass(struct vn_switch *sw, struct vn_flow *f)
{
    sw->ports[f->port].st.tcp_bypassed++;
    sring_close(sw, f, VN_CLOSE_BYPASS);
    f->bypass = 1;
    for (int i = 0; i < 2; i++) {
        struct vn_half *hf = &f->half[i];
        hf->passed = UINT64_MAX;
        hf->sig_ok = UINT64_MAX;    /* the signature stage lets go too: uninspected means that */
        hf->contig = UINT64_MAX;    /* gaps no longer matter: the receiver sorts them out */
        half_release(sw, f, hf);
        hf->read = hf->hold = 0;
        half_free_all(sw, f, hf);
    }
    if (f->announced) {
        f->report_close = 1;
        f->reason = VN_CLOSE_BYPASS;
        mark_dirty(sw, f);
    }
}

static struct vn_flow *flow_new(struct vn_switch *sw, struct vn_tcp_port *tp, int port,
                                int family, const uint8_t *ga, const uint8_t *ra,
                                uint16_t gp, uint16_t rp)
{
    struct vn_tcp *t = sw->tcp;
    struct vn_flow *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    unsigned n = family == 4 ? 4 : 16;
    f->family = (uint8_t)family;
    memcpy(f->gaddr, ga, n);
    memcpy(f->raddr, ra, n);
    f->gport = gp;
    f->rport = rp;
    f->port = port;
    f->id = ++t->next_id;
    f->id_next = t->ids[f->id % VN_TCP_ID_HASH];
    t->ids[f->id % VN_TCP_ID_HASH] = f;
    unsigned b = flow_hash(family, ga, ra, gp, rp);
    f->next = tp->buckets[b];
    tp->buckets[b] = f;
    f->in_table = 1;
    tp->nflows++;
    for (int i = 0; i < 2; i++) {
        f->half[i].wscale = -1;
        f->half[i].sig_ok = UINT64_MAX;
    }
    return f;
}

static int port_subscribed(const struct vn_policy *pol, uint16_t port)
{
    for (unsigned i = 0; i < pol->nstream_subs && i < VN_MAX_STREAM_SUBS; i++)
        if (pol->stream_subs[i].port_lo <= port && port <= pol->stream_subs[i].port_hi)
            return 1;
    return 0;
}

/* Does a holder want connections of this server port: a scanner's stream subscription, or
 * the signature stage (a stream rule's ports name either end's)? */
static int port_tracked(struct vn_switch *sw, int port, const struct vn_policy *pol, uint16_t sport,
                        uint16_t dport)
{
    return port_subscribed(pol, dport) || vn_sig_tracks(sw, port, sport, dport);
}

/* The handshake completed: which subscriptions want it now, and what each direction is. */
static void flow_establish(struct vn_switch *sw, struct vn_flow *f, const struct vn_policy *pol)
{
    f->state = ST_ESTABLISHED;
    uint16_t server_port = f->client == VN_DIR_FROM_GUEST ? f->rport : f->gport;
    uint64_t subs = 0;
    uint8_t read = 0, hold = 0;    /* the kernel's (scanners on the socket) */
    uint8_t rread[VN_CHANS], rhold[VN_CHANS];   /* each scanner ring's */
    uint8_t rings = 0;
    memset(rread, 0, sizeof(rread));
    memset(rhold, 0, sizeof(rhold));
    for (unsigned i = 0; i < pol->nstream_subs && i < VN_MAX_STREAM_SUBS; i++) {
        const struct vn_stream_sub *s = &pol->stream_subs[i];
        if (s->port_lo <= server_port && server_port <= s->port_hi) {
            uint8_t dirs = s->dirs ? s->dirs : (VN_DIR_FROM_GUEST | VN_DIR_TO_GUEST);
            unsigned c = pol->stream_sub_chan[i];
            if (c && c <= VN_CHANS) {
                rread[c - 1] |= dirs;
                if (s->contain)
                    rhold[c - 1] |= dirs;
                rings |= dirs;
                continue;
            }
            subs |= 1ULL << i;
            read |= dirs;
            if (s->contain)
                hold |= dirs;
        }
    }
    /* the signature stage is a holder too: it holds the directions its rules cover */
    int sig = sig_flow_open(sw, f);
    if (!subs && !sig && !rings) { /* unsubscribed meanwhile: nobody wants it */
        f->bypass = 1;
        return;
    }
    f->subs = subs;
    for (int i = 0; i < 2; i++) {
        struct vn_half *hf = &f->half[i];
        hf->kread = !!(read & dir_of(i));
        hf->khold = !!(hold & dir_of(i));
        hf->read = hf->kread;
        hf->hold = hf->khold;
    }
    if (rings)
        sring_open(sw, f, rread, rhold);
    for (unsigned k = 0; k < f->nrings; k++)
        for (int i = 0; i < 2; i++) {
            f->half[i].read |= !!(f->rings[k].read & dir_of(i));
            f->half[i].hold |= !!(f->rings[k].hold & dir_of(i));
        }
    for (int i = 0; i < 2; i++) {
        struct vn_half *hf = &f->half[i];
        sring_settle(f, hf);       /* nobody holds: passed = all; nobody reads: consumed = all */
        if (sig && hf->sig_ok != UINT64_MAX)
            hf->read = hf->hold = 1;     /* kept for the stage (its own frontier, sig_ok) */
    }
    if (!subs)
        return;                    /* rings' and the stage's alone: the kernel never hears of it */
    f->announced = 1;
    f->report_open = 1;
    mark_dirty(sw, f);
}

/* ---- the input path ---- */

/* Parses TCP options of a SYN for the MSS (0: none). */
static uint16_t syn_mss(const uint8_t *opt, unsigned len)
{
    const uint8_t *o = tcp_opt(opt, len, 2);
    return o && o[1] == 4 ? vn_rd16(o + 2) : 0;
}

/* Parses TCP options of a SYN for the window scale (-1: none). */
static int8_t syn_wscale(const uint8_t *opt, unsigned len)
{
    const uint8_t *o = tcp_opt(opt, len, 3);
    return o && o[1] == 3 ? (int8_t)(o[2] > 14 ? 14 : o[2]) : -1;
}

/* Compares a new payload with every kept record that overlaps it.  Returns -1 if a byte
 * differs; else sets *covered (every byte already kept, FIN included) and *all_released
 * (each covering record already went on). */
static int half_compare(const struct vn_half *hf, uint64_t start, const uint8_t *pay, uint32_t len,
                        int fin, uint64_t from, int *covered, int *all_released)
{
    uint64_t end = start + len;
    /* coverage of [from, end) (+ the FIN) by the records, walked in start order */
    uint64_t cov = from;
    int fin_cov = !fin;
    *all_released = 1;
    for (const struct vn_seg *s = seg_from(hf, from); s; s = s->next) {
        if (s->start >= end && !(fin && s->start == end))
            break;
        uint64_t a = s->start > start ? s->start : start;
        uint64_t b = seg_end(s) < end ? seg_end(s) : end;
        if (a < b) {
            const uint8_t *mine = pay + (a - start);
            const uint8_t *theirs = s->rec->data + s->pay + (a - s->start);
            if (memcmp(mine, theirs, b - a))
                return -1;
        }
        if (s->start <= cov && seg_end(s) > cov) {
            if (!s->released)
                *all_released = 0;
            cov = seg_end(s);
        } else if (a < b && !s->released) {
            *all_released = 0;
        }
        if (fin && s->fin && seg_end(s) == end) {
            fin_cov = 1;
            if (!s->released)
                *all_released = 0;
        }
    }
    *covered = cov >= end && fin_cov;
    return 0;
}

static void seg_insert(struct vn_half *hf, struct vn_seg *n)
{
    if (n->len > hf->seg_max)
        hf->seg_max = n->len;      /* bounds seg_from's walk back */
    struct vn_seg *s = hf->tail;
    while (s && s->start > n->start)
        s = s->prev;
    n->prev = s;
    n->next = s ? s->next : hf->head;
    if (n->next)
        n->next->prev = n;
    else
        hf->tail = n;
    if (s)
        s->next = n;
    else
        hf->head = n;
}

int vn_tcp_active(struct vn_switch *sw, int port)
{
    const struct vn_policy *pol = sw->ports[port].pol;
    if (pol && pol->nstream_subs)
        return 1;
    if (vn_sig_streams(sw, port))
        return 1;
    return sw->tcp && sw->tcp->ports[port] && (sw->tcp->ports[port]->nflows || sw->tcp->ports[port]->nfrags);
}

int vn_tcp_pending(struct vn_switch *sw)
{
    return sw->tcp && sw->tcp->dirty_head;
}

/* Verifies the IPv4 header and TCP checksums (after completing a partial one). */
static int checksums_ok(struct vn_pkt *pkt, const struct vn_hdrs *h, unsigned ip_end)
{
    if (pkt->hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (vn_csum_complete(pkt) < 0)
            return 0;
    }
    unsigned l3 = (unsigned)h->l3_off, l4 = (unsigned)h->l4_off;
    const uint8_t *ip = vn_get(pkt->data, ip_end, l3, h->family == 4 ? 20 : 40);
    if (!ip || l4 > ip_end)
        return 0;
    if (h->family == 4 && (!vn_get(pkt->data, ip_end, l3, (ip[0] & 15) * 4u) ||
                           vn_fold(vn_sum16(0, ip, (ip[0] & 15) * 4u)) != 0xffff))
        return 0;
    uint32_t tlen = ip_end - l4;
    const uint8_t *tcp = vn_get(pkt->data, ip_end, l4, tlen);
    return tcp && vn_fold(vn_sum16(pseudo(h->family, ip, tlen), tcp, tlen)) == 0xffff;
}

/* Adopting: asks the receiver of the prober's data where it stands.  A bare ACK whose
 * sequence number lies far behind its window is unacceptable to it, and a stack answers an
 * unacceptable segment with an ACK of its own (RFC 793 3.9; Linux rate-limits these to one
 * per 500 ms): that ACK's acknowledgement number is where the prober's stream stands. */
static void adopt_probe(struct vn_switch *sw, struct vn_flow *f, uint32_t seq, uint32_t ack, uint16_t win)
{
    f->probe_ns = sw->now_ns;
    forge_seg(sw, f, f->prober, seq - 0x40000000u, ack, TCP_ACK, win, NULL, 0, NULL);
}

/* Data of a connection the NI never saw open, on a subscribed port (the NI restarted, the
 * subscription is newer than the connection, the flow was forgotten): the policy's
 * tcp_midstream says what happens (VN_MIDSTREAM_*): drop, reset both ends, pass (the
 * connection is remembered as bypassed) or adopt (ST_ADOPTING until the receiver's answer
 * to a probe says where it stands).  Nothing reaches a receiver as if a scanner had seen it. */
static int midstream(struct vn_switch *sw, struct vn_tcp_port *tp, int port, int dir,
                     const struct vn_pkt *pkt, const struct vn_hdrs *h, const uint8_t *tcp,
                     uint32_t seq, uint32_t ack, uint32_t paylen)
{
    const struct vn_policy *pol = sw->ports[port].pol;
    struct vn_port_stats *st = &sw->ports[port].st;
    const uint8_t *ga = dir == VN_DIR_FROM_GUEST ? h->src : h->dst;
    const uint8_t *ra = dir == VN_DIR_FROM_GUEST ? h->dst : h->src;
    uint16_t gp = dir == VN_DIR_FROM_GUEST ? h->sport : h->dport;
    uint16_t rp = dir == VN_DIR_FROM_GUEST ? h->dport : h->sport;
    if (pol->tcp_flows_over_pass)
        return VN_TCP_FORWARD;     /* it may be one the full table let through uninspected */
    if (pol->tcp_midstream == VN_MIDSTREAM_ADOPT) {
        if (!(tcp[13] & TCP_ACK))
            return VN_TCP_TAKEN;   /* data without ACK: the receiver discards it too */
        tp = tport(sw, port, 1);
        struct vn_flow *f = tp && tp->nflows < pol->tcp_flows_max
                          ? flow_new(sw, tp, port, h->family, ga, ra, gp, rp) : NULL;
        if (!f) {
            st->tcp_flows_over++;
            return VN_TCP_TAKEN;
        }
        st->tcp_midstream_adopt++;
        f->state = ST_ADOPTING;
        f->midstream = 1;
        f->client = port_tracked(sw, port, pol, h->dport, h->dport) ? dir
                  : (dir == VN_DIR_FROM_GUEST ? VN_DIR_TO_GUEST : VN_DIR_FROM_GUEST);
        f->last_ns = sw->now_ns;
        int hs = half_of(dir);
        f->prober = (uint8_t)hs;
        /* the sender's acknowledgement is exactly where its peer's stream stands for it */
        struct vn_half *O = &f->half[!hs];
        O->isn = ack - 1;
        O->have_isn = 1;
        for (int i = 0; i < 2; i++)
            f->half[i].wscale = VN_TCP_ADOPT_WSCALE;
        unsigned l2 = (unsigned)h->l3_off < sizeof(f->half[hs].eth) ? (unsigned)h->l3_off
                                                                    : sizeof(f->half[hs].eth);
        memcpy(f->half[hs].eth, pkt->data, l2);
        f->half[hs].eth_len = (uint8_t)l2;
        adopt_probe(sw, f, seq, ack, vn_rd16(tcp + 14));
        return VN_TCP_TAKEN;       /* its sender retransmits it once the flow is whole */
    }
    if (pol->tcp_midstream == VN_MIDSTREAM_PASS) {
        /* remembered as bypassed, so that the rest of it passes without a count each */
        st->tcp_midstream_pass++;
        tp = tport(sw, port, 1);
        if (tp && tp->nflows < pol->tcp_flows_max) {
            struct vn_flow *f = flow_new(sw, tp, port, h->family, ga, ra, gp, rp);
            if (f) {
                f->state = ST_ESTABLISHED;
                f->bypass = 1;
                f->client = port_tracked(sw, port, pol, h->dport, h->dport) ? dir
                          : (dir == VN_DIR_FROM_GUEST ? VN_DIR_TO_GUEST : VN_DIR_FROM_GUEST);
                f->last_ns = sw->now_ns;
            }
        }
        return VN_TCP_FORWARD;
    }
    if (pol->tcp_midstream != VN_MIDSTREAM_RESET || !(tcp[13] & TCP_ACK) || !tcp_get(sw))
        return VN_TCP_TAKEN;       /* drop; and data without ACK the receiver discards too */
    /* RSTs both ways, from what the segment says: its sender's receive point is its ACK
     * (an exact match, which RFC 5961 stacks insist on), its receiver's is (for the
     * retransmission a sender resumes with) the segment's own sequence number.  A flow
     * on the stack (never in the table) carries the addresses for forge_seg. */
    struct vn_flow f;
    memset(&f, 0, sizeof(f));
    unsigned n = h->family == 4 ? 4 : 16;
    f.family = (uint8_t)h->family;
    memcpy(f.gaddr, ga, n);
    memcpy(f.raddr, ra, n);
    f.gport = gp;
    f.rport = rp;
    f.port = port;
    int hs = half_of(dir);
    unsigned l2 = (unsigned)h->l3_off < sizeof(f.half[hs].eth) ? (unsigned)h->l3_off
                                                               : sizeof(f.half[hs].eth);
    memcpy(f.half[hs].eth, pkt->data, l2);
    f.half[hs].eth_len = (uint8_t)l2;
    st->tcp_midstream_reset++;
    forge_rst(sw, &f, !hs, ack, seq + paylen);   /* to the sender, as its peer */
    forge_rst(sw, &f, hs, seq, ack);             /* to the receiver, as the sender */
    return VN_TCP_TAKEN;
}

/* A frame of a tracked connection goes on: rewritten if the connection was edited. */
static int forward_edited(struct vn_flow *f, int hs, struct vn_pkt *pkt, uint8_t *tcp, unsigned doff)
{
    struct vn_half *S = &f->half[hs];
    uint32_t seq = vn_rd32(tcp + 4), nseq = seq;
    if (S->edited) {
        int64_t o = seq_off(S, seq);
        if (o >= 0)
            nseq = seq_at(S, out_pos(S, (uint64_t)o));
    }
    rewrite_tcp(f, hs, tcp, doff, nseq, !(pkt->hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM));
    return VN_TCP_FORWARD;
}

/* A retransmission of bytes of an edited stream that already went on: the receiver gets
 * them again, edited (with the injections it has not acknowledged); if it has them all
 * (or they were cut), the sender is acknowledged again instead. */
static int resend(struct vn_switch *sw, struct vn_flow *f, int hs, const struct vn_fview *v)
{
    struct vn_half *S = &f->half[hs];
    uint64_t end = v->start + v->paylen + v->fin;
    if (S->vouched >= end) {
        reack(sw, f, hs);          /* the NI owns these bytes: it resends them itself */
        return VN_TCP_TAKEN;
    }
    if (orig_ack_clamped(S, S->acked_out) >= end) {
        if (S->told >= end)
            S->told = v->start;    /* the sender missed our ACK: say it again */
        ack_cut(sw, f, hs);
        return VN_TCP_TAKEN;
    }
    send_edited(sw, f, hs, v, v->start, v->start + v->paylen, v->fin, 1);
    return VN_TCP_TAKEN;
}

/* One TCP segment on its way through the engine: the frame, where its headers are and what
 * they say (seg_parse), and (once its flow is known) which half sent it.  The steps below
 * take it in the order a receiver would: the connection's state first (no flow, adopting,
 * the handshake), then RST, ACK and data. */
struct vn_tcp_in {
    struct vn_switch *sw;
    int port, dir, egress_to;
    struct vn_pkt *pkt;
    const struct vn_hdrs *h;
    const struct vn_policy *pol;
    struct vn_port_stats *st;
    struct vn_tcp_port *tp;
    uint8_t *d, *tcp;
    unsigned l3, l4, doff, pay;
    uint32_t paylen, seq, ack;
    uint16_t win;
    uint8_t flags;
    /* of a tracked flow */
    int hs;                        /* the sender's half */
    int edited;                    /* either half was edited (then the flow is announced: it stays) */
    int from_client;
    const uint8_t *tso;            /* its timestamp option, if both ends negotiated them */
};

/* A step's verdict when the segment goes on to the next step. */
#define SEG_NEXT (-1)

/* Forwards the segment, rewritten if the connection was edited. */
static int fwd(const struct vn_tcp_in *in, struct vn_flow *f)
{
    return in->edited ? forward_edited(f, in->hs, in->pkt, in->tcp, in->doff) : VN_TCP_FORWARD;
}

/* Forwards the segment through the emit queue, behind what a release queued before it in
 * this same drain (which the switch has not yet sent): returned to the caller, it would go
 * on at once and overtake those segments. */
static int fwd_queued(const struct vn_tcp_in *in, struct vn_flow *f)
{
    if (fwd(in, f) == VN_TCP_FORWARD)
        vn_emit_push_flow(in->sw, VN_EMIT_SUBS, in->port, in->dir, in->egress_to, in->pkt, in->h);
    return VN_TCP_TAKEN;
}

static int resend_in(const struct vn_tcp_in *in, struct vn_flow *f, uint64_t start, int fin)
{
    return resend(in->sw, f, in->hs, &(struct vn_fview){in->d, &in->pkt->hdr, in->pay, in->paylen,
                                                        (uint16_t)in->l3, (uint16_t)in->l4, start,
                                                        (uint8_t)fin, in->port, in->dir, in->egress_to});
}

/* The headers: lengths (the IP header's own for plain frames; a TSO frame is one segment
 * of the whole payload, its length fields the guest's business until segmentation),
 * checksums, and the urgent pointer cleared. */
static int seg_parse(struct vn_tcp_in *in)
{
    struct vn_pkt *pkt = in->pkt;
    const struct vn_hdrs *h = in->h;
    struct vn_port_stats *st = in->st;
    uint8_t *d = in->d = pkt->data;
    int gso = (pkt->hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_NONE;
    unsigned l3 = in->l3 = (unsigned)h->l3_off, l4 = in->l4 = (unsigned)h->l4_off, ip_end;
    const uint8_t *ip = vn_get(d, pkt->len, l3, h->family == 4 ? 20 : 40);
    if (!ip)
        return drop(&st->tcp_bad_header);
    if (gso) {
        ip_end = pkt->len;
    } else if (h->family == 4) {
        unsigned tot = vn_rd16(ip + 2);
        if (tot < (ip[0] & 15) * 4u || !vn_get(d, pkt->len, l3, tot))
            return drop(&st->tcp_bad_header);
        ip_end = l3 + tot;
    } else {
        if (!vn_get(d, pkt->len, l3, 40 + vn_rd16(ip + 4)))
            return drop(&st->tcp_bad_header);
        ip_end = l3 + 40 + vn_rd16(ip + 4);
    }
    uint8_t *tcp = in->tcp = vn_getw(d, ip_end, l4, 20);
    if (!tcp)
        return drop(&st->tcp_bad_header);
    unsigned doff = in->doff = (tcp[12] >> 4) * 4u;
    if (doff < 20 || !vn_get(d, ip_end, l4, doff))
        return drop(&st->tcp_bad_header);
    in->pay = l4 + doff;
    in->paylen = ip_end - in->pay;
    in->flags = tcp[13];
    in->seq = vn_rd32(tcp + 4);
    in->ack = vn_rd32(tcp + 8);
    in->win = vn_rd16(tcp + 14);
    if (!gso && !checksums_ok(pkt, h, ip_end))
        return drop(&st->tcp_bad_csum);
    if (in->flags & TCP_URG) {
        /* the receiver would take the urgent byte out of the stream (no SO_OOBINLINE):
         * clear the flag and the pointer so it stays where the scanners see it */
        uint16_t old_w = vn_rd16(tcp + 12), old_u = vn_rd16(tcp + 18);
        tcp[13] &= ~TCP_URG;
        vn_wr16(tcp + 18, 0);
        in->flags = tcp[13];
        if (!(pkt->hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) {
            uint16_t c = vn_rd16(tcp + 16);
            c = csum_update(c, old_w, vn_rd16(tcp + 12));
            c = csum_update(c, old_u, 0);
            vn_wr16(tcp + 16, c);
        }
        st->tcp_urg_cleared++;
    }
    return SEG_NEXT;
}

/* No flow: a client's SYN to a subscribed port opens one (ST_SYN_SENT); data is midstream. */
static int st_none(struct vn_tcp_in *in, const uint8_t *ga, const uint8_t *ra, uint16_t gp, uint16_t rp)
{
    const struct vn_policy *pol = in->pol;
    struct vn_port_stats *st = in->st;
    const struct vn_hdrs *h = in->h;
    if ((in->flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN)) == TCP_SYN &&
        port_tracked(in->sw, in->port, pol, h->sport, h->dport)) {
        if (in->paylen)
            return drop(&st->tcp_syn_data);
        struct vn_tcp_port *tp = in->tp = tport(in->sw, in->port, 1);
        if (!tp || tp->nflows >= pol->tcp_flows_max) {
            st->tcp_flows_over++;
            return pol->tcp_flows_over_pass ? VN_TCP_FORWARD : VN_TCP_TAKEN;
        }
        struct vn_flow *f = flow_new(in->sw, tp, in->port, h->family, ga, ra, gp, rp);
        if (!f) {
            st->tcp_flows_over++;
            return pol->tcp_flows_over_pass ? VN_TCP_FORWARD : VN_TCP_TAKEN;
        }
        st->tcp_flows_opened++;
        f->client = in->dir;
        f->state = ST_SYN_SENT;
        f->last_ns = in->sw->now_ns;
        struct vn_half *c = &f->half[half_of(in->dir)];
        c->isn = in->seq;
        c->have_isn = 1;
        c->wscale = syn_wscale(in->tcp + 20, in->doff - 20);
        c->mss = syn_mss(in->tcp + 20, in->doff - 20);
        c->ts = tcp_opt(in->tcp + 20, in->doff - 20, 8) != NULL;
        c->syn_win = in->win;
        return VN_TCP_FORWARD;
    }
    if (in->paylen) {
        st->tcp_no_flow++;
        return midstream(in->sw, in->tp, in->port, in->dir, in->pkt, h, in->tcp, in->seq, in->ack,
                         in->paylen);
    }
    return VN_TCP_FORWARD;         /* no bytes to inspect: ACK, RST, FIN */
}

/* ST_ADOPTING: everything waits for the receiver's answer to a probe; that answer makes
 * the flow established (SEG_NEXT: the answer itself goes on as a segment of it). */
static int st_adopting(struct vn_tcp_in *in, struct vn_flow *f)
{
    struct vn_switch *sw = in->sw;
    struct vn_half *S = &f->half[in->hs], *R = &f->half[!in->hs];
    uint8_t flags = in->flags;
    if (flags & TCP_RST) {
        flow_end(sw, f, VN_CLOSE_RST);
        return VN_TCP_FORWARD;
    }
    if (in->hs == f->prober || (flags & TCP_SYN) || !(flags & TCP_ACK)) {
        if (!in->paylen && !(flags & (TCP_FIN | TCP_SYN)))
            return VN_TCP_FORWARD;     /* a bare ACK: nothing to inspect */
        if (in->hs == f->prober && (flags & TCP_ACK) && sw->now_ns - f->probe_ns > VN_TCP_PROBE_NS)
            adopt_probe(sw, f, in->seq, in->ack, in->win);
        in->st->tcp_no_flow++;
        return VN_TCP_TAKEN;           /* waits for the receiver's word */
    }
    /* the receiver's word: its acknowledgement is where the prober's stream stands;
     * from here on it is an established connection, this segment included */
    R->isn = in->ack - 1;
    R->have_isn = 1;
    S->ts = R->ts = tcp_opt(in->tcp + 20, in->doff - 20, 8) != NULL;
    flow_establish(sw, f, in->pol);
    return f->bypass ? VN_TCP_FORWARD : SEG_NEXT;
}

/* A SYN or SYN-ACK of a known flow: the handshake (ST_SYN_SENT to ST_SYN_RCVD), or a
 * retransmission of it. */
static int seg_syn(struct vn_tcp_in *in, struct vn_flow *f)
{
    struct vn_port_stats *st = in->st;
    struct vn_half *S = &f->half[in->hs], *R = &f->half[!in->hs];
    uint8_t flags = in->flags;
    const uint8_t *opt = in->tcp + 20;
    unsigned optlen = in->doff - 20;
    if (flags & (TCP_RST | TCP_FIN))
        return drop(&st->tcp_bad_handshake);
    if (in->paylen)
        return drop(&st->tcp_syn_data);
    if (!(flags & TCP_ACK)) {
        if (!in->from_client)
            return drop(&st->tcp_bad_handshake);     /* simultaneous open */
        if (f->state == ST_SYN_SENT) {
            S->isn = in->seq;                        /* a new attempt may pick a new ISN */
            S->wscale = syn_wscale(opt, optlen);
            S->mss = syn_mss(opt, optlen);
            S->ts = tcp_opt(opt, optlen, 8) != NULL;
            S->syn_win = in->win;
            return fwd(in, f);
        }
        return in->seq == S->isn ? VN_TCP_FORWARD : drop(&st->tcp_bad_handshake);
    }
    /* SYN-ACK */
    if (in->from_client || in->ack != R->isn + 1)
        return drop(&st->tcp_bad_handshake);
    if (f->state == ST_SYN_SENT) {
        S->isn = in->seq;
        S->have_isn = 1;
        S->wscale = syn_wscale(opt, optlen);
        S->mss = syn_mss(opt, optlen);
        S->ts = tcp_opt(opt, optlen, 8) != NULL;
        if (S->wscale < 0 || R->wscale < 0)
            S->wscale = R->wscale = -1;              /* scaling needs both */
        /* windows in SYNs are never scaled */
        R->right = R->real_right = in->win;
        R->have_right = 1;
        S->right = S->real_right = R->syn_win;
        S->have_right = 1;
        f->state = ST_SYN_RCVD;
        return fwd(in, f);
    }
    return in->seq == S->isn ? VN_TCP_FORWARD : drop(&st->tcp_bad_handshake);
}

/* ST_SYN_SENT, anything but a SYN: only a refusal fits here, the server's RST
 * acknowledging the SYN. */
static int st_syn_sent(struct vn_tcp_in *in, struct vn_flow *f)
{
    uint8_t flags = in->flags;
    if ((flags & TCP_RST) && !in->from_client && (flags & TCP_ACK) &&
        in->ack == f->half[!in->hs].isn + 1 && !in->paylen) {
        int r = fwd(in, f);        /* before flow_end, which may free f */
        flow_end(in->sw, f, VN_CLOSE_RST);
        return r;
    }
    return in->paylen || (flags & (TCP_FIN | TCP_RST)) ? drop(&in->st->tcp_bad_handshake)
                                                       : VN_TCP_FORWARD;
}

/* A RST of a synchronized connection: taken only inside the receiver's window. */
static int seg_rst(struct vn_tcp_in *in, struct vn_flow *f)
{
    struct vn_half *S = &f->half[in->hs];
    if (in->paylen)
        return drop(&in->st->tcp_rst_data);
    int64_t off = seq_off(S, in->seq);
    uint64_t hi = S->have_right && S->right > S->acked ? S->right : S->acked + 1;
    if (off < 0 || (uint64_t)off < S->acked || (uint64_t)off >= hi)
        return drop(&in->st->tcp_rst_out_of_window);
    int r = fwd(in, f);            /* before flow_end, which may free f */
    flow_end(in->sw, f, VN_CLOSE_RST);
    return r;
}

/* The acknowledgement (ST_SYN_RCVD: the one completing the handshake): what the receiver
 * R of the other direction got, and its window. */
static int seg_ack(struct vn_tcp_in *in, struct vn_flow *f)
{
    struct vn_switch *sw = in->sw;
    struct vn_port_stats *st = in->st;
    struct vn_half *S = &f->half[in->hs], *R = &f->half[!in->hs];
    uint8_t flags = in->flags;
    if (!(flags & TCP_ACK)) {
        if (in->paylen || (flags & TCP_FIN))
            return drop(&st->tcp_bad_header);        /* data without ACK: discarded */
        return SEG_NEXT;
    }
    int64_t aoff = seq_off_out(R, in->ack);
    if (f->state == ST_SYN_RCVD) {
        if (!in->from_client || aoff != 0)
            return drop(&st->tcp_bad_handshake);
        flow_establish(sw, f, in->pol);
        if (f->bypass)
            return VN_TCP_FORWARD;
    }
    /* the receiver acknowledges what it got: output offsets (of an edited stream) */
    if (aoff < 0 || (!R->edited && (uint64_t)aoff > R->highest))
        return drop(&st->tcp_out_of_window);         /* ACK of unsent data: discarded */
    uint64_t aout = (uint64_t)aoff;
    if (aout > sent_out(R)) {
        /* it cannot have bytes the NI holds: only a forged ACK says so.  Its sender
         * may believe it, the NI does not: what it holds still waits for the scanners
         * and a copy arriving later is still compared, never waved through. */
        st->tcp_ack_unsent++;
        aout = sent_out(R);
    }
    if (aout > R->acked_out)
        R->acked_out = aout;
    uint64_t a = R->edited ? orig_ack_clamped(R, aout) : aout;
    if (a > R->acked) {
        R->acked = a;
        R->ack_ns = sw->now_ns;
        R->rtx_tries = 0;
    }
    int ws = S->wscale >= 0 ? S->wscale : 0;
    uint64_t eout = aout + ((uint64_t)in->win << ws);
    uint64_t edge = R->edited ? orig_ack(R, eout) : eout;
    uint64_t old_right = R->right;
    if (!R->have_right || edge > R->right)
        R->right = edge;
    R->have_right = 1;
    if (edge > R->real_right)
        R->real_right = edge;
    half_trim(sw, f, R);
    if (R->edited)
        edits_compact(sw, f, R);
    if (R->vouched > a) {
        /* the NI acknowledged further for this receiver: its window may let more of
         * what waits go now; its pure ACKs below what the sender heard are news to
         * the sender only if they open the window further */
        half_release(sw, f, R);
        if (!in->paylen && !(flags & (TCP_FIN | TCP_RST)) && edge <= old_right)
            return drop(&st->tcp_acks_absorbed);
    }
    return SEG_NEXT;
}

/* Data and/or FIN from S: checked against what came before (window, FIN, PAWS, earlier
 * copies), then kept as a record, and held or sent on. */
static int seg_data(struct vn_tcp_in *in, struct vn_flow *f)
{
    struct vn_switch *sw = in->sw;
    const struct vn_policy *pol = in->pol;
    struct vn_port_stats *st = in->st;
    struct vn_tcp_port *tp = in->tp;
    struct vn_half *S = &f->half[in->hs];
    uint32_t paylen = in->paylen;
    int fin = !!(in->flags & TCP_FIN);
    int64_t soff = seq_off(S, in->seq);
    if (soff < 0)
        return drop(&st->tcp_bad_header);
    uint64_t start = (uint64_t)soff, end = start + paylen;
    if (S->fin && (end > S->fin_off || (fin && end != S->fin_off)))
        return drop(&st->tcp_after_fin);
    if (paylen && S->have_right && end > S->right)
        return drop(&st->tcp_out_of_window);
    /* PAWS (RFC 7323): with timestamps on, the receiver drops a segment whose TSval is
     * older than the one it last took in order; so does the NI, or a scanner would see
     * bytes the receiver never takes (a stale-timestamp insertion) */
    if (in->tso) {
        uint32_t tsval = vn_rd32(in->tso + 2);
        if (S->have_ts_recent && (int32_t)(S->ts_recent - tsval) > 1)
            return drop(&st->tcp_paws);
        if (start <= S->contig && (!S->have_ts_recent || (int32_t)(tsval - S->ts_recent) > 0)) {
            S->ts_recent = tsval;
            S->have_ts_recent = 1;
        }
    }
    if (end + fin <= S->acked) {
        st->tcp_retransmit++;                            /* the receiver has all of it */
        return S->edited ? resend_in(in, f, start, fin) : fwd(in, f);
    }
    if (end + fin > S->highest)
        S->highest = end + fin;
    if (fin && !S->fin) {
        S->fin = 1;
        S->fin_off = end;
    }
    if (!S->read) {
        if (end + fin > S->released_end)
            S->released_end = end + fin;
        return fwd(in, f);
    }
    int covered, all_released;
    const uint8_t *payload = in->d + in->pay;
    if (half_compare(S, start, payload, paylen, fin, start > S->acked ? start : S->acked,
                     &covered, &all_released) < 0)
        return drop(&st->tcp_conflict);
    if (covered) {
        st->tcp_retransmit++;
        if (!all_released) {
            if (S->vouched >= end + fin)
                reack(sw, f, in->hs);        /* it missed the NI's acknowledgement */
            return VN_TCP_TAKEN;
        }
        return S->edited ? resend_in(in, f, start, fin) : fwd(in, f);
    }
    if (tp->bytes + in->pkt->len > pol->tcp_bytes_max) {
        st->tcp_bytes_over++;
        if (!pol->tcp_bytes_over_pass)
            return VN_TCP_TAKEN;
        flow_bypass(sw, f);          /* queues what was held: this segment goes behind it */
        return fwd_queued(in, f);
    }
    if (start > S->contig && S->ooo + paylen > pol->tcp_depth_max) {
        st->tcp_depth_over++;
        if (!pol->tcp_depth_over_pass)
            return VN_TCP_TAKEN;
        flow_bypass(sw, f);          /* queues what was held: this segment goes behind it */
        return fwd_queued(in, f);
    }
    struct vn_seg *s = seg_new(sw, in->pkt, in->port, in->dir, in->egress_to);
    if (!s) {
        st->tcp_bytes_over++;
        return VN_TCP_TAKEN;
    }
    struct vn_held *rec = s->rec;
    s->start = start;
    s->len = paylen;
    s->pay = in->pay;
    s->l3 = (uint16_t)in->l3;
    s->l4 = (uint16_t)in->l4;
    s->fin = (uint8_t)fin;
    tp->bytes += rec->len;
    seg_insert(S, s);
    if (S->adv && s->start < S->adv->start)
        S->adv = s;
    if (half_advance(S)) {
        mark_dirty(sw, f);
        sring_feed(sw, f);
        if (S->more)
            more_ack(sw, f, in->hs);
    }
    if (!S->hold) {
        /* read, not held: it goes on now (the caller forwards the frame itself) */
        s->released = 1;
        if (end + fin > S->released_end)
            S->released_end = end + fin;
        return fwd(in, f);
    }
    if (f->sig) {
        sig_flow_scan(sw, f, in->hs);     /* the new in-order bytes, before any leaves */
        if (sig_flow_forwards(f, S, s)) {
            /* the stage alone held it, scanned it whole, and nothing waits before it: the
             * frame itself goes on (the record stays for later copies to be compared with),
             * into the emit queue like every release if anything is queued, so it cannot
             * overtake the segments before it that a release in this same drain queued and
             * the switch has not yet sent */
            s->released = 1;
            if (end + fin > S->released_end)
                S->released_end = end + fin;
            /* with nothing queued it can overtake nothing: handed back, it goes on as the
             * frame itself, without a copy into the queue and one out */
            return sw->emit.count ? fwd_queued(in, f) : fwd(in, f);
        }
    }
    st->tcp_held_segments++;
    half_release(sw, f, S);
    return VN_TCP_TAKEN;
}

int vn_tcp_input(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt,
                 const struct vn_hdrs *h)
{
    struct vn_port *p = &sw->ports[port];
    const struct vn_policy *pol = p->pol;
    if (!pol || !h->family || h->proto != 6)
        return VN_TCP_FORWARD;
    struct vn_tcp_port *tp = tport(sw, port, 0);
    const uint8_t *ga = dir == VN_DIR_FROM_GUEST ? h->src : h->dst;
    const uint8_t *ra = dir == VN_DIR_FROM_GUEST ? h->dst : h->src;
    if (h->frag)
        return frag_input(sw, port, dir, egress_to, pkt, h);
    if (!h->l4_known)
        return VN_TCP_FORWARD;
    uint16_t gp = dir == VN_DIR_FROM_GUEST ? h->sport : h->dport;
    uint16_t rp = dir == VN_DIR_FROM_GUEST ? h->dport : h->sport;
    struct vn_flow *f = flow_find(tp, h->family, ga, ra, gp, rp);
    if (!f && !port_tracked(sw, port, pol, h->sport, h->dport) &&
        !port_tracked(sw, port, pol, h->dport, h->sport))
        return VN_TCP_FORWARD;

    struct vn_tcp_in in = {.sw = sw, .port = port, .dir = dir, .egress_to = egress_to, .pkt = pkt,
                           .h = h, .pol = pol, .st = &p->st, .tp = tp};
    int r = seg_parse(&in);
    if (r != SEG_NEXT)
        return r;
    if (!f)
        return st_none(&in, ga, ra, gp, rp);

    f->last_ns = sw->now_ns;
    in.hs = half_of(dir);
    in.edited = f->half[0].edited || f->half[1].edited;
    if (f->bypass)
        return fwd(&in, f);
    if (sig_flow_blocked(f))
        return drop(&p->st.sig_flow_dropped);   /* a rule stopped it: nothing more goes */
    struct vn_half *S = &f->half[in.hs], *R = &f->half[!in.hs];
    unsigned l2 = in.l3 < sizeof(S->eth) ? in.l3 : sizeof(S->eth);
    memcpy(S->eth, in.d, l2);
    S->eth_len = (uint8_t)l2;
    if (f->state == ST_ADOPTING && (r = st_adopting(&in, f)) != SEG_NEXT)
        return r;
    in.from_client = dir == f->client;
    /* the timestamp option (both ends negotiated it): parsed once, for PAWS and for the
     * segments the NI sends as this end (its latest timestamps) */
    const uint8_t *tso = S->ts && R->ts && !(in.flags & TCP_SYN)
                       ? tcp_opt(in.tcp + 20, in.doff - 20, 8) : NULL;
    if (tso && tso[1] != 10)
        tso = NULL;
    if (tso && (!S->ts_seen || (int32_t)(vn_rd32(tso + 2) - S->ts_val) >= 0)) {
        S->ts_seen = 1;
        S->ts_val = vn_rd32(tso + 2);
        S->ts_ecr = vn_rd32(tso + 6);
    }
    in.tso = tso;

    if (in.flags & TCP_SYN)
        return seg_syn(&in, f);
    if (f->state == ST_SYN_SENT)
        return st_syn_sent(&in, f);
    if (in.flags & TCP_RST)
        return seg_rst(&in, f);
    if ((r = seg_ack(&in, f)) != SEG_NEXT)
        return r;
    if (!in.paylen && !(in.flags & TCP_FIN)) {
        /* a pure ACK or window update; the one acknowledging the second FIN ends it */
        int r = fwd(&in, f);       /* before flow_end, which may free f (not announced) */
        if (S->fin && S->acked > S->fin_off && R->fin && R->acked > R->fin_off)
            flow_end(sw, f, VN_CLOSE_FIN);
        return r;
    }
    return seg_data(&in, f);
}

#undef SEG_NEXT

/* The NI's own resends (200 ms doubling, at most 12.8 s apart: 12 take ~90 s) before it
 * gives up: the policy's tcp_resend_max (12 if unset). */
static unsigned resend_max(struct vn_switch *sw, const struct vn_flow *f)
{
    const struct vn_policy *pol = sw->ports[f->port].pol;
    return pol && pol->tcp_resend_max ? pol->tcp_resend_max : 12;
}

/* Bytes the NI vouched for and sent on but the receiver has not acknowledged go again
 * (the sender will not resend them): back-off from 200 ms.  1 if the NI gives up. */
static int vouched_retransmit(struct vn_switch *sw, struct vn_flow *f, uint64_t now)
{
    for (int hs = 0; hs < 2; hs++) {
        struct vn_half *S = &f->half[hs];
        if (S->vouched <= S->acked)
            continue;
        /* only what went on and waits for the receiver: what is still held is not late */
        struct vn_seg *first = S->head;
        while (first && first->released && seg_end(first) + first->fin <= S->acked)
            first = first->next;
        if (!first || !first->released)
            continue;
        uint64_t rto = 200000000ULL << (S->rtx_tries < 6 ? S->rtx_tries : 6);
        if (now - S->ack_ns < rto)
            continue;
        if (S->rtx_tries >= resend_max(sw, f))
            return 1;
        S->rtx_tries++;
        S->ack_ns = now;
        for (struct vn_seg *s = first; s && s->released; s = s->next) {
            sw->ports[f->port].st.tcp_vouched_retransmits++;
            emit_record(sw, f, hs, s);
        }
    }
    return 0;
}

/* Injected bytes the receiver has not acknowledged go again (back-off from 200 ms).  1 if
 * the NI gives up. */
static int inject_retransmit(struct vn_switch *sw, struct vn_flow *f, uint64_t now)
{
    for (int hs = 0; hs < 2; hs++) {
        struct vn_half *S = &f->half[hs];
        for (unsigned i = 0; i < S->nedits; i++) {
            struct vn_edit *e = &S->edits[i];
            uint64_t oend = (uint64_t)((int64_t)e->off + e->before) + e->inj_len;
            if (!e->inj_len || !e->inj_sent || S->acked_out >= oend)
                continue;
            uint64_t rto = 200000000ULL << (e->tries - 1 < 6 ? e->tries - 1 : 6);
            if (now - e->sent_ns >= rto) {
                if (e->tries > resend_max(sw, f))
                    return 1;
                sw->ports[f->port].st.tcp_inject_retransmits++;
                send_inject(sw, f, hs, e, S->acked_out, NULL);
            }
        }
    }
    return 0;
}

int vn_tcp_timers(struct vn_switch *sw)
{
    struct vn_tcp *t = sw->tcp;
    if (!t)
        return 0;
    uint64_t now = vn_clock(sw);
    int n = 0;
    for (int port = 0; port < VN_MAX_PORTS; port++) {
        struct vn_tcp_port *tp = t->ports[port];
        if (tp && tp->nfrags)
            frag_expire(sw, port, now);
        if (!tp || !tp->nflows)
            continue;
        const struct vn_policy *pol = sw->ports[port].pol;
        uint64_t idle = pol ? (uint64_t)pol->tcp_idle_ms * 1000000ULL : 0;
        for (unsigned b = 0; b < VN_TCP_HASH; b++) {
            for (struct vn_flow *f = tp->buckets[b], *nx; f; f = nx) {
                nx = f->next;
                if (f->state == ST_ESTABLISHED &&
                    (((f->half[0].nedits || f->half[1].nedits) && inject_retransmit(sw, f, now)) ||
                     ((f->half[0].vouched || f->half[1].vouched) && vouched_retransmit(sw, f, now)))) {
                    /* the receiver never took what the NI owes it: the connection cannot go
                     * on intact, so both ends hear it end */
                    sw->ports[port].st.tcp_ni_gave_up++;
                    forge_rsts(sw, f);
                    flow_close(sw, f, VN_CLOSE_KILLED);
                    n++;
                    continue;
                }
                uint64_t limit = f->state == ST_ESTABLISHED ? idle : VN_TCP_HANDSHAKE_NS;
                if (f->bypass && f->state != ST_ESTABLISHED)
                    limit = VN_TCP_HANDSHAKE_NS;
                if (now - f->last_ns > limit) {
                    flow_end(sw, f, VN_CLOSE_IDLE);
                    n++;
                }
            }
        }
    }
    return n;
}

int vn_tcp_flows(struct vn_switch *sw, int port)
{
    if (port < 0 || port >= VN_MAX_PORTS)
        return VN_ENOPORT;
    struct vn_tcp_port *tp = sw->tcp ? sw->tcp->ports[port] : NULL;
    return tp ? (int)tp->nflows : 0;
}

uint64_t vn_tcp_bytes(struct vn_switch *sw, int port)
{
    if (port < 0 || port >= VN_MAX_PORTS)
        return 0;
    struct vn_tcp_port *tp = sw->tcp ? sw->tcp->ports[port] : NULL;
    return tp ? tp->bytes : 0;
}

void vn_tcp_port_gone(struct vn_switch *sw, int port)
{
    struct vn_tcp *t = sw->tcp;
    if (!t || port < 0 || port >= VN_MAX_PORTS || !t->ports[port])
        return;
    struct vn_tcp_port *tp = t->ports[port];
    while (tp->frags)
        frag_free(sw, port, &tp->frags);
    for (unsigned b = 0; b < VN_TCP_HASH; b++)
        while (tp->buckets[b]) {
            struct vn_flow *f = tp->buckets[b];
            if (!f->announced) {    /* freed at once */
                flow_end(sw, f, VN_CLOSE_GONE);
                continue;
            }
            flow_end(sw, f, VN_CLOSE_GONE);
            for (int i = 0; i < 2; i++)     /* waits for its report; its frames go now */
                half_free_all(sw, f, &f->half[i]);
        }
}

void vn_tcp_free_all(struct vn_switch *sw)
{
    struct vn_tcp *t = sw->tcp;
    if (!t)
        return;
    for (unsigned b = 0; b < VN_TCP_ID_HASH; b++)
        while (t->ids[b])
            flow_free(sw, t->ids[b]);
    for (int i = 0; i < VN_MAX_PORTS; i++) {
        while (t->ports[i] && t->ports[i]->frags)
            frag_free(sw, i, &t->ports[i]->frags);
        free(t->ports[i]);
    }
    vn_blk_drain(&t->seg_blocks);
    munmap(t->scratch, sizeof(struct vn_pkt));
    free(t);
    sw->tcp = NULL;
}
