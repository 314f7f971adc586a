/*
 * What the virtio-net offloads imply for a switch: completing partial checksums
 * (VIRTIO_NET_HDR_F_NEEDS_CSUM) and cutting TSO frames into MSS-sized segments for a peer
 * that did not negotiate them.  Every header field comes from a guest: every read goes
 * through vn_get() (vn_internal.h), against the frame's length.
 */
#include <arpa/inet.h>
#include "vn_internal.h"




/* Validates the offload request in a guest's header against the frame it came with.
 * 0: fine; -1: reject the frame. */
int vn_offload_check(const struct vn_pkt *pkt)
{
    const struct vn_net_hdr *h = &pkt->hdr;
    if (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
        if (!vn_get(pkt->data, pkt->len, (uint32_t)h->csum_start + h->csum_offset, 2))
            return -1;
    }
    uint8_t gso = h->gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
    if (gso != VIRTIO_NET_HDR_GSO_NONE && gso != VIRTIO_NET_HDR_GSO_TCPV4 &&
        gso != VIRTIO_NET_HDR_GSO_TCPV6)
        return -1;
    /* a tiny MSS would make one 64 KiB frame cost us thousands of segments */
    if (gso != VIRTIO_NET_HDR_GSO_NONE && h->gso_size < VN_MIN_GSO_SIZE)
        return -1;
    return 0;
}

/* Completes a partial checksum in place: the 16-bit field at csum_start+csum_offset holds
 * the pseudo-header sum; the result covers [csum_start, len). */
int vn_csum_complete(struct vn_pkt *pkt)
{
    struct vn_net_hdr *h = &pkt->hdr;
    if (!(h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM))
        return 0;
    uint32_t start = h->csum_start;
    uint8_t *field = vn_getw(pkt->data, pkt->len, start + h->csum_offset, 2);
    const uint8_t *covered = vn_get(pkt->data, pkt->len, start, 1);
    if (!field || !covered)
        return -1;
    uint16_t c = (uint16_t)~vn_fold(vn_sum16(0, covered, pkt->len - start));
    /* a computed 0 is sent as 0xffff for UDP; harmless for TCP (both mean "ok") */
    vn_wr16(field, c ? c : 0xffff);
    h->flags &= ~VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h->flags |= VIRTIO_NET_HDR_F_DATA_VALID;
    return 0;
}

/* Where the L3 header starts, and its ethertype, skipping one VLAN tag.  -1 if runt. */
static int l3_offset(const struct vn_pkt *pkt, uint16_t *etype)
{
    uint16_t t;
    if (vn_get16(pkt->data, pkt->len, 12, &t) < 0)
        return -1;
    unsigned off = 14;
    if (t == 0x8100) {
        if (vn_get16(pkt->data, pkt->len, 16, &t) < 0)
            return -1;
        off = 18;
    }
    *etype = t;
    return (int)off;
}

/*
 * Cuts a TSO frame into segments of gso_size payload bytes, each with its own IP length,
 * IPv4 id and checksum, TCP sequence number and full TCP checksum; FIN/PSH only on the
 * last segment, CWR only on the first.  Calls cb for each segment (sw->seg, reused).
 * Returns the number of segments, or -1 if the headers do not describe a TCP frame we can
 * segment (the caller drops it).
 */
int vn_gso_segment(struct vn_switch *sw, int port, const struct vn_pkt *pkt, vn_seg_cb cb)
{
    uint16_t etype;
    int l3 = l3_offset(pkt, &etype);
    if (l3 < 0)
        return -1;
    const uint8_t *d = pkt->data;
    uint32_t len = pkt->len;
    unsigned l4, l3len;
    int v4;
    const uint8_t *ip, *th;
    if (etype == 0x0800) {
        if (!(ip = vn_get(d, len, (unsigned)l3, 20)) || (ip[0] >> 4) != 4)
            return -1;
        l3len = (ip[0] & 15) * 4u;
        if (l3len < 20 || !vn_get(d, len, (unsigned)l3, l3len) || ip[9] != 6)
            return -1;
        if (vn_rd16(ip + 6) & 0x3fff)   /* a fragment cannot be TSO */
            return -1;
        v4 = 1;
    } else if (etype == 0x86dd) {
        if (!(ip = vn_get(d, len, (unsigned)l3, 40)) || (ip[0] >> 4) != 6 || ip[6] != 6)
            return -1;                   /* extension headers are not segmented */
        l3len = 40;
        v4 = 0;
    } else {
        return -1;
    }
    l4 = l3 + l3len;
    if (!(th = vn_get(d, len, l4, 20)))
        return -1;
    unsigned tcplen = (th[12] >> 4) * 4u;
    if (tcplen < 20 || !vn_get(d, len, l4, tcplen))
        return -1;
    unsigned hdrs = l4 + tcplen;
    unsigned mss = pkt->hdr.gso_size;
    if (mss == 0 || mss > VN_MAX_FRAME - hdrs)
        return -1;
    uint32_t payload = len - hdrs;
    uint32_t seq = vn_rd32(th + 4);
    uint16_t ipid = v4 ? vn_rd16(ip + 4) : 0;
    uint8_t flags = th[13];
    int nseg = 0;
    uint32_t off = 0;
    do {
        uint32_t take = payload - off < mss ? payload - off : mss;
        struct vn_pkt *s = sw->seg;
        memcpy(s->data, d, hdrs);
        memcpy(s->data + hdrs, d + hdrs + off, take);
        s->len = hdrs + take;
        memset(&s->hdr, 0, sizeof(s->hdr));
        s->hdr.flags = VIRTIO_NET_HDR_F_DATA_VALID;
        uint8_t *ip = s->data + l3, *tcp = s->data + l4;
        int last = off + take >= payload;
        uint8_t f = flags;
        if (!last)
            f &= ~(0x01 | 0x08);          /* FIN, PSH */
        if (nseg > 0)
            f &= ~0x80;                   /* CWR */
        tcp[13] = f;
        vn_wr32(tcp + 4, seq + off);
        uint32_t seglen = tcplen + take;
        uint32_t sum;
        if (v4) {
            vn_wr16(ip + 2, (uint16_t)(l3len + seglen));
            vn_wr16(ip + 4, (uint16_t)(ipid + nseg));
            vn_wr16(ip + 10, 0);
            vn_wr16(ip + 10, (uint16_t)~vn_fold(vn_sum16(0, ip, l3len)));
            sum = vn_sum16(0, ip + 12, 8);
        } else {
            vn_wr16(ip + 4, (uint16_t)seglen);
            sum = vn_sum16(0, ip + 8, 32);
        }
        sum += 6 + seglen;
        vn_wr16(tcp + 16, 0);
        sum = vn_sum16(sum, tcp, seglen);
        vn_wr16(tcp + 16, (uint16_t)~vn_fold(sum));
        cb(sw, port, s);
        nseg++;
        off += take;
    } while (off < payload);
    return nseg;
}
