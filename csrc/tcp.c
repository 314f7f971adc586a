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
 * Releasing a held segment may happen inside another frame's processing (a released frame
 * meets the destination NI's engine, which may release its own segments): emission uses
 * a small stack of scratch frames, and defers past its depth.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include "vn_internal.h"

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20

#define VN_TCP_HASH 1024           /* flow table buckets per port (power of two) */
#define VN_TCP_ID_HASH 4096        /* stream id -> flow */
#define VN_TCP_DEPTH 4             /* nested emissions before deferring */
#define VN_TCP_HANDSHAKE_NS (30ULL * 1000000000ULL)   /* a handshake that never completes */

/* ST_ADOPTING: picked up mid-stream (VN_MIDSTREAM_ADOPT), waiting for the receiver's word */
enum { ST_SYN_SENT = 1, ST_SYN_RCVD, ST_ESTABLISHED, ST_CLOSED, ST_ADOPTING };
#define VN_TCP_PROBE_NS (200ULL * 1000000ULL)          /* between probes of one adoption */
#define VN_TCP_ADOPT_WSCALE 14     /* window scale assumed for an adopted connection */

/* A reference to the payload of one kept frame. */
struct vn_seg {
    struct vn_seg *prev, *next;    /* sorted by start */
    uint64_t start;                /* stream offset of its first payload byte */
    uint32_t len;                  /* payload bytes */
    uint32_t pay;                  /* where the payload starts in rec->data */
    uint16_t l3, l4;               /* where the IP and TCP headers start */
    uint8_t fin;                   /* a FIN follows the payload */
    uint8_t released;              /* sent on to the receiver */
    struct vn_held *rec;           /* the frame, owned */
};

/* One direction of a connection: the bytes one endpoint sends. */
struct vn_half {
    uint32_t isn;
    uint8_t have_isn;
    int8_t wscale;                 /* its window-scale option (-1: none) */
    uint16_t syn_win;              /* window in its SYN (unscaled) */
    uint8_t read, hold;            /* a scanner reads / holds these bytes */
    uint8_t fin, eof;              /* FIN seen (at fin_off); FIN in order */
    uint64_t fin_off;
    uint64_t contig;               /* bytes available in order */
    uint64_t passed;               /* every contain scanner passed the bytes below */
    uint64_t consumed;             /* the kernel read the bytes below */
    uint64_t acked;                /* the receiver acknowledged the offsets below (FIN counts 1) */
    uint64_t right;                /* the receiver's window right edge */
    uint8_t have_right;
    uint64_t highest;              /* end of the highest byte sent (FIN counts 1) */
    uint64_t released_end;         /* end of what went on to the receiver (FIN counts 1) */
    uint64_t ooo;                  /* bytes kept beyond contig */
    struct vn_seg *head, *tail;
    struct vn_seg *adv;            /* the record that last advanced contig (a hint) */
    uint64_t rel_lim;              /* every record ending at or below this was released */
    uint8_t eth[18];               /* L2 header of its latest frame, for forged RSTs */
    uint8_t eth_len;
    uint16_t mss;                  /* the MSS this endpoint announced (for its peer's segments) */
    uint8_t ts;                    /* its SYN carried a timestamp option */
    uint8_t have_ts_recent;
    uint32_t ts_recent;            /* TSval of its latest in-order segment (PAWS, RFC 7323) */
    uint8_t ts_seen;               /* the timestamps of its latest segment, for the NI's own */
    uint32_t ts_val, ts_ecr;
    /* What the receiver gets is this stream edited (cut, inject).  Offsets above
     * are the sender's ("original"); the receiver sees "output" offsets. */
    struct vn_edit *edits;         /* outstanding edits, in stream order */
    unsigned nedits, edits_cap;
    uint8_t edited;                /* ever edited: every later frame is rewritten */
    int64_t base;                  /* output shift of the edits compacted away */
    int64_t shift;                 /* output shift after every edit */
    uint64_t edit_lim;             /* new edits start at or beyond this */
    uint64_t acked_out;            /* the receiver acknowledged the output offsets below */
    uint64_t out_sent;             /* end of the output sent to the receiver (edited only) */
    uint64_t told;                 /* the sender was told (ACK) its bytes below this arrived */
    uint8_t wire_set;              /* the latest ack and window this endpoint sent, as rewritten */
    uint32_t wire_ack;
    uint16_t wire_win;
    /* `more` (Siphon 4.3): the NI acknowledges held bytes on the receiver's behalf so the
     * sender goes on past the receiver's window; it then owns those bytes (vouched) and
     * resends them to the receiver until acknowledged */
    uint8_t more;
    uint64_t more_at;              /* contig when asked: a pass beyond it ends the request */
    uint64_t vouched;              /* the NI acknowledged the sender's bytes below this */
    uint64_t real_right;           /* the receiver's own window edge (its ACKs alone) */
    uint64_t ack_ns;               /* when the receiver last acknowledged new bytes */
    uint8_t rtx_tries;
};

/* One edit of a direction: inj_len bytes inserted before byte `off`, then `cut` bytes from
 * `off` removed.  `before` is the output shift of everything ahead of it. */
struct vn_edit {
    uint64_t off;
    uint64_t cut;
    int64_t before;
    uint8_t *inj;
    uint32_t inj_len;
    uint8_t inj_sent;
    uint8_t tries;
    uint64_t sent_ns;
    uint8_t has_ts;                /* the timestamps its segments carry: those of the bytes */
    uint32_t ts_val, ts_ecr;       /* before it, never newer than those after (PAWS) */
};

struct vn_flow {
    struct vn_flow *next;          /* table bucket */
    struct vn_flow *id_next;
    struct vn_flow *dirty_next;
    uint8_t dirty, in_table, announced, report_open, report_close, bypass, deferred;
    uint8_t midstream;             /* adopted: no handshake seen (no edits, no more) */
    uint8_t prober;                /* adopting: the half whose data started it */
    uint64_t probe_ns;             /* adopting: when the receiver was last asked */
    int state;
    int reason;
    int port;
    int client;                    /* VN_DIR_* of the client's data */
    uint64_t id;
    uint64_t subs;
    uint64_t last_ns;
    uint8_t family;
    uint8_t gaddr[16], raddr[16];
    uint16_t gport, rport;
    struct vn_half half[2];        /* [0] from the guest, [1] to the guest */
};

struct vn_frag;

struct vn_tcp_port {
    struct vn_flow *buckets[VN_TCP_HASH];
    unsigned nflows;
    uint64_t bytes;
    struct vn_frag *frags;         /* IP datagrams of TCP in reassembly */
    unsigned nfrags;
};

struct vn_tcp {
    struct vn_tcp_port *ports[VN_MAX_PORTS];
    struct vn_flow *ids[VN_TCP_ID_HASH];
    struct vn_flow *dirty_head, *dirty_tail;
    struct vn_flow *reported;      /* closed flows handed out by vn_stream_next; freed next call */
    uint64_t next_id;
    int depth;
    int depth_max;                 /* VN_TCP_DEPTH unless a test lowered it */
    int deferred;                  /* flows wait for a release past the emission depth */
    struct vn_pkt *scratch;        /* VN_TCP_DEPTH frames, one mmap */
};


static int half_of(int dir) { return dir == VN_DIR_FROM_GUEST ? 0 : 1; }
static uint32_t seq_at(const struct vn_half *hf, uint64_t off);
static int64_t seq_off(const struct vn_half *hf, uint32_t seq);
static int dir_of(int half) { return half == 0 ? VN_DIR_FROM_GUEST : VN_DIR_TO_GUEST; }

static uint64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* ---- checksums ---- */



/* The pseudo-header sum of a TCP segment of `len` bytes. */
static uint32_t pseudo(int family, const uint8_t *ip, uint32_t len)
{
    uint32_t s = family == 4 ? vn_sum16(0, ip + 12, 8) : vn_sum16(0, ip + 8, 32);
    return s + 6 + (len >> 16) + (len & 0xffff);
}

/* The first TCP option of `kind` in opt[0, len) (pointing at its kind byte, its length
 * byte within bounds), NULL if there is none before the end or a malformed option. */
static const uint8_t *tcp_opt(const uint8_t *opt, unsigned len, uint8_t kind)
{
    unsigned i = 0;
    while (i < len) {
        if (opt[i] == 0)
            break;
        if (opt[i] == 1) {
            i++;
            continue;
        }
        if (i + 1 >= len || opt[i + 1] < 2 || i + opt[i + 1] > len)
            break;
        if (opt[i] == kind)
            return opt + i;
        i += opt[i + 1];
    }
    return NULL;
}

/* RFC 1624: a checksum after 16-bit word `old` became `new`. */
static uint16_t csum_update(uint16_t csum, uint16_t old, uint16_t new)
{
    uint32_t s = (uint16_t)~csum + (uint32_t)(uint16_t)~old + new;
    return (uint16_t)~vn_fold(s);
}

/* ---- tables ---- */

static struct vn_tcp *tcp_get(struct vn_switch *sw)
{
    if (sw->tcp)
        return sw->tcp;
    struct vn_tcp *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    void *b = mmap(NULL, sizeof(struct vn_pkt) * VN_TCP_DEPTH, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED) {
        free(t);
        return NULL;
    }
    t->scratch = b;
    t->depth_max = VN_TCP_DEPTH;
    sw->tcp = t;
    return t;
}

static struct vn_tcp_port *tport(struct vn_switch *sw, int port, int create)
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

static struct vn_flow *flow_by_id(struct vn_switch *sw, uint64_t id)
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

static uint64_t seg_end(const struct vn_seg *s) { return s->start + s->len; }

