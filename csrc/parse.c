/*
 * The frame parser: one walk from the Ethernet header to the transport header, and the
 * table that gives later IP fragments the transport header of their first fragment.
 *
 * The contract (vhostni.h, VN_UNPARSED_*): a frame is either parsed (every header it has
 * was walked, the transport is known or is a protocol the NI does not look into) or
 * unparsed, with the reason the walk stopped.  Prevent rules and anti-spoofing see only
 * parsed frames unless the policy says `unparsed = pass`; so no header the NI did not
 * understand can hide a port or an address from them.
 *
 * Every read of frame bytes goes through vn_get(): bounds are checked in one place, against
 * the end of the frame or, once inside IP, the end of the datagram by its length field
 * (bytes after it are padding the receiver ignores).
 */
#include "vn_internal.h"

static int stop(struct vn_hdrs *h, int reason)
{
    h->unparsed = reason;
    return reason;
}

/* A header cut short: in a first fragment that is the sender's doing (RFC 7112: the first
 * fragment carries the whole chain), anywhere else the frame is truncated. */
static int short_hdr(struct vn_hdrs *h)
{
    return stop(h, h->frag ? VN_UNPARSED_FRAGMENT : VN_UNPARSED_TRUNCATED);
}

/* The transport header at `off`, the datagram ending at `end`. */
static int parse_l4(const uint8_t *d, uint32_t end, uint32_t off, int proto, struct vn_hdrs *h)
{
    const uint8_t *p;
    h->proto = proto;
    h->l4_off = (int)off;
    switch (proto) {
    case 6:
        if (!(p = vn_get(d, end, off, 20)))
            return short_hdr(h);
        if ((p[12] >> 4) < 5)
            return stop(h, VN_UNPARSED_BAD_HEADER);
        if (!vn_get(d, end, off, (p[12] >> 4) * 4u))
            return short_hdr(h);
        h->tcp_flags = p[13];
        break;
    case 17:
    case 132:
        if (!(p = vn_get(d, end, off, proto == 17 ? 8 : 12)))
            return short_hdr(h);
        break;
    case 1:
    case 58:
        if (!(p = vn_get(d, end, off, 4)))
            return short_hdr(h);
        h->icmp_type = p[0];
        h->icmp_code = p[1];
        h->l4_known = 1;
        return 0;
    case 4:    /* IPv4 in IP */
    case 41:   /* IPv6 in IP (6in4, 6to4, ISATAP) */
    case 47:   /* GRE */
    case 97:   /* EtherIP */
    case 137:  /* MPLS in IP */
        /* a whole packet inside, which the walk does not enter: its addresses, ports and
         * flags are nobody's check, and a host with a tunnel module loaded decapsulates it
         * from anyone (Linux's fallback tunl0, sit0, gre0): a spoofed inner source, a
         * port no rule sees.  Unparsed unless the policy says tunnels = pass. */
        return stop(h, VN_UNPARSED_TUNNEL);
    default:
        /* ESP (50: encrypted, its transport unknowable), no next header (59) and protocols
         * the NI does not look into: the walk ends here; rules can name the protocol */
        h->l4_known = 1;
        return 0;
    }
    h->sport = vn_rd16(p);
    h->dport = vn_rd16(p + 2);
    h->l4_known = 1;
    return 0;
}

/* A later fragment: no transport header, only payload; but one that starts inside the
 * transport header of its datagram could rewrite what the first fragment showed (RFC
 * 1858's overlapping fragment attack on TCP flags).  IPv4 repeats the protocol in every
 * fragment (it is part of the datagram's key); an IPv6 fragment header's next header is
 * only the first fragment's word, so there any fragment that starts within 20 bytes is
 * refused, whatever it claims (no real one does: IPv6 fragments carry 1232 bytes at least). */
static int later_fragment(uint32_t off, int proto, uint32_t frag_off, int any_proto, struct vn_hdrs *h)
{
    h->frag_later = 1;
    h->frag_off = frag_off;
    h->frag_part = off;
    h->proto = proto;
    h->l4_off = (int)off;
    if ((proto == 6 || any_proto) && frag_off < 20)
        return stop(h, VN_UNPARSED_FRAGMENT);
    return 0;
}

/* IPv4 options (RFC 791): each one whole inside the header; loose or strict source routing
 * (LSRR 131, SSRR 137) sends the packet on past its destination address to the hops
 * listed, so rules and anti-spoofing would judge a destination that is not the last. */
