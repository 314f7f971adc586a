/*
 * The NI kernel's hooks in the fast path: anti-spoofing, prevent rules (a header
 * firewall), and subscriptions that hold frames for scanner decisions or copy them to
 * read-only scanners.  Frames that match nothing never leave C.
 *
 * Held frames are copied once out of the batch buffer into a record that the NI kernel
 * (Python) sees through the punt queue; it later releases each by id with pass or cut.
 * Every port's held frames are bounded by bytes and count (memcap); past it the port's
 * exception policy applies, fail-closed (drop) unless the administrator said otherwise.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include "vn_internal.h"

static int addr_match(int fam, uint8_t plen, const uint8_t *pfx, const struct vn_hdrs *h,
                      const uint8_t *addr)
{
    if (!fam)
        return 1;
    if (h->family != fam)
        return 0;
    return vn_prefix_match(addr, pfx, plen > (fam == 4 ? 32 : 128) ? (fam == 4 ? 32 : 128) : plen);
}

int vn_match_frame(const struct vn_match *m, int dir, const struct vn_pkt *pkt,
                   const struct vn_hdrs *h)
{
    if (m->dirs && !(m->dirs & dir))
        return 0;
    if (m->ethertype && m->ethertype != h->ethertype)
        return 0;
    if (m->proto >= 0 && (h->family == 0 || h->proto != m->proto))
        return 0;
    if (m->flow_new && h->flow_admitted)
        return 0;
    if (!addr_match(m->src_family, m->src_plen, m->src, h, h->src))
        return 0;
    if (!addr_match(m->dst_family, m->dst_plen, m->dst, h, h->dst))
        return 0;
    int ports = m->sport_lo > 0 || m->sport_hi < 0xffff || m->dport_lo > 0 || m->dport_hi < 0xffff;
    if (ports || m->tcp_flags_mask) {
        if (h->family == 0)
            return 0;
        if (ports && h->proto != 6 && h->proto != 17 && h->proto != 132)
            return 0;
        if (m->tcp_flags_mask && h->proto != 6)
            return 0;
        if (h->l4_known) {
            if (h->sport < m->sport_lo || h->sport > m->sport_hi ||
                h->dport < m->dport_lo || h->dport > m->dport_hi)
                return 0;
            if ((h->tcp_flags & m->tcp_flags_mask) != m->tcp_flags_value)
                return 0;
        }
        /* L4 unknown (a later fragment whose first was not seen, a truncated header let
         * through by unparsed = pass): counts as a match, see vhostni.h */
    }
    for (unsigned i = 0; i < m->nterms && i < VN_MAX_TERMS; i++) {
        const struct vn_term *t = &m->terms[i];
        unsigned tl = t->len > VN_TERM_BYTES ? VN_TERM_BYTES : t->len;
        const uint8_t *b = vn_get(pkt->data, pkt->len, t->offset, tl);
        if (!b)
            return 0;
        for (unsigned k = 0; k < tl; k++)
            if ((b[k] & t->mask[k]) != (t->value[k] & t->mask[k]))
                return 0;
    }
    return 1;
}

/* ---- held frames and the punt queue ---- */


void vn_punt_signal(struct vn_switch *sw)
{
    uint64_t one = 1;
    if (sw->punt_fd >= 0 && write(sw->punt_fd, &one, sizeof(one)) < 0) {
        /* an eventfd write only fails at 2^64-1 pending: impossible here */
    }
}

static struct vn_held *held_take(struct vn_switch *sw, uint64_t id)
{
    struct vn_held **pp = &sw->held_hash[id % VN_HELD_HASH];
    for (; *pp; pp = &(*pp)->hnext) {
        if ((*pp)->id == id) {
            struct vn_held *h = *pp;
            *pp = h->hnext;
            h->hnext = NULL;
            return h;
        }
    }
    return NULL;
}

static int punt_push(struct vn_switch *sw, struct vn_held *r)
{
    if (sw->punt_count >= VN_PUNT_QUEUE)
        return -1;
    sw->punt_q[(sw->punt_head + sw->punt_count) % VN_PUNT_QUEUE] = r;
    if (sw->punt_count++ == 0)
        vn_punt_signal(sw);
    return 0;
}

void vn_held_init(struct vn_held *r, const struct vn_pkt *pkt, int port, int dir, int egress_to,
                  uint64_t subs, uint64_t contain, uint64_t time_ns)
{
    memset(r, 0, sizeof(*r));
    r->port = port;
    r->dir = dir;
    r->egress_to = egress_to;
    r->subs = subs;
    r->contain = contain;
    r->time_ns = time_ns;
    r->len = pkt->len;
    r->hdr = pkt->hdr;
    memcpy(r->data, pkt->data, pkt->len);
}

