/*
 * The TCP engine's IP fragment reassembly (see tcp.c): on an NI whose TCP is inspected,
 * fragments of a TCP datagram are put back together before the engine sees them.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include "tcp_internal.h"

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

void frag_free(struct vn_switch *sw, int port, struct vn_frag **pp)
{
    struct vn_frag *g = *pp;
    *pp = g->next;
    sw->tcp->ports[port]->nfrags--;
    sw->tcp->ports[port]->bytes -= sizeof(*g);
    free(g);
}

/* Takes one TCP fragment.  Returns VN_TCP_TAKEN always: the fragment is kept, or dropped
 * (counted), or it completed a datagram that went on through the policy. */
int frag_input(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt,
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
        const uint8_t *ip = vn_get(d, pkt->len, l3, 20);
        if (!ip)
            return drop(&st->tcp_frag_dropped);
        unsigned ihl = (ip[0] & 15) * 4u, tot = vn_rd16(ip + 2);
        if (tot < ihl || !vn_get(d, pkt->len, l3, tot) ||
            vn_fold(vn_sum16(0, ip, ihl)) != 0xffff)
            return drop(&st->tcp_frag_dropped);
        uint16_t fr = vn_rd16(ip + 6);
        id = vn_rd16(ip + 4);
        off = (fr & 0x1fffu) * 8;
        more = !!(fr & 0x2000);
        pay = l3 + ihl;
        end = l3 + tot;
    } else {
        /* the fragment header right after the base header; other layouts are not taken apart */
        const uint8_t *ip = vn_get(d, pkt->len, l3, 48);
        if (!ip || ip[6] != 44 || !vn_get(d, pkt->len, l3, 40 + vn_rd16(ip + 4)))
            return drop(&st->tcp_frag_dropped);
        const uint8_t *fh = ip + 40;
        nh = fh[0];
        off = vn_rd16(fh + 2) & 0xfff8u;
        more = fh[3] & 1;
        id = vn_rd32(fh + 4);
        pay = l3 + 48;
        end = l3 + 40 + vn_rd16(ip + 4);
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
    sw->now_ns = vn_clock(sw);
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
void frag_expire(struct vn_switch *sw, int port, uint64_t now)
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
