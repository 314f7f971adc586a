/*
 * Split virtqueues, device side (virtio 1.x section 2.7), against a hostile driver.
 *
 * The pipeline per chain: read the avail idx once (acquire) and check it moved by at most
 * the ring size; read the head once and check it is < num; walk the chain loading each
 * descriptor once into a local, checking direction, nesting of indirect tables (at most
 * as many entries as the ring), the next index, the chain length (a chain longer than
 * its ring or table is a loop) and translating every
 * buffer with its length capped at its region's end.  A violation breaks the port: its
 * rings are no longer touched until the frontend re-initialises them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <unistd.h>
#include "vn_internal.h"

static inline uint16_t load16(const volatile uint16_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

void vn_port_break(struct vn_port *p, int reason)
{
    if (!p->broken)
        p->broken = reason;
}

static size_t desc_bytes(unsigned num) { return 16ULL * num; }
static size_t avail_bytes(unsigned num) { return 6 + 2ULL * num; }
static size_t used_bytes(unsigned num) { return 6 + 8ULL * num; }

/* Translates the ring addresses through the current memory table.  Each ring must lie
 * whole inside one region. */
int vn_vq_map(struct vn_port *p, struct vn_vq *vq)
{
    vq->desc = NULL;
    vq->avail = NULL;
    vq->used = NULL;
    vq->avail_known = 0;
    if (!vq->addr_set || vq->num == 0)
        return 0;
    uint8_t *d = vn_mem_uva(&p->mem, vq->desc_uva, desc_bytes(vq->num));
    uint8_t *a = vn_mem_uva(&p->mem, vq->avail_uva, avail_bytes(vq->num));
    uint8_t *u = vn_mem_uva(&p->mem, vq->used_uva, used_bytes(vq->num));
    if (!d || !a || !u)
        return -1;
    /* alignment the spec requires; unaligned rings would make our atomics tear */
    if (((uintptr_t)d & 15) || ((uintptr_t)a & 1) || ((uintptr_t)u & 3))
        return -1;
    vq->desc = (volatile struct vring_desc *)d;
    vq->avail = (volatile struct vring_avail *)a;
    vq->used = (volatile struct vring_used *)u;
    return 0;
}

/* How many new heads the driver made available; -1 (and broken) if the index is absurd.
 * Reads avail idx (and remembers the count in avail_known). */
int vn_vq_avail_count(struct vn_port *p, struct vn_vq *vq)
{
    uint16_t idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(idx - vq->last_avail);
    if (n > vq->num) {
        vq->avail_known = 0;
        vn_port_break(p, VN_BROKEN_AVAIL_IDX);
        return -1;
    }
    vq->avail_known = n;
    return n;
}

/* The same, but without touching avail idx (a cache line the driver keeps writing) while
 * heads of its last reading are left: once per burst, not once per frame.  The entries
 * those heads sit in were published before the idx we read (acquire), and every head and
 * chain is still checked as it is taken. */
static inline int avail_heads(struct vn_port *p, struct vn_vq *vq)
{
    if (vq->avail_known)
        return vq->avail_known;
    return vn_vq_avail_count(p, vq);
}

static inline void load_desc(const volatile struct vring_desc *src, struct vring_desc *d)
{
    d->addr = *(const volatile uint64_t *)&src->addr;
    d->len = *(const volatile uint32_t *)&src->len;
    d->flags = *(const volatile uint16_t *)&src->flags;
    d->next = *(const volatile uint16_t *)&src->next;
}

/*
 * Maps the chain starting at `head` into sw->iov[0..*niov).  `writable` says which
 * direction every buffer must have (virtio-net never mixes them in one chain).  Returns 0,
 * or -1 after breaking the port.  Zero-length descriptors are allowed and not translated.
 */