/* The first record (in start order) that may reach offset `pos`: no record is longer than
 * a frame, so walking back from the tail stops a frame's length before `pos`.  Keeps the
 * walks short while many records wait for acknowledgement. */
static struct vn_seg *seg_from(const struct vn_half *hf, uint64_t pos)
{
    struct vn_seg *s = hf->tail;
    if (!s)
        return NULL;
    while (s->prev && s->prev->start + VN_MAX_FRAME > pos)
        s = s->prev;
    return s;
}

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
    free(s->rec);
    free(s);
}

/* Frees the records the receiver acknowledged and the kernel read (oldest first). */
static void half_trim(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
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

static void half_free_all(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
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

/* ---- edited streams (cut, inject) and bytes the NI vouches for (more) ---- */

static int64_t edit_after(const struct vn_edit *e) { return e->before + e->inj_len - (int64_t)e->cut; }
static int64_t edit_ostart(const struct vn_edit *e) { return (int64_t)e->off + e->before; }

/* Output offset of sender byte `o` (a byte inside a cut: where the cut collapsed).  The
 * last edit at or before it decides (binary search: edits are sorted by offset). */
static uint64_t out_pos(const struct vn_half *hf, uint64_t o)
{
    unsigned lo = 0, hi = hf->nedits;          /* first edit with off > o */
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (hf->edits[mid].off <= o)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (!lo)
        return (uint64_t)((int64_t)o + hf->base);
    const struct vn_edit *e = &hf->edits[lo - 1];
    if (o < e->off + e->cut)
        return (uint64_t)(edit_ostart(e) + e->inj_len);
    return (uint64_t)((int64_t)o + edit_after(e));
}

/* The sender offset the receiver's acknowledgement of output offset `x` stands for: every
 * sender byte whose output lies below x, and the cut bytes right after them (the receiver
 * has everything before a cut once it has acknowledged up to it).  Output starts of edits
 * never decrease, so the last edit starting at or before x decides. */
static uint64_t orig_ack(const struct vn_half *hf, uint64_t x)
{
    unsigned lo = 0, hi = hf->nedits;
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        if (edit_ostart(&hf->edits[mid]) <= (int64_t)x)
            lo = mid + 1;
        else
            hi = mid;
    }
    int64_t d = hf->base;
    if (lo) {
        const struct vn_edit *e = &hf->edits[lo - 1];
        if ((int64_t)x < edit_ostart(e) + e->inj_len)
            return e->off;
        d = edit_after(e);
    }
    int64_t o = (int64_t)x - d;
    return o < 0 ? 0 : (uint64_t)o;
}

/* The first edit that ends after sender offset `a` (or injects at it). */
static unsigned edit_first_after(const struct vn_half *hf, uint64_t a)
{
    unsigned lo = 0, hi = hf->nedits;          /* first edit ending after a (or at a, inject) */
    while (lo < hi) {
        unsigned mid = (lo + hi) / 2;
        const struct vn_edit *e = &hf->edits[mid];
        if (e->off + e->cut < a || (e->off + e->cut == a && e->off < a))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* orig_ack, never beyond what the sender sent (a cut may reach into bytes not sent yet). */
static uint64_t orig_ack_clamped(const struct vn_half *hf, uint64_t x)
{
    uint64_t a = orig_ack(hf, x);
    return a > hf->highest ? hf->highest : a;
}

/* How far the receiver's stream stands, in output offsets. */
static uint64_t sent_out(const struct vn_half *hf)
{
    return hf->edited ? hf->out_sent : hf->released_end;
}

/* Output offset of a sequence number the receiver uses (acknowledgements, SACK edges). */
static int64_t seq_off_out(const struct vn_half *hf, uint32_t seq)
{
    uint64_t ref = sent_out(hf);
    int32_t delta = (int32_t)(seq - seq_at(hf, ref));
    if (delta < 0 && (uint64_t)(-(int64_t)delta) > ref)
        return -1;
    return (int64_t)ref + delta;
}

static uint16_t csum_update32(uint16_t c, uint32_t old, uint32_t new)
{
    c = csum_update(c, (uint16_t)(old >> 16), (uint16_t)(new >> 16));
    return csum_update(c, (uint16_t)old, (uint16_t)new);
}

/* Rewrites the TCP header of a frame from half `hs` for the receiver: its sequence number
 * to `seq` (when the sender's stream is edited), its acknowledgement, SACK blocks and window
 * through the edits of the other direction.  `csum`: 1 update the checksum incrementally,
 * 0 leave it (partial checksum, or the caller recomputes it).  Remembers what went out. */
static void rewrite_tcp(struct vn_flow *f, int hs, uint8_t *tcp, unsigned doff, uint32_t seq,
                        int csum)
{
    struct vn_half *S = &f->half[hs], *R = &f->half[!hs];
    uint16_t c = vn_rd16(tcp + 16);
    uint32_t old_seq = vn_rd32(tcp + 4);
    if (S->edited && old_seq != seq) {
        vn_wr32(tcp + 4, seq);
        if (csum)
            c = csum_update32(c, old_seq, seq);
    }
    if (R->edited && (tcp[13] & TCP_ACK)) {
        uint32_t ack = vn_rd32(tcp + 8);
        int64_t aout = seq_off_out(R, ack);
        if (aout >= 0) {
            uint64_t a = orig_ack_clamped(R, (uint64_t)aout);
            if (a < R->vouched)
                a = R->vouched;    /* the NI acknowledged more already: never less */
            uint32_t nack = seq_at(R, a);
            vn_wr32(tcp + 8, nack);
            if (csum)
                c = csum_update32(c, ack, nack);
            /* the window's right edge, mapped the same way */
            int ws = S->wscale >= 0 ? S->wscale : 0;
            uint16_t win = vn_rd16(tcp + 14);
            uint64_t edge = orig_ack(R, (uint64_t)aout + ((uint64_t)win << ws));
            uint64_t nw = edge > a ? (edge - a) >> ws : 0;
            if (nw > 0xffff)
                nw = 0xffff;
            vn_wr16(tcp + 14, (uint16_t)nw);
            if (csum)
                c = csum_update(c, win, (uint16_t)nw);
        }
        /* SACK blocks (kind 5): both edges mapped */
        uint8_t *o = (uint8_t *)tcp_opt(tcp + 20, doff - 20, 5);
        for (unsigned b = 2; o && b + 8 <= o[1]; b += 8) {
            for (int k = 0; k < 2; k++) {
                uint32_t old = vn_rd32(o + b + 4 * k);
                int64_t x = seq_off_out(R, old);
                uint32_t nv = x < 0 ? old : seq_at(R, orig_ack_clamped(R, (uint64_t)x));
                vn_wr32(o + b + 4 * k, nv);
                if (csum)
                    c = csum_update32(c, old, nv);
            }
        }
    }
    if (csum)
        vn_wr16(tcp + 16, c);
    if (tcp[13] & TCP_ACK) {
        S->wire_set = 1;
        S->wire_ack = vn_rd32(tcp + 8);
        S->wire_win = vn_rd16(tcp + 14);
        int64_t a = seq_off(R, S->wire_ack);
        if (a >= 0 && (uint64_t)a > R->told)
            R->told = (uint64_t)a;
    }
}

/* The full TCP checksum (and IPv4 header checksum) of a frame built here. */
static void finish_csums(int family, uint8_t *ip, uint8_t *tcp, uint32_t tlen)
{
    if (family == 4) {
        unsigned ihl = (ip[0] & 15) * 4u;
        vn_wr16(ip + 10, 0);
        vn_wr16(ip + 10, (uint16_t)~vn_fold(vn_sum16(0, ip, ihl)));
    }
    vn_wr16(tcp + 16, 0);
    vn_wr16(tcp + 16, (uint16_t)~vn_fold(vn_sum16(pseudo(family, ip, tlen), tcp, tlen)));
}

/* A data frame of one direction as it arrived: a kept record, or the frame being input. */
struct vn_fview {
    const uint8_t *data;
    const struct vn_net_hdr *hdr;
    uint32_t pay, paylen;
    uint16_t l3, l4;
    uint64_t start;
    uint8_t fin;
    int port, dir, egress_to;
};

/* Sends a frame built in the scratch slot of the current depth on its way. */
static void send_built(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt)
{
    struct vn_tcp *t = sw->tcp;
    struct vn_port *p = &sw->ports[port];
    if (!p->kind)
        return;
    t->depth++;
    if (vn_isolation_drops(p, dir, pkt)) {
        t->depth--;                /* the NI was isolated while the bytes waited */
        return;
    }
    struct vn_hdrs h;
    vn_parse(pkt, &h);
    sw->now_ns = vn_now_ns();
    if (!vn_policy_subs(sw, port, dir, egress_to, pkt, &h)) {
        if (egress_to < 0)
            vn_forward_switch(sw, port, pkt);
        else if (sw->ports[egress_to].kind)
            vn_deliver_nopolicy(sw, egress_to, pkt);
    }
    t->depth--;
}

static void note_out(struct vn_half *hf, uint64_t end)
{
    if (end > hf->out_sent)
        hf->out_sent = end;
}

/* Sends sender bytes [a, b) of a frame as plain segments (at most `chunk` bytes each) at
 * their output offsets, the FIN on the last one if `fin`. */
static void send_piece(struct vn_switch *sw, struct vn_flow *f, int hs, const struct vn_fview *v,
                       uint64_t a, uint64_t b, int fin)
{
    struct vn_tcp *t = sw->tcp;
    struct vn_half *S = &f->half[hs];
    uint32_t chunk = v->hdr->gso_size && (v->hdr->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) ? v->hdr->gso_size
                                                                                    : v->paylen;
    if (!chunk)
        chunk = 1;
    do {
        if (t->depth >= t->depth_max) {
            sw->ports[f->port].st.tcp_emit_dropped++;
            return;
        }
        uint64_t e = b - a > chunk ? a + chunk : b;
        int last_fin = fin && e == b;
        struct vn_pkt *pkt = &t->scratch[t->depth];
        uint32_t n = (uint32_t)(e - a);
        memcpy(pkt->data, v->data, v->pay);
        memcpy(pkt->data + v->pay, v->data + v->pay + (a - v->start), n);
        pkt->len = v->pay + n;
        memset(&pkt->hdr, 0, sizeof(pkt->hdr));
        uint8_t *ip = pkt->data + v->l3, *tcp = pkt->data + v->l4;
        if (f->family == 4)
            vn_wr16(ip + 2, (uint16_t)(pkt->len - v->l3));
        else
            vn_wr16(ip + 4, (uint16_t)(pkt->len - v->l3 - 40));
        tcp[13] = (uint8_t)((tcp[13] & ~TCP_FIN) | (last_fin ? TCP_FIN : 0));
        uint64_t o = out_pos(S, a);
        rewrite_tcp(f, hs, tcp, v->pay - v->l4, seq_at(S, o), 0);
        finish_csums(f->family, ip, tcp, pkt->len - v->l4);
        note_out(S, o + n + last_fin);
        sw->ports[f->port].st.tcp_edit_segments++;
        send_built(sw, v->port, v->dir, v->egress_to, pkt);
        a = e;
    } while (a < b);
}

/* Builds and sends a segment of our own from the `from` half's endpoint to the other one. */
static void forge_seg(struct vn_switch *sw, struct vn_flow *f, int from, uint32_t seq, uint32_t ack,
                      uint8_t flags, uint16_t win, const uint8_t *payload, uint32_t len,
                      const struct vn_edit *inj)
{
    struct vn_tcp *t = sw->tcp;
    if (t->depth >= t->depth_max) {
        sw->ports[f->port].st.tcp_emit_dropped++;
        return;
    }
    struct vn_half *src = &f->half[from], *other = &f->half[!from];
    struct vn_pkt *pkt = &t->scratch[t->depth];
    uint8_t *d = pkt->data;
    unsigned l2;
    if (src->eth_len) {
        l2 = src->eth_len;
        memcpy(d, src->eth, l2);
    } else if (other->eth_len) {
        l2 = other->eth_len;
        memcpy(d, other->eth, l2);
        memcpy(d, other->eth + 6, 6);       /* swap the addresses */
        memcpy(d + 6, other->eth, 6);
    } else {
        sw->ports[f->port].st.tcp_emit_dropped++;
        return;
    }
    int from_guest = from == 0;
    const uint8_t *sa = from_guest ? f->gaddr : f->raddr, *da = from_guest ? f->raddr : f->gaddr;
    uint16_t sp = from_guest ? f->gport : f->rport, dp = from_guest ? f->rport : f->gport;
    /* with timestamps on: an ACK carries the end's latest ones; injected bytes those of
     * the bytes before them (later data must not look older to the receiver's PAWS) */
    uint32_t tsv = inj ? inj->ts_val : src->ts_val, tse = inj ? inj->ts_ecr : src->ts_ecr;
    unsigned th = !(flags & TCP_RST) && (inj ? inj->has_ts : src->ts_seen) && src->ts && other->ts ? 32 : 20;
    uint8_t *ip = d + l2, *tcp;
    if (f->family == 4) {
        memset(ip, 0, 20);
        ip[0] = 0x45;
        vn_wr16(ip + 2, (uint16_t)(20 + th + len));
        vn_wr16(ip + 6, 0x4000);
        ip[8] = 64;
        ip[9] = 6;
        memcpy(ip + 12, sa, 4);
        memcpy(ip + 16, da, 4);
        tcp = ip + 20;
    } else {
        memset(ip, 0, 40);
        ip[0] = 0x60;
        vn_wr16(ip + 4, (uint16_t)(th + len));
        ip[6] = 6;
        ip[7] = 64;
        memcpy(ip + 8, sa, 16);
        memcpy(ip + 24, da, 16);
        tcp = ip + 40;
    }
    memset(tcp, 0, th);
    vn_wr16(tcp, sp);
    vn_wr16(tcp + 2, dp);
    vn_wr32(tcp + 4, seq);
    vn_wr32(tcp + 8, ack);
    tcp[12] = (uint8_t)((th / 4) << 4);
    tcp[13] = flags;
    vn_wr16(tcp + 14, win);
    if (th > 20) {
        static const uint8_t ts_head[4] = {1, 1, 8, 10};
        memcpy(tcp + 20, ts_head, 4);
        vn_wr32(tcp + 24, tsv);
        vn_wr32(tcp + 28, tse);
    }
    if (len)
        memcpy(tcp + th, payload, len);
    finish_csums(f->family, ip, tcp, th + len);
    pkt->len = (uint32_t)(tcp + th + len - d);
    memset(&pkt->hdr, 0, sizeof(pkt->hdr));
    t->depth++;
    sw->now_ns = vn_now_ns();
    if (from_guest)
        vn_forward_switch(sw, f->port, pkt);       /* into the network, as the guest */
    else
        vn_deliver_nopolicy(sw, f->port, pkt);     /* to the guest, as the remote end */
    t->depth--;
}

/* Sends (or resends) the injected bytes of edit `e` of half `hs` from output offset `from`
 * on, in segments the receiver's MSS allows, as the sender. */
static void send_inject(struct vn_switch *sw, struct vn_flow *f, int hs, struct vn_edit *e, uint64_t from,
                        const uint8_t *tsopt)
{
    if (!e->has_ts && tsopt) {     /* first send: the timestamps of the bytes around it */
        e->has_ts = 1;
        e->ts_val = vn_rd32(tsopt + 2);
        e->ts_ecr = vn_rd32(tsopt + 6);
    }
    struct vn_half *S = &f->half[hs], *R = &f->half[!hs];
    uint64_t ostart = (uint64_t)((int64_t)e->off + e->before), oend = ostart + e->inj_len;
    if (from < ostart)
        from = ostart;
    uint32_t mss = R->mss ? R->mss : 536;
    if (mss > 1400)
        mss = 1400;
    uint32_t ack = S->wire_set ? S->wire_ack : seq_at(R, R->released_end);
    uint16_t win = S->wire_set ? S->wire_win : 0xffff;
    for (uint64_t o = from; o < oend; o += mss) {
        uint32_t n = oend - o > mss ? mss : (uint32_t)(oend - o);
        forge_seg(sw, f, hs, seq_at(S, o), ack, TCP_ACK | TCP_PSH, win, e->inj + (o - ostart), n, e);
        sw->ports[f->port].st.tcp_injected_bytes += n;
    }
    note_out(S, oend);
    e->inj_sent = 1;
    e->sent_ns = vn_now_ns();
    e->tries++;
}

/* The timestamp option of a kept frame (NULL: none). */
static const uint8_t *frame_ts(const struct vn_fview *v)
{
    unsigned doff = v->pay - v->l4;
    const uint8_t *o = doff > 20 ? tcp_opt(v->data + v->l4 + 20, doff - 20, 8) : NULL;
    return o && o[1] == 10 ? o : NULL;
}

/* The timestamp option of the kept frame with the byte before sender offset `off`. */
static const uint8_t *ts_before(const struct vn_half *hf, uint64_t off)
{
    if (!off)
        return NULL;
    for (const struct vn_seg *s = seg_from(hf, off - 1); s && s->start < off; s = s->next)
        if (seg_end(s) >= off) {
            struct vn_fview v;
            v.data = s->rec->data;
            v.pay = s->pay;
            v.l4 = s->l4;
            return frame_ts(&v);
        }
    return NULL;
}

/* Sends sender bytes [from, to) of frame `v` edited: the pieces between cuts, and the
 * injections at offsets in [from, to) before their bytes (those not sent yet; with
 * `resend`, also those the receiver has not acknowledged).  The frame's FIN goes last. */
static void send_edited(struct vn_switch *sw, struct vn_flow *f, int hs, const struct vn_fview *v,
                        uint64_t from, uint64_t to, int fin, int resend)
{
    struct vn_half *S = &f->half[hs];
    uint64_t cur = from;
    int sent_fin = 0;
    for (unsigned i = edit_first_after(S, from); i < S->nedits && cur < to; i++) {
        struct vn_edit *e = &S->edits[i];
        uint64_t cend = e->off + e->cut;
        if (cend < cur || (cend == cur && e->off < cur))
            continue;
        if (e->off >= to)
            break;
        if (e->off > cur) {
            send_piece(sw, f, hs, v, cur, e->off, 0);
            cur = e->off;
        }
        if (e->inj_len && e->off >= from) {
            uint64_t oend = (uint64_t)((int64_t)e->off + e->before) + e->inj_len;
            if (!e->inj_sent || (resend && S->acked_out < oend))
                send_inject(sw, f, hs, e, S->acked_out, frame_ts(v));
        }
        if (cend > cur)
            cur = cend;
    }
    if (cur < to) {
        send_piece(sw, f, hs, v, cur, to, fin);
        sent_fin = fin;
    }
    if (fin && !sent_fin)
        send_piece(sw, f, hs, v, to, to, 1);   /* the FIN alone: its bytes were cut */
}

/* Whether edits of half `hs` touch the bytes [a, b] of a frame (a boundary inside it, or
 * an injection to send at one of its offsets). */
static int edits_touch(const struct vn_half *hf, uint64_t a, uint64_t b)
{
    for (unsigned i = edit_first_after(hf, a); i < hf->nedits; i++) {
        const struct vn_edit *e = &hf->edits[i];
        if (e->off >= b)
            break;
        if (e->off + e->cut > a)
            return 1;
    }
    return 0;
}

/* Acknowledges to the sender of half `hs` the cut bytes the receiver is done with: the
 * receiver never sees them, so it never acknowledges them itself. */
static void ack_cut(struct vn_switch *sw, struct vn_flow *f, int hs)
{
    struct vn_half *S = &f->half[hs], *R = &f->half[!hs];
    if (!S->edited)
        return;
    uint64_t a = orig_ack_clamped(S, S->acked_out);
    if (a <= S->told || !R->have_isn)
        return;
    S->told = a;
    forge_seg(sw, f, !hs, seq_at(R, sent_out(R)), seq_at(S, a), TCP_ACK,
              R->wire_set ? R->wire_win : 0xffff, NULL, 0, NULL);
    sw->ports[f->port].st.tcp_forged_acks++;
}

static void edit_account(struct vn_switch *sw, struct vn_flow *f, int64_t delta)
{
    struct vn_tcp_port *tp = sw->tcp->ports[f->port];
    if (tp)
        tp->bytes += (uint64_t)delta;
}

static uint64_t edit_cost(const struct vn_edit *e) { return sizeof(*e) + e->inj_len; }

/* Drops the edits the receiver acknowledged entirely (their shift stays in `base`). */
static void edits_compact(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
{
    unsigned k = 0;
    while (k < hf->nedits) {
        struct vn_edit *e = &hf->edits[k];
        uint64_t oend = (uint64_t)((int64_t)e->off + e->before) + e->inj_len;
        if ((e->inj_len && (!e->inj_sent || hf->acked_out < oend)) || hf->acked < e->off + e->cut ||
            hf->rel_lim < e->off + e->cut)
            break;                 /* still needed: to send, or to map what comes back */
        hf->base = edit_after(e);
        edit_account(sw, f, -(int64_t)edit_cost(e));
        free(e->inj);
        k++;
    }
    if (k) {
        memmove(hf->edits, hf->edits + k, (hf->nedits - k) * sizeof(*hf->edits));
        hf->nedits -= k;
    }
}

static void edits_free(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
{
    for (unsigned i = 0; i < hf->nedits; i++) {
        edit_account(sw, f, -(int64_t)edit_cost(&hf->edits[i]));
        free(hf->edits[i].inj);
    }
    free(hf->edits);
    hf->edits = NULL;
    hf->nedits = 0;
}

/* Sends the injections whose place the release frontier `lim` reached and whose bytes
 * before were sent (those at the end of what arrived so far). */
static void send_due_injections(struct vn_switch *sw, struct vn_flow *f, int hs, uint64_t lim)
{
    struct vn_half *S = &f->half[hs];
    for (unsigned i = 0; i < S->nedits; i++) {
        struct vn_edit *e = &S->edits[i];
        if (e->off > lim)
            break;
        if (e->inj_len && !e->inj_sent)
            send_inject(sw, f, hs, e, 0, ts_before(S, e->off));
    }
}

/* From now on every frame of this direction (and the acknowledgements of it) goes through
 * rewrite_tcp: until now the output was the input. */
static void rewrite_start(struct vn_half *hf)
{
    if (hf->edited)
        return;
    hf->edited = 1;
    hf->out_sent = hf->released_end;
    hf->told = hf->acked;
}

/* Tells the sender of half `hs` again how far its bytes are acknowledged (it resent some:
 * it missed the NI's ACK). */
static void reack(struct vn_switch *sw, struct vn_flow *f, int hs)
{
    struct vn_half *S = &f->half[hs], *R = &f->half[!hs];
    if (!R->have_isn)
        return;
    forge_seg(sw, f, !hs, seq_at(R, sent_out(R)), seq_at(S, S->told), TCP_ACK,
              R->wire_set ? R->wire_win : 0xffff, NULL, 0, NULL);
    sw->ports[f->port].st.tcp_forged_acks++;
}

/* `more`: acknowledges to the sender of half `hs` the held bytes it sent in order, with
 * the receiver's last window beyond them, so it sends on. */
static void more_ack(struct vn_switch *sw, struct vn_flow *f, int hs)
{
    struct vn_half *S = &f->half[hs], *R = &f->half[!hs];
    if (!S->more || !S->hold || !R->have_isn || !S->have_isn)
        return;
    uint64_t target = S->contig;
    if (target < S->told)
        target = S->told;
    if (target <= S->vouched)
        return;
    rewrite_start(S);
    uint16_t win = R->wire_set ? R->wire_win : 0xffff;
    int ws = R->wscale >= 0 ? R->wscale : 0;
    forge_seg(sw, f, !hs, seq_at(R, sent_out(R)), seq_at(S, target), TCP_ACK, win, NULL, 0, NULL);
    S->told = S->vouched = target;
    uint64_t edge = target + ((uint64_t)win << ws);
    if (edge > S->right)
        S->right = edge;
    sw->ports[f->port].st.tcp_more_acks++;
}

/* ---- emission ---- */

static void view_of(struct vn_fview *v, const struct vn_seg *s)
{
    v->data = s->rec->data;
    v->hdr = &s->rec->hdr;
    v->pay = s->pay;
    v->paylen = s->len;
    v->l3 = s->l3;
    v->l4 = s->l4;
    v->start = s->start;
    v->fin = s->fin;
    v->port = s->rec->port;
    v->dir = s->rec->dir;
    v->egress_to = s->rec->egress_to;
}

/* Sends a kept frame on: as it arrived, or rewritten for the edits of its connection (its
 * sequence and acknowledgement numbers shifted; split where an edit falls inside it). */
static void emit_record(struct vn_switch *sw, struct vn_flow *f, int hs, struct vn_seg *s)
{
    struct vn_tcp *t = sw->tcp;
    struct vn_held *r = s->rec;
    struct vn_half *S = &f->half[hs];
    if (!sw->ports[r->port].kind)
        return;                    /* its port went, and with it where it was going */
    if (t->depth >= t->depth_max) {
        sw->ports[f->port].st.tcp_emit_dropped++;
        return;
    }
    if (S->edited && edits_touch(S, s->start, seg_end(s))) {
        struct vn_fview v;
        view_of(&v, s);
        send_edited(sw, f, hs, &v, s->start, seg_end(s), s->fin, 0);
        return;
    }
    struct vn_pkt *pkt = &t->scratch[t->depth];
    pkt->len = r->len;
    pkt->hdr = r->hdr;
    memcpy(pkt->data, r->data, r->len);
    if (S->edited || f->half[!hs].edited) {
        uint8_t *tcp = pkt->data + s->l4;
        uint64_t o = out_pos(S, s->start);
        rewrite_tcp(f, hs, tcp, s->pay - s->l4, seq_at(S, o),
                    !(pkt->hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM));
        if (S->edited)
            note_out(S, o + s->len + s->fin);
    }
    send_built(sw, r->port, r->dir, r->egress_to, pkt);
}

/* Sends on, in order, every held record whose bytes are all passed and in order. */
static void half_release(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
{
    if (!hf->hold)
        return;
    if (sw->tcp->depth >= sw->tcp->depth_max) {
        f->deferred = 1;
        sw->tcp->deferred = 1;
        return;
    }
    uint64_t lim = hf->passed < hf->contig ? hf->passed : hf->contig;
    if (hf->vouched > hf->acked && hf->real_right && lim > hf->real_right)
        lim = hf->real_right;      /* bytes beyond the receiver's window wait with the NI */
    struct vn_port *p = &sw->ports[f->port];
    /* every record ending at or below the last limit went already */
    for (struct vn_seg *s = seg_from(hf, hf->rel_lim); s && s->start <= lim; s = s->next) {
        if (s->released || seg_end(s) > lim)
            continue;
        s->released = 1;
        uint64_t end = seg_end(s) + s->fin;
        if (end > hf->released_end)
            hf->released_end = end;
        p->st.tcp_released_segments++;
        if (hf->vouched > hf->acked)
            hf->ack_ns = vn_now_ns();  /* the resend timer runs from the latest send */
        emit_record(sw, f, (int)(hf - f->half), s);
    }
    if (lim > hf->rel_lim)
        hf->rel_lim = lim;
    if (hf->edited) {
        /* injections at the end of what went: never ahead of bytes still held before
         * them (the receiver's stream stays contiguous; an acknowledgement beyond it
         * is a lie the NI does not believe) */
        uint64_t front = lim;
        for (struct vn_seg *s = hf->head; s && s->start < front; s = s->next)
            if (!s->released) {
                front = s->start;
                break;
            }
        send_due_injections(sw, f, (int)(hf - f->half), front);
        ack_cut(sw, f, (int)(hf - f->half));
    }
}

/* ---- forged RSTs ---- */

/* An RST|ACK from the `from` half's endpoint to the other one. */
static void forge_rst(struct vn_switch *sw, struct vn_flow *f, int from, uint32_t seq, uint32_t ack)
{
    forge_seg(sw, f, from, seq, ack, TCP_RST | TCP_ACK, 0, NULL, 0, NULL);
}

static uint32_t seq_at(const struct vn_half *hf, uint64_t off) { return hf->isn + 1 + (uint32_t)off; }

/* RSTs to both ends with the sequence numbers each expects: where the receiver's stream
 * stands is what the NI sent on; if it acknowledged less, a second RST covers that. */
static void forge_rsts(struct vn_switch *sw, struct vn_flow *f)
{
    for (int from = 0; from < 2; from++) {
        struct vn_half *s = &f->half[from], *r = &f->half[!from];
        if (!s->have_isn || !r->have_isn)
            continue;
        uint32_t ack = seq_at(r, r->released_end);
        uint64_t at = sent_out(s), acked = s->edited ? s->acked_out : s->acked;
        forge_rst(sw, f, from, seq_at(s, at), ack);
        if (acked != at)
            forge_rst(sw, f, from, seq_at(s, acked), ack);
    }
}

/* ---- life and death of flows ---- */

static void flow_close(struct vn_switch *sw, struct vn_flow *f, int reason)
{
    if (f->state == ST_CLOSED)
        return;
    f->state = ST_CLOSED;
    f->reason = reason;
    table_unlink(sw, f);
    if (reason != VN_CLOSE_FIN)
        for (int i = 0; i < 2; i++)
            half_drop_held(sw, f, &f->half[i]);
    if (f->announced) {
        f->report_close = 1;
        mark_dirty(sw, f);
    }
}

static void flow_free(struct vn_switch *sw, struct vn_flow *f)
{
    struct vn_tcp *t = sw->tcp;
    table_unlink(sw, f);
    for (int i = 0; i < 2; i++) {
        half_free_all(sw, f, &f->half[i]);
        edits_free(sw, f, &f->half[i]);
    }
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
    f->bypass = 1;
    for (int i = 0; i < 2; i++) {
        struct vn_half *hf = &f->half[i];
        hf->passed = UINT64_MAX;
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
    for (int i = 0; i < 2; i++)
        f->half[i].wscale = -1;
    return f;
}

static int port_subscribed(const struct vn_policy *pol, uint16_t port)
{
    for (unsigned i = 0; i < pol->nstream_subs && i < VN_MAX_STREAM_SUBS; i++)
        if (pol->stream_subs[i].port_lo <= port && port <= pol->stream_subs[i].port_hi)
            return 1;
    return 0;
}

/* The handshake completed: which subscriptions want it now, and what each direction is. */
static void flow_establish(struct vn_switch *sw, struct vn_flow *f, const struct vn_policy *pol)
{
    f->state = ST_ESTABLISHED;
    uint16_t server_port = f->client == VN_DIR_FROM_GUEST ? f->rport : f->gport;
    uint64_t subs = 0;
    uint8_t read = 0, hold = 0;
    for (unsigned i = 0; i < pol->nstream_subs && i < VN_MAX_STREAM_SUBS; i++) {
        const struct vn_stream_sub *s = &pol->stream_subs[i];
        if (s->port_lo <= server_port && server_port <= s->port_hi) {
            uint8_t dirs = s->dirs ? s->dirs : (VN_DIR_FROM_GUEST | VN_DIR_TO_GUEST);
            subs |= 1ULL << i;
            read |= dirs;
            if (s->contain)
                hold |= dirs;
        }
    }
    if (!subs) {                   /* unsubscribed meanwhile: nobody wants it */
        f->bypass = 1;
        return;
    }
    f->subs = subs;
    for (int i = 0; i < 2; i++) {
        f->half[i].read = !!(read & dir_of(i));
        f->half[i].hold = !!(hold & dir_of(i));
    }
    f->announced = 1;
    f->report_open = 1;
    mark_dirty(sw, f);
}

/* ---- the input path ---- */

/* Stream offset of sequence number `seq` in half `hf` (relative to its reference point);
 * -1 if it lies before the first byte. */
static int64_t seq_off(const struct vn_half *hf, uint32_t seq)
{
    uint64_t ref = hf->highest;
    int32_t delta = (int32_t)(seq - seq_at(hf, ref));
    if (delta < 0 && (uint64_t)(-(int64_t)delta) > ref)
        return -1;
    return (int64_t)ref + delta;
}

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

static int drop(uint64_t *counter)
{
    (*counter)++;
    return VN_TCP_TAKEN;
}

/* ---- IP fragments of TCP: reassembled before inspection ----
 *
 * On an NI whose TCP is inspected, every fragment of a TCP datagram is kept until the
 * datagram is whole; it then goes through the NI's policy again as one unfragmented frame
 * (so the stream rules see all of it), as a TSO frame if it is larger than a plain frame
 * (segmented again for a receiver that cannot take it).  Fragments that overlap (Ptacek and
 * Newsham: the receiver could take either copy), disagree about the datagram's end, or do
 * not add up to a datagram within VN_FRAG_NS are dropped, all of them: nothing the scanners
 * could not have seen reaches a receiver.  Kept bytes count towards tcp_bytes_max. */
#define VN_FRAG_MAX 64                 /* datagrams in reassembly per NI */
#define VN_FRAG_PIECES 64              /* fragments per datagram */
#define VN_FRAG_NS (30ULL * 1000000000ULL)
#define VN_FRAG_BUF 65536

struct vn_frag {
    struct vn_frag *next;
    int dir, egress_to;
    uint8_t family, bad, have_first;
    uint8_t src[16], dst[16];
    uint32_t id;
    uint64_t first_ns;
    uint32_t total;                    /* payload bytes, once the last fragment came (0: not yet) */
    uint32_t have;
    unsigned npieces;
    struct { uint32_t off, len; } piece[VN_FRAG_PIECES];
    uint8_t head[18 + 60];             /* L2 + IPv4 header (or IPv6 base header) of fragment 0 */
    unsigned head_len, l3;
    uint8_t nh;                        /* IPv6: the protocol after the fragment header */
    uint8_t payload[VN_FRAG_BUF];
};

static void frag_free(struct vn_switch *sw, int port, struct vn_frag **pp)
{
    struct vn_frag *g = *pp;
    *pp = g->next;
    sw->tcp->ports[port]->nfrags--;
    sw->tcp->ports[port]->bytes -= sizeof(*g);
    free(g);
}

/* Takes one TCP fragment.  Returns VN_TCP_TAKEN always: the fragment is kept, or dropped
 * (counted), or it completed a datagram that went on through the policy. */
static int frag_input(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt,
                      const struct vn_hdrs *h)
{
    struct vn_port *p = &sw->ports[port];
    struct vn_port_stats *st = &p->st;
    const struct vn_policy *pol = p->pol;
    const uint8_t *d = pkt->data;
    unsigned l3 = (unsigned)h->l3_off, pay, end;
    uint32_t id, off;
    int more;
    uint8_t nh = 6;
    if (h->family == 4) {
        unsigned ihl = (d[l3] & 15) * 4u, tot = vn_rd16(d + l3 + 2);
        if (tot < ihl || l3 + tot > pkt->len ||
            vn_fold(vn_sum16(0, d + l3, ihl)) != 0xffff)
            return drop(&st->tcp_frag_dropped);
        uint16_t fr = vn_rd16(d + l3 + 6);
        id = vn_rd16(d + l3 + 4);
        off = (fr & 0x1fffu) * 8;
        more = !!(fr & 0x2000);
        pay = l3 + ihl;
        end = l3 + tot;
    } else {
        /* the fragment header right after the base header; other layouts are not taken apart */
        if (d[l3 + 6] != 44 || l3 + 48 > pkt->len || l3 + 40 + vn_rd16(d + l3 + 4) > pkt->len)
            return drop(&st->tcp_frag_dropped);
        const uint8_t *fh = d + l3 + 40;
        nh = fh[0];
        off = vn_rd16(fh + 2) & 0xfff8u;
        more = fh[3] & 1;
        id = vn_rd32(fh + 4);
        pay = l3 + 48;
        end = l3 + 40 + vn_rd16(d + l3 + 4);
    }
    if (end < pay)
        return drop(&st->tcp_frag_dropped);
    uint32_t len = end - pay;
    if ((more && (len & 7)) || off + len > VN_FRAG_BUF || (!len && more))
        return drop(&st->tcp_frag_dropped);
    struct vn_tcp_port *tp = tport(sw, port, 1);
    if (!tp)
        return drop(&st->tcp_frag_dropped);
    unsigned n = h->family == 4 ? 4 : 16;
    struct vn_frag **pp = &tp->frags, *g = NULL;
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->id == id && (*pp)->family == h->family && (*pp)->dir == dir &&
            !memcmp((*pp)->src, h->src, n) && !memcmp((*pp)->dst, h->dst, n)) {
            g = *pp;
            break;
        }
    if (!g) {
        if (tp->nfrags >= VN_FRAG_MAX || tp->bytes + sizeof(*g) > pol->tcp_bytes_max)
            return drop(&st->tcp_frag_dropped);
        g = calloc(1, sizeof(*g));
        if (!g)
            return drop(&st->tcp_frag_dropped);
        g->family = (uint8_t)h->family;
        memcpy(g->src, h->src, n);
        memcpy(g->dst, h->dst, n);
        g->id = id;
        g->dir = dir;
        g->egress_to = egress_to;
        g->first_ns = sw->now_ns;
        g->next = tp->frags;
        tp->frags = g;
        tp->nfrags++;
        tp->bytes += sizeof(*g);
        pp = &tp->frags;
    }
    if (g->bad)
        return drop(&st->tcp_frag_overlap);
    /* overlaps: an identical copy of a piece is a duplicate; anything else poisons it */
    for (unsigned i = 0; i < g->npieces; i++) {
        uint32_t a = g->piece[i].off, b = a + g->piece[i].len;
        if (off < b && a < off + len) {
            if (a == off && b == off + len && !memcmp(g->payload + off, d + pay, len))
                return drop(&st->tcp_frag_dropped);
            g->bad = 1;
            return drop(&st->tcp_frag_overlap);
        }
    }
    if ((!more && g->total && g->total != off + len) || (g->total && off + len > g->total) ||
        g->npieces >= VN_FRAG_PIECES || (g->family == 6 && g->npieces && g->nh != nh)) {
        g->bad = 1;
        return drop(&st->tcp_frag_overlap);
    }
    if (!more)
        g->total = off + len;
    g->nh = nh;
    memcpy(g->payload + off, d + pay, len);
    g->piece[g->npieces].off = off;
    g->piece[g->npieces].len = len;
    g->npieces++;
    g->have += len;
    if (off == 0) {
        unsigned hl = h->family == 4 ? pay : l3 + 40;
        if (hl > sizeof(g->head)) {
            g->bad = 1;
            return drop(&st->tcp_frag_dropped);
        }
        memcpy(g->head, d, hl);
        g->head_len = hl;
        g->l3 = l3;
        g->have_first = 1;
    }
    if (!g->total || g->have != g->total || !g->have_first)
        return VN_TCP_TAKEN;

    /* whole: one frame, through the policy again */
    struct vn_tcp *t = sw->tcp;
    int ok = g->head_len + g->total <= VN_MAX_FRAME &&
             (g->family == 4 ? g->head_len - g->l3 + g->total <= 0xffff : g->total <= 0xffff) &&
             g->total >= 20;
    if (!ok) {                     /* too large for a frame, or too short for a TCP header */
        st->tcp_frag_dropped += g->npieces;
    } else if (t->depth >= t->depth_max) {
        ok = 0;
        st->tcp_emit_dropped++;
    }
    struct vn_pkt *out = ok ? &t->scratch[t->depth] : NULL;
    if (ok) {
        memcpy(out->data, g->head, g->head_len);
        memcpy(out->data + g->head_len, g->payload, g->total);
        out->len = g->head_len + g->total;
        memset(&out->hdr, 0, sizeof(out->hdr));
        uint8_t *ip = out->data + g->l3;
        unsigned l4 = g->head_len;
        if (g->family == 4) {
            vn_wr16(ip + 2, (uint16_t)(l4 - g->l3 + g->total));
            vn_wr16(ip + 6, 0x4000);
            vn_wr16(ip + 10, 0);
            vn_wr16(ip + 10, (uint16_t)~vn_fold(vn_sum16(0, ip, l4 - g->l3)));
        } else {
            ip[6] = g->nh;
            vn_wr16(ip + 4, (uint16_t)g->total);
        }
        uint8_t *tcp = out->data + l4;
        unsigned doff = (tcp[12] >> 4) * 4u;
        ok = g->nh == 6 && doff >= 20 && doff <= g->total &&
             vn_fold(vn_sum16(pseudo(g->family, ip, g->total), tcp, g->total)) == 0xffff;
        if (!ok) {
            st->tcp_bad_csum++;
        } else if (out->len > 1514) {
            /* larger than a plain frame: a TSO frame (its checksum now partial, as a
             * guest's own), cut into segments again for a receiver that needs them */
            out->hdr.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            out->hdr.gso_type = g->family == 4 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6;
            out->hdr.gso_size = (uint16_t)(1500 - (l4 - g->l3) - doff);
            out->hdr.hdr_len = (uint16_t)(l4 + doff);
            out->hdr.csum_start = (uint16_t)l4;
            out->hdr.csum_offset = 16;
            vn_wr16(tcp + 16, (uint16_t)vn_fold(pseudo(g->family, ip, g->total)));
        }
    }
    frag_free(sw, port, pp);
    if (!ok)
        return VN_TCP_TAKEN;
    st->tcp_frag_reassembled++;
    t->depth++;
    sw->now_ns = vn_now_ns();
    if (!vn_policy_apply(sw, port, dir, egress_to, out)) {
        if (egress_to < 0)
            vn_forward_switch(sw, port, out);
        else if (sw->ports[egress_to].kind)
            vn_deliver_nopolicy(sw, egress_to, out);
    }
    t->depth--;
    return VN_TCP_TAKEN;
}

/* Datagrams that did not come together in time are dropped, as a host drops them. */
static void frag_expire(struct vn_switch *sw, int port, uint64_t now)
{
    struct vn_tcp_port *tp = sw->tcp->ports[port];
    for (struct vn_frag **pp = &tp->frags; *pp;) {
        if (now - (*pp)->first_ns > VN_FRAG_NS) {
            sw->ports[port].st.tcp_frag_dropped += (*pp)->npieces;
            frag_free(sw, port, pp);
        } else {
            pp = &(*pp)->next;
        }
    }
}

int vn_tcp_active(struct vn_switch *sw, int port)
{
    const struct vn_policy *pol = sw->ports[port].pol;
    if (pol && pol->nstream_subs)
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
    const uint8_t *ip = pkt->data + h->l3_off;
    if (h->family == 4 && vn_fold(vn_sum16(0, ip, (ip[0] & 15) * 4u)) != 0xffff)
        return 0;
    uint32_t tlen = ip_end - (unsigned)h->l4_off;
    return vn_fold(vn_sum16(pseudo(h->family, ip, tlen), pkt->data + h->l4_off, tlen)) == 0xffff;
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
        f->client = port_subscribed(pol, h->dport) ? dir
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
                f->client = port_subscribed(pol, h->dport) ? dir
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

#define FWD() (edited ? forward_edited(f, hs, pkt, tcp, doff) : VN_TCP_FORWARD)
#define RESEND() resend(sw, f, hs, &(struct vn_fview){d, &pkt->hdr, pay, paylen, (uint16_t)l3, \
                        (uint16_t)l4, start, (uint8_t)fin, port, dir, egress_to})

int vn_tcp_input(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt,
                 const struct vn_hdrs *h)
{
    struct vn_port *p = &sw->ports[port];
    const struct vn_policy *pol = p->pol;
    struct vn_port_stats *st = &p->st;
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
    if (!f && !port_subscribed(pol, h->dport) && !port_subscribed(pol, h->sport))
        return VN_TCP_FORWARD;

    /* lengths: the IP header's own for plain frames; a TSO frame is one segment of the
     * whole payload (its length fields are the guest's business until segmentation) */
    uint8_t *d = pkt->data;
    int gso = (pkt->hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_NONE;
    unsigned l3 = (unsigned)h->l3_off, l4 = (unsigned)h->l4_off, ip_end;
    if (gso) {
        ip_end = pkt->len;
    } else if (h->family == 4) {
        unsigned tot = vn_rd16(d + l3 + 2);
        if (tot < (d[l3] & 15) * 4u || l3 + tot > pkt->len)
            return drop(&st->tcp_bad_header);
        ip_end = l3 + tot;
    } else {
        ip_end = l3 + 40 + vn_rd16(d + l3 + 4);
        if (ip_end > pkt->len)
            return drop(&st->tcp_bad_header);
    }
    if (l4 + 20 > ip_end)
        return drop(&st->tcp_bad_header);
    unsigned doff = (d[l4 + 12] >> 4) * 4u;
    if (doff < 20 || l4 + doff > ip_end)
        return drop(&st->tcp_bad_header);
    uint8_t *tcp = d + l4;
    unsigned pay = l4 + doff;
    uint32_t paylen = ip_end - pay;
    uint8_t flags = tcp[13];
    uint32_t seq = vn_rd32(tcp + 4), ack = vn_rd32(tcp + 8);
    uint16_t win = vn_rd16(tcp + 14);
    if (!gso && !checksums_ok(pkt, h, ip_end))
        return drop(&st->tcp_bad_csum);
    if (flags & TCP_URG) {
        /* the receiver would take the urgent byte out of the stream (no SO_OOBINLINE):
         * clear the flag and the pointer so it stays where the scanners see it */
        uint16_t old_w = vn_rd16(tcp + 12), old_u = vn_rd16(tcp + 18);
        tcp[13] &= ~TCP_URG;
        vn_wr16(tcp + 18, 0);
        flags = tcp[13];
        if (!(pkt->hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) {
            uint16_t c = vn_rd16(tcp + 16);
            c = csum_update(c, old_w, vn_rd16(tcp + 12));
            c = csum_update(c, old_u, 0);
            vn_wr16(tcp + 16, c);
        }
        st->tcp_urg_cleared++;
    }

    if (!f) {
        if ((flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN)) == TCP_SYN &&
            port_subscribed(pol, h->dport)) {
            if (paylen)
                return drop(&st->tcp_syn_data);
            tp = tport(sw, port, 1);
            if (!tp || tp->nflows >= pol->tcp_flows_max) {
                st->tcp_flows_over++;
                return pol->tcp_flows_over_pass ? VN_TCP_FORWARD : VN_TCP_TAKEN;
            }
            f = flow_new(sw, tp, port, h->family, ga, ra, gp, rp);
            if (!f) {
                st->tcp_flows_over++;
                return pol->tcp_flows_over_pass ? VN_TCP_FORWARD : VN_TCP_TAKEN;
            }
            st->tcp_flows_opened++;
            f->client = dir;
            f->state = ST_SYN_SENT;
            f->last_ns = sw->now_ns;
            struct vn_half *c = &f->half[half_of(dir)];
            c->isn = seq;
            c->have_isn = 1;
            c->wscale = syn_wscale(tcp + 20, doff - 20);
            c->mss = syn_mss(tcp + 20, doff - 20);
            c->ts = tcp_opt(tcp + 20, doff - 20, 8) != NULL;
            c->syn_win = win;
            return VN_TCP_FORWARD;
        }
        if (paylen) {
            st->tcp_no_flow++;
            return midstream(sw, tp, port, dir, pkt, h, tcp, seq, ack, paylen);
        }
        return VN_TCP_FORWARD;     /* no bytes to inspect: ACK, RST, FIN */
    }

    f->last_ns = sw->now_ns;
    int hs = half_of(dir);
    int edited = f->half[0].edited || f->half[1].edited;     /* then f is announced: it stays */
    if (f->bypass)
        return FWD();
    struct vn_half *S = &f->half[hs], *R = &f->half[!hs];
    unsigned l2 = l3 < sizeof(S->eth) ? l3 : sizeof(S->eth);
    memcpy(S->eth, d, l2);
    S->eth_len = (uint8_t)l2;
    if (f->state == ST_ADOPTING) {
        if (flags & TCP_RST) {
            flow_end(sw, f, VN_CLOSE_RST);
            return VN_TCP_FORWARD;
        }
        if (hs == f->prober || (flags & TCP_SYN) || !(flags & TCP_ACK)) {
            if (!paylen && !(flags & (TCP_FIN | TCP_SYN)))
                return VN_TCP_FORWARD;     /* a bare ACK: nothing to inspect */
            if (hs == f->prober && (flags & TCP_ACK) && sw->now_ns - f->probe_ns > VN_TCP_PROBE_NS)
                adopt_probe(sw, f, seq, ack, win);
            st->tcp_no_flow++;
            return VN_TCP_TAKEN;           /* waits for the receiver's word */
        }
        /* the receiver's word: its acknowledgement is where the prober's stream stands;
         * from here on it is an established connection, this segment included */
        R->isn = ack - 1;
        R->have_isn = 1;
        S->ts = R->ts = tcp_opt(tcp + 20, doff - 20, 8) != NULL;
        flow_establish(sw, f, pol);
        if (f->bypass)
            return VN_TCP_FORWARD;
    }
    int from_client = dir == f->client;
    /* the timestamp option (both ends negotiated it): parsed once, for PAWS below and for
     * the segments the NI sends as this end (its latest timestamps) */
    const uint8_t *tso = S->ts && R->ts && !(flags & TCP_SYN) ? tcp_opt(tcp + 20, doff - 20, 8) : NULL;
    if (tso && tso[1] != 10)
        tso = NULL;
    if (tso && (!S->ts_seen || (int32_t)(vn_rd32(tso + 2) - S->ts_val) >= 0)) {
        S->ts_seen = 1;
        S->ts_val = vn_rd32(tso + 2);
        S->ts_ecr = vn_rd32(tso + 6);
    }

    if (flags & TCP_SYN) {
        if (flags & (TCP_RST | TCP_FIN))
            return drop(&st->tcp_bad_handshake);
        if (paylen)
            return drop(&st->tcp_syn_data);
        if (!(flags & TCP_ACK)) {
            if (!from_client)
                return drop(&st->tcp_bad_handshake);     /* simultaneous open */
            if (f->state == ST_SYN_SENT) {
                S->isn = seq;                            /* a new attempt may pick a new ISN */
                S->wscale = syn_wscale(tcp + 20, doff - 20);
                S->mss = syn_mss(tcp + 20, doff - 20);
                S->ts = tcp_opt(tcp + 20, doff - 20, 8) != NULL;
                S->syn_win = win;
                return FWD();
            }
            return seq == S->isn ? VN_TCP_FORWARD : drop(&st->tcp_bad_handshake);
        }
        /* SYN-ACK */
        if (from_client || ack != R->isn + 1)
            return drop(&st->tcp_bad_handshake);
        if (f->state == ST_SYN_SENT) {
            S->isn = seq;
            S->have_isn = 1;
            S->wscale = syn_wscale(tcp + 20, doff - 20);
            S->mss = syn_mss(tcp + 20, doff - 20);
            S->ts = tcp_opt(tcp + 20, doff - 20, 8) != NULL;
            if (S->wscale < 0 || R->wscale < 0)
                S->wscale = R->wscale = -1;              /* scaling needs both */
            /* windows in SYNs are never scaled */
            R->right = R->real_right = win;
            R->have_right = 1;
            S->right = S->real_right = R->syn_win;
            S->have_right = 1;
            f->state = ST_SYN_RCVD;
            return FWD();
        }
        return seq == S->isn ? VN_TCP_FORWARD : drop(&st->tcp_bad_handshake);
    }

    if (f->state == ST_SYN_SENT) {
        /* only a refusal fits here: the server's RST acknowledging the SYN */
        if ((flags & TCP_RST) && !from_client && (flags & TCP_ACK) && ack == R->isn + 1 && !paylen) {
            flow_end(sw, f, VN_CLOSE_RST);
            return FWD();
        }
        return paylen || (flags & (TCP_FIN | TCP_RST)) ? drop(&st->tcp_bad_handshake)
                                                       : VN_TCP_FORWARD;
    }

    if (flags & TCP_RST) {
        if (paylen)
            return drop(&st->tcp_rst_data);
        int64_t off = seq_off(S, seq);
        uint64_t hi = S->have_right && S->right > S->acked ? S->right : S->acked + 1;
        if (off < 0 || (uint64_t)off < S->acked || (uint64_t)off >= hi)
            return drop(&st->tcp_rst_out_of_window);
        flow_end(sw, f, VN_CLOSE_RST);
        return FWD();
    }

    if (flags & TCP_ACK) {
        int64_t aoff = seq_off_out(R, ack);
        if (f->state == ST_SYN_RCVD) {
            if (!from_client || aoff != 0)
                return drop(&st->tcp_bad_handshake);
            flow_establish(sw, f, pol);
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
        uint64_t eout = aout + ((uint64_t)win << ws);
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
            if (!paylen && !(flags & (TCP_FIN | TCP_RST)) && edge <= old_right)
                return drop(&st->tcp_acks_absorbed);
        }
    } else if (paylen || (flags & TCP_FIN)) {
        return drop(&st->tcp_bad_header);                /* data without ACK: discarded */
    }
    if (!paylen && !(flags & TCP_FIN)) {
        /* a pure ACK or window update; the one acknowledging the second FIN ends it */
        if (S->fin && S->acked > S->fin_off && R->fin && R->acked > R->fin_off)
            flow_end(sw, f, VN_CLOSE_FIN);
        return FWD();
    }

    /* data and/or FIN from S */
    int fin = !!(flags & TCP_FIN);
    int64_t soff = seq_off(S, seq);
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
    if (tso) {
        uint32_t tsval = vn_rd32(tso + 2);
        if (S->have_ts_recent && (int32_t)(S->ts_recent - tsval) > 1)
            return drop(&st->tcp_paws);
        if (start <= S->contig && (!S->have_ts_recent || (int32_t)(tsval - S->ts_recent) > 0)) {
            S->ts_recent = tsval;
            S->have_ts_recent = 1;
        }
    }
    if (end + fin <= S->acked) {
        st->tcp_retransmit++;                            /* the receiver has all of it */
        return S->edited ? RESEND() : FWD();
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
        return FWD();
    }
    int covered, all_released;
    const uint8_t *payload = d + pay;
    if (half_compare(S, start, payload, paylen, fin, start > S->acked ? start : S->acked,
                     &covered, &all_released) < 0)
        return drop(&st->tcp_conflict);
    if (covered) {
        st->tcp_retransmit++;
        if (!all_released) {
            if (S->vouched >= end + fin)
                reack(sw, f, hs);            /* it missed the NI's acknowledgement */
            return VN_TCP_TAKEN;
        }
        return S->edited ? RESEND() : FWD();
    }
    if (tp->bytes + pkt->len > pol->tcp_bytes_max) {
        st->tcp_bytes_over++;
        if (!pol->tcp_bytes_over_pass)
            return VN_TCP_TAKEN;
        flow_bypass(sw, f);
        return FWD();
    }
    if (start > S->contig && S->ooo + paylen > pol->tcp_depth_max) {
        st->tcp_depth_over++;
        if (!pol->tcp_depth_over_pass)
            return VN_TCP_TAKEN;
        flow_bypass(sw, f);
        return FWD();
    }
    struct vn_seg *s = calloc(1, sizeof(*s));
    struct vn_held *rec = s ? vn_held_record(pkt, port, dir, egress_to, 0, 0) : NULL;
    if (!rec) {
        free(s);
        st->tcp_bytes_over++;
        return VN_TCP_TAKEN;
    }
    s->rec = rec;
    s->start = start;
    s->len = paylen;
    s->pay = pay;
    s->l3 = (uint16_t)l3;
    s->l4 = (uint16_t)l4;
    s->fin = (uint8_t)fin;
    tp->bytes += rec->len;
    seg_insert(S, s);
    if (S->adv && s->start < S->adv->start)
        S->adv = s;
    if (half_advance(S)) {
        mark_dirty(sw, f);
        if (S->more)
            more_ack(sw, f, hs);
    }
    if (!S->hold) {
        /* read, not held: it goes on now (the caller forwards the frame itself) */
        s->released = 1;
        if (end + fin > S->released_end)
            S->released_end = end + fin;
        return FWD();
    }
    st->tcp_held_segments++;
    half_release(sw, f, S);
    return VN_TCP_TAKEN;
}

#undef FWD
#undef RESEND

/* ---- the NI kernel's side ---- */

int vn_stream_next(struct vn_switch *sw, struct vn_stream_event *ev)
{
    struct vn_tcp *t = sw->tcp;
    if (!t)
        return 0;
    if (t->reported) {
        flow_free(sw, t->reported);
        t->reported = NULL;
    }
    struct vn_flow *f = t->dirty_head;
    if (!f)
        return 0;
    t->dirty_head = f->dirty_next;
    if (!t->dirty_head)
        t->dirty_tail = NULL;
    f->dirty = 0;
    f->dirty_next = NULL;
    memset(ev, 0, sizeof(*ev));
    ev->stream = f->id;
    ev->port = f->port;
    ev->client = f->client;
    ev->subs = f->subs;
    ev->family = f->family;
    memcpy(ev->guest_addr, f->gaddr, 16);
    memcpy(ev->remote_addr, f->raddr, 16);
    ev->guest_port = f->gport;
    ev->remote_port = f->rport;
    ev->time_ns = realtime_ns();
    ev->midstream = f->midstream;
    ev->what = VN_STREAM_DATA;
    if (f->report_open)
        ev->what |= VN_STREAM_OPEN;
    f->report_open = 0;
    for (int i = 0; i < 2; i++) {
        struct vn_half *hf = &f->half[i];
        ev->read[i] = hf->read;
        ev->hold[i] = hf->hold;
        ev->avail[i] = hf->read && hf->contig != UINT64_MAX ? hf->contig : hf->consumed;
        ev->eof[i] = hf->eof;
    }
    if (f->report_close) {
        ev->what |= VN_STREAM_CLOSED;
        ev->reason = f->reason;
        f->report_close = 0;
        if (f->state == ST_CLOSED) {
            t->reported = f;       /* its frames stay readable until the next call */
        } else {                   /* bypassed: it stays in the table, silent */
            f->announced = 0;
            for (int i = 0; i < 2; i++)
                half_free_all(sw, f, &f->half[i]);
        }
    }
    return 1;
}

static struct vn_half *stream_half(struct vn_switch *sw, uint64_t stream, int dir, struct vn_flow **fp)
{
    if (dir != VN_DIR_FROM_GUEST && dir != VN_DIR_TO_GUEST)
        return NULL;
    struct vn_flow *f = flow_by_id(sw, stream);
    if (!f)
        return NULL;
    *fp = f;
    return &f->half[half_of(dir)];
}

int vn_stream_read(struct vn_switch *sw, uint64_t stream, int dir, uint64_t offset,
                   const uint8_t **data)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    if (!hf)
        return VN_ENOPORT;
    *data = NULL;
    if (offset >= hf->contig)
        return 0;
    for (struct vn_seg *s = seg_from(hf, offset); s && s->start <= offset; s = s->next) {
        if (seg_end(s) > offset) {
            uint64_t n = seg_end(s) - offset;
            if (n > hf->contig - offset)
                n = hf->contig - offset;
            *data = s->rec->data + s->pay + (offset - s->start);
            return (int)n;
        }
    }
    return 0;
}

int vn_stream_consume(struct vn_switch *sw, uint64_t stream, int dir, uint64_t upto)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    if (!hf)
        return VN_ENOPORT;
    if (upto > hf->contig)
        upto = hf->contig;
    if (upto > hf->consumed)
        hf->consumed = upto;
    if (f->state != ST_CLOSED)
        half_trim(sw, f, hf);
    return VN_OK;
}

int vn_stream_pass(struct vn_switch *sw, uint64_t stream, int dir, uint64_t upto)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    if (!hf)
        return VN_ENOPORT;
    if (f->state == ST_CLOSED || f->bypass)
        return VN_ESTATE;
    if (upto > hf->passed) {
        hf->passed = upto;
        if (hf->more && upto > hf->more_at)
            hf->more = 0;          /* the decision that needed more was made */
        half_release(sw, f, hf);
        vn_signal_all(sw);
    }
    return VN_OK;
}

int vn_stream_kill(struct vn_switch *sw, uint64_t stream)
{
    struct vn_flow *f = flow_by_id(sw, stream);
    if (!f)
        return VN_ENOPORT;
    if (f->state == ST_CLOSED || f->bypass)
        return VN_ESTATE;
    sw->ports[f->port].st.tcp_killed++;
    forge_rsts(sw, f);
    flow_close(sw, f, VN_CLOSE_KILLED);
    vn_signal_all(sw);
    return VN_OK;
}

/* A new edit of a held direction (`inject`: bytes it will insert, 0 for a cut): at `at` (not before the pass frontier or the previous
 * edit; an injection may join a cut at the same offset).  Returns the edit or NULL (*err). */
static struct vn_edit *edit_new(struct vn_switch *sw, uint64_t stream, int dir, uint64_t at,
                                uint32_t inject, struct vn_flow **fp, struct vn_half **hp, int *err)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    *err = VN_ENOPORT;
    if (!hf)
        return NULL;
    *err = VN_ESTATE;
    if (f->state == ST_CLOSED || f->bypass || !hf->hold || !hf->have_isn || f->midstream)
        return NULL;               /* adopted: its windows' scale is a guess, never rewritten */
    *err = VN_EINVAL;
    if (at < hf->passed || at < hf->rel_lim)
        return NULL;
    *fp = f;
    *hp = hf;
    if (hf->nedits) {
        struct vn_edit *last = &hf->edits[hf->nedits - 1];
        if (inject && at == last->off && !last->inj_len)
            return last;           /* inserted before the bytes that edit cuts */
        if (!inject && at == last->off + last->cut && (last->cut || !last->inj_len || at == last->off))
            return last;           /* a cut continuing the previous edit's */
    }
    if (at < hf->edit_lim)
        return NULL;
    *err = VN_ERANGE;
    struct vn_tcp_port *tp = sw->tcp->ports[f->port];
    const struct vn_policy *pol = sw->ports[f->port].pol;
    if (hf->nedits >= VN_TCP_EDITS_MAX ||
        (tp && pol && tp->bytes + sizeof(struct vn_edit) + inject > pol->tcp_bytes_max))
        return NULL;
    *err = VN_ENOMEM;
    if (hf->nedits == hf->edits_cap) {
        unsigned cap = hf->edits_cap ? hf->edits_cap * 2 : 16;
        struct vn_edit *n = realloc(hf->edits, cap * sizeof(*n));
        if (!n)
            return NULL;
        hf->edits = n;
        hf->edits_cap = cap;
    }
    rewrite_start(hf);
    struct vn_edit *e = &hf->edits[hf->nedits++];
    memset(e, 0, sizeof(*e));
    e->off = at;
    e->before = hf->shift;
    edit_account(sw, f, sizeof(*e));
    return e;
}

static void edit_done(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf, struct vn_edit *e)
{
    hf->shift = e->before + e->inj_len - (int64_t)e->cut;
    if (e->off + e->cut > hf->edit_lim)
        hf->edit_lim = e->off + e->cut;
    int hs = (int)(hf - f->half);
    half_release(sw, f, hf);
    ack_cut(sw, f, hs);
    vn_signal_all(sw);
}

int vn_stream_cut(struct vn_switch *sw, uint64_t stream, int dir, uint64_t from, uint64_t to)
{
    if (to <= from)
        return VN_EINVAL;
    struct vn_flow *f;
    struct vn_half *hf;
    int err;
    struct vn_edit *e = edit_new(sw, stream, dir, from, 0, &f, &hf, &err);
    if (!e)
        return err;
    if (e->off + e->cut == from)
        e->cut += to - from;
    else
        e->cut = to - from;
    sw->ports[f->port].st.tcp_cut_bytes += to - from;
    edit_done(sw, f, hf, e);
    return VN_OK;
}

int vn_stream_inject(struct vn_switch *sw, uint64_t stream, int dir, uint64_t at,
                     const uint8_t *bytes, uint32_t len)
{
    if (!len || len > VN_TCP_INJECT_MAX || !bytes)
        return VN_EINVAL;
    uint8_t *copy = malloc(len);
    if (!copy)
        return VN_ENOMEM;
    memcpy(copy, bytes, len);
    struct vn_flow *f;
    struct vn_half *hf;
    int err;
    struct vn_edit *e = edit_new(sw, stream, dir, at, len, &f, &hf, &err);
    if (!e) {
        free(copy);
        return err;
    }
    e->inj = copy;
    e->inj_len = len;
    edit_account(sw, f, len);
    /* the later edits' shifts are unaffected: this is the last edit or joins it */
    edit_done(sw, f, hf, e);
    return VN_OK;
}

int vn_stream_more(struct vn_switch *sw, uint64_t stream, int dir)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    if (!hf)
        return VN_ENOPORT;
    if (f->state != ST_ESTABLISHED || f->bypass || !hf->hold || f->midstream)
        return VN_ESTATE;          /* adopted: the receiver's real window is unknown */
    hf->more = 1;
    hf->more_at = hf->contig;
    more_ack(sw, f, (int)(hf - f->half));
    vn_signal_all(sw);
    return VN_OK;
}

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

int vn_tcp_housekeeping(struct vn_switch *sw)
{
    struct vn_tcp *t = sw->tcp;
    if (!t)
        return 0;
    uint64_t now = vn_now_ns();
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
                if (f->deferred && !f->bypass) {
                    f->deferred = 0;
                    for (int i = 0; i < 2; i++)
                        half_release(sw, f, &f->half[i]);
                }
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
    t->deferred = 0;
    vn_signal_all(sw);
    return n;
}

int vn_tcp_set_emit_depth(struct vn_switch *sw, int depth)
{
    struct vn_tcp *t = tcp_get(sw);
    if (!t)
        return VN_ENOMEM;
    if (depth < 0 || depth > VN_TCP_DEPTH)
        return VN_EINVAL;
    t->depth_max = depth;
    return VN_OK;
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
    munmap(t->scratch, sizeof(struct vn_pkt) * VN_TCP_DEPTH);
    free(t);
    sw->tcp = NULL;
}
