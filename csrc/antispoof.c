/*
 * Anti-spoofing: every way a frame from the guest can claim a link-layer or IP address
 * must claim one the policy gave it (README, "Anti-spoofing").
 *
 * MAC checks (Ethernet source, ARP sender, NDP link-layer options, DHCP chaddr) apply when
 * the NI knows the guest's MAC (the policy's, or QEMU's NIC's); address checks (IP sources,
 * ARP sender IP, NDP targets) when the policy lists addresses.  The frame was parsed by
 * vn_parse; every read goes through vn_get.
 */
#include "vn_internal.h"

static const uint8_t zero16[16];

static int listed(const struct vn_policy *pol, int fam, const uint8_t *a)
{
    unsigned maxlen = fam == 4 ? 32 : 128;
    for (unsigned i = 0; i < pol->naddrs && i < VN_MAX_ADDRS; i++) {
        const struct vn_addr *x = &pol->addrs[i];
        if (x->family == fam && vn_prefix_match(a, x->addr, x->plen > maxlen ? maxlen : x->plen))
            return 1;
    }
    return 0;
}

static int lists_ipv6(const struct vn_policy *pol)
{
    for (unsigned i = 0; i < pol->naddrs && i < VN_MAX_ADDRS; i++)
        if (pol->addrs[i].family == 6)
            return 1;
    return 0;
}

/* The guest's IPv6 addresses: those listed and, if any are, the link-local address its
 * MAC gives by modified EUI-64 (RFC 4291 appendix A), which a guest configures before
 * anything else.  Other link-local addresses must be listed. */
static int guest_ipv6(const struct vn_policy *pol, const uint8_t *a)
{
    if (listed(pol, 6, a))
        return 1;
    if (!pol->mac_set || !lists_ipv6(pol))
        return 0;
    const uint8_t *m = pol->mac;
    const uint8_t ll[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0,
                            (uint8_t)(m[0] ^ 2), m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]};
    return !memcmp(a, ll, 16);
}

static int arp_spoofed(const struct vn_policy *pol, const struct vn_pkt *pkt,
                       const struct vn_hdrs *h)
{
    /* only Ethernet/IPv4 ARP is checked, so only it leaves: a receiver takes other
     * hardware types too (Linux: IEEE 802 on an Ethernet device) */
    const uint8_t *a = vn_get(pkt->data, pkt->len, (uint32_t)h->l3_off, 28);
    if (!a || vn_rd16(a) != 1 || vn_rd16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4)
        return 1;
    if (pol->mac_set && memcmp(a + 8, pol->mac, 6))
        return 1;
    /* 0.0.0.0: an ARP probe (RFC 5227) */
    return pol->naddrs && memcmp(a + 14, zero16, 4) && !listed(pol, 4, a + 14);
}

/* A BOOTP/DHCP request must name the guest's own hardware address: a lease is the chaddr's
 * (a guest that names others' takes or releases their leases, or exhausts the pool). */
static int dhcp_spoofed(const struct vn_policy *pol, const struct vn_pkt *pkt,
                        const struct vn_hdrs *h)
{
    if (!pol->mac_set)
        return 0;
    const uint8_t *b = vn_get(pkt->data, h->ip_end, (uint32_t)h->l4_off + 8, 34);
    return !b || b[0] != 1 || b[1] != 1 || b[2] != 6 || memcmp(b + 28, pol->mac, 6);
}

/* A DHCP answer (from the server's port: 67, DHCPv6 547, relays included) from a guest that is
 * no DHCP server: a rogue one names itself router and resolver to its neighbours, the
 * man-in-the-middle the router-advertisement check stops for IPv6.  Fragments of UDP from
 * that port are refused too (the port is only in the first). */
static int dhcp_answer(const struct vn_policy *pol, const struct vn_hdrs *h, unsigned port)
{
    return !pol->dhcp_server && h->proto == 17 && h->l4_known && h->sport == port ? VN_SPOOFED_DHCP : 0;
}

/* An ICMP error (IPv4: unreachable, source quench, redirect, time exceeded, parameter problem;
 * ICMPv6: unreachable, packet too big, time exceeded, parameter problem) quotes the packet
 * that caused it, which was sent *to* its sender: from a guest that forwards nobody's packets
 * (no [ni] router), the quoted packet's destination is one of its own addresses.  One quoting
 * others' traffic is forged on behalf of a router: a remote host would shrink a third party's
 * path MTU, drop its connected UDP sockets (ICMP-assisted DNS poisoning) or reset its
 * connections.  A quote too short to hold the addresses is refused (receivers ignore it). */
static int icmp_error_spoofed(const struct vn_policy *pol, const struct vn_pkt *pkt,
                              const struct vn_hdrs *h)
{
    if (pol->router || !pol->naddrs || h->frag_later || h->l4_off <= 0 || h->icmp_type < 0)
        return 0;
    int t = h->icmp_type, v6 = h->family == 6;
    if (v6 ? !(t >= 1 && t <= 4) : !(t == 3 || t == 4 || t == 5 || t == 11 || t == 12))
        return 0;
    const uint8_t *q = vn_get(pkt->data, h->ip_end, (uint32_t)h->l4_off + 8, v6 ? 40 : 20);
    if (!q || (q[0] >> 4) != (v6 ? 6 : 4))
        return 1;
    return v6 ? !guest_ipv6(pol, q + 24) : !listed(pol, 4, q + 16);
}

