/*
 * The in-line signature stage (SafeCard's payload stage): Suricata-syntax rules, compiled by
 * vhostni/signatures/stage.py into the matcher of sig.c, enforced on the switch's path.
 *
 *  - Packet rules (udp, icmp, ip; tcp with dsize or flow:stateless/no_stream): Hyperscan block
 *    mode over each frame's transport payload, from vn_policy_apply, after the prevent rules.
 *    IP fragments of a protocol packet rules cover are dropped (counted): the stage does not
 *    reassemble them, and a rule must not be evaded by fragmenting (fail closed).
 *  - Stream rules (tcp): Hyperscan stream mode per direction over the bytes the receiver gets,
 *    after the TCP engine's conservative reassembly (tcp.c): the engine tracks every connection
 *    a stream rule's ports may cover (as it does for a scanner's stream subscription), holds
 *    its segments, and calls sig_flow_scan whenever the in-order bytes grow.  The new bytes are
 *    scanned at once; the scanned frontier (vn_half.sig_ok) is the stage's "pass", and
 *    half_release sends a record on only when every holder (scanners' `passed`, this stage's
 *    sig_ok) passed all of it.  Stream offsets count from the first byte after the handshake
 *    (or the adoption point) and run across segments and joined IP fragments, since the scan
 *    is over the engine's reassembled stream, never over frames.
 *
 * Actions, as Suricata in IPS mode: `drop` stops the record that completes the match (and
 * everything after it on the connection: both directions, every later frame dropped);
 * `reject` does the same and resets both ends; `alert` only alerts; `pass` ends inspection of
 * the connection (the stage lets go of it).  Several rules matching in one scan: pass wins,
 * then reject, drop, alert (Suricata's default action order).
 *
 * Reload: vn_port_set_sigstage swaps a port's stage at a frame boundary on the data-plane
 * thread (the database was compiled on another thread).  New connections use the new stage;
 * connections already open keep scanning with the stage they started with (it is reference
 * counted and freed with its last connection), so no stream restarts mid-way.
 *
 * Thresholds, per rule, as Suricata 8 applies them (its thresholding docs), in the data path:
 * `detection_filter: track T, count N, seconds S` - the rule matches (acts and alerts) only on
 * the matches after the Nth within S seconds of the first, per tracked key; `threshold: type
 * limit` - the action on every match, an alert for the first N per S; `type threshold` - the
 * Nth match within S acts and alerts, then counting starts over; `type both` - nothing before
 * the Nth match within S, the Nth acts and alerts, later ones in the window act without an
 * alert.  A window is [first match, first match + S] (inclusive, as Suricata compares).  A
 * match the filter holds back is no match: no action, no alert, no per-rule count
 * (counted as matches_filtered).  Keys (rule, source/destination/both/none) live in a fixed
 * table of track_entries slots, VN_SIG_TRACK_WAYS per bucket, hashed with a per-stage random
 * seed; a new key takes a free or expired slot of its bucket, else the least recently used
 * one (counted as an eviction: that key's counting starts over).  Time is the switch's clock
 * (vn_clock: a replay on capture time applies them on capture time).  The table belongs to
 * the stage: a reload starts counting afresh.
 *
 * Memory: a connection's stream state (Hyperscan's stream state plus the look-back history,
 * per direction) is bounded by the flow table (tcp_flows_max) and the stage's memcap; a
 * connection whose state the memcap refuses is dropped (fail closed, counted).
 */
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include "tcp_internal.h"
#include "sig.h"
#include "sigstage.h"
#include "http.h"

struct sig_v6 { uint8_t lo[16], hi[16]; };
struct sig_r32 { uint32_t lo, hi; };
struct sig_r16 { uint16_t lo, hi; };

struct sig_hdr {
    uint8_t action, proto, dir, flags;
    uint32_t sid, rev;
    uint8_t th_type, th_track, df_track;
    uint32_t th_count, th_secs, df_count, df_secs;
    uint32_t hmask[VN_SIG_NHG];  /* an HTTP rule's buffers per group (VN_SIG_HG_*) */
    uint32_t n[6];              /* src4 src6 dst4 dst6 sport dport */
    struct sig_r32 *src4, *dst4;
    struct sig_v6 *src6, *dst6;
    struct sig_r16 *sport, *dport;
};

struct vn_sigstage {
    unsigned refs;
    uint32_t nrules;
    struct sig_hdr *rules;
    uint64_t *matches, *drops;  /* per rule */
    struct vn_sig_db *stream, *pkt;
    uint32_t nstream, npkt;
    uint32_t nplain;            /* stream rules matched over the stream (the HTTP ones follow) */
    uint32_t nhttp;             /* HTTP rules */
    struct vn_sig_db *hdb[VN_SIG_NHG][VN_HTTP_NBUF];  /* per group and buffer (NULL: none) */
    struct vn_sig_db *seg;      /* stream rules with absolute positions, per segment (NULL: none) */
    uint32_t hgroups;           /* bit g: group g has rules */
    uint32_t http_body_limit;
    uint64_t http_memcap, http_mem;
    uint32_t *hgot, *hgen, *htouch, hgen_cur;   /* one message's matching (data-plane thread) */
    uint8_t *hlimit;
    uint8_t pkt_protos;         /* bit 0 ip, 1 icmp, 2 tcp, 3 udp: packet rules exist for it */
    uint8_t *ports;             /* 65536-bit map: a stream rule's port set names the port */
    struct vn_sig_match *out;   /* scan results, max(nrules, 1) */
    struct sig_trk *trk;        /* the threshold table, ntrk slots (NULL: no thresholds) */
    uint32_t ntrk, nused;
    uint64_t seed;
    uint64_t evictions, suppressed, filtered;
};

/* One tracked key of a threshold (kind 0) or detection_filter (kind 1). */
struct sig_trk {
    uint64_t start, last;       /* the window's first match, the last match (switch clock, ns) */
    uint32_t rule, count;       /* matches in the window */
    uint8_t kind, used, family, zero;
    uint8_t a[16], b[16];       /* the tracked address(es) */
};

struct vn_sigport {
    struct vn_sigstage *cur;
    struct vn_sig_alert ring[VN_SIG_ALERT_RING];
    unsigned head, count;
    uint64_t lost;
};

struct vn_sigflow {
    struct vn_sigstage *stage;
    struct vn_sig_stream *st[2];
    uint64_t pos[2];            /* stream bytes scanned per half */
    uint8_t on[2];              /* some stream rule's header covers the half */
    uint8_t hon[2];             /* some HTTP rule's header covers the half */
    struct vn_http *http;       /* the HTTP reader (NULL: no HTTP rule covers the connection) */
    size_t http_mem;            /* what it took, as last counted into the stage */
    uint64_t hbase[2];          /* the stream offset the reader's offsets count from, per half */
    uint8_t blocked;            /* a drop/reject matched (or state was refused): nothing more goes */
    uint8_t done;               /* inspection ended (pass rule, or blocked) */
};

/* ---------------------------------------------------------------- building */

struct hrd {
    const uint8_t *p;
    size_t len, off;
};

static const uint8_t *take(struct hrd *r, size_t n)
{
    if (n > r->len - r->off)
        return NULL;
    const uint8_t *p = r->p + r->off;
    r->off += n;
    return p;
}

static int take_u32(struct hrd *r, uint32_t *v)
{
    const uint8_t *p = take(r, 4);
    if (!p)
        return -1;
    *v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    return 0;
}

/* References: the creator's (Python's, dropped by vn_sigstage_free on whichever thread its
 * garbage collector runs), each port's and each open connection's (data-plane thread): atomic. */