static int ipv4_options(const uint8_t *o, unsigned n, struct vn_hdrs *h)
{
    for (unsigned i = 0; i < n;) {
        uint8_t t = o[i];
        if (t == 0)
            break;             /* end of options */
        if (t == 1) {
            i++;               /* no-op */
            continue;
        }
        if (n - i < 2 || o[i + 1] < 2 || o[i + 1] > n - i)
            return stop(h, VN_UNPARSED_BAD_HEADER);   /* receivers drop it too */
        if (t == 131 || t == 137)
            return stop(h, VN_UNPARSED_SOURCE_ROUTE);
        i += o[i + 1];
    }
    return 0;
}

/* IPv4 AH (RFC 4302) between the IP header and the transport: length in 4-byte units + 2. */
static int parse_ipv4(const uint8_t *d, uint32_t len, int gso, uint32_t off, struct vn_hdrs *h)
{
    const uint8_t *ip = vn_get(d, len, off, 20);
    if (!ip)
        return stop(h, VN_UNPARSED_TRUNCATED);
    unsigned ihl = (ip[0] & 15) * 4u, tot = vn_rd16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < 20)
        return stop(h, VN_UNPARSED_BAD_HEADER);
    uint32_t end;
    if (tot == 0 && gso) {
        end = len;             /* a TSO frame past 64 KiB carries no length of its own */
    } else {
        if (tot < ihl)
            return stop(h, VN_UNPARSED_BAD_HEADER);
        end = off + tot;
        if (end > len)
            return stop(h, VN_UNPARSED_TRUNCATED);
    }
    if (!vn_get(d, end, off, ihl))
        return stop(h, VN_UNPARSED_TRUNCATED);
    h->family = 4;
    h->l3_off = (int)off;
    h->ip_end = end;
    h->src = ip + 12;
    h->dst = ip + 16;
    if (ihl > 20 && ipv4_options(ip + 20, ihl - 20, h))
        return h->unparsed;
    int proto = ip[9];
    h->frag_key_proto = ip[9];
    uint16_t fr = vn_rd16(ip + 6);
    uint32_t frag_off = (fr & 0x1fffu) * 8;
    h->frag = (fr & 0x3fff) != 0;
    h->frag_more = (fr & 0x2000) != 0;
    h->frag_id = vn_rd16(ip + 4);
    off += ihl;
    h->frag_part = off;
    if (frag_off)
        return later_fragment(off, proto, frag_off, 0, h);
    for (unsigned n = 0; proto == 51; n++) {
        const uint8_t *ah = vn_get(d, end, off, 12);
        if (n == VN_PARSE_MAX_EXT)
            return stop(h, VN_UNPARSED_IPV6_CHAIN);
        if (!ah)
            return short_hdr(h);
        uint32_t l = (ah[1] + 2u) * 4;
        if (!vn_get(d, end, off, l))
            return short_hdr(h);
        proto = ah[0];
        off += l;
    }
    return parse_l4(d, end, off, proto, h);
}