int vn_vq_map_chain(struct vn_switch *sw, struct vn_port *p, struct vn_vq *vq, uint16_t head,
                    int writable, unsigned *niov, uint64_t *total)
{
    unsigned num = vq->num;
    unsigned limit = num;           /* descriptors we may follow in the current table */
    unsigned count = 0;
    uint16_t idx = head;
    int indirect = 0;
    uint64_t itable = 0;            /* guest-physical address of the indirect table */
    unsigned isize = 0;
    *niov = 0;
    *total = 0;

    for (;;) {
        struct vring_desc d;
        if (!indirect) {
            if (idx >= num) {
                vn_port_break(p, VN_BROKEN_DESC_NEXT);
                return -1;
            }
            load_desc(&vq->desc[idx], &d);
        } else {
            if (idx >= isize) {
                vn_port_break(p, VN_BROKEN_DESC_NEXT);
                return -1;
            }
            if (vn_mem_read(&p->mem, itable + 16ULL * idx, &d, sizeof(d)) < 0) {
                vn_port_break(p, VN_BROKEN_INDIRECT);
                return -1;
            }
        }
        if (++count > limit) {
            vn_port_break(p, VN_BROKEN_CHAIN_LOOP);
            return -1;
        }
        if (d.flags & VRING_DESC_F_INDIRECT) {
            /* one level only, never combined with NEXT, only if negotiated, and no longer
             * than the queue (2.7.5.3.1: no chain is; DPDK checks the same).  That bound
             * is what keeps one pass short: the budget counts chains, and 256 chains
             * through one 32768-entry table of zero-length descriptors (runts, not
             * errors) walked 8M descriptors while no other NI moved. */
            if (indirect || (d.flags & VRING_DESC_F_NEXT) ||
                !HAS_FEATURE(p->features, VIRTIO_RING_F_INDIRECT_DESC) ||
                d.len == 0 || (d.len & 15) || d.len / 16 > num) {
                vn_port_break(p, VN_BROKEN_INDIRECT);
                return -1;
            }
            indirect = 1;
            itable = d.addr;
            isize = d.len / 16;
            limit = isize;
            count = 0;
            idx = 0;
            continue;
        }
        if (!!(d.flags & VRING_DESC_F_WRITE) != !!writable) {
            vn_port_break(p, VN_BROKEN_DESC_DIR);
            return -1;
        }
        if (d.len) {
            if (*total + d.len > (1ULL << 24)) {
                /* 16 MiB is far beyond any frame: a guest making us walk this is hostile */
                vn_port_break(p, VN_BROKEN_CHAIN_LEN);
                return -1;
            }
            if (vn_mem_iov(&p->mem, d.addr, d.len, sw->iov, VN_MAX_IOV, niov) < 0) {
                vn_port_break(p, VN_BROKEN_DESC_ADDR);
                return -1;
            }
            *total += d.len;
        }
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        idx = d.next;
    }
}

/* Logs a write of len bytes at offset off of the used ring (VHOST_VRING_F_LOG). */
static inline void log_used(struct vn_port *p, struct vn_vq *vq, uint64_t off, uint64_t len)
{
    if (vq->log_used)
        vn_log_write(p, vq->log_used_gpa + off, len);
}

/* Writes the shadowed used entries to the ring (not yet visible: idx is not moved). */
static void flush_used(struct vn_port *p, struct vn_vq *vq)
{
    unsigned mask = vq->num - 1;     /* a power of two (vn_vq_set_num) */
    for (unsigned k = 0; k < vq->nshadow; k++) {
        unsigned slot = (uint16_t)(vq->shadow_idx + k) & mask;
        volatile struct vring_used_elem *e = &vq->used->ring[slot];
        e->id = vq->shadow[k].id;
        e->len = vq->shadow[k].len;
        log_used(p, vq, offsetof(struct vring_used, ring) + 8ULL * slot, 8);
    }
    vq->nshadow = 0;
}

/* Returns a chain to the driver.  The entry is kept in vq->shadow and written with the
 * others of its burst when they are published (or the shadow fills): the used ring's lines,
 * which the driver reads, are written once per burst, not once per frame. */
void vn_vq_push_used(struct vn_port *p, struct vn_vq *vq, uint16_t head, uint32_t len)
{
    if (vq->nshadow == 0)
        vq->shadow_idx = vq->used_idx;
    vq->shadow[vq->nshadow].id = head;
    vq->shadow[vq->nshadow].len = len;
    if (++vq->nshadow == VN_USED_SHADOW)
        flush_used(p, vq);
    vq->used_idx++;
    vq->call_pending = 1;
}

void vn_vq_publish_used(struct vn_port *p, struct vn_vq *vq)
{
    flush_used(p, vq);
    __atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
    log_used(p, vq, offsetof(struct vring_used, idx), 2);
}

static inline volatile uint16_t *avail_event(struct vn_vq *vq)
{
    return (volatile uint16_t *)&vq->used->ring[vq->num];
}

static inline volatile uint16_t *used_event(struct vn_vq *vq)
{
    return &vq->avail->ring[vq->num];
}

