/*
 * Reconstructed TCP streams on scanner rings: the TCP engine's side (the ring's is ring.c).
 *
 * A stream subscription routed to a ring (vn_policy.stream_sub_chan) makes that ring a
 * party to the connections it matches, beside the NI kernel (its scanners on the socket)
 * and the signature stage.  At the handshake the ring gets an OPEN descriptor; each time
 * in-order bytes arrive they are copied once onto it (DATA descriptors of up to
 * VNR_STREAM_CHUNK bytes, held if it holds that direction), then END at the FIN and CLOSE
 * when the connection is over.  Its stream passes (decisions on the ring) move its frontier;
 * a direction's bytes go on as far as every party holding it passed (sring_settle).  No
 * Python runs per segment: the kernel hears only of connections its own subscriptions match.
 *
 * A ring that cannot take a connection's bytes (full) loses that connection: as the kernel
 * does with a scanner that cannot keep up, the policy's default stands in for what it held
 * (pass: the ring's hold is dropped; cut: the connection is killed, here, out of the input
 * path, by vn_tcp_ring_service).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include "tcp_internal.h"
#include "vnring.h"

#define KILL_PENDING 256

/* The least frontier of the parties holding / reading a direction (UINT64_MAX: none). */
void sring_settle(struct vn_flow *f, struct vn_half *hf)
{
    int hs = (int)(hf - f->half);
    uint64_t passed = hf->khold ? hf->kpassed : UINT64_MAX;
    uint64_t consumed = hf->kread ? hf->kconsumed : UINT64_MAX;
    for (unsigned k = 0; k < f->nrings; k++) {
        const struct vn_sring *r = &f->rings[k];
        if (r->hold & dir_of(hs) && r->passed[hs] < passed)
            passed = r->passed[hs];
        if (r->read & dir_of(hs) && r->given[hs] < consumed)
            consumed = r->given[hs];
    }
    hf->passed = passed;
    hf->consumed = consumed;
}

static void copy_from_half(void *arg, uint8_t *dst, uint64_t off, uint32_t len)
{
    const struct vn_half *hf = arg;
    while (len) {
        uint32_t n = 0;
        for (struct vn_seg *s = seg_from(hf, off); s && s->start <= off; s = s->next) {
            if (seg_end(s) > off) {
                uint64_t m = seg_end(s) - off;
                n = m < len ? (uint32_t)m : len;
                memcpy(dst, s->rec->data + s->pay + (off - s->start), n);
                break;
            }
        }
        if (!n) {                  /* cannot happen below contig; never loop on it */
            memset(dst, 0, len);
            return;
        }
        dst += n;
        off += n;
        len -= n;
    }
}

static struct vn_sring *sring_of(struct vn_flow *f, int slot)
{
    for (unsigned k = 0; k < f->nrings; k++)
        if (f->rings[k].slot == slot)
            return &f->rings[k];
    return NULL;
}

static void sring_remove(struct vn_flow *f, struct vn_sring *r)
{
    *r = f->rings[--f->nrings];
    if (!f->nrings) {
        free(f->rings);
        f->rings = NULL;
    }
}

/* A ring leaves a connection (lost, gone): what it held gets `pass`, else the connection is
 * to be killed (1 returned: the caller kills it, or queues the kill). */
static int sring_leave(struct vn_switch *sw, struct vn_flow *f, struct vn_sring *r, int pass, int reason)
{
    int held = r->hold != 0;
    uint32_t h = r->handle;
    int slot = r->slot;
    int pushed = reason && vn_chan_stream_push(sw, f->port, slot, VNR_KIND_STREAM_CLOSE, h, f->id, 0, 0, 0,
                                               0, (uint32_t)reason, NULL, 0, NULL, NULL) == 0;
    vn_chan_stream_closed(sw, f->port, slot, h, pushed);
    sring_remove(f, r);
    if (held && !pass)
        return 1;
    for (int i = 0; i < 2; i++) {
        sring_settle(f, &f->half[i]);
        if (f->state != ST_CLOSED && !f->bypass)
            half_release(sw, f, &f->half[i]);
    }
    return 0;
}

static void kill_later(struct vn_switch *sw, struct vn_flow *f)
{
    struct vn_tcp *t = sw->tcp;
    for (unsigned i = 0; i < t->nring_kill; i++)
        if (t->ring_kill[i] == f->id)
            return;
    if (t->nring_kill < KILL_PENDING)
        t->ring_kill[t->nring_kill++] = f->id;
    /* else: its held bytes stay held (nobody passes them): the idle timeout ends it */
}