static void stage_hold(struct vn_sigstage *st)
{
    __atomic_fetch_add(&st->refs, 1, __ATOMIC_RELAXED);
}

static void stage_release(struct vn_sigstage *st)
{
    if (!st || __atomic_sub_fetch(&st->refs, 1, __ATOMIC_ACQ_REL))
        return;
    for (uint32_t i = 0; i < st->nrules; i++) {
        struct sig_hdr *h = &st->rules[i];
        free(h->src4); free(h->dst4); free(h->src6); free(h->dst6); free(h->sport); free(h->dport);
    }
    free(st->rules);
    free(st->matches);
    free(st->drops);
    free(st->ports);
    free(st->out);
    free(st->trk);
    free(st->hgot);
    free(st->hgen);
    free(st->htouch);
    free(st->hlimit);
    for (int g = 0; g < VN_SIG_NHG; g++)
        for (int b = 0; b < VN_HTTP_NBUF; b++)
            vn_sig_db_free(st->hdb[g][b]);
    vn_sig_db_free(st->stream);
    vn_sig_db_free(st->pkt);
    vn_sig_db_free(st->seg);
    free(st);
}

void vn_sigstage_free(struct vn_sigstage *st)
{
    stage_release(st);
}

static int read_hdr(struct hrd *r, struct sig_hdr *h)
{
    const uint8_t *b = take(r, 4);
    if (!b || take_u32(r, &h->sid) || take_u32(r, &h->rev))
        return -1;
    h->action = b[0], h->proto = b[1], h->dir = b[2], h->flags = b[3];
    if (h->action > VN_SIGA_PASS || (h->proto != 0 && h->proto != 1 && h->proto != 6 && h->proto != 17) ||
        h->dir > 2 || (h->flags & ~(VN_SIGH_BIDIR | VN_SIGH_STREAM | VN_SIGH_HTTP)) ||
        ((h->flags & VN_SIGH_HTTP) && !(h->flags & VN_SIGH_STREAM)))
        return -1;
    const uint8_t *t = take(r, 4);
    if (!t || take_u32(r, &h->th_count) || take_u32(r, &h->th_secs) || take_u32(r, &h->df_count) ||
        take_u32(r, &h->df_secs))
        return -1;
    h->th_type = t[0], h->th_track = t[1], h->df_track = t[2];
    /* a threshold is all set or all zero, within the bounds the parser enforces */
    if (t[3] || h->th_type > VN_SIGT_BOTH || h->th_track > VN_SIGK_BOTH || h->df_track > VN_SIGK_BOTH ||
        !h->th_type != !h->th_track || !h->th_type != !h->th_count || !h->th_type != !h->th_secs ||
        !h->df_track != !h->df_count || !h->df_track != !h->df_secs ||
        h->th_count > VN_SIG_TRACK_COUNT_MAX || h->df_count > VN_SIG_TRACK_COUNT_MAX ||
        h->th_secs > VN_SIG_TRACK_SECONDS_MAX || h->df_secs > VN_SIG_TRACK_SECONDS_MAX)
        return -1;
    uint32_t any = 0;
    for (int g = 0; g < VN_SIG_NHG; g++) {
        if (take_u32(r, &h->hmask[g]) || h->hmask[g] >> VN_HTTP_NBUF)
            return -1;
        any |= h->hmask[g];
    }
    /* an HTTP rule names buffers; no other rule does */
    if (!any != !(h->flags & VN_SIGH_HTTP))
        return -1;
    for (int i = 0; i < 6; i++)
        if (take_u32(r, &h->n[i]) || h->n[i] > 65536)
            return -1;
    const size_t sz[6] = {8, 32, 8, 32, 4, 4};
    void **dst[6] = {(void **)&h->src4, (void **)&h->src6, (void **)&h->dst4, (void **)&h->dst6,
                     (void **)&h->sport, (void **)&h->dport};
    for (int i = 0; i < 6; i++) {
        const uint8_t *p = take(r, sz[i] * h->n[i]);
        if (!p)
            return -1;
        if (!h->n[i])
            continue;
        if (!(*dst[i] = malloc(sz[i] * h->n[i])))
            return -2;
        for (uint32_t k = 0; k < h->n[i]; k++) {
            const uint8_t *q = p + sz[i] * k;
            if (sz[i] == 8) {
                struct sig_r32 *x = (struct sig_r32 *)*dst[i] + k;
                x->lo = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
                x->hi = (uint32_t)q[4] | (uint32_t)q[5] << 8 | (uint32_t)q[6] << 16 | (uint32_t)q[7] << 24;
            } else if (sz[i] == 32) {
                memcpy((struct sig_v6 *)*dst[i] + k, q, 32);
            } else {
                struct sig_r16 *x = (struct sig_r16 *)*dst[i] + k;
                x->lo = (uint16_t)(q[0] | q[1] << 8);
                x->hi = (uint16_t)(q[2] | q[3] << 8);
            }
        }
    }
    return 0;
}

static void mark_ports(uint8_t *map, const struct sig_r16 *r, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++) {
        uint32_t p = r[k].lo, hi = r[k].hi;
        for (; p <= hi && (p & 7); p++)
            map[p >> 3] |= (uint8_t)(1u << (p & 7));
        if (p + 7 <= hi) {                   /* whole bytes at once: "any" is 8 KiB, not 65536 steps */
            memset(map + (p >> 3), 0xff, (hi + 1 - p) >> 3);
            p += (hi + 1 - p) & ~7u;
        }
        for (; p <= hi; p++)
            map[p >> 3] |= (uint8_t)(1u << (p & 7));
    }
}

