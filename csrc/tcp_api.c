/*
 * The TCP engine's side facing the NI kernel (see tcp.c): stream events (vn_stream_next),
 * reading, consuming, passing held bytes, killing, editing (cut, inject) and `more`.  What
 * passing, killing, editing and `more` send joins the switch's emit queue: the public
 * vn_stream_pass/_kill/_cut/_inject/_more, in switch.c, call these and then drain it.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include "tcp_internal.h"

/* ---- the NI kernel's side ---- */

int vn_stream_next(struct vn_switch *sw, struct vn_stream_event *ev)
{
    struct vn_tcp *t = sw->tcp;
    if (!t)
        return 0;
    if (t->reported) {
        flow_free(sw, t->reported);
        t->reported = NULL;
    }
    struct vn_flow *f = t->dirty_head;
    if (!f)
        return 0;
    t->dirty_head = f->dirty_next;
    if (!t->dirty_head)
        t->dirty_tail = NULL;
    f->dirty = 0;
    f->dirty_next = NULL;
    memset(ev, 0, sizeof(*ev));
    ev->stream = f->id;
    ev->port = f->port;
    ev->client = f->client;
    ev->subs = f->subs;
    ev->family = f->family;
    memcpy(ev->guest_addr, f->gaddr, 16);
    memcpy(ev->remote_addr, f->raddr, 16);
    ev->guest_port = f->gport;
    ev->remote_port = f->rport;
    ev->time_ns = vn_clock_real(sw);
    ev->midstream = f->midstream;
    ev->what = VN_STREAM_DATA;
    if (f->report_open)
        ev->what |= VN_STREAM_OPEN;
    f->report_open = 0;
    for (int i = 0; i < 2; i++) {
        struct vn_half *hf = &f->half[i];
        ev->read[i] = hf->kread;   /* the kernel's part (rings read theirs on the ring) */
        ev->hold[i] = hf->khold;
        ev->avail[i] = hf->kread && hf->contig != UINT64_MAX ? hf->contig : hf->kconsumed;
        ev->eof[i] = hf->eof;
    }
    if (f->report_close) {
        ev->what |= VN_STREAM_CLOSED;
        ev->reason = f->reason;
        f->report_close = 0;
        if (f->state == ST_CLOSED) {
            t->reported = f;       /* its frames stay readable until the next call */
        } else {                   /* bypassed: it stays in the table, silent */
            f->announced = 0;
            for (int i = 0; i < 2; i++)
                half_free_all(sw, f, &f->half[i]);
        }
    }
    return 1;
}

static struct vn_half *stream_half(struct vn_switch *sw, uint64_t stream, int dir, struct vn_flow **fp)
{
    if (dir != VN_DIR_FROM_GUEST && dir != VN_DIR_TO_GUEST)
        return NULL;
    struct vn_flow *f = flow_by_id(sw, stream);
    if (!f)
        return NULL;
    *fp = f;
    return &f->half[half_of(dir)];
}

int vn_stream_read(struct vn_switch *sw, uint64_t stream, int dir, uint64_t offset,
                   const uint8_t **data)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    if (!hf)
        return VN_ENOPORT;
    *data = NULL;
    if (offset >= hf->contig)
        return 0;
    for (struct vn_seg *s = seg_from(hf, offset); s && s->start <= offset; s = s->next) {
        if (seg_end(s) > offset) {
            uint64_t n = seg_end(s) - offset;
            if (n > hf->contig - offset)
                n = hf->contig - offset;
            *data = s->rec->data + s->pay + (offset - s->start);
            return (int)n;
        }
    }
    return 0;
}

int vn_stream_consume(struct vn_switch *sw, uint64_t stream, int dir, uint64_t upto)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    if (!hf)
        return VN_ENOPORT;
    if (upto > hf->contig)
        upto = hf->contig;
    if (upto > hf->kconsumed) {
        hf->kconsumed = upto;
        sring_settle(f, hf);
    }
    if (f->state != ST_CLOSED)
        half_trim(sw, f, hf);
    return VN_OK;
}

int vn_tcp_stream_pass(struct vn_switch *sw, uint64_t stream, int dir, uint64_t upto)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    if (!hf)
        return VN_ENOPORT;
    if (f->state == ST_CLOSED || f->bypass)
        return VN_ESTATE;
    if (upto > hf->kpassed) {
        hf->kpassed = upto;
        uint64_t before = hf->passed;
        sring_settle(f, hf);       /* scanner rings holding it too must have passed it */
        if (hf->passed > before) {
            if (hf->more && hf->passed > hf->more_at)
                hf->more = 0;      /* the decision that needed more was made */
            half_release(sw, f, hf);
        }
    }
    return VN_OK;
}

int vn_tcp_stream_kill(struct vn_switch *sw, uint64_t stream)
{
    struct vn_flow *f = flow_by_id(sw, stream);
    if (!f)
        return VN_ENOPORT;
    if (f->state == ST_CLOSED || f->bypass)
        return VN_ESTATE;
    sw->ports[f->port].st.tcp_killed++;
    forge_rsts(sw, f);
    flow_close(sw, f, VN_CLOSE_KILLED);
    return VN_OK;
}