/* Held-frame records come from the switch's block cache (blkcache.c): a burst of held
 * frames made and freed that many records through glibc's bins (_int_malloc, unlink,
 * _int_free: 7% of the NI's time with every 64-byte frame held). */
static struct vn_held *held_new(struct vn_switch *sw, const struct vn_pkt *pkt, int port, int dir,
                                int egress_to, uint64_t subs, uint64_t contain, uint64_t time_ns)
{
    struct vn_held *r = vn_blk_get(&sw->held_blocks, sizeof(*r) + pkt->len);
    if (r)
        vn_held_init(r, pkt, port, dir, egress_to, subs, contain, time_ns);
    return r;
}

/* Frees a record of held_new (NULL: nothing). */
static void held_free(struct vn_switch *sw, struct vn_held *r)
{
    if (r)
        vn_blk_put(&sw->held_blocks, r, sizeof(*r) + r->len);
}


/* Does the match look at the transport (protocol, ports, flags)? */
static int match_needs_l4(const struct vn_match *m)
{
    return m->proto >= 0 || m->sport_lo > 0 || m->sport_hi < 0xffff || m->dport_lo > 0 ||
           m->dport_hi < 0xffff || m->tcp_flags_mask;
}

/* Quarantine: 1 if a quarantined port's policy allows this frame anyway.  An allow rule
 * does not stretch to a transport header nobody saw. */
static int quarantine_allows(const struct vn_policy *pol, int dir, const struct vn_pkt *pkt,
                             const struct vn_hdrs *h)
{
    for (unsigned i = 0; i < pol->nqallow && i < VN_MAX_QALLOW; i++)
        if ((h->l4_known || !match_needs_l4(&pol->qallow[i])) &&
            vn_match_frame(&pol->qallow[i], dir, pkt, h))
            return 1;
    return 0;
}

/* Would any verdict on this port depend on a transport header (prevent rules, frame
 * subscriptions, quarantine-allow rules while quarantined)? */
static int policy_needs_l4(const struct vn_policy *pol)
{
    for (unsigned i = 0; i < pol->nrules && i < VN_MAX_RULES; i++)
        if (match_needs_l4(&pol->rules[i]))
            return 1;
    for (unsigned i = 0; i < pol->nsubs && i < VN_MAX_SUBS; i++)
        if (match_needs_l4(&pol->subs[i]))
            return 1;
    if (pol->isolation & VN_ISOLATE_QUARANTINE)
        for (unsigned i = 0; i < pol->nqallow && i < VN_MAX_QALLOW; i++)
            if (match_needs_l4(&pol->qallow[i]))
                return 1;
    return 0;
}

/* Counts an unparsed frame under its reason; 1 if the policy drops it. */
static int unparsed_drops(struct vn_port *p, const struct vn_policy *pol, int reason)
{
    struct vn_port_stats *st = &p->st;
    if (pol->unparsed_pass || (reason == VN_UNPARSED_TUNNEL && pol->tunnel_pass)) {
        st->unparsed_passed++;
        return 0;
    }
    switch (reason) {
    case VN_UNPARSED_TRUNCATED: st->drop_unparsed_truncated++; break;
    case VN_UNPARSED_BAD_HEADER: st->drop_unparsed_bad_header++; break;
    case VN_UNPARSED_VLAN_DEPTH: st->drop_unparsed_vlan_depth++; break;
    case VN_UNPARSED_ENCAP: st->drop_unparsed_encap++; break;
    case VN_UNPARSED_IPV6_CHAIN: st->drop_unparsed_ipv6_chain++; break;
    case VN_UNPARSED_TUNNEL: st->drop_unparsed_tunnel++; break;
    case VN_UNPARSED_SOURCE_ROUTE: st->drop_unparsed_source_route++; break;
    default: st->drop_unparsed_fragment++; break;
    }
    return 1;
}