struct vn_sigstage *vn_sigstage_build(const uint8_t *hdrs, size_t hlen, struct vn_sig_db *stream,
                                      struct vn_sig_db *pkt, int *rc)
{
    *rc = VN_SIG_EINVAL;
    struct hrd r = {hdrs, hlen, 0};
    const uint8_t *magic = take(&r, 4);
    uint32_t n, ntrk, blim, hcap;
    if (!hdrs || !magic || memcmp(magic, "VSH3", 4) || take_u32(&r, &n) || n > VN_SIG_MAX_RULES ||
        take_u32(&r, &ntrk) || (ntrk && (ntrk < VN_SIG_TRACK_MIN || ntrk > VN_SIG_TRACK_MAX || (ntrk & (ntrk - 1)))) ||
        take_u32(&r, &blim) || blim > VN_HTTP_BODY_LIMIT_MAX || take_u32(&r, &hcap))
        return NULL;
    struct vn_sigstage *st = calloc(1, sizeof *st);
    *rc = VN_SIG_ENOMEM;
    if (!st)
        return NULL;
    st->refs = 1;
    st->http_body_limit = blim;
    st->http_memcap = (uint64_t)hcap << 10;
    st->rules = calloc(n ? n : 1, sizeof *st->rules);
    st->matches = calloc(n ? n : 1, sizeof *st->matches);
    st->drops = calloc(n ? n : 1, sizeof *st->drops);
    st->out = calloc(n ? n : 1, sizeof *st->out);
    st->ports = calloc(65536 / 8, 1);
    if (!st->rules || !st->matches || !st->drops || !st->out || !st->ports)
        goto fail;
    st->nrules = n;
    for (uint32_t i = 0; i < n; i++) {
        int e = read_hdr(&r, &st->rules[i]);
        if (e) {
            *rc = e == -2 ? VN_SIG_ENOMEM : VN_SIG_EINVAL;
            goto fail;
        }
        struct sig_hdr *h = &st->rules[i];
        if ((h->th_type || h->df_track) && !ntrk)  /* thresholds need the table */
            goto bad;
        if (h->flags & VN_SIGH_STREAM) {
            if (h->proto != 6 || st->npkt)       /* stream rules first */
                goto bad;
            if (h->flags & VN_SIGH_HTTP) {
                st->nhttp++;
                for (int g = 0; g < VN_SIG_NHG; g++)
                    if (h->hmask[g])
                        st->hgroups |= 1u << g;
            } else if (st->nhttp) {
                goto bad;                        /* the plain stream rules, then the HTTP ones */
            } else {
                st->nplain++;
            }
            st->nstream++;
            mark_ports(st->ports, h->sport, h->n[4]);
            mark_ports(st->ports, h->dport, h->n[5]);
        } else {
            st->npkt++;
            st->pkt_protos |= (uint8_t)(h->proto == 0 ? 1 : h->proto == 1 ? 2 : h->proto == 6 ? 4 : 8);
        }
    }
    struct vn_sig_stats s1, s2;
    if (r.off != r.len || (st->nplain && !stream) || (st->npkt && !pkt) ||
        (stream && (vn_sig_db_stats(stream, &s1) < 0 || s1.nrules != st->nplain)) ||
        (pkt && (vn_sig_db_stats(pkt, &s2) < 0 || s2.nrules != st->npkt)))
        goto bad;
    if (ntrk) {
        if (!(st->trk = calloc(ntrk, sizeof *st->trk)))
            goto fail;
        st->ntrk = ntrk;
        if (getrandom(&st->seed, sizeof st->seed, GRND_NONBLOCK) != sizeof st->seed)
            st->seed = vn_now_ns() ^ (uint64_t)(uintptr_t)st;
    }
    if (st->nhttp && (!(st->hgot = calloc(n, sizeof *st->hgot)) || !(st->hgen = calloc(n, sizeof *st->hgen)) ||
                      !(st->htouch = calloc(n, sizeof *st->htouch)) || !(st->hlimit = calloc(n, 1))))
        goto fail;
    st->stream = st->nplain ? stream : NULL;
    st->pkt = st->npkt ? pkt : NULL;
    if (stream && !st->stream)
        vn_sig_db_free(stream);
    if (pkt && !st->pkt)
        vn_sig_db_free(pkt);
    *rc = 0;
    return st;
bad:
    *rc = VN_SIG_EINVAL;
fail:
    stage_release(st);
    return NULL;
}

/* Whether every rule id of `db` (a block-mode database) names a rule `ok` accepts: 0, or an
 * error (VN_SIG_EINVAL: one it does not, or a database that cannot say). */
static int db_ids_check(const struct vn_sigstage *st, struct vn_sig_db *db,
                        int (*ok)(const struct vn_sigstage *, uint32_t, int, int), int group, int buf)
{
    if (vn_sig_db_mode(db) != VN_SIG_MODE_BLOCK)
        return VN_SIG_EINVAL;
    struct vn_sig_stats s;
    if (vn_sig_db_stats(db, &s) < 0)
        return VN_SIG_EINVAL;
    uint32_t n = (uint32_t)s.nrules;
    uint32_t *ids = malloc((size_t)(n ? n : 1) * sizeof *ids);
    if (!ids)
        return VN_SIG_ENOMEM;
    int bad = vn_sig_db_ids(db, ids, n) != n;
    for (uint32_t i = 0; i < n && !bad; i++)
        bad = !ok(st, ids[i], group, buf);
    free(ids);
    return bad ? VN_SIG_EINVAL : 0;
}

/* an HTTP rule of this group that reads this buffer */
static int http_rule_of(const struct vn_sigstage *st, uint32_t ri, int group, int buf)
{
    return ri < st->nstream && (st->rules[ri].flags & VN_SIGH_HTTP) && (st->rules[ri].hmask[group] >> buf & 1);
}

/* a plain stream rule (matched over the stream, not an HTTP rule) */
static int plain_stream_rule(const struct vn_sigstage *st, uint32_t ri, int group, int buf)
{
    (void)group;
    (void)buf;
    return ri < st->nplain && (st->rules[ri].flags & VN_SIGH_STREAM) && !(st->rules[ri].flags & VN_SIGH_HTTP);
}

int vn_sigstage_add_http(struct vn_sigstage *st, int group, int buf, struct vn_sig_db *db)
{
    if (!st || !db || group < 0 || group >= VN_SIG_NHG || buf < 0 || buf >= VN_HTTP_NBUF ||
        st->hdb[group][buf] || st->refs != 1)
        return VN_SIG_EINVAL;
    int rc = db_ids_check(st, db, http_rule_of, group, buf);
    if (rc)
        return rc;
    st->hdb[group][buf] = db;
    return 0;
}

int vn_sigstage_add_seg(struct vn_sigstage *st, struct vn_sig_db *db)
{
    if (!st || !db || st->seg || st->refs != 1)
        return VN_SIG_EINVAL;
    int rc = db_ids_check(st, db, plain_stream_rule, 0, 0);
    if (rc)
        return rc;
    st->seg = db;
    return 0;
}

/* ---------------------------------------------------------------- per port */

int vn_port_set_sigstage(struct vn_switch *sw, int port, struct vn_sigstage *st)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind)
        return VN_ENOPORT;
    struct vn_port *p = &sw->ports[port];
    if (!p->sig && st && !(p->sig = calloc(1, sizeof *p->sig)))
        return VN_ENOMEM;
    if (!p->sig)
        return VN_OK;
    /* the swap: connections open keep a reference to the stage they started with */
    if (st)
        stage_hold(st);
    stage_release(p->sig->cur);
    p->sig->cur = st;
    return VN_OK;
}

void vn_sigport_free(struct vn_switch *sw, int port)
{
    struct vn_port *p = &sw->ports[port];
    if (!p->sig)
        return;
    stage_release(p->sig->cur);
    free(p->sig);
    p->sig = NULL;
}

int vn_sig_alerts_next(struct vn_switch *sw, int port, struct vn_sig_alert *out)
{
    if (port < 0 || port >= VN_MAX_PORTS)
        return 0;
    struct vn_sigport *sp = sw->ports[port].sig;
    if (!sp || !sp->count)
        return 0;
    *out = sp->ring[sp->head];
    sp->head = (sp->head + 1) % VN_SIG_ALERT_RING;
    sp->count--;
    return 1;
}

uint64_t vn_sig_alerts_lost(struct vn_switch *sw, int port)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].sig)
        return 0;
    return sw->ports[port].sig->lost;
}

int vn_sig_rule_counts(struct vn_switch *sw, int port, uint64_t *matches, uint64_t *drops, uint32_t n)
{
    if (port < 0 || port >= VN_MAX_PORTS)
        return VN_ENOPORT;
    struct vn_sigport *sp = sw->ports[port].sig;
    if (!sp || !sp->cur)
        return 0;
    uint32_t k = n < sp->cur->nrules ? n : sp->cur->nrules;
    memcpy(matches, sp->cur->matches, k * sizeof *matches);
    memcpy(drops, sp->cur->drops, k * sizeof *drops);
    return (int)k;
}

int vn_sigstage_track_stats(struct vn_sigstage *st, struct vn_sig_track_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!st)
        return 0;
    out->entries = st->ntrk;
    out->used = st->nused;
    out->evictions = st->evictions;
    out->alerts_suppressed = st->suppressed;
    out->matches_filtered = st->filtered;
    return 0;
}

int vn_sigstage_db_stats(struct vn_sigstage *st, int stream, struct vn_sig_stats *out)
{
    struct vn_sig_db *db = st ? (stream ? st->stream : st->pkt) : NULL;
    if (!db) {
        memset(out, 0, sizeof *out);
        return 0;
    }
    return vn_sig_db_stats(db, out);
}

/* ---------------------------------------------------------------- headers */