/* A new edit of a held direction (`inject`: bytes it will insert, 0 for a cut): at `at` (not before the pass frontier or the previous
 * edit; an injection may join a cut at the same offset).  Returns the edit or NULL (*err). */
static struct vn_edit *edit_new(struct vn_switch *sw, uint64_t stream, int dir, uint64_t at,
                                uint32_t inject, struct vn_flow **fp, struct vn_half **hp, int *err)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    *err = VN_ENOPORT;
    if (!hf)
        return NULL;
    *err = VN_ESTATE;
    if (f->state == ST_CLOSED || f->bypass || !hf->hold || !hf->have_isn || f->midstream)
        return NULL;               /* adopted: its windows' scale is a guess, never rewritten */
    *err = VN_EINVAL;
    if (at < hf->passed || at < hf->rel_lim)
        return NULL;
    *fp = f;
    *hp = hf;
    if (hf->nedits) {
        struct vn_edit *last = &hf->edits[hf->nedits - 1];
        if (inject && at == last->off && !last->inj_len)
            return last;           /* inserted before the bytes that edit cuts */
        if (!inject && at == last->off + last->cut && (last->cut || !last->inj_len || at == last->off))
            return last;           /* a cut continuing the previous edit's */
    }
    if (at < hf->edit_lim)
        return NULL;
    *err = VN_ERANGE;
    struct vn_tcp_port *tp = sw->tcp->ports[f->port];
    const struct vn_policy *pol = sw->ports[f->port].pol;
    if (hf->nedits >= VN_TCP_EDITS_MAX ||
        (tp && pol && tp->bytes + sizeof(struct vn_edit) + inject > pol->tcp_bytes_max))
        return NULL;
    *err = VN_ENOMEM;
    if (hf->nedits == hf->edits_cap) {
        unsigned cap = hf->edits_cap ? hf->edits_cap * 2 : 16;
        struct vn_edit *n = realloc(hf->edits, cap * sizeof(*n));
        if (!n)
            return NULL;
        hf->edits = n;
        hf->edits_cap = cap;
    }
    rewrite_start(hf);
    struct vn_edit *e = &hf->edits[hf->nedits++];
    memset(e, 0, sizeof(*e));
    e->off = at;
    e->before = hf->shift;
    edit_account(sw, f, sizeof(*e));
    return e;
}

static void edit_done(struct vn_switch *sw, struct vn_flow *f, struct vn_half *hf, struct vn_edit *e)
{
    hf->shift = e->before + e->inj_len - (int64_t)e->cut;
    if (e->off + e->cut > hf->edit_lim)
        hf->edit_lim = e->off + e->cut;
    int hs = (int)(hf - f->half);
    half_release(sw, f, hf);
    ack_cut(sw, f, hs);
}

int vn_tcp_stream_cut(struct vn_switch *sw, uint64_t stream, int dir, uint64_t from, uint64_t to)
{
    if (to <= from)
        return VN_EINVAL;
    struct vn_flow *f;
    struct vn_half *hf;
    int err;
    struct vn_edit *e = edit_new(sw, stream, dir, from, 0, &f, &hf, &err);
    if (!e)
        return err;
    if (e->off + e->cut == from)
        e->cut += to - from;
    else
        e->cut = to - from;
    sw->ports[f->port].st.tcp_cut_bytes += to - from;
    edit_done(sw, f, hf, e);
    return VN_OK;
}

int vn_tcp_stream_inject(struct vn_switch *sw, uint64_t stream, int dir, uint64_t at,
                         const uint8_t *bytes, uint32_t len)
{
    if (!len || len > VN_TCP_INJECT_MAX || !bytes)
        return VN_EINVAL;
    uint8_t *copy = malloc(len);
    if (!copy)
        return VN_ENOMEM;
    memcpy(copy, bytes, len);
    struct vn_flow *f;
    struct vn_half *hf;
    int err;
    struct vn_edit *e = edit_new(sw, stream, dir, at, len, &f, &hf, &err);
    if (!e) {
        free(copy);
        return err;
    }
    e->inj = copy;
    e->inj_len = len;
    edit_account(sw, f, len);
    /* the later edits' shifts are unaffected: this is the last edit or joins it */
    edit_done(sw, f, hf, e);
    return VN_OK;
}

int vn_tcp_stream_more(struct vn_switch *sw, uint64_t stream, int dir)
{
    struct vn_flow *f;
    struct vn_half *hf = stream_half(sw, stream, dir, &f);
    if (!hf)
        return VN_ENOPORT;
    if (f->state != ST_ESTABLISHED || f->bypass || !hf->hold || f->midstream)
        return VN_ESTATE;          /* adopted: the receiver's real window is unknown */
    hf->more = 1;
    hf->more_at = hf->contig;
    more_ack(sw, f, (int)(hf - f->half));
    return VN_OK;
}
