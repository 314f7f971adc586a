/*
 * Private to the TCP stream engine (tcp.c, tcp_edit.c, tcp_frag.c, tcp_api.c): its state
 * and the calls between its files.  See tcp.c for what the engine does.
 *
 * Frames leave the engine at four points only, into the switch's emit queue
 * (vn_emit_push) with the stage they still have to pass: send_built() (released and edited
 * frames: the NI's frame subscriptions) and forge_seg() (the NI's own segments: none) in
 * tcp_edit.c, frag_input() (a reassembled datagram: the NI's whole policy) in tcp_frag.c,
 * and seg_data() in tcp.c (a segment only the signature stage held, scanned: the frame
 * itself, to the frame subscriptions).  The engine calls nothing in the switch (but its clock, vn_clock) and wakes
 * only the kernel (vn_punt_signal).
 */
#ifndef VN_TCP_INTERNAL_H
#define VN_TCP_INTERNAL_H

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
    struct vn_held *rec;           /* the frame: in the same block, just after (seg_new) */
};

/* A kept segment is one block, its vn_seg and then its vn_held record with the frame, from
 * the engine's block cache (vn_tcp.seg_blocks, blkcache.c): malloc and free took a tenth of
 * the signature stage's time per segment. */
static inline size_t seg_size(uint32_t frame_len)
{
    return sizeof(struct vn_seg) + sizeof(struct vn_held) + frame_len;
}
#define VN_SEG_CACHE_BYTES (4u << 20)  /* free segment blocks kept at most */

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
    uint64_t sig_ok;               /* the signature stage passed the bytes below (sigstage.c) */
    uint64_t consumed;             /* the kernel read the bytes below */
    /* the parties: the NI kernel (its scanners on the socket) and scanner rings
     * (vn_flow.rings); passed and consumed above are the least of theirs (sring_settle) */
    uint8_t kread, khold;          /* the kernel reads / holds this direction */
    uint64_t kpassed, kconsumed;   /* how far the kernel passed / read it */
    uint64_t acked;                /* the receiver acknowledged the offsets below (FIN counts 1) */
    uint64_t right;                /* the receiver's window right edge */
    uint8_t have_right;
    uint64_t highest;              /* end of the highest byte sent (FIN counts 1) */
    uint64_t released_end;         /* end of what went on to the receiver (FIN counts 1) */
    uint64_t ooo;                  /* bytes kept beyond contig */
    struct vn_seg *head, *tail;
    uint32_t seg_max;              /* the longest record's payload ever kept (seg_from) */
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
    uint8_t dirty, in_table, announced, report_open, report_close, bypass;
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
    struct vn_sigflow *sig;        /* the signature stage's state (sigstage.c); NULL: none */
    struct vn_sring *rings;        /* scanner rings reading it (tcp_ring.c) */
    uint8_t nrings;
};

/* A scanner ring's part in a stream (tcp_ring.c). */
struct vn_sring {
    uint8_t slot;                  /* the ring on the flow's port */
    uint8_t read, hold;            /* VN_DIR_* bits */
    uint8_t ended;                 /* END published (VN_DIR_* bits) */
    uint32_t handle;
    uint64_t given[2];             /* bytes published on the ring */
    uint64_t passed[2];            /* bytes it passed */
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
    struct vn_pkt *scratch;        /* where a frame is built before it joins the emit queue */
    struct vn_blkcache seg_blocks; /* free kept-segment blocks (seg_new) */
    uint64_t ring_kill[256];       /* connections a full ring lost, to kill (tcp_ring.c) */
    unsigned nring_kill;
};

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

/* ---- small helpers, inline for the per-segment path ---- */

static inline int half_of(int dir) { return dir == VN_DIR_FROM_GUEST ? 0 : 1; }

static inline int dir_of(int half) { return half == 0 ? VN_DIR_FROM_GUEST : VN_DIR_TO_GUEST; }

/* The pseudo-header sum of a TCP segment of `len` bytes. */
static inline uint32_t pseudo(int family, const uint8_t *ip, uint32_t len)
{
    uint32_t s = family == 4 ? vn_sum16(0, ip + 12, 8) : vn_sum16(0, ip + 8, 32);
    return s + 6 + (len >> 16) + (len & 0xffff);
}

/* The first TCP option of `kind` in opt[0, len) (pointing at its kind byte; all of its
 * o[1] bytes lie within bounds), NULL if there is none before the end or a malformed option. */
static inline const uint8_t *tcp_opt(const uint8_t *opt, unsigned len, uint8_t kind)
{
    unsigned i = 0;
    const uint8_t *o;
    while ((o = vn_get(opt, len, i, 1)) && o[0] != 0) {
        if (o[0] == 1) {
            i++;
            continue;
        }
        if (!(o = vn_get(opt, len, i, 2)) || o[1] < 2 || !vn_get(opt, len, i, o[1]))
            break;
        if (o[0] == kind)
            return o;
        i += o[1];
    }
    return NULL;
}

/* RFC 1624: a checksum after 16-bit word `old` became `new`. */
static inline uint16_t csum_update(uint16_t csum, uint16_t old, uint16_t new)
{
    uint32_t s = (uint16_t)~csum + (uint32_t)(uint16_t)~old + new;
    return (uint16_t)~vn_fold(s);
}

static inline uint64_t seg_end(const struct vn_seg *s) { return s->start + s->len; }