static int in_v4(const struct sig_r32 *r, uint32_t n, const uint8_t *a)
{
    uint32_t v = vn_rd32(a);
    for (uint32_t k = 0; k < n; k++)
        if (r[k].lo <= v && v <= r[k].hi)
            return 1;
    return 0;
}

static int in_v6(const struct sig_v6 *r, uint32_t n, const uint8_t *a)
{
    for (uint32_t k = 0; k < n; k++)
        if (memcmp(r[k].lo, a, 16) <= 0 && memcmp(a, r[k].hi, 16) <= 0)
            return 1;
    return 0;
}

static int in_ports(const struct sig_r16 *r, uint32_t n, uint16_t p)
{
    for (uint32_t k = 0; k < n; k++)
        if (r[k].lo <= p && p <= r[k].hi)
            return 1;
    return 0;
}

static int one_way(const struct sig_hdr *h, int family, const uint8_t *s, uint16_t sp, const uint8_t *d,
                   uint16_t dp)
{
    if (family == 4 ? !in_v4(h->src4, h->n[0], s) || !in_v4(h->dst4, h->n[2], d)
                    : !in_v6(h->src6, h->n[1], s) || !in_v6(h->dst6, h->n[3], d))
        return 0;
    return in_ports(h->sport, h->n[4], sp) && in_ports(h->dport, h->n[5], dp);
}

/* The rule's addresses and ports (both ways if <>) against one direction's. */
static int hdr_match(const struct sig_hdr *h, int family, const uint8_t *s, uint16_t sp, const uint8_t *d,
                     uint16_t dp)
{
    return one_way(h, family, s, sp, d, dp) || ((h->flags & VN_SIGH_BIDIR) && one_way(h, family, d, dp, s, sp));
}

/* ---------------------------------------------------------------- alerts and actions */

static struct vn_sig_alert *alert_push(struct vn_switch *sw, int port, const struct vn_sigstage *st, uint32_t ri, int taken,
                       int limit, int stream, int family, int proto, int to_server, int dir,
                       const uint8_t *src, uint16_t sport, const uint8_t *dst, uint16_t dport,
                       uint64_t offset, uint64_t flow)
{
    struct vn_sigport *sp = sw->ports[port].sig;
    if (!sp)
        return NULL;
    if (sp->count >= VN_SIG_ALERT_RING) {
        sp->lost++;
        sw->ports[port].st.sig_alerts_lost++;
        return NULL;
    }
    struct vn_sig_alert *a = &sp->ring[(sp->head + sp->count++) % VN_SIG_ALERT_RING];
    memset(a, 0, sizeof *a);
    a->rule = ri;
    a->sid = st->rules[ri].sid;
    a->rev = st->rules[ri].rev;
    a->action = st->rules[ri].action;
    a->taken = (uint8_t)taken;
    a->limit = (uint8_t)limit;
    a->stream = (uint8_t)stream;
    a->family = (uint8_t)family;
    a->proto = (uint8_t)proto;
    a->to_server = (uint8_t)to_server;
    a->dir = (uint8_t)dir;
    unsigned n = family == 4 ? 4 : 16;
    memcpy(a->src, src, n);
    memcpy(a->dst, dst, n);
    a->sport = sport;
    a->dport = dport;
    a->offset = offset;
    a->flow = flow;
    vn_punt_signal(sw);
    return a;
}

/* An HTTP rule's alert: the message's method, host and target, cut to fit. */
_Static_assert(sizeof ((struct vn_sig_alert *)0)->http_method == sizeof ((struct vn_http_reqinfo *)0)->method
               && sizeof ((struct vn_sig_alert *)0)->http_host == sizeof ((struct vn_http_reqinfo *)0)->host
               && sizeof ((struct vn_sig_alert *)0)->http_url == sizeof ((struct vn_http_reqinfo *)0)->url,
               "an alert names a request as the reader keeps it");

