/*
 * The TCP engine's edited streams and emission (see tcp.c): mapping sender offsets to what
 * the receiver sees and back (out_pos, orig_ack), rewriting frames of an edited connection,
 * sending held records on (emit_record, half_release), injected bytes and forged segments.
 * send_built() and forge_seg() are where the frames the engine makes leave it: into the
 * switch's emit queue, built in the one scratch frame (nothing nests: the switch sends them
 * on after the engine returned).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include "tcp_internal.h"

/* ---- edited streams (cut, inject) and bytes the NI vouches for (more) ---- */

static int64_t edit_after(const struct vn_edit *e) { return e->before + e->inj_len - (int64_t)e->cut; }
static int64_t edit_ostart(const struct vn_edit *e) { return (int64_t)e->off + e->before; }

/* Output offset of sender byte `o` (a byte inside a cut: where the cut collapsed).  The
 * last edit at or before it decides (binary search: edits are sorted by offset). */
uint64_t out_pos(const struct vn_half *hf, uint64_t o)
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
uint64_t orig_ack(const struct vn_half *hf, uint64_t x)
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
uint64_t orig_ack_clamped(const struct vn_half *hf, uint64_t x)
{
    uint64_t a = orig_ack(hf, x);
    return a > hf->highest ? hf->highest : a;
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
void rewrite_tcp(struct vn_flow *f, int hs, uint8_t *tcp, unsigned doff, uint32_t seq,
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

/* Sends a frame built in the scratch frame on its way: into the emit queue, to meet the
 * frame subscriptions of its NI, then the switch (or its receiver). */
static void send_built(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt)
{
    struct vn_port *p = &sw->ports[port];
    if (!p->kind)
        return;
    if (vn_isolation_drops(p, dir, pkt))
        return;                    /* the NI was isolated while the bytes waited */
    vn_emit_push(sw, VN_EMIT_SUBS, port, dir, egress_to, pkt);
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
        uint64_t e = b - a > chunk ? a + chunk : b;
        int last_fin = fin && e == b;
        struct vn_pkt *pkt = t->scratch;
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
void forge_seg(struct vn_switch *sw, struct vn_flow *f, int from, uint32_t seq, uint32_t ack,
               uint8_t flags, uint16_t win, const uint8_t *payload, uint32_t len,
               const struct vn_edit *inj)
{
    struct vn_tcp *t = sw->tcp;
    struct vn_half *src = &f->half[from], *other = &f->half[!from];
    struct vn_pkt *pkt = t->scratch;
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
    if (from_guest)                                /* into the network, as the guest */
        vn_emit_push(sw, VN_EMIT_OUT, f->port, VN_DIR_FROM_GUEST, -1, pkt);
    else                                           /* to the guest, as the remote end */
        vn_emit_push(sw, VN_EMIT_OUT, f->port, VN_DIR_TO_GUEST, f->port, pkt);
}

/* Sends (or resends) the injected bytes of edit `e` of half `hs` from output offset `from`
 * on, in segments the receiver's MSS allows, as the sender. */
void send_inject(struct vn_switch *sw, struct vn_flow *f, int hs, struct vn_edit *e, uint64_t from,
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
    e->sent_ns = vn_clock(sw);
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
void send_edited(struct vn_switch *sw, struct vn_flow *f, int hs, const struct vn_fview *v,
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
void ack_cut(struct vn_switch *sw, struct vn_flow *f, int hs)
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

void edit_account(struct vn_switch *sw, struct vn_flow *f, int64_t delta)
{
    struct vn_tcp_port *tp = sw->tcp->ports[f->port];
    if (tp)
        tp->bytes += (uint64_t)delta;
}

static uint64_t edit_cost(const struct vn_edit *e) { return sizeof(*e) + e->inj_len; }

/* Drops the edits the receiver acknowledged entirely (their shift stays in `base`). */
void edits_compact(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
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

void edits_free(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
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
void rewrite_start(struct vn_half *hf)
{
    if (hf->edited)
        return;
    hf->edited = 1;
    hf->out_sent = hf->released_end;
    hf->told = hf->acked;
}

/* Tells the sender of half `hs` again how far its bytes are acknowledged (it resent some:
 * it missed the NI's ACK). */
void reack(struct vn_switch *sw, struct vn_flow *f, int hs)
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
void more_ack(struct vn_switch *sw, struct vn_flow *f, int hs)
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
    if (S->vouched <= S->acked)
        /* nothing was owed: the resend timer runs from now, not from the receiver's last
         * acknowledgement (bytes released before this `more` are not late yet) */
        S->ack_ns = vn_clock(sw);
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
void emit_record(struct vn_switch *sw, struct vn_flow *f, int hs, struct vn_seg *s)
{
    struct vn_tcp *t = sw->tcp;
    struct vn_held *r = s->rec;
    struct vn_half *S = &f->half[hs];
    if (!sw->ports[r->port].kind)
        return;                    /* its port went, and with it where it was going */
    if (S->edited && edits_touch(S, s->start, seg_end(s))) {
        struct vn_fview v;
        view_of(&v, s);
        send_edited(sw, f, hs, &v, s->start, seg_end(s), s->fin, 0);
        return;
    }
    const struct vn_policy *pol = sw->ports[r->port].pol;
    if (!S->edited && !f->half[!hs].edited && !(pol && pol->isolation)) {
        /* as it arrived, and no isolation check needs it as a vn_pkt: queued from the
         * record itself, one copy fewer (send_built's path otherwise) */
        vn_emit_push_raw(sw, VN_EMIT_SUBS, r->port, r->dir, r->egress_to, &r->hdr, r->data, r->len,
                         NULL);
        return;
    }
    struct vn_pkt *pkt = t->scratch;
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
void half_release(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf)
{
    if (!hf->hold)
        return;
    uint64_t lim = hf->passed < hf->contig ? hf->passed : hf->contig;
    if (lim > hf->sig_ok)
        lim = hf->sig_ok;          /* the signature stage holds the rest (sigstage.c) */
    if (hf->vouched > hf->acked && hf->real_right && lim > hf->real_right) {
        uint64_t cap = lim;
        lim = hf->real_right;      /* bytes beyond the receiver's window wait with the NI */
        if (hf->real_right > hf->acked && hf->acked >= hf->released_end) {
            /* ... but the NI never splits a record: one longer than the window the receiver
             * has open would wait for good once the receiver took all before it (it has
             * nothing left to acknowledge, so its window never grows; the sender, already
             * acknowledged, sends nothing).  As a sender's window probe: the next record
             * goes whole, alone, while the window is open and nothing is in flight (a
             * receiver takes a segment that starts inside its window; what it drops the
             * NI's resend timer sends again). */
            for (struct vn_seg *s = seg_from(hf, hf->acked); s && s->start <= hf->acked; s = s->next)
                if (!s->released && seg_end(s) > hf->acked) {
                    if (seg_end(s) > lim && seg_end(s) <= cap)
                        lim = seg_end(s);
                    break;
                }
        }
    }
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
            hf->ack_ns = vn_clock(sw);  /* the resend timer runs from the latest send */
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
void forge_rst(struct vn_switch *sw, struct vn_flow *f, int from, uint32_t seq, uint32_t ack)
{
    forge_seg(sw, f, from, seq, ack, TCP_RST | TCP_ACK, 0, NULL, 0, NULL);
}

/* RSTs to both ends with the sequence numbers each expects: where the receiver's stream
 * stands is what the NI sent on; if it acknowledged less, a second RST covers that. */
void forge_rsts(struct vn_switch *sw, struct vn_flow *f)
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