static int ipv4_spoofed(const struct vn_policy *pol, const struct vn_pkt *pkt,
                        const struct vn_hdrs *h)
{
    int dhcp = h->proto == 17 && h->l4_known && !h->frag && h->sport == 68 && h->dport == 67;
    if (dhcp && dhcp_spoofed(pol, pkt, h))
        return 1;
    if (dhcp_answer(pol, h, 67))
        return VN_SPOOFED_DHCP;
    if (!pol->naddrs)
        return 0;
    if (!memcmp(h->src, zero16, 4))
        return !dhcp;          /* a client without an address yet: DHCP only */
    if (!listed(pol, 4, h->src))
        return 1;
    return h->proto == 1 && icmp_error_spoofed(pol, pkt, h);
}

#define ND_RS 133
#define ND_RA 134
#define ND_NS 135
#define ND_NA 136
#define ND_REDIRECT 137
#define ND_OPT_SLLA 1
#define ND_OPT_TLLA 2

/* NDP from the guest: targets it advertises (NA) or probes for itself (DAD) are its own,
 * link-layer address options carry its MAC (a redirect's target link-layer address names
 * the better next hop, so only routers may send redirects). */
static int nd_spoofed(const struct vn_policy *pol, const struct vn_pkt *pkt,
                      const struct vn_hdrs *h, int type, int unspecified)
{
    static const uint8_t fixed[] = {[ND_RS - ND_RS] = 8, [ND_RA - ND_RS] = 16,
                                    [ND_NS - ND_RS] = 24, [ND_NA - ND_RS] = 24,
                                    [ND_REDIRECT - ND_RS] = 40};
    const uint8_t *d = pkt->data;
    uint32_t off = (uint32_t)h->l4_off, end = h->ip_end;
    const uint8_t *m = vn_get(d, end, off, fixed[type - ND_RS]);
    if (!m)
        return 1;              /* malformed: receivers drop it, so need not get it */
    if (pol->naddrs && (type == ND_NA || (type == ND_NS && unspecified)) &&
        !guest_ipv6(pol, m + 8))
        return 1;
    for (off += fixed[type - ND_RS]; off < end;) {
        const uint8_t *o = vn_get(d, end, off, 2);
        if (!o || !o[1] || !vn_get(d, end, off, o[1] * 8u))
            return 1;          /* a zero-length or cut option: RFC 4861 says discard */
        if (o[0] == ND_OPT_SLLA || (o[0] == ND_OPT_TLLA && type != ND_REDIRECT)) {
            if (unspecified && o[0] == ND_OPT_SLLA)
                return 1;      /* RFC 4861 7.1.1: none from the unspecified address */
            if (pol->mac_set && memcmp(o + 2, pol->mac, 6))
                return 1;
        }
        off += o[1] * 8u;
    }
    return 0;
}

static int ipv6_spoofed(const struct vn_policy *pol, const struct vn_pkt *pkt,
                        const struct vn_hdrs *h)
{
    int type = h->proto == 58 && !h->frag_later ? h->icmp_type : -1;
    int nd = type >= ND_RS && type <= ND_REDIRECT;
    if ((type == ND_RA || type == ND_REDIRECT) && !pol->ipv6_router)
        return 1;
    if (dhcp_answer(pol, h, 547))
        return VN_SPOOFED_DHCP;
    if (nd && h->frag)
        return 1;              /* receivers ignore fragmented NDP (RFC 6980) */
    int unspecified = !memcmp(h->src, zero16, 16);
    if (pol->naddrs) {
        if (unspecified) {
            /* RFC 4862 5.4 (DAD), RFC 4861 6.3.7 (a router solicitation before any
             * address) and RFC 3810 5.2.13 (MLD reports before an address) */
            if (type != ND_NS && type != ND_RS && type != 131 && type != 143)
                return 1;
        } else if (!guest_ipv6(pol, h->src)) {
            return 1;
        }
    }
    if (nd)
        return nd_spoofed(pol, pkt, h, type, unspecified);
    return h->proto == 58 && !unspecified && icmp_error_spoofed(pol, pkt, h);
}

int vn_spoofed(const struct vn_policy *pol, const struct vn_pkt *pkt, const struct vn_hdrs *h)
{
    if (!pol->anti_spoof)
        return 0;
    const uint8_t *eth_src = vn_get(pkt->data, pkt->len, 6, 6);
    if (!eth_src || (pol->mac_set && memcmp(eth_src, pol->mac, 6)))
        return 1;
    if (h->ethertype == 0x0806)
        return arp_spoofed(pol, pkt, h);
    if (h->family == 4)
        return ipv4_spoofed(pol, pkt, h);
    if (h->family == 6)
        return ipv6_spoofed(pol, pkt, h);
    return 0;
}