static int parse_ipv6(const uint8_t *d, uint32_t len, int gso, uint32_t off, struct vn_hdrs *h)
{
    const uint8_t *ip = vn_get(d, len, off, 40);
    if (!ip)
        return stop(h, VN_UNPARSED_TRUNCATED);
    if ((ip[0] >> 4) != 6)
        return stop(h, VN_UNPARSED_BAD_HEADER);
    unsigned plen = vn_rd16(ip + 4);
    /* 0: a TSO frame past 64 KiB (BIG TCP); the frame's end is the datagram's. Outside
     * segmentation offload, a payload length of 0 with data after the header is not a
     * datagram any receiver reads the same way: unparsed. */
    if (plen == 0 && !gso && len > off + 40)
        return stop(h, VN_UNPARSED_BAD_HEADER);
    uint32_t end = plen ? off + 40 + plen : len;
    if (end > len)
        return stop(h, VN_UNPARSED_TRUNCATED);
    h->family = 6;
    h->l3_off = (int)off;
    h->ip_end = end;
    h->src = ip + 8;
    h->dst = ip + 24;
    int nh = ip[6];
    off += 40;
    for (unsigned n = 0;; n++) {
        const uint8_t *x;
        uint32_t l;
        switch (nh) {
        case 0:    /* hop-by-hop options */
        case 43:   /* routing */
        case 60:   /* destination options */
        case 51:   /* AH: length in 4-byte units + 2 */
            if (n == VN_PARSE_MAX_EXT)
                return stop(h, VN_UNPARSED_IPV6_CHAIN);
            if (!(x = vn_get(d, end, off, 8)))
                return short_hdr(h);
            l = nh == 51 ? (x[1] + 2u) * 4 : (x[1] + 1u) * 8;
            if (!vn_get(d, end, off, l))
                return short_hdr(h);
            /* a routing header with segments left sends the packet on past its destination
             * address (segment routing, RH0, mobile IPv6's type 2): rules and anti-spoofing
             * would judge a destination that is not the last one */
            if (nh == 43 && x[3] != 0)
                return stop(h, VN_UNPARSED_SOURCE_ROUTE);
            nh = x[0];
            off += l;
            break;
        case 44: { /* fragment */
            if (n == VN_PARSE_MAX_EXT)
                return stop(h, VN_UNPARSED_IPV6_CHAIN);
            if (!(x = vn_get(d, end, off, 8)))
                return short_hdr(h);
            if (h->frag)
                return stop(h, VN_UNPARSED_IPV6_CHAIN);   /* a second fragment header */
            uint32_t frag_off = vn_rd16(x + 2) & 0xfff8u;
            h->frag = 1;
            h->frag_more = x[3] & 1;
            h->frag_id = vn_rd32(x + 4);
            nh = x[0];
            off += 8;
            h->frag_part = off;
            if (frag_off)
                return later_fragment(off, nh, frag_off, 1, h);
            break;
        }
        case 135:  /* mobility */
        case 139:  /* HIP */
        case 140:  /* shim6 */
        case 253:  /* experiments (RFC 3692) */
        case 254:
            /* extension headers (RFC 7045) this walk does not take apart: what follows
             * them is unknown */
            return stop(h, VN_UNPARSED_IPV6_CHAIN);
        default:
            return parse_l4(d, end, off, nh, h);
        }
    }
}

static int parse(const uint8_t *d, uint32_t len, int gso, struct vn_hdrs *h)
{
    memset(h, 0, sizeof(*h));
    h->proto = -1;
    h->icmp_type = h->icmp_code = -1;
    const uint8_t *p = vn_get(d, len, 0, 14);
    if (!p)
        return stop(h, VN_UNPARSED_TRUNCATED);
    uint32_t off = 14;
    uint16_t et = vn_rd16(p + 12);
    while (et == 0x8100 || et == 0x88a8 || et == 0x9100) {
        if (h->nvlan == VN_PARSE_MAX_VLAN)
            return stop(h, VN_UNPARSED_VLAN_DEPTH);
        if (!(p = vn_get(d, len, off, 4)))
            return stop(h, VN_UNPARSED_TRUNCATED);
        et = vn_rd16(p + 2);
        off += 4;
        h->nvlan++;
    }
    if (et < 0x0600) {
        /* 802.3: a length, then LLC.  Only SNAP with an Ethernet type (RFC 1042, or 802.1H
         * bridge tunnel) is walked on; raw 802.3, other LLC and lengths past 1500 are not */
        if (et > 1500)
            return stop(h, VN_UNPARSED_ENCAP);
        if (off + et > len)
            return stop(h, VN_UNPARSED_TRUNCATED);
        len = off + et;        /* what follows is padding */
        if (!(p = vn_get(d, len, off, 8)))
            return stop(h, VN_UNPARSED_ENCAP);
        if (p[0] != 0xaa || p[1] != 0xaa || p[2] != 0x03 || p[3] || p[4] ||
            (p[5] != 0 && p[5] != 0xf8))
            return stop(h, VN_UNPARSED_ENCAP);
        et = vn_rd16(p + 6);
        off += 8;
        h->snap = 1;
        if (et < 0x0600 || et == 0x8100 || et == 0x88a8 || et == 0x9100)
            return stop(h, VN_UNPARSED_ENCAP);
    }
    h->ethertype = et;
    h->l3_off = (int)off;
    switch (et) {
    case 0x0800:
        return parse_ipv4(d, len, gso, off, h);
    case 0x86dd:
        return parse_ipv6(d, len, gso, off, h);
    case 0x0806:
        /* the fixed part and both address pairs; anti-spoofing decides about the kinds */
        if (!(p = vn_get(d, len, off, 8)) || !vn_get(d, len, off, 8 + 2u * (p[4] + p[5])))
            return stop(h, VN_UNPARSED_TRUNCATED);
        return 0;
    case 0x8847:   /* MPLS */
    case 0x8848:
    case 0x8864:   /* PPPoE session */
    case 0x88e7:   /* 802.1ah */
    case 0x8870:   /* 802.3 jumbo LLC */
        return stop(h, VN_UNPARSED_ENCAP);
    default:
        return 0;  /* a layer-2 protocol: rules see its type and its bytes */
    }
}