int vn_policy_apply(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt)
{
    struct vn_port *p = &sw->ports[port];
    const struct vn_policy *pol = p->pol;
    if (!pol)
        return 0;
    if (pol->isolation & VN_ISOLATE_LINK_DOWN) {
        p->st.drop_isolated++;
        return 1;
    }
    /* a frame is understood fully, or it is not forwarded (unless the policy says so):
     * either way, since a receiver on either side may act on what the NI did not see */
    struct vn_hdrs h;
    if (vn_parse(pkt, &h) && unparsed_drops(p, pol, h.unparsed))
        return 1;
    /* a later fragment is matched by its datagram: the first fragment's transport header.
     * Without one (out of order, or more than VN_FRAG_FIRSTS datagrams in flight), TCP
     * with a stream engine goes to its reassembly (the whole datagram is checked); else it
     * is dropped if any verdict here would look at the transport. */
    int track = vn_frag_track(p, dir, sw->now_ns, &h);
    int orphan = track == -1;
    /* one overlapping its first fragment: the stream engine's reassembly drops the whole
     * datagram (and counts tcp_frag_overlap); anywhere else it is not forwarded */
    int to_engine = (orphan || track == -2) && h.proto == 6 && vn_tcp_active(sw, port);
    if (track == -2 && !to_engine) {
        h.unparsed = VN_UNPARSED_FRAGMENT;
        if (unparsed_drops(p, pol, h.unparsed))
            return 1;
    }
    if (orphan && !to_engine && policy_needs_l4(pol)) {
        p->st.drop_frag_unmatched++;
        return 1;
    }
    if (dir == VN_DIR_FROM_GUEST && h.nvlan && pol->guest_vlan_drop) {
        p->st.drop_guest_vlan++;
        return 1;
    }
    int spoofed = dir == VN_DIR_FROM_GUEST ? vn_spoofed(pol, pkt, &h) : 0;
    if (spoofed) {
        if (spoofed == VN_SPOOFED_DHCP)
            p->st.drop_dhcp_answer++;      /* told apart: a DHCP server's policy lacks dhcp_server */
        else
            p->st.drop_spoofed++;
        return 1;
    }
    if ((pol->isolation & VN_ISOLATE_QUARANTINE) && !quarantine_allows(pol, dir, pkt, &h)) {
        p->st.drop_quarantine++;
        return 1;
    }
    if (to_engine)
        return vn_tcp_input(sw, port, dir, egress_to, pkt, &h) == VN_TCP_TAKEN;
    for (unsigned i = 0; i < pol->nrules && i < VN_MAX_RULES; i++) {
        if (vn_match_frame(&pol->rules[i], dir, pkt, &h)) {
            p->st.drop_prevented++;
            return 1;
        }
    }
    /* the flow stage sees what the header filter let through, before anyone holds it */
    if (pol->flows && vn_flow_input(sw, port, dir, pkt, &h))
        return 1;
    /* packet signature rules (the stream rules run inside the TCP engine) */
    if (p->sig && vn_sig_packet(sw, port, dir, pkt, &h))
        return 1;
    /* stream subscriptions first: a data segment they hold meets the frame subscriptions
     * when the stream releases it, so every frame leaves with both kinds of decision */
    if (h.proto == 6 && vn_tcp_active(sw, port) &&
        vn_tcp_input(sw, port, dir, egress_to, pkt, &h) == VN_TCP_TAKEN)
        return 1;
    return vn_policy_subs(sw, port, dir, egress_to, pkt, &h);
}