void sring_open(struct vn_switch *sw, struct vn_flow *f, const uint8_t *read, const uint8_t *hold)
{
    struct vnr_stream_open o;
    memset(&o, 0, sizeof(o));
    o.family = f->family;
    o.client = (uint8_t)f->client;
    o.midstream = f->midstream;
    o.guest_port = f->gport;
    o.remote_port = f->rport;
    o.server_port = f->client == VN_DIR_FROM_GUEST ? f->rport : f->gport;
    memcpy(o.guest_addr, f->gaddr, 16);
    memcpy(o.remote_addr, f->raddr, 16);
    const struct vn_policy *pol = sw->ports[f->port].pol;
    for (int slot = 0; slot < VN_CHANS; slot++) {
        if (!read[slot])
            continue;
        uint32_t h;
        o.read = read[slot];
        o.held = hold[slot];
        int ok = vn_chan_stream_handle(sw, f->port, slot, f->id, &h) == 0;
        if (ok && vn_chan_stream_push(sw, f->port, slot, VNR_KIND_STREAM_OPEN, h, f->id, 0, 0, 0, 0, 0,
                                      &o, sizeof(o), NULL, NULL) < 0) {
            vn_chan_stream_closed(sw, f->port, slot, h, 0);
            ok = 0;
        }
        if (ok) {
            struct vn_sring *n = realloc(f->rings, (f->nrings + 1) * sizeof(*n));
            if (n) {
                f->rings = n;
                struct vn_sring *r = &f->rings[f->nrings++];
                memset(r, 0, sizeof(*r));
                r->slot = (uint8_t)slot;
                r->read = read[slot];
                r->hold = hold[slot];
                r->handle = h;
                continue;
            }
            vn_chan_stream_closed(sw, f->port, slot, h, 0);
        }
        /* the ring cannot take it (full, broken, gone): the default for what it would hold */
        sw->ports[f->port].st.ring_streams_lost++;
        if (hold[slot] && !(pol && pol->hold_default_pass))
            kill_later(sw, f);
    }
}

void sring_feed(struct vn_switch *sw, struct vn_flow *f)
{
    if (!f->nrings || f->state == ST_CLOSED || f->bypass)
        return;
    const struct vn_policy *pol = sw->ports[f->port].pol;
    int pass = pol && pol->hold_default_pass;
    for (unsigned k = 0; k < f->nrings;) {
        struct vn_sring *r = &f->rings[k];
        int lost = 0;
        for (int i = 0; i < 2 && !lost; i++) {
            struct vn_half *hf = &f->half[i];
            int dir = dir_of(i);
            if (!(r->read & dir))
                continue;
            while (r->given[i] < hf->contig && !lost) {
                uint64_t n = hf->contig - r->given[i];
                if (n > VNR_STREAM_CHUNK)
                    n = VNR_STREAM_CHUNK;
                if (vn_chan_stream_push(sw, f->port, r->slot, VNR_KIND_STREAM_DATA, r->handle, f->id, dir,
                                        r->given[i], (uint32_t)n, !!(r->hold & dir), 0, NULL, 0,
                                        copy_from_half, hf) < 0)
                    lost = 1;
                else
                    r->given[i] += n;
            }
            if (!lost && hf->eof && r->given[i] == hf->contig && !(r->ended & dir)) {
                if (vn_chan_stream_push(sw, f->port, r->slot, VNR_KIND_STREAM_END, r->handle, f->id, dir,
                                        hf->contig, 0, 0, 0, NULL, 0, NULL, NULL) < 0)
                    lost = 1;
                else
                    r->ended |= dir;
            }
        }
        if (lost) {
            sw->ports[f->port].st.ring_streams_lost++;
            if (sring_leave(sw, f, r, pass, VNR_CLOSE_OVERRUN))
                kill_later(sw, f);
            continue;              /* the last party moved into slot k */
        }
        k++;
    }
    for (int i = 0; i < 2; i++) {
        sring_settle(f, &f->half[i]);
        half_trim(sw, f, &f->half[i]);
    }
}

