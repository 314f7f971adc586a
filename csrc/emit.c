/*
 * The switch's emit queue: frames the NI policy and the TCP engine produce (a held frame a
 * scanner passed, a reassembled datagram, a released or rebuilt segment, the NI's own ACKs,
 * RSTs and injected bytes) wait here, copied, with the stage they still have to pass, until
 * the switch sends them on (switch.c, emit_drain) after the ingress frame, API call or timer
 * tick that made them.  Producers never call into the switch, so calls go one way (switch ->
 * policy -> TCP engine) and nothing re-enters a port's policy or engine while it is at work.
 *
 * One preallocated buffer (pages untouched until used), records of any frame length in
 * arrival order, as a ring; no allocation per frame.  Full (bytes or frames): the frame is
 * dropped and counted on the port that produced it (drop_emit_queue_full).  This file
 * calls nothing outside itself.
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <sys/mman.h>
#include "vn_internal.h"

struct vn_emit_rec {
    uint32_t size;                 /* bytes the record takes (a multiple of 8); 0: the ring's
                                      rest is unused, the next record is at its start */
    uint32_t len;
    int16_t port, egress_to;
    uint8_t dir, stage;
    uint8_t flow_admitted;         /* the flow stage's note on the frame (vn_hdrs.flow_*) */
    uint32_t flow_hash;
    uint64_t flow_id;
    struct vn_net_hdr hdr;
    uint8_t data[];
};

static uint32_t rec_size(uint32_t len)
{
    return (uint32_t)(offsetof(struct vn_emit_rec, data) + len + 7) & ~7u;
}

int vn_emit_init(struct vn_emitq *q)
{
    void *b = mmap(NULL, VN_EMIT_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (b == MAP_FAILED)
        return -1;
    memset(q, 0, sizeof(*q));
    q->buf = b;
    q->max = VN_EMIT_FRAMES;
    return 0;
}

void vn_emit_free(struct vn_emitq *q)
{
    if (q->buf)
        munmap(q->buf, VN_EMIT_BYTES);
    q->buf = NULL;
}

int vn_emit_push(struct vn_switch *sw, int stage, int port, int dir, int egress_to,
                 const struct vn_pkt *pkt)
{
    return vn_emit_push_flow(sw, stage, port, dir, egress_to, pkt, NULL);
}

int vn_emit_push_flow(struct vn_switch *sw, int stage, int port, int dir, int egress_to,
                      const struct vn_pkt *pkt, const struct vn_hdrs *h)
{
    return vn_emit_push_raw(sw, stage, port, dir, egress_to, &pkt->hdr, pkt->data, pkt->len, h);
}

int vn_emit_push_raw(struct vn_switch *sw, int stage, int port, int dir, int egress_to,
                     const struct vn_net_hdr *hdr, const uint8_t *data, uint32_t len,
                     const struct vn_hdrs *h)
{
    struct vn_emitq *q = &sw->emit;
    if (q->count >= q->max || len > VN_MAX_FRAME)
        goto full;
    uint32_t need = rec_size(len), at;
    if (q->tail >= q->head) {          /* [head, tail) used: room after tail, or before head */
        if (need <= VN_EMIT_BYTES - q->tail) {
            at = q->tail;
        } else if (need < q->head) {   /* strictly: tail == head means empty */
            if (q->tail < VN_EMIT_BYTES)
                ((struct vn_emit_rec *)(q->buf + q->tail))->size = 0;
            at = 0;
        } else {
            goto full;
        }
    } else if (need < q->head - q->tail) {   /* wrapped: room between tail and head */
        at = q->tail;
    } else {
        goto full;
    }
    struct vn_emit_rec *r = (struct vn_emit_rec *)(q->buf + at);
    r->size = need;
    r->len = len;
    r->port = (int16_t)port;
    r->egress_to = (int16_t)egress_to;
    r->dir = (uint8_t)dir;
    r->stage = (uint8_t)stage;
    r->flow_id = h ? h->flow_id : 0;
    r->flow_hash = h ? h->flow_hash : 0;
    r->flow_admitted = h ? h->flow_admitted : 0;
    r->hdr = *hdr;
    memcpy(r->data, data, len);
    q->tail = at + need;
    if (q->tail > q->hi)
        q->hi = q->tail;
    q->count++;
    return 0;
full:
    sw->ports[port].st.drop_emit_queue_full++;
    return -1;
}

int vn_emit_pop(struct vn_emitq *q, struct vn_emit_to *m, struct vn_pkt *pkt)
{
    if (!q->count)
        return 0;
    if (q->head >= VN_EMIT_BYTES || ((struct vn_emit_rec *)(q->buf + q->head))->size == 0)
        q->head = 0;
    const struct vn_emit_rec *r = (const struct vn_emit_rec *)(q->buf + q->head);
    m->stage = r->stage;
    m->port = r->port;
    m->dir = r->dir;
    m->egress_to = r->egress_to;
    m->flow_id = r->flow_id;
    m->flow_hash = r->flow_hash;
    m->flow_admitted = r->flow_admitted;
    pkt->len = r->len;
    pkt->hdr = r->hdr;
    memcpy(pkt->data, r->data, r->len);
    q->head += r->size;
    if (--q->count == 0) {
        /* empty: start over at the front, and give back what a burst touched beyond it */
        q->head = q->tail = 0;
        if (q->hi > VN_EMIT_KEEP)
            madvise(q->buf + VN_EMIT_KEEP, q->hi - VN_EMIT_KEEP, MADV_DONTNEED);
        q->hi = 0;
    }
    return 1;
}

int vn_switch_set_emit_max(struct vn_switch *sw, unsigned frames)
{
    if (frames > VN_EMIT_FRAMES)
        return VN_ERANGE;
    sw->emit.max = frames;
    return VN_OK;
}