/* Asks the driver to kick us (on) or not (off) when it adds buffers. */
void vn_vq_notify_enable(struct vn_port *p, struct vn_vq *vq, int on)
{
    /* Written only when it changes: the field shares its cache line with what the driver
     * polls (used idx beside the flags), and a poll loop asks for "off" on every pass. */
    if (HAS_FEATURE(p->features, VIRTIO_RING_F_EVENT_IDX)) {
        /* on: kick for the next head; off: an index one ring-wrap away */
        uint16_t v = on ? vq->last_avail : (uint16_t)(vq->last_avail - 1);
        if (load16(avail_event(vq)) != v) {
            *avail_event(vq) = v;
            log_used(p, vq, offsetof(struct vring_used, ring) + 8ULL * vq->num, 2);
        }
    } else {
        uint16_t f = load16(&vq->used->flags);
        uint16_t nf = on ? (f & ~VRING_USED_F_NO_NOTIFY) : (f | VRING_USED_F_NO_NOTIFY);
        if (nf != f) {
            vq->used->flags = nf;
            log_used(p, vq, offsetof(struct vring_used, flags), 2);
        }
    }
    /* on: the flag must be visible before we re-read avail idx (the lost-wakeup race) */
    if (on)
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Sends an interrupt if used entries were published and the driver wants one. */
void vn_vq_signal(struct vn_port *p, struct vn_vq *vq)
{
    if (!vq->call_pending)
        return;
    vq->call_pending = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int want;
    if (HAS_FEATURE(p->features, VIRTIO_RING_F_EVENT_IDX)) {
        uint16_t ev = load16(used_event(vq));
        uint16_t new_idx = vq->used_idx;
        uint16_t old = vq->signalled_used;
        int valid = vq->signalled_valid;
        vq->signalled_used = new_idx;
        vq->signalled_valid = 1;
        want = !valid || (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old);
    } else {
        want = !(load16(&vq->avail->flags) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    if (!want) {
        p->st.calls_suppressed++;
        return;
    }
    if (vq->callfd >= 0) {
        uint64_t one = 1;
        if (write(vq->callfd, &one, sizeof(one)) == sizeof(one))
            p->st.calls++;
    }
}

/* Copies iov[skip..] into dst, at most len bytes; returns bytes copied. */
static uint64_t iov_to_buf(const struct vn_iov *iov, unsigned n, uint64_t skip, uint8_t *dst,
                           uint64_t len)
{
    uint64_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        uint64_t l = iov[i].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip;
        if (take > len - done)
            take = len - done;
        memcpy(dst + done, iov[i].p + skip, take);
        done += take;
        skip = 0;
    }
    return done;
}

/* Copies src into iov[skip..], at most len bytes, logging the pages written; returns
 * bytes copied. */
static uint64_t buf_to_iov(struct vn_port *p, const struct vn_iov *iov, unsigned n,
                           uint64_t skip, const uint8_t *src, uint64_t len)
{
    uint64_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        uint64_t l = iov[i].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip;
        if (take > len - done)
            take = len - done;
        /* memmove: src may be another port's guest memory (a frame's tail), and two NIs
         * of one guest share it, so a hostile guest can make the two overlap */
        memmove(iov[i].p + skip, src + done, take);
        vn_log_write(p, iov[i].gpa + skip, take);
        done += take;
        skip = 0;
    }
    return done;
}

/* Prefetches for the chains the driver made available after the one being taken: the
 * descriptor of the one `ahead` + 1 slots on, and the first buffer of the next one (whose
 * descriptor an earlier call prefetched), for writing on a receive queue.  The guest's
 * values here are hints only: a head outside the ring or an address outside the region
 * the last translation hit is not prefetched, and nothing is decided on them. */
static inline void prefetch_next(struct vn_port *p, struct vn_vq *vq, uint16_t avail,
                                 unsigned ahead, int rw)
{
    if (ahead < 2)
        return;
    unsigned mask = vq->num - 1;
    uint16_t h1 = load16(&vq->avail->ring[(uint16_t)(avail + 1) & mask]);
    uint16_t h2 = load16(&vq->avail->ring[(uint16_t)(avail + 2) & mask]);
    if (h2 < vq->num)
        __builtin_prefetch((const void *)&vq->desc[h2], 0);
    if (h1 < vq->num) {
        uint64_t a = *(const volatile uint64_t *)&vq->desc[h1].addr;
        const struct vn_region *r = &p->mem.r[p->mem.hint];
        if (p->mem.hint < p->mem.n && a >= r->gpa && a - r->gpa < r->size) {
            if (rw)
                __builtin_prefetch(r->host + (a - r->gpa), 1);
            else
                __builtin_prefetch(r->host + (a - r->gpa), 0);
        }
    }
}

/* Copies frame bytes [off, off + len) into iov[skip..]: data[0, head) first, then the
 * tail src left in its sender's buffers (src NULL: none).  Returns bytes copied. */
static uint64_t frame_to_iov(struct vn_port *p, const struct vn_iov *iov, unsigned n,
                             uint64_t skip, const uint8_t *data, uint32_t head,
                             const struct vn_pkt *src, uint64_t off, uint64_t len)
{
    uint64_t done = 0;
    if (off < head) {
        uint64_t t = head - off < len ? head - off : len;
        done = buf_to_iov(p, iov, n, skip, data + off, t);
        if (done < t)
            return done;
    }
    if (!src)
        return done;
    uint64_t toff = off + done - head;          /* offset into the tail */
    for (unsigned i = 0; i < src->ntail && done < len; i++) {
        uint64_t l = src->tail[i].len;
        if (toff >= l) {
            toff -= l;
            continue;
        }
        uint64_t t = l - toff;
        if (t > len - done)
            t = len - done;
        uint64_t c = buf_to_iov(p, iov, n, skip + done, src->tail[i].p + toff, t);
        done += c;
        if (c < t)
            break;
        toff = 0;
    }
    return done;
}

void vn_pkt_fill_tail(struct vn_pkt *pkt)
{
    iov_to_buf(pkt->tail, pkt->ntail, 0, pkt->data + (pkt->len - pkt->tail_len),
               pkt->tail_len);
    pkt->tail_len = 0;
    pkt->ntail = 0;
}

/* Notes in pkt the pieces of iov[0, n) after its first `skip` bytes; 0 if they are more
 * than VN_TAIL_IOV (the frame is then copied whole). */
static int tail_split(const struct vn_iov *iov, unsigned n, uint64_t skip, struct vn_pkt *pkt)
{
    unsigned k = 0;
    for (unsigned i = 0; i < n; i++) {
        uint64_t l = iov[i].len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        if (k == VN_TAIL_IOV)
            return 0;
        pkt->tail[k].p = iov[i].p + skip;
        pkt->tail[k].len = (uint32_t)(l - skip);
        pkt->tail[k].gpa = iov[i].gpa + skip;
        k++;
        skip = 0;
    }
    pkt->ntail = k;
    return 1;
}

/*
 * Takes the next frame the guest sent on TX queue `vq` into pkt.  With `direct`, a frame
 * longer than VN_COPY_HEAD may leave the rest in the guest's buffers (pkt->tail_len): the
 * caller must then not return the chain (publish the used entry) before the frame is
 * delivered or filled (vn_pkt_fill).
 * Returns 1 (frame in pkt), 0 (nothing available), 2 (a chain was consumed but its frame
 * dropped and counted), or -1 (port broken).
 */
int vn_vq_pop_tx(struct vn_switch *sw, struct vn_port *p, struct vn_vq *vq, struct vn_pkt *pkt,
                 int direct)
{
    int n = avail_heads(p, vq);
    if (n <= 0)
        return n;
    uint16_t head = load16(&vq->avail->ring[vq->last_avail % vq->num]);
    if (head >= vq->num) {
        vn_port_break(p, VN_BROKEN_HEAD);
        return -1;
    }
    prefetch_next(p, vq, vq->last_avail, (unsigned)n, 0);
    unsigned niov;
    uint64_t total;
    if (vn_vq_map_chain(sw, p, vq, head, 0, &niov, &total) < 0) {
        p->st.drop_bad_desc++;
        return -1;
    }
    vq->last_avail++;
    vq->avail_known--;
    int ret = 1;
    unsigned hl = p->hdr_len;
    if (total < hl + 14) {
        p->st.drop_runt++;
        ret = 2;
    } else if (total - hl > VN_MAX_FRAME) {
        p->st.drop_oversize++;
        ret = 2;
    } else {
        /* header and data are contiguous in vn_pkt: one gather copy of each byte, all but
         * num_buffers (which a 10-byte header lacks) overwritten */
        _Static_assert(offsetof(struct vn_pkt, data) ==
                       offsetof(struct vn_pkt, hdr) + sizeof(struct vn_net_hdr),
                       "vn_pkt: data follows hdr");
        uint64_t copy = total;           /* header and frame bytes copied now */
        pkt->tail_len = 0;
        pkt->ntail = 0;
        if (direct && total - hl > VN_COPY_HEAD &&
            tail_split(sw->iov, niov, hl + VN_COPY_HEAD, pkt))
            copy = hl + VN_COPY_HEAD;
        if (hl == sizeof(pkt->hdr)) {
            iov_to_buf(sw->iov, niov, 0, (uint8_t *)&pkt->hdr, copy);
        } else {
            iov_to_buf(sw->iov, niov, 0, (uint8_t *)&pkt->hdr, hl);
            iov_to_buf(sw->iov, niov, hl, pkt->data, copy - hl);
        }
        pkt->hdr.num_buffers = 0;
        pkt->len = (uint32_t)(total - hl);
        pkt->tail_len = (uint32_t)(total - copy);
    }
    vn_vq_push_used(p, vq, head, 0);
    return ret;
}

/*
 * Delivers one frame into the guest's receive queue.  With MRG_RXBUF the frame may take
 * several heads (num_buffers says how many); without, it needs one chain big enough.
 * Nothing is consumed unless the whole frame fits.  Returns VN_PUSH_*.
 */
int vn_vq_push_rx(struct vn_switch *sw, struct vn_port *p, struct vn_vq *vq,
                  const struct vn_net_hdr *hdr, const uint8_t *data, uint32_t len,
                  const struct vn_pkt *src)
{
    /* data[0, inbuf) is ours; the rest (if src) still in the sender's buffers */
    uint32_t inbuf = src && src->tail_len <= len ? len - src->tail_len : len;
    if (inbuf == len)
        src = NULL;
    int fresh = !vq->avail_known;   /* n will come from reading avail idx now */
    int n = avail_heads(p, vq);
    if (n < 0)
        return VN_PUSH_BROKEN;
    unsigned hl = p->hdr_len;
    int mrg = HAS_FEATURE(p->features, VIRTIO_NET_F_MRG_RXBUF);
    uint64_t need = (uint64_t)hl + len;
    uint64_t placed = 0;                 /* bytes of header+frame written so far */
    uint16_t avail = vq->last_avail;
    unsigned used = 0;
    unsigned nfirst = 0;
    struct vn_net_hdr h = *hdr;
    h.num_buffers = 1;
    if (n > 0)
        prefetch_next(p, vq, avail, (unsigned)n, 1);
    /* (head, len) of each buffer, written to the used ring only once all fit */
    uint16_t heads[64];
    uint32_t lens[64];

    while (placed < need) {
        if ((int)used >= n) {
            /* the heads we knew of are not enough: has the driver added some since? */
            if (fresh)
                return VN_PUSH_NOBUF;
            fresh = 1;
            if ((n = vn_vq_avail_count(p, vq)) < 0)
                return VN_PUSH_BROKEN;
            continue;
        }
        if (used >= 64 || (!mrg && used >= 1))
            return VN_PUSH_TOOBIG;
        uint16_t head = load16(&vq->avail->ring[avail % vq->num]);
        if (head >= vq->num) {
            vn_port_break(p, VN_BROKEN_HEAD);
            return VN_PUSH_BROKEN;
        }
        unsigned niov;
        uint64_t total;
        if (used == 1)   /* sw->iov is about to be reused: keep the first buffer's pieces */
            memcpy(sw->iov_first, sw->iov, nfirst * sizeof(struct vn_iov));
        if (vn_vq_map_chain(sw, p, vq, head, 1, &niov, &total) < 0)
            return VN_PUSH_BROKEN;
        if (!mrg && total < need)
            return VN_PUSH_TOOBIG;
        if (used == 0) {
            if (total < hl || niov > 64)
                return VN_PUSH_TOOBIG;
            nfirst = niov;
            placed = buf_to_iov(p, sw->iov, niov, 0, (const uint8_t *)&h, hl);
            uint64_t take = total - hl < len ? total - hl : len;
            placed += frame_to_iov(p, sw->iov, niov, hl, data, inbuf, src, 0, take);
            lens[used] = (uint32_t)(hl + take);
        } else {
            uint64_t off = placed - hl;
            uint64_t take = total < len - off ? total : len - off;
            placed += frame_to_iov(p, sw->iov, niov, 0, data, inbuf, src, off, take);
            lens[used] = (uint32_t)take;
        }
        heads[used++] = head;
        avail++;
    }
    if (mrg && used > 1) {
        uint16_t nb = (uint16_t)used;
        buf_to_iov(p, sw->iov_first, nfirst, offsetof(struct vn_net_hdr, num_buffers),
                   (const uint8_t *)&nb, sizeof(nb));
    }
    for (unsigned i = 0; i < used; i++)
        vn_vq_push_used(p, vq, heads[i], lens[i]);
    vq->last_avail = avail;
    vq->avail_known = (uint16_t)(vq->avail_known - used);
    return VN_PUSH_OK;
}