static void alert_http(struct vn_sig_alert *a, const struct vn_http *h, int side)
{
    const uint8_t *p;
    uint32_t n;
    a->http = 1;
    if (side == VN_HTTP_RESP) {
        /* the request this response answers, as it was read (not the request side's latest:
         * pipelined requests may have followed, and its buffers may be gone) */
        const struct vn_http_reqinfo *ri = vn_http_answered(h);
        if (ri) {
            memcpy(a->http_method, ri->method, sizeof a->http_method);
            memcpy(a->http_host, ri->host, sizeof a->http_host);
            memcpy(a->http_url, ri->url, sizeof a->http_url);
            a->http_trunc = ri->trunc;
        }
        if (vn_http_buf(h, VN_HTTP_RESP, VN_HTTP_B_STAT_CODE, &p, &n) && n == 3)
            a->http_status = (uint16_t)((p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0'));
        return;
    }
    struct { int b; char *dst; size_t cap; int bit; } f[3] = {
        {VN_HTTP_B_METHOD, a->http_method, sizeof a->http_method, 1},
        {VN_HTTP_B_HOST, a->http_host, sizeof a->http_host, 2},
        {VN_HTTP_B_URI_RAW, a->http_url, sizeof a->http_url, 4}};
    for (int i = 0; i < 3; i++) {
        if (!vn_http_buf(h, VN_HTTP_REQ, f[i].b, &p, &n))
            continue;
        if (n >= f[i].cap) {
            n = (uint32_t)f[i].cap - 1;
            a->http_trunc |= (uint8_t)f[i].bit;
        }
        memcpy(f[i].dst, p, n);
        f[i].dst[n] = 0;
    }
}

/* The verdict of one scan's matches (already filtered to the rules that apply): the
 * strongest action among them (pass > reject > drop > alert); -1 if none. */
static int verdict(const struct vn_sigstage *st, const struct vn_sig_match *m, int n, const uint8_t *ok)
{
    int v = -1;
    static const int rank[4] = {1, 2, 3, 4};     /* alert drop reject pass */
    for (int i = 0; i < n; i++) {
        if (!ok[i])
            continue;
        int a = st->rules[m[i].rule].action;
        if (v < 0 || rank[a] > rank[v])
            v = a;
    }
    return v;
}

/* ---------------------------------------------------------------- thresholds */

#define SIG_ACT 1               /* the match counts: its action applies */
#define SIG_ALERT 2             /* and it alerts */

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static uint64_t secs_ns(uint32_t s)
{
    return (uint64_t)s * 1000000000ull;
}

static uint32_t trk_secs(const struct vn_sigstage *st, const struct sig_trk *e)
{
    const struct sig_hdr *h = &st->rules[e->rule];
    return e->kind ? h->df_secs : h->th_secs;
}

/* 0: a free slot, 1: its window ran out, 2: live */
static int trk_rank(const struct vn_sigstage *st, const struct sig_trk *c, uint64_t now)
{
    if (!c->used)
        return 0;
    return now >= c->start && now - c->start > secs_ns(trk_secs(st, c)) ? 1 : 2;
}

/* The slot of key (rule, kind, what `track` names of src/dst), its window started over if it
 * ran out, and this match counted in it. */
static struct sig_trk *track(struct vn_sigstage *st, uint64_t now, uint32_t ri, int kind, int trk,
                             uint32_t secs, int family, const uint8_t *src, const uint8_t *dst)
{
    uint8_t a[16] = {0}, b[16] = {0};
    unsigned n = family == 4 ? 4 : 16;
    if (trk == VN_SIGK_SRC || trk == VN_SIGK_BOTH)
        memcpy(a, src, n);
    if (trk == VN_SIGK_DST)
        memcpy(a, dst, n);
    if (trk == VN_SIGK_BOTH)
        memcpy(b, dst, n);
    uint8_t fam = trk == VN_SIGK_RULE ? 0 : (uint8_t)family;
    /* FNV-1a over the key, seeded per stage and finished with a mixer: a sender cannot aim its
     * addresses at one bucket to evict someone else's tracker without knowing the seed */
    uint64_t x = 1469598103934665603ull ^ st->seed;
    const uint8_t hd[6] = {(uint8_t)ri, (uint8_t)(ri >> 8), (uint8_t)(ri >> 16), (uint8_t)(ri >> 24),
                           (uint8_t)kind, fam};
    for (int i = 0; i < 6; i++)
        x = (x ^ hd[i]) * 1099511628211ull;
    for (int i = 0; i < 16; i++)
        x = (x ^ a[i]) * 1099511628211ull;
    for (int i = 0; i < 16; i++)
        x = (x ^ b[i]) * 1099511628211ull;
    uint32_t nb = st->ntrk / VN_SIG_TRACK_WAYS;
    struct sig_trk *bk = &st->trk[(mix(x) & (nb - 1)) * VN_SIG_TRACK_WAYS], *e = NULL, *spare = NULL;
    int spare_rank = 3;
    for (int w = 0; w < VN_SIG_TRACK_WAYS; w++) {
        struct sig_trk *c = &bk[w];
        if (c->used && c->rule == ri && c->kind == kind && c->family == fam && !memcmp(c->a, a, 16) &&
            !memcmp(c->b, b, 16)) {
            e = c;
            break;
        }
        /* a spare: a free slot, else one whose window ran out, else the least recently used */
        int rk = trk_rank(st, c, now);
        if (!spare || rk < spare_rank || (rk == spare_rank && c->last < spare->last))
            spare = c, spare_rank = rk;
    }
    if (!e) {
        e = spare;
        if (spare_rank == 0)
            st->nused++;
        else if (spare_rank == 2)
            st->evictions++;          /* a live key goes: its counting starts over */
        memset(e, 0, sizeof *e);
        e->used = 1, e->rule = ri, e->kind = (uint8_t)kind, e->family = fam;
        memcpy(e->a, a, 16);
        memcpy(e->b, b, 16);
        e->start = now;
    } else if (now < e->start || now - e->start > secs_ns(secs)) {
        e->start = now, e->count = 0;         /* the window ran out: a new one from this match */
    }
    if (e->count < UINT32_MAX)
        e->count++;
    e->last = now;
    return e;
}

/* What one match of rule ri (its header matched) does under the rule's detection_filter and
 * threshold: SIG_ACT and/or SIG_ALERT (see the top of the file). */
static int gate(struct vn_switch *sw, struct vn_sigstage *st, uint32_t ri, int family, const uint8_t *src,
                const uint8_t *dst)
{
    const struct sig_hdr *h = &st->rules[ri];
    if (!h->th_type && !h->df_track)
        return SIG_ACT | SIG_ALERT;
    uint64_t now = vn_clock(sw);
    if (h->df_track) {
        struct sig_trk *e = track(st, now, ri, 1, h->df_track, h->df_secs, family, src, dst);
        if (e->count <= h->df_count) {
            st->filtered++;
            return 0;
        }
    }
    if (!h->th_type)
        return SIG_ACT | SIG_ALERT;
    struct sig_trk *e = track(st, now, ri, 0, h->th_track, h->th_secs, family, src, dst);
    int g = 0;
    if (h->th_type == VN_SIGT_LIMIT) {
        g = e->count <= h->th_count ? SIG_ACT | SIG_ALERT : SIG_ACT;
    } else if (h->th_type == VN_SIGT_THRESHOLD) {
        if (e->count >= h->th_count) {
            g = SIG_ACT | SIG_ALERT;
            e->count = 0;                     /* every Nth match */
        }
    } else {                                  /* both: from the Nth, one alert per window */
        g = e->count < h->th_count ? 0 : e->count == h->th_count ? SIG_ACT | SIG_ALERT : SIG_ACT;
    }
    if (!(g & SIG_ACT))
        st->filtered++;
    else if (!(g & SIG_ALERT))
        st->suppressed++;
    return g;
}

/* ---------------------------------------------------------------- packet rules */

static int proto_bit(int proto)
{
    return proto == 6 ? 4 : proto == 17 ? 8 : (proto == 1 || proto == 58) ? 2 : 0;
}

int vn_sig_packet(struct vn_switch *sw, int port, int dir, struct vn_pkt *pkt, const struct vn_hdrs *h)
{
    struct vn_sigport *sp = sw->ports[port].sig;
    struct vn_sigstage *st = sp ? sp->cur : NULL;
    if (!st || !st->pkt || !h->family)
        return 0;
    int bit = proto_bit(h->proto);
    if (!(st->pkt_protos & (bit | 1)))
        return 0;
    struct vn_port_stats *ps = &sw->ports[port].st;
    if (h->frag) {
        if (h->proto == 6 && !(st->pkt_protos & 5))
            return 0;
        ps->sig_frag_dropped++;
        return 1;
    }
    /* the transport payload (what Suricata's packet rules see) */
    uint32_t end = h->ip_end < pkt->len ? h->ip_end : pkt->len;
    uint32_t l4 = (uint32_t)h->l4_off, off = l4;
    if (h->l4_known && h->proto == 17)
        off = l4 + 8;
    else if (h->l4_known && (h->proto == 1 || h->proto == 58))
        off = l4 + 8;
    else if (h->l4_known && h->proto == 6) {
        const uint8_t *t = vn_get(pkt->data, end, l4, 20);
        if (!t)
            return 0;
        off = l4 + (uint32_t)(t[12] >> 4) * 4;
    }
    if (off > end)
        off = end;
    int n = vn_sig_scan_block(st->pkt, pkt->data + off, end - off, st->out, st->nrules ? st->nrules : 1);
    ps->sig_packets_scanned++;
    if (n < 0) {
        ps->sig_scan_errors++;
        return 1;                  /* fail closed */
    }
    if (!n)
        return 0;
    uint8_t ok[n], g[n];
    int proto = h->proto == 58 ? 1 : h->proto;
    for (int i = 0; i < n; i++) {
        ok[i] = g[i] = 0;
        if (st->out[i].rule >= st->npkt)
            continue;
        st->out[i].rule += st->nstream;      /* the packet database's ids follow the stream rules' */
        const struct sig_hdr *r = &st->rules[st->out[i].rule];
        if ((r->proto == 0 || r->proto == proto) && hdr_match(r, h->family, h->src, h->sport, h->dst, h->dport))
            g[i] = (uint8_t)gate(sw, st, st->out[i].rule, h->family, h->src, h->dst);
        ok[i] = g[i] & SIG_ACT;
    }
    int v = verdict(st, st->out, n, ok);
    if (v < 0)
        return 0;
    int taken = v == VN_SIGA_PASS ? VN_SIGA_PASS : v;
    for (int i = 0; i < n; i++) {
        if (!ok[i])
            continue;
        uint32_t ri = st->out[i].rule;
        st->matches[ri]++;
        ps->sig_matches++;
        if (taken == VN_SIGA_DROP || taken == VN_SIGA_REJECT)
            st->drops[ri]++;
        /* a pass rule that matched the packet passes it silently, as Suricata's action order
         * (pass first) does: no other rule's alert for it */
        if (st->rules[ri].action != VN_SIGA_PASS && (g[i] & SIG_ALERT) && taken != VN_SIGA_PASS)
            alert_push(sw, port, st, ri, taken, !!(st->out[i].flags & VN_SIG_F_LIMIT), 0, h->family, proto, 2,
                       dir, h->src, h->sport, h->dst, h->dport, st->out[i].offset, 0);
    }
    if (taken == VN_SIGA_DROP || taken == VN_SIGA_REJECT) {
        ps->sig_dropped++;
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- stream rules */

static int in_ports(const struct sig_r16 *r, uint32_t n, uint16_t p);

int vn_sig_tracks(struct vn_switch *sw, int port, uint16_t a, uint16_t b)
{
    struct vn_sigport *sp = sw->ports[port].sig;
    struct vn_sigstage *st = sp ? sp->cur : NULL;
    if (!st || !st->nstream)
        return 0;
    /* quick no: neither port is in any stream rule's port sets */
    if (!(st->ports[a >> 3] >> (a & 7) & 1) && !(st->ports[b >> 3] >> (b & 7) & 1))
        return 0;
    /* some stream rule's (source, destination) ports fit the pair, either way round (a rule
     * may be about either direction of the connection) */
    for (uint32_t i = 0; i < st->nstream; i++) {
        const struct sig_hdr *h = &st->rules[i];
        if ((in_ports(h->sport, h->n[4], a) && in_ports(h->dport, h->n[5], b)) ||
            (in_ports(h->sport, h->n[4], b) && in_ports(h->dport, h->n[5], a)))
            return 1;
    }
    return 0;
}

int vn_sig_streams(struct vn_switch *sw, int port)
{
    struct vn_sigport *sp = sw->ports[port].sig;
    return sp && sp->cur && sp->cur->nstream;
}

/* Sender and receiver of half `hs`. */
static void half_ends(const struct vn_flow *f, int hs, const uint8_t **s, uint16_t *sp, const uint8_t **d,
                      uint16_t *dp)
{
    if (hs == 0) {
        *s = f->gaddr, *sp = f->gport, *d = f->raddr, *dp = f->rport;
    } else {
        *s = f->raddr, *sp = f->rport, *d = f->gaddr, *dp = f->gport;
    }
}

static int applies(const struct sig_hdr *r, const struct vn_flow *f, int hs)
{
    if (!(r->flags & VN_SIGH_STREAM))
        return 0;
    int to_server = dir_of(hs) == f->client;
    if ((r->dir == 1 && !to_server) || (r->dir == 2 && to_server))
        return 0;
    const uint8_t *s, *d;
    uint16_t sp, dp;
    half_ends(f, hs, &s, &sp, &d, &dp);
    return hdr_match(r, f->family, s, sp, d, dp);
}

/* The stage stops holding the connection: what it held goes on as far as the others allow. */
static void sig_let_go(struct vn_switch *sw, struct vn_flow *f)
{
    struct vn_sigflow *sf = f->sig;
    (void)sw;
    sf->done = 1;
    if (sf->http) {
        sf->stage->http_mem -= sf->http_mem;
        vn_http_free(sf->http);
        sf->http = NULL;
        sf->http_mem = 0;
    }
    for (int hs = 0; hs < 2; hs++) {
        if (sf->st[hs]) {
            vn_sig_stream_close(sf->stage->stream, sf->st[hs], NULL, 0);
            sf->st[hs] = NULL;
        }
        f->half[hs].sig_ok = UINT64_MAX;
    }
}

/* Blocks the connection: nothing more of it goes either way.  Half hs stops before `stop`
 * (the record that completed the match); of the other half, what went, went. */
static void sig_block(struct vn_switch *sw, struct vn_flow *f, int hs, uint64_t stop, int reject)
{
    f->sig->blocked = 1;
    if (reject)
        forge_rsts(sw, f);
    sig_let_go(sw, f);
    for (int i = 0; i < 2; i++) {
        struct vn_half *hf = &f->half[i];
        hf->sig_ok = i == hs ? stop : hf->rel_lim;
        /* what the others passed below the stop goes; then, if the stage alone held the
         * connection, every record is freed: the rest never goes, and with every later frame
         * dropped no copy needs comparing any more, so a blocked connection does not sit on
         * the port's tcp_bytes_max until it idles out.  Scanners' connections keep theirs
         * for the kernel to read (it ends them by its own hold timeout or kill). */
        half_release(sw, f, hf);
        if (!f->announced)
            half_free_all(sw, f, hf);
    }
}

/* The first record of half hf that a block stopping at stream byte `last` keeps back: the one
 * holding that byte, or (if it went already) the first not yet released. */
static uint64_t stop_at(struct vn_half *hf, uint64_t last)
{
    uint64_t stop = last;
    for (struct vn_seg *x = seg_from(hf, last); x; x = x->next)
        if (x->start <= last && last < seg_end(x) && x->start < stop)
            stop = x->start;
    if (stop < hf->rel_lim)          /* released already (the match completed later, e.g. at EOF) */
        stop = hf->rel_lim;
    return stop;
}

/* Handles one scan's matches on half hs: the stream offset of the match's end decides which
 * record completed it, or, for an HTTP message (`http`: its reader, `msg`: the stream offset
 * of its first byte), the message's first byte: none of it goes. */
static void stream_matches(struct vn_switch *sw, struct vn_flow *f, int hs, int n,
                           const struct vn_http *http, int side, uint64_t msg)
{
    struct vn_sigflow *sf = f->sig;
    struct vn_sigstage *st = sf->stage;
    struct vn_port_stats *ps = &sw->ports[f->port].st;
    uint8_t ok[n > 0 ? n : 1], g[n > 0 ? n : 1];
    const uint8_t *s, *d;
    uint16_t sp, dp;
    half_ends(f, hs, &s, &sp, &d, &dp);
    for (int i = 0; i < n; i++) {
        g[i] = st->out[i].rule < st->nstream && applies(&st->rules[st->out[i].rule], f, hs)
                   ? (uint8_t)gate(sw, st, st->out[i].rule, f->family, s, d) : 0;
        ok[i] = g[i] & SIG_ACT;
    }
    int v = verdict(st, st->out, n, ok);
    if (v < 0)
        return;
    int to_server = dir_of(hs) == f->client;
    uint64_t first_end = UINT64_MAX, pass_at = UINT64_MAX;
    if (v == VN_SIGA_PASS)
        for (int i = 0; i < n; i++)
            if (ok[i] && st->rules[st->out[i].rule].action == VN_SIGA_PASS && st->out[i].offset < pass_at)
                pass_at = st->out[i].offset;
    for (int i = 0; i < n; i++) {
        if (!ok[i])
            continue;
        uint32_t ri = st->out[i].rule;
        st->matches[ri]++;
        ps->sig_matches++;
        if (v == VN_SIGA_DROP || v == VN_SIGA_REJECT) {
            st->drops[ri]++;
            uint32_t a = st->rules[ri].action;
            if ((a == VN_SIGA_DROP || a == VN_SIGA_REJECT) && st->out[i].offset < first_end)
                first_end = st->out[i].offset;
        }
        /* the pass ends inspection where it matched: matches from there on are not alerted
         * (those that ended before it were, as a packet before the pass's would have been) */
        if (st->rules[ri].action != VN_SIGA_PASS && (g[i] & SIG_ALERT) && st->out[i].offset < pass_at) {
            struct vn_sig_alert *a = alert_push(sw, f->port, st, ri, v, !!(st->out[i].flags & VN_SIG_F_LIMIT),
                                                1, f->family, 6, to_server, dir_of(hs), s, sp, d, dp,
                                                st->out[i].offset, f->id);
            if (a && http)
                alert_http(a, http, side);
        }
    }
    if (v == VN_SIGA_PASS) {
        ps->sig_passed_flows++;
        sig_let_go(sw, f);
        half_release(sw, f, &f->half[!hs]);    /* what the other direction held for the stage */
        return;
    }
    if (v != VN_SIGA_DROP && v != VN_SIGA_REJECT)
        return;
    /* the record holding the match's last byte (an HTTP message's first), and everything
     * after it, stays */
    struct vn_half *hf = &f->half[hs];
    uint64_t stop = stop_at(hf, http ? msg : first_end ? first_end - 1 : 0);
    ps->sig_dropped++;
    sig_block(sw, f, hs, stop, v == VN_SIGA_REJECT);
}

int sig_flow_open(struct vn_switch *sw, struct vn_flow *f)
{
    struct vn_sigport *sp = sw->ports[f->port].sig;
    struct vn_sigstage *st = sp ? sp->cur : NULL;
    if (!st || !st->nstream)
        return 0;
    uint8_t on[2] = {0, 0}, hon[2] = {0, 0};
    for (uint32_t i = 0; i < st->nstream && !(on[0] && on[1] && hon[0] && hon[1]); i++) {
        uint8_t *o = st->rules[i].flags & VN_SIGH_HTTP ? hon : on;
        for (int hs = 0; hs < 2; hs++)
            if (!o[hs] && applies(&st->rules[i], f, hs))
                o[hs] = 1;
    }
    if (!on[0] && !on[1] && !hon[0] && !hon[1])
        return 0;
    struct vn_sigflow *sf = calloc(1, sizeof *sf);
    if (!sf) {
        sw->ports[f->port].st.sig_streams_refused++;
        return -1;
    }
    f->sig = sf;
    sf->stage = st;
    stage_hold(st);
    int refused = 0;
    if (hon[0] || hon[1]) {
        /* an HTTP rule covers a direction: the reader reads both (responses are framed by
         * the requests they answer, and a request may wait for its response); it holds
         * responses only if some rule reads them */
        hon[0] = hon[1] = 1;
        sf->http = vn_http_new(st->http_body_limit, !!(st->hgroups & 1u << VN_SIG_HG_REQ_BODY),
                               !!(st->hgroups & 1u << VN_SIG_HG_RESP));
        if (!sf->http || st->http_mem + vn_http_mem(sf->http) > st->http_memcap) {
            vn_http_free(sf->http);
            sf->http = NULL;
            sw->ports[f->port].st.sig_http_memcap++;
            refused = 1;
        } else {
            sf->http_mem = vn_http_mem(sf->http);
            st->http_mem += sf->http_mem;
        }
    }
    for (int hs = 0; hs < 2; hs++) {
        sf->on[hs] = on[hs];
        sf->hon[hs] = hon[hs];
        sf->pos[hs] = sf->hbase[hs] = f->half[hs].contig;
        if (!on[hs] && !hon[hs])
            continue;
        f->half[hs].sig_ok = sf->pos[hs];
        int rc;
        if (on[hs] && !refused && !(sf->st[hs] = vn_sig_stream_open(st->stream, &rc))) {
            sw->ports[f->port].st.sig_streams_refused++;
            refused = 1;
        }
    }
    if (refused) {
        /* over the stage's memcap: fail closed */
        sf->blocked = sf->done = 1;
        for (int i = 0; i < 2; i++)
            f->half[i].sig_ok = f->half[i].contig;
    }
    return 1;
}

static int side_of(const struct vn_flow *f, int hs)
{
    return dir_of(hs) == f->client ? VN_HTTP_REQ : VN_HTTP_RESP;
}

/* One HTTP message's matching for group g: every buffer database of the group over the
 * message's buffers; an HTTP rule matches when every buffer it names matched (a buffer the
 * message lacks matches nothing, as in Suricata).  Fills st->out, returns how many. */
static int http_match(struct vn_switch *sw, struct vn_flow *f, int side, int g, uint64_t end)
{
    struct vn_sigflow *sf = f->sig;
    struct vn_sigstage *st = sf->stage;
    (void)sw;
    if (++st->hgen_cur == 0) {
        memset(st->hgen, 0, st->nrules * sizeof *st->hgen);
        st->hgen_cur = 1;
    }
    uint32_t nt = 0;
    for (int b = 0; b < VN_HTTP_NBUF; b++) {
        struct vn_sig_db *db = st->hdb[g][b];
        const uint8_t *p;
        uint32_t len;
        if (!db || !vn_http_buf(sf->http, side, b, &p, &len))
            continue;
        int n = vn_sig_scan_block(db, p, len, st->out, st->nrules);
        if (n < 0)
            return n;
        for (int i = 0; i < n; i++) {
            uint32_t ri = st->out[i].rule;
            if (ri >= st->nstream)
                continue;
            if (st->hgen[ri] != st->hgen_cur) {
                st->hgen[ri] = st->hgen_cur;
                st->hgot[ri] = 0;
                st->hlimit[ri] = 0;
                st->htouch[nt++] = ri;
            }
            st->hgot[ri] |= 1u << b;
            if (st->out[i].flags & VN_SIG_F_LIMIT)
                st->hlimit[ri] = 1;
        }
    }
    int n = 0;
    for (uint32_t k = 0; k < nt; k++) {
        uint32_t ri = st->htouch[k];
        if (st->hgot[ri] != st->rules[ri].hmask[g])
            continue;
        st->out[n].rule = ri;
        st->out[n].flags = st->hlimit[ri] ? VN_SIG_F_LIMIT : 0;
        st->out[n].offset = end;
        n++;
    }
    return n;
}

/* The reader failed (smuggling, syntax, limits) or went over the memcap: fail closed, from
 * the message it was reading on. */
static void http_fail(struct vn_switch *sw, struct vn_flow *f, int hs, uint64_t *counter)
{
    struct vn_sigflow *sf = f->sig;
    int side = side_of(f, hs);
    uint64_t msg = sf->hbase[hs] + vn_http_msg_start(sf->http, side);
    (*counter)++;
    sw->ports[f->port].st.sig_dropped++;
    sig_block(sw, f, hs, stop_at(&f->half[hs], msg), 0);
}

/* An event of the reader on half hs: match the group it completes. */
static void http_event(struct vn_switch *sw, struct vn_flow *f, int hs, int side, int ev)
{
    struct vn_sigflow *sf = f->sig;
    struct vn_port_stats *ps = &sw->ports[f->port].st;
    if (ev == VN_HTTP_EV_HEAD)
        *(side == VN_HTTP_REQ ? &ps->sig_http_requests : &ps->sig_http_responses) += 1;
    int g = side == VN_HTTP_RESP ? VN_SIG_HG_RESP : ev == VN_HTTP_EV_BODY ? VN_SIG_HG_REQ_BODY : VN_SIG_HG_REQ;
    if (!(sf->stage->hgroups & 1u << g) || !sf->hon[hs])
        return;
    uint64_t end = sf->hbase[hs] + vn_http_pos(sf->http, side);
    int n = http_match(sw, f, side, g, end);
    if (n < 0) {
        http_fail(sw, f, hs, &ps->sig_scan_errors);
        return;
    }
    if (n)
        stream_matches(sw, f, hs, n, sf->http, side, sf->hbase[hs] + vn_http_msg_start(sf->http, side));
}

/* Feeds the reader half hs's new in-order bytes. */
static void http_pump(struct vn_switch *sw, struct vn_flow *f, int hs)
{
    struct vn_sigflow *sf = f->sig;
    struct vn_half *hf = &f->half[hs];
    struct vn_port_stats *ps = &sw->ports[f->port].st;
    int side = side_of(f, hs);
    uint64_t upto = hf->contig;
    uint64_t pos = sf->hbase[hs] + vn_http_pos(sf->http, side);
    for (struct vn_seg *s = seg_from(hf, pos); s && pos < upto && !sf->done && vn_http_active(sf->http, side);
         s = s->next) {
        if (s->start > pos || seg_end(s) <= pos)
            continue;
        uint64_t to = seg_end(s) < upto ? seg_end(s) : upto;
        while (pos < to && !sf->done && vn_http_active(sf->http, side)) {
            int ev;
            int64_t r = vn_http_feed(sf->http, side, s->rec->data + s->pay + (pos - s->start),
                                     (size_t)(to - pos), &ev);
            if (r < 0) {
                http_fail(sw, f, hs, &ps->sig_http_errors);
                return;
            }
            pos += (uint64_t)r;
            if (ev)
                http_event(sw, f, hs, side, ev);
            else if (r == 0)
                return;                 /* waits for the other side */
        }
        if (sf->done)
            return;                     /* blocked: its records may be gone (s with them) */
        /* what the reader holds now is counted against the stage's memcap; a connection
         * whose own reader grew past it is the one that fails */
        vn_http_settle(sf->http, side);
        size_t m = vn_http_mem(sf->http);
        int grew = m > sf->http_mem;
        sf->stage->http_mem += m - sf->http_mem;
        sf->http_mem = m;
        if (grew && sf->stage->http_mem > sf->stage->http_memcap) {
            http_fail(sw, f, hs, &ps->sig_http_memcap);
            return;
        }
    }
    if (!sf->done && sf->http && hf->eof && pos == hf->fin_off && vn_http_active(sf->http, side)) {
        int ev = vn_http_eof(sf->http, side);
        if (ev < 0)
            http_fail(sw, f, hs, &ps->sig_http_errors);
        else if (ev)
            http_event(sw, f, hs, side, ev);
    }
}

/* What a scan of direction `hs` found (`n` matches in st->out, or an error: fail closed from
 * `at`): applied.  1 if the flow is done with (blocked or passed). */
static int scan_result(struct vn_switch *sw, struct vn_flow *f, int hs, int n, uint64_t at)
{
    struct vn_port_stats *ps = &sw->ports[f->port].st;
    if (n < 0) {
        ps->sig_scan_errors++;
        ps->sig_dropped++;
        sig_block(sw, f, hs, at, 0);
        return 1;
    }
    if (n)
        stream_matches(sw, f, hs, n, NULL, 0, 0);
    return f->sig->done;
}

void sig_flow_scan(struct vn_switch *sw, struct vn_flow *f, int hs)
{
    struct vn_sigflow *sf = f->sig;
    struct vn_half *hf = &f->half[hs];
    if (sf->done || (!sf->st[hs] && !(sf->http && sf->hon[hs])))
        return;
    struct vn_sigstage *st = sf->stage;
    struct vn_port_stats *ps = &sw->ports[f->port].st;
    uint64_t upto = hf->contig;
    /* the new in-order bytes, record by record (records may overlap: identical copies) */
    for (struct vn_seg *s = seg_from(hf, sf->pos[hs]); sf->st[hs] && s && sf->pos[hs] < upto && !sf->done;
         s = s->next) {
        if (s->start > sf->pos[hs] || seg_end(s) <= sf->pos[hs])
            continue;
        uint64_t from = sf->pos[hs], to = seg_end(s) < upto ? seg_end(s) : upto;
        int n = vn_sig_stream_scan(st->stream, sf->st[hs], s->rec->data + s->pay + (from - s->start),
                                   (size_t)(to - from), st->out, st->nrules ? st->nrules : 1);
        ps->sig_stream_bytes += to - from;
        sf->pos[hs] = to;
        if (scan_result(sw, f, hs, n, s->start))
            return;                /* blocked (its records are gone) or passed */
        /* rules with absolute positions, as Suricata reads a tcp rule over a packet: from this
         * segment's first byte (the first segment's are the stream's, matched above already) */
        if (st->seg && s->start > sf->hbase[hs] && sf->st[hs]) {
            n = vn_sig_scan_block(st->seg, s->rec->data + s->pay, (size_t)(to - s->start), st->out,
                                  st->nrules ? st->nrules : 1);
            for (int i = 0; i < n; i++)
                st->out[i].offset += s->start;      /* the block's offsets, as stream offsets */
            if (scan_result(sw, f, hs, n, s->start))
                return;
        }
    }
    if (!sf->done && sf->st[hs] && hf->eof && sf->pos[hs] == hf->fin_off) {
        /* the end of this direction: candidates that waited for more bytes are decided now */
        struct vn_sig_stream *x = sf->st[hs];
        sf->st[hs] = NULL;
        int n = vn_sig_stream_close(st->stream, x, st->out, st->nrules ? st->nrules : 1);
        if (n > 0)
            stream_matches(sw, f, hs, n, NULL, 0, 0);
    }
    if (sf->done)
        return;
    /* the HTTP reader: it holds a message from its first byte until the rules read it */
    uint64_t ok = sf->on[hs] ? sf->pos[hs] : UINT64_MAX;
    if (sf->http && sf->hon[hs]) {
        int side = side_of(f, hs);
        int waited = vn_http_waiting(sf->http);
        http_pump(sw, f, hs);
        if (sf->done)
            return;
        uint64_t h = vn_http_hold(sf->http, side);
        if (h != UINT64_MAX && sf->hbase[hs] + h < ok)
            ok = sf->hbase[hs] + h;
        if (side == VN_HTTP_RESP && waited && !vn_http_waiting(sf->http)) {
            /* a response let the request side go on (or made the connection a tunnel) */
            sig_flow_scan(sw, f, !hs);
            if (sf->done)
                return;
            half_release(sw, f, &f->half[!hs]);
        }
    }
    hf->sig_ok = ok;
}

/* May the frame of record `s`, just scanned, go on as it is, now (instead of being held and
 * sent again as a copy)?  Only if the stage alone holds the direction (no contain scanner,
 * no edits, no `more`), the scan passed all of it, it is the last record and every record
 * before it went already: then sending it now changes nothing the receiver sees. */
int sig_flow_forwards(const struct vn_flow *f, const struct vn_half *hf, const struct vn_seg *s)
{
    const struct vn_sigflow *sf = f->sig;
    return sf && !sf->blocked && hf->passed == UINT64_MAX && !hf->edited && !hf->more &&
           hf->vouched <= hf->acked && s == hf->tail && !s->released && seg_end(s) <= hf->sig_ok &&
           seg_end(s) <= hf->contig && (!s->prev || s->prev->released);
}

int sig_flow_blocked(const struct vn_flow *f)
{
    return f->sig && f->sig->blocked;
}

void sig_flow_free(struct vn_switch *sw, struct vn_flow *f)
{
    struct vn_sigflow *sf = f->sig;
    if (!sf)
        return;
    (void)sw;
    for (int hs = 0; hs < 2; hs++)
        if (sf->st[hs])
            vn_sig_stream_close(sf->stage->stream, sf->st[hs], NULL, 0);
    if (sf->http) {
        sf->stage->http_mem -= sf->http_mem;
        vn_http_free(sf->http);
    }
    stage_release(sf->stage);
    free(sf);
    f->sig = NULL;
}

/* ---------------------------------------------------------------- bench */

int64_t vn_sig_bench_switch(struct vn_switch *sw, int a, int b, const uint8_t *pack, size_t len)
{
    size_t off = 0;
    int64_t delivered = 0;
    struct vn_sink_frame out;
    while (off < len) {
        if (len - off < 3)
            return -1;
        int which = pack[off];
        unsigned n = (unsigned)pack[off + 1] | (unsigned)pack[off + 2] << 8;
        off += 3;
        if (n > len - off || vn_port_inject_from(sw, which ? b : a, pack + off, n) < 0)
            return -1;
        off += n;
        while (vn_sink_next(sw, &out))
            delivered += out.len;
    }
    return delivered;
}