/* The first record (in start order) that may reach offset `pos`: no record is longer than
 * the longest one kept (seg_max, at most a frame), so walking back from the tail stops that
 * far before `pos`.  Keeps the walks short while many records wait for acknowledgement (a
 * frame's length would walk back over some 45 full-sized segments each time). */
static inline struct vn_seg *seg_from(const struct vn_half *hf, uint64_t pos)
{
    struct vn_seg *s = hf->tail;
    if (!s)
        return NULL;
    while (s->prev && s->prev->start + hf->seg_max > pos)
        s = s->prev;
    return s;
}

static inline uint32_t seq_at(const struct vn_half *hf, uint64_t off) { return hf->isn + 1 + (uint32_t)off; }

/* Stream offset of sequence number `seq` in half `hf` (relative to its reference point);
 * -1 if it lies before the first byte. */
static inline int64_t seq_off(const struct vn_half *hf, uint32_t seq)
{
    uint64_t ref = hf->highest;
    int32_t delta = (int32_t)(seq - seq_at(hf, ref));
    if (delta < 0 && (uint64_t)(-(int64_t)delta) > ref)
        return -1;
    return (int64_t)ref + delta;
}

static inline int drop(uint64_t *counter)
{
    (*counter)++;
    return VN_TCP_TAKEN;
}

/* How far the receiver's stream stands, in output offsets. */
static inline uint64_t sent_out(const struct vn_half *hf)
{
    return hf->edited ? hf->out_sent : hf->released_end;
}

/* Output offset of a sequence number the receiver uses (acknowledgements, SACK edges). */
static inline int64_t seq_off_out(const struct vn_half *hf, uint32_t seq)
{
    uint64_t ref = sent_out(hf);
    int32_t delta = (int32_t)(seq - seq_at(hf, ref));
    if (delta < 0 && (uint64_t)(-(int64_t)delta) > ref)
        return -1;
    return (int64_t)ref + delta;
}

/* ---- calls between the engine's files (hidden: not exported from the module) ---- */
#pragma GCC visibility push(hidden)

/* tcp.c: tables, segments, life of flows */
struct vn_tcp_port *tport(struct vn_switch *sw, int port, int create);
struct vn_flow *flow_by_id(struct vn_switch *sw, uint64_t id);
void half_trim(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf);
void half_free_all(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf);
void flow_free(struct vn_switch *sw, struct vn_flow *f);
void flow_close(struct vn_switch *sw, struct vn_flow *f, int reason);

/* tcp_edit.c: edited streams, emission, forged segments */
void half_release(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf);
void reack(struct vn_switch *sw, struct vn_flow *f, int hs);
uint64_t orig_ack_clamped(const struct vn_half *hf, uint64_t x);
void more_ack(struct vn_switch *sw, struct vn_flow *f, int hs);
void forge_rsts(struct vn_switch *sw, struct vn_flow *f);
void edit_account(struct vn_switch *sw, struct vn_flow *f, int64_t delta);
void ack_cut(struct vn_switch *sw, struct vn_flow *f, int hs);
void send_inject(struct vn_switch *sw, struct vn_flow *f, int hs, struct vn_edit *e, uint64_t from,
                 const uint8_t *tsopt);
void send_edited(struct vn_switch *sw, struct vn_flow *f, int hs, const struct vn_fview *v,
                 uint64_t from, uint64_t to, int fin, int resend);
void rewrite_tcp(struct vn_flow *f, int hs, uint8_t *tcp, unsigned doff, uint32_t seq,
                 int csum);
void rewrite_start(struct vn_half *hf);
uint64_t out_pos(const struct vn_half *hf, uint64_t o);
uint64_t orig_ack(const struct vn_half *hf, uint64_t x);
void forge_seg(struct vn_switch *sw, struct vn_flow *f, int from, uint32_t seq, uint32_t ack,
               uint8_t flags, uint16_t win, const uint8_t *payload, uint32_t len,
               const struct vn_edit *inj);
void forge_rst(struct vn_switch *sw, struct vn_flow *f, int from, uint32_t seq, uint32_t ack);
void emit_record(struct vn_switch *sw, struct vn_flow *f, int hs, struct vn_seg *s);
void edits_free(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf);
void edits_compact(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf);

/* tcp_ring.c: streams on scanner rings */
void sring_open(struct vn_switch *sw, struct vn_flow *f, const uint8_t *read, const uint8_t *hold);
void sring_feed(struct vn_switch *sw, struct vn_flow *f);
void sring_close(struct vn_switch *sw, struct vn_flow *f, int reason);
void sring_settle(struct vn_flow *f, struct vn_half *hf);

/* tcp_frag.c: IP fragments of TCP */
void frag_free(struct vn_switch *sw, int port, struct vn_frag **pp);
int frag_input(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt,
               const struct vn_hdrs *h);
void frag_expire(struct vn_switch *sw, int port, uint64_t now);

/* sigstage.c: the signature stage as a holder of streams */
int sig_flow_open(struct vn_switch *sw, struct vn_flow *f);
void sig_flow_scan(struct vn_switch *sw, struct vn_flow *f, int hs);
int sig_flow_blocked(const struct vn_flow *f);
int sig_flow_forwards(const struct vn_flow *f, const struct vn_half *hf, const struct vn_seg *s);
void sig_flow_free(struct vn_switch *sw, struct vn_flow *f);

#pragma GCC visibility pop

#endif