int vn_policy_subs(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt,
                   const struct vn_hdrs *hp)
{
    struct vn_port *p = &sw->ports[port];
    const struct vn_policy *pol = p->pol;
    if (!pol)
        return 0;
    const struct vn_hdrs h = *hp;
    /* who the matching subscriptions belong to: the NI kernel (punted) or a scanner ring */
    uint64_t subs = 0, contain = 0, ring_read = 0, ring_hold = 0;
    for (unsigned i = 0; i < pol->nsubs && i < VN_MAX_SUBS; i++) {
        if (!vn_match_frame(&pol->subs[i], dir, pkt, &h))
            continue;
        unsigned c = pol->sub_chan[i];
        if (c && c <= VN_CHANS) {
            ring_read |= 1ULL << (c - 1);
            if (pol->sub_contain[i])
                ring_hold |= 1ULL << (c - 1);
        } else {
            subs |= 1ULL << i;
            if (pol->sub_contain[i])
                contain |= 1ULL << i;
        }
    }
    if (!contain && !ring_hold && h.flow_id && !h.flow_admitted)
        vn_flow_admit(sw, port, dir, h.flow_id, h.flow_hash);   /* it leaves unheld */
    if (!subs && !ring_read)
        return 0;
    /* scanners see the bytes the receiver will: complete a partial checksum (TSO frames
     * keep theirs, the receiver or segmentation computes it from the same bytes) */
    if ((pkt->hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) &&
        (pkt->hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN) == VIRTIO_NET_HDR_GSO_NONE)
        vn_csum_complete(pkt);
    /* read-only copies: on rings, and to the kernel (which learns which rings got it: a
     * scanner not ready yet is covered by the kernel, unless its own ring has the frame) */
    uint64_t ring_got = 0;
    uint64_t now_real = vn_clock_real(sw);     /* the frame's time, for every ring and record */
    for (uint64_t ro = ring_read & ~ring_hold; ro; ro &= ro - 1)
        if (vn_chan_push(sw, port, __builtin_ctzll(ro), pkt, dir, 0, now_real) == 0)
            ring_got |= ro & -ro;
    if (subs && !contain) {
        struct vn_held *r = held_new(sw, pkt, port, dir, egress_to, subs, 0, now_real);
        if (r)
            r->rings = ring_got;
        if (!r || punt_push(sw, r) < 0) {
            held_free(sw, r);
            p->st.punt_queue_full++;
        } else {
            p->st.punted_copies++;
        }
    }
    if (!contain && !ring_hold)
        return 0;
    if (p->held_frames >= pol->held_frames_max ||
        p->held_bytes + pkt->len > pol->held_bytes_max ||
        (contain && sw->punt_count >= VN_PUNT_QUEUE)) {
        p->st.held_over_cap++;
        return pol->over_cap_pass ? 0 : 1;
    }
    struct vn_held *r = held_new(sw, pkt, port, dir, egress_to, contain ? subs : 0, contain, now_real);
    if (!r) {
        p->st.held_over_cap++;
        return pol->over_cap_pass ? 0 : 1;
    }
    r->flow_id = h.flow_id;
    r->flow_hash = h.flow_hash;
    r->id = ++sw->next_held_id;
    r->need = contain ? VN_NEED_KERNEL : 0;
    /* each scanner ring holding it gets a copy; one whose ring is full stands for the
     * policy's default decision at once */
    int cut = 0;
    for (uint64_t hold = ring_hold; hold; hold &= hold - 1) {
        int slot = __builtin_ctzll(hold);
        if (vn_chan_push(sw, port, slot, pkt, dir, r->id, now_real) == 0) {
            r->need |= 1ULL << slot;
            ring_got |= 1ULL << slot;
        }
        else if (!pol->hold_default_pass)
            cut = 1;
    }
    if (cut || !r->need) {
        held_free(sw, r);      /* what rings got of it is settled: their decisions are stale */
        if (cut) {
            p->st.drop_ring_full++;
            return 1;
        }
        if (h.flow_id && !h.flow_admitted)
            vn_flow_admit(sw, port, dir, h.flow_id, h.flow_hash);
        return 0;
    }
    r->rings = ring_got;
    r->hnext = sw->held_hash[r->id % VN_HELD_HASH];
    sw->held_hash[r->id % VN_HELD_HASH] = r;
    if (contain)
        punt_push(sw, r);
    p->held_frames++;
    p->held_bytes += pkt->len;
    p->st.held++;
    return 1;
}

int vn_punt_fd(struct vn_switch *sw)
{
    return sw->punt_fd;
}

int vn_punt_next(struct vn_switch *sw, struct vn_punt *out)
{
    if (sw->punt_last) {
        held_free(sw, sw->punt_last);   /* a read-only copy handed out last time */
        sw->punt_last = NULL;
    }
    while (sw->punt_count) {
        struct vn_held *r = sw->punt_q[sw->punt_head];
        sw->punt_q[sw->punt_head] = NULL;
        sw->punt_head = (sw->punt_head + 1) % VN_PUNT_QUEUE;
        sw->punt_count--;
        if (!r)
            continue;          /* released before the kernel saw it */
        out->id = r->id;
        out->port = r->port;
        out->dir = r->dir;
        out->subs = r->subs;
        out->contain = r->contain;
        out->rings = r->rings;
        out->time_ns = r->time_ns;
        out->len = r->len;
        out->data = r->data;
        if (!r->id)
            sw->punt_last = r;
        return 1;
    }
    uint64_t v;
    if (vn_tcp_pending(sw) || vn_flow_pending(sw))
        return 0;              /* stream or flow events wait: leave the eventfd readable */
    if (sw->punt_fd >= 0 && read(sw->punt_fd, &v, sizeof(v)) < 0) {
        /* EAGAIN: already clear */
    }
    return 0;
}