int vn_parse(const struct vn_pkt *pkt, struct vn_hdrs *h)
{
    int gso = (pkt->hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) != VIRTIO_NET_HDR_GSO_NONE;
    return parse(pkt->data, pkt->len, gso, h);
}

int vn_parse_frame(const uint8_t *frame, uint32_t len, struct vn_parse_result *r)
{
    struct vn_hdrs h;
    parse(frame, len, 0, &h);
    memset(r, 0, sizeof(*r));
    r->reason = h.unparsed;
    r->ethertype = h.ethertype;
    r->nvlan = h.nvlan;
    r->snap = h.snap;
    r->family = (uint8_t)h.family;
    r->proto = (int16_t)h.proto;
    r->l4_known = (uint8_t)h.l4_known;
    r->frag = (uint8_t)h.frag;
    r->frag_later = (uint8_t)h.frag_later;
    r->sport = h.sport;
    r->dport = h.dport;
    r->icmp_type = (int16_t)h.icmp_type;
    r->l4_off = (uint32_t)h.l4_off;
    return h.unparsed;
}

/* ---- later fragments take their datagram's transport header ---- */

static int frag_key_eq(const struct vn_frag_first *e, int dir, const struct vn_hdrs *h)
{
    unsigned n = h->family == 4 ? 4 : 16;
    return e->seen_ns && e->id == h->frag_id && e->family == h->family && e->dir == dir &&
           e->key_proto == h->frag_key_proto && !memcmp(e->src, h->src, n) &&
           !memcmp(e->dst, h->dst, n);
}

int vn_frag_track(struct vn_port *p, int dir, uint64_t now, struct vn_hdrs *h)
{
    if (!h->frag || !h->family)
        return 0;
    struct vn_frag_first *hit = NULL, *slot = NULL;
    for (unsigned i = 0; i < VN_FRAG_FIRSTS; i++) {
        struct vn_frag_first *e = &p->frag_first[i];
        if (e->seen_ns && now - e->seen_ns > VN_FRAG_FIRST_NS)
            e->seen_ns = 0;    /* expired */
        if (frag_key_eq(e, dir, h)) {
            hit = e;
            break;
        }
        if (!slot || (slot->seen_ns && (!e->seen_ns || e->seen_ns < slot->seen_ns)))
            slot = e;          /* a free entry, else the oldest */
    }
    if (h->frag_later) {
        if (!hit)
            return -1;
        h->proto = hit->proto;
        h->l4_known = hit->l4_known;
        h->sport = hit->sport;
        h->dport = hit->dport;
        h->tcp_flags = hit->tcp_flags;
        h->l4_from_first = 1;
        /* a later fragment never starts inside what its first fragment carried: one that
         * does would have a receiver that favours new data (RFC 5722 forbids it for IPv6,
         * not every stack obeys) rewrite bytes the checks read, a transport header behind
         * IPv4 AH or IPv6 destination options as well as the payload packet rules saw */
        return h->frag_off < hit->data_end ? -2 : 0;
    }
    if (!h->frag_more)
        return 0;              /* atomic (IPv6 offset 0, no more): a datagram by itself */
    /* a first fragment: the newest one of a datagram wins.  Each first fragment was
     * matched by itself, so the receiver only ever holds first fragments that passed. */
    struct vn_frag_first *e = hit ? hit : slot;
    unsigned n = h->family == 4 ? 4 : 16;
    memset(e, 0, sizeof(*e));
    e->seen_ns = now ? now : 1;
    e->id = h->frag_id;
    e->family = (uint8_t)h->family;
    e->dir = (uint8_t)dir;
    e->key_proto = h->frag_key_proto;
    memcpy(e->src, h->src, n);
    memcpy(e->dst, h->dst, n);
    e->proto = (int16_t)h->proto;
    e->l4_known = (uint8_t)h->l4_known;
    e->sport = h->sport;
    e->dport = h->dport;
    e->tcp_flags = h->tcp_flags;
    e->data_end = h->ip_end > h->frag_part ? h->ip_end - h->frag_part : 0;
    return 0;
}