void sring_close(struct vn_switch *sw, struct vn_flow *f, int reason)
{
    while (f->nrings) {
        struct vn_sring *r = &f->rings[f->nrings - 1];
        uint32_t h = r->handle;
        int slot = r->slot;
        int pushed = vn_chan_stream_push(sw, f->port, slot, VNR_KIND_STREAM_CLOSE, h, f->id, 0, 0, 0, 0,
                                         (uint32_t)reason, NULL, 0, NULL, NULL) == 0;
        vn_chan_stream_closed(sw, f->port, slot, h, pushed);
        sring_remove(f, r);
    }
}

/* ---- what ring.c asks ---- */

static struct vn_sring *part(struct vn_switch *sw, uint64_t stream, int port, int slot, struct vn_flow **fp)
{
    struct vn_flow *f = sw->tcp ? flow_by_id(sw, stream) : NULL;
    if (!f || f->port != port || f->state == ST_CLOSED || f->bypass)
        return NULL;
    *fp = f;
    return sring_of(f, slot);
}

int vn_tcp_ring_pass(struct vn_switch *sw, uint64_t stream, int port, int slot, int dir, uint64_t upto)
{
    struct vn_flow *f;
    struct vn_sring *r = part(sw, stream, port, slot, &f);
    if (!r || !(r->hold & dir))
        return -1;
    int i = half_of(dir);
    if (upto > r->passed[i]) {
        r->passed[i] = upto;
        struct vn_half *hf = &f->half[i];
        uint64_t before = hf->passed;
        sring_settle(f, hf);
        if (hf->passed > before) {
            if (hf->more && hf->passed > hf->more_at)
                hf->more = 0;      /* the decision that needed more was made */
            half_release(sw, f, hf);
        }
    }
    return 0;
}

int vn_tcp_ring_chunk(struct vn_switch *sw, uint64_t stream, int port, int slot, int dir,
                      uint64_t end, int timeout, int pass)
{
    struct vn_flow *f;
    struct vn_sring *r = part(sw, stream, port, slot, &f);
    int i = half_of(dir);
    if (!r || !(r->hold & dir) || r->passed[i] >= end)
        return 1;
    if (!timeout)
        return 0;
    if (pass)
        return vn_tcp_ring_pass(sw, stream, port, slot, dir, end), 1;
    sw->ports[f->port].st.tcp_killed++;
    forge_rsts(sw, f);
    flow_close(sw, f, VN_CLOSE_KILLED);
    return 1;
}

void vn_tcp_ring_gone(struct vn_switch *sw, uint64_t stream, int port, int slot, int pass)
{
    struct vn_flow *f;
    struct vn_sring *r = part(sw, stream, port, slot, &f);
    if (!r)
        return;
    if (sring_leave(sw, f, r, pass, 0)) {
        sw->ports[f->port].st.tcp_killed++;
        forge_rsts(sw, f);
        flow_close(sw, f, VN_CLOSE_KILLED);
    }
}

void vn_tcp_ring_service(struct vn_switch *sw)
{
    struct vn_tcp *t = sw->tcp;
    if (!t || !t->nring_kill)
        return;
    unsigned n = t->nring_kill;
    t->nring_kill = 0;
    for (unsigned i = 0; i < n; i++) {
        struct vn_flow *f = flow_by_id(sw, t->ring_kill[i]);
        if (f && f->state != ST_CLOSED && !f->bypass) {
            sw->ports[f->port].st.tcp_killed++;
            forge_rsts(sw, f);
            flow_close(sw, f, VN_CLOSE_KILLED);
        }
    }
}

/* ---- the NI kernel's questions about a ring's part (edits from a ring scanner) ---- */

int vn_stream_ring_part(struct vn_switch *sw, uint64_t stream, int port, int slot,
                        struct vn_stream_ring_part *out)
{
    struct vn_flow *f;
    struct vn_sring *r = part(sw, stream, port, slot, &f);
    if (!r)
        return VN_ENOPORT;
    out->read = r->read;
    out->hold = r->hold;
    for (int i = 0; i < 2; i++) {
        out->passed[i] = r->passed[i];
        out->given[i] = r->given[i];
        out->released[i] = f->half[i].passed;
    }
    return VN_OK;
}

int vn_tcp_stream_ring_pass(struct vn_switch *sw, uint64_t stream, int port, int slot, int dir,
                            uint64_t upto)
{
    return vn_tcp_ring_pass(sw, stream, port, slot, dir, upto) < 0 ? VN_ENOPORT : VN_OK;
}