/* Drops a record from the punt queue if it still sits there (decided before it was read). */
static void punt_forget(struct vn_switch *sw, struct vn_held *r)
{
    for (unsigned i = 0; i < sw->punt_count; i++) {
        unsigned k = (sw->punt_head + i) % VN_PUNT_QUEUE;
        if (sw->punt_q[k] == r)
            sw->punt_q[k] = NULL;
    }
}

/* 1 (counted) if the port's isolation drops a frame a scanner passed after it was held. */
int vn_isolation_drops(struct vn_port *p, int dir, const struct vn_pkt *pkt)
{
    const struct vn_policy *pol = p->pol;
    if (!pol || !pol->isolation)
        return 0;
    if (pol->isolation & VN_ISOLATE_LINK_DOWN) {
        p->st.drop_isolated++;
        return 1;
    }
    struct vn_hdrs h;
    vn_parse(pkt, &h);
    if (!quarantine_allows(pol, dir, pkt, &h)) {
        p->st.drop_quarantine++;
        return 1;
    }
    return 0;
}

static void release(struct vn_switch *sw, struct vn_held *r, int pass)
{
    struct vn_port *p = &sw->ports[r->port];
    punt_forget(sw, r);
    if (p->kind) {
        p->held_frames--;
        p->held_bytes -= r->len;
        if (pass)
            p->st.held_passed++;
        else
            p->st.held_cut++;
    }
    if (pass && p->kind) {
        /* unless the NI was isolated while the frame waited for its decision, it goes on
         * where it was going (into the switch, or to its receiver) once the switch drains;
         * its flow counts as admitted that way once it is queued to leave.  Only an
         * isolation check needs the frame as a vn_pkt: otherwise the record is queued as it
         * is, one copy fewer */
        int queued;
        if (p->pol && p->pol->isolation) {
            struct vn_pkt *pkt = sw->rel;
            pkt->len = r->len;
            pkt->hdr = r->hdr;
            memcpy(pkt->data, r->data, r->len);
            queued = !vn_isolation_drops(p, r->dir, pkt) &&
                     vn_emit_push(sw, VN_EMIT_OUT, r->port, r->dir, r->egress_to, pkt) == 0;
        } else {
            queued = vn_emit_push_raw(sw, VN_EMIT_OUT, r->port, r->dir, r->egress_to, &r->hdr,
                                      r->data, r->len, NULL) == 0;
        }
        if (queued)
            vn_flow_admit(sw, r->port, r->dir, r->flow_id, r->flow_hash);
    }
    held_free(sw, r);
}

static struct vn_held *held_find(struct vn_switch *sw, uint64_t id)
{
    struct vn_held *h = sw->held_hash[id % VN_HELD_HASH];
    while (h && h->id != id)
        h = h->hnext;
    return h;
}

int vn_held_exists(struct vn_switch *sw, uint64_t id)
{
    return held_find(sw, id) != NULL;
}

int vn_held_settle(struct vn_switch *sw, uint64_t id, uint64_t bit, int pass)
{
    struct vn_held *r = held_find(sw, id);
    if (!r || !(r->need & bit))
        return VN_ENOPORT;
    if (!pass)
        return vn_policy_release(sw, id, 0);
    r->need &= ~bit;
    if (!r->need)
        return vn_policy_release(sw, id, 1);
    /* others still owe their pass; the kernel has seen it if it was punted */
    return VN_OK;
}

int vn_policy_release(struct vn_switch *sw, uint64_t id, int pass)
{
    struct vn_held *r = held_take(sw, id);
    if (!r)
        return VN_ENOPORT;
    release(sw, r, pass);
    return VN_OK;
}

int vn_policy_release_port(struct vn_switch *sw, int port, int pass)
{
    int n = 0;
    vn_tcp_port_gone(sw, port);
    vn_flow_port_gone(sw, port);
    for (unsigned b = 0; b < VN_HELD_HASH; b++) {
        struct vn_held **pp = &sw->held_hash[b];
        while (*pp) {
            struct vn_held *r = *pp;
            if (r->port == port || r->egress_to == port) {
                *pp = r->hnext;
                release(sw, r, pass);
                n++;
            } else {
                pp = &r->hnext;
            }
        }
    }
    /* read-only copies of that port still queued */
    for (unsigned i = 0; i < sw->punt_count; i++) {
        unsigned k = (sw->punt_head + i) % VN_PUNT_QUEUE;
        struct vn_held *r = sw->punt_q[k];
        if (r && !r->id && (r->port == port || r->egress_to == port)) {
            held_free(sw, r);
            sw->punt_q[k] = NULL;
        }
    }
    return n;
}

void vn_held_free_all(struct vn_switch *sw)
{
    vn_tcp_free_all(sw);
    vn_flow_free_all(sw);
    for (unsigned b = 0; b < VN_HELD_HASH; b++) {
        while (sw->held_hash[b]) {
            struct vn_held *r = sw->held_hash[b];
            sw->held_hash[b] = r->hnext;
            punt_forget(sw, r);
            held_free(sw, r);
        }
    }
    for (unsigned i = 0; i < sw->punt_count; i++) {
        unsigned k = (sw->punt_head + i) % VN_PUNT_QUEUE;
        held_free(sw, sw->punt_q[k]);
        sw->punt_q[k] = NULL;
    }
    sw->punt_count = 0;
    held_free(sw, sw->punt_last);
    sw->punt_last = NULL;
    vn_blk_drain(&sw->held_blocks);
}

int vn_port_set_policy(struct vn_switch *sw, int port, const struct vn_policy *pol)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind)
        return VN_ENOPORT;
    if (pol->naddrs > VN_MAX_ADDRS || pol->nrules > VN_MAX_RULES || pol->nsubs > VN_MAX_SUBS ||
        pol->nqallow > VN_MAX_QALLOW)
        return VN_ERANGE;
    for (unsigned i = 0; i < pol->nqallow; i++)
        if (pol->qallow[i].nterms > VN_MAX_TERMS)
            return VN_ERANGE;
    for (unsigned i = 0; i < pol->nrules; i++)
        if (pol->rules[i].nterms > VN_MAX_TERMS)
            return VN_ERANGE;
    for (unsigned i = 0; i < pol->nsubs; i++)
        if (pol->subs[i].nterms > VN_MAX_TERMS)
            return VN_ERANGE;
    if (pol->nstream_subs > VN_MAX_STREAM_SUBS)
        return VN_ERANGE;
    struct vn_policy *copy = malloc(sizeof(*copy));
    if (!copy)
        return VN_ENOMEM;
    *copy = *pol;
    copy->isolation = sw->ports[port].pol ? sw->ports[port].pol->isolation : 0;
    copy->isolation_carrier = 0;
    free(sw->ports[port].pol);
    sw->ports[port].pol = copy;
    return VN_OK;
}

/* An isolated port without a policy keeps an empty one that carries its isolation (and
 * allows nothing in quarantine: fail closed). */
static struct vn_policy *isolation_only(unsigned bits)
{
    struct vn_policy *pol = calloc(1, sizeof(*pol));
    if (pol) {
        pol->isolation = bits;
        pol->isolation_carrier = 1;
    }
    return pol;
}

int vn_port_clear_policy(struct vn_switch *sw, int port)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind)
        return VN_ENOPORT;
    vn_tcp_port_gone(sw, port);
    vn_flow_port_gone(sw, port);
    struct vn_policy *old = sw->ports[port].pol;
    struct vn_policy *keep = old && old->isolation ? isolation_only(old->isolation) : NULL;
    if (old && old->isolation && !keep)
        return VN_ENOMEM;
    free(old);
    sw->ports[port].pol = keep;
    return VN_OK;
}

int vn_port_set_isolation(struct vn_switch *sw, int port, unsigned bits)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind)
        return VN_ENOPORT;
    if (bits & ~(unsigned)(VN_ISOLATE_QUARANTINE | VN_ISOLATE_LINK_DOWN))
        return VN_EINVAL;
    struct vn_port *p = &sw->ports[port];
    if (!p->pol) {
        if (!bits)
            return VN_OK;
        p->pol = isolation_only(bits);
        return p->pol ? VN_OK : VN_ENOMEM;
    }
    p->pol->isolation = bits;
    if (!bits && p->pol->isolation_carrier) {
        /* it only carried the isolation: forward without parsing again.  A policy of the NI's
         * own stays whole, whatever it holds (VLAN and unparsed handling, flows, signatures) */
        free(p->pol);
        p->pol = NULL;
    }
    return VN_OK;
}

int vn_port_isolation(struct vn_switch *sw, int port)
{
    if (port < 0 || port >= VN_MAX_PORTS || !sw->ports[port].kind)
        return VN_ENOPORT;
    return sw->ports[port].pol ? (int)sw->ports[port].pol->isolation : 0;
}
