/*
 * HTTP/1.x message reader for the signature stage (see http.h).
 *
 * Each side (requests, responses) is a small state machine over the in-order bytes: a head is
 * copied (it may span any number of segments) until its empty line, then split into its start
 * line and header fields and turned into the buffers rules match; a body is framed as the
 * server frames it (Content-Length, chunked, or to the end) so that the next message is found
 * where the server finds it.  Responses are framed with the requests they answer (a HEAD's
 * response has no body; a CONNECT answered 2xx or a 101 makes the connection a tunnel, which
 * is not HTTP any more).  A request that may turn the connection into something else (CONNECT,
 * Upgrade) makes the request side wait for its response: what the client sends after it is
 * read as HTTP only if the server did not switch, so a "CONNECT" the server refuses is not a
 * way to smuggle the requests behind it past the rules.
 *
 * URI normalisation (http.uri), as an IIS-like server may read the path: %XX and %uXXXX
 * decoding (fullwidth forms U+FF01..FF5E read as their ASCII letters, as IIS's best-fit
 * mapping does; other code points above 0xFF become '?'), backslashes as slashes, empty and
 * "." segments removed, ".." resolved (never above the root); the query is decoded, not
 * reshaped.  An absolute-form target (a proxy request) gives its path and query; its
 * authority is the host.
 */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include "http.h"

enum { ST_START, ST_HEAD, ST_BODY_CL, ST_CHUNK_SIZE, ST_CHUNK_DATA, ST_CHUNK_END, ST_TRAILER,
       ST_BODY_CLOSE, ST_WAIT, ST_DEAD };

/* what a request asks of its response's framing */
#define K_HEAD 1
#define K_CONNECT 2
#define K_UPGRADE 4

#define CHUNK_LINE_MAX 1024
#define TRAILER_MAX 8192
/* the arena's worst case for a head of n bytes: the fold area (n), then every derived buffer
 * (decoded and normalised URI, host twice, header, start, header names, joined fields) */
#define ARENA_NEED(n) (16u * (n) + 16u * VN_HTTP_FIELDS_MAX + 256u)

struct field {
    uint32_t id;                /* a name the reader knows (F_*), else F_OTHER */
    uint32_t no, nl;            /* name: offset into head, length */
    const uint8_t *v;           /* value (into head, or into the arena if it was folded) */
    uint32_t vl;
};

/* Field names the reader has buffers or framing for. */
enum { F_OTHER, F_COOKIE, F_SET_COOKIE, F_CONTENT_TYPE, F_CONTENT_LENGTH, F_USER_AGENT, F_ACCEPT,
       F_ACCEPT_LANGUAGE, F_ACCEPT_ENCODING, F_REFERER, F_CONNECTION, F_HOST, F_SERVER, F_LOCATION,
       F_TRANSFER_ENCODING, F_UPGRADE, F_CONTENT_ENCODING, F_N };
static const char *const field_names[F_N] = {
    "", "cookie", "set-cookie", "content-type", "content-length", "user-agent", "accept",
    "accept-language", "accept-encoding", "referer", "connection", "host", "server", "location",
    "transfer-encoding", "upgrade", "content-encoding"};

struct side {
    uint8_t state, first_done, method_done, cr, inspecting, body_ev, kind;
    uint64_t pos, msg_start;
    uint32_t line_len;          /* bytes of the current head line so far (CR/LF excluded) */
    uint32_t line0_len;         /* the first line's length */
    uint8_t *head;
    uint32_t head_len, head_cap;
    uint8_t *arena;
    uint32_t arena_len, arena_cap;
    const uint8_t *bp[VN_HTTP_NBUF];
    uint32_t bl[VN_HTTP_NBUF];
    uint32_t present;
    uint64_t left;              /* body bytes (Content-Length) or chunk bytes to go */
    uint8_t *body;
    uint32_t body_len, body_cap;
    uint8_t *dbody;             /* the request body with its Content-Encoding undone */
    uint32_t dbody_cap;
    uint8_t keep_body, has_body, overflow;
    char cline[CHUNK_LINE_MAX];
    uint32_t cline_len, trailer_len;
    struct field f[VN_HTTP_FIELDS_MAX];
    uint32_t nf;
};

struct vn_http {
    struct side s[2];
    uint32_t body_limit;
    int want_body, hold_resp;
    uint8_t pend[VN_HTTP_PIPELINE_MAX];
    unsigned pend_head, pend_n;
    /* with hold_resp: each pending request's names, slot by slot as pend (allocated when
     * the request is read, freed when its response comes), and the answered one's */
    struct vn_http_reqinfo *info[VN_HTTP_PIPELINE_MAX];
    struct vn_http_reqinfo answered;
    uint8_t has_answered;
    uint8_t seen_request;       /* a request was read: the connection speaks HTTP */
    uint8_t tunnel_probe;       /* a CONNECT was answered 2xx: the next request bytes decide */
    size_t mem;
};

static const char *errs[] = {
    "", "a message head over 32 KiB", "not HTTP/1.x syntax (bad start line, header or bare CR)",
    "ambiguous message framing (Content-Length with Transfer-Encoding, differing lengths, "
    "or a Transfer-Encoding not ending in chunked): request smuggling",
    "more than 64 pipelined requests awaiting responses", "out of memory", "a malformed chunk",
};

const char *vn_http_strerror(int e)
{
    return (e < 0 && -e < (int)(sizeof errs / sizeof *errs)) ? errs[-e] : "unknown error";
}

/* RFC 9110's token characters, as a table: a field name's bytes are checked one by one */
#define T_ (1)
static const uint8_t tchars[256] = {
    ['!'] = T_, ['#'] = T_, ['$'] = T_, ['%'] = T_, ['&'] = T_, ['\''] = T_, ['*'] = T_, ['+'] = T_,
    ['-'] = T_, ['.'] = T_, ['^'] = T_, ['_'] = T_, ['`'] = T_, ['|'] = T_, ['~'] = T_,
    ['0'] = T_, ['1'] = T_, ['2'] = T_, ['3'] = T_, ['4'] = T_, ['5'] = T_, ['6'] = T_, ['7'] = T_,
    ['8'] = T_, ['9'] = T_,
    ['A'] = T_, ['B'] = T_, ['C'] = T_, ['D'] = T_, ['E'] = T_, ['F'] = T_, ['G'] = T_, ['H'] = T_,
    ['I'] = T_, ['J'] = T_, ['K'] = T_, ['L'] = T_, ['M'] = T_, ['N'] = T_, ['O'] = T_, ['P'] = T_,
    ['Q'] = T_, ['R'] = T_, ['S'] = T_, ['T'] = T_, ['U'] = T_, ['V'] = T_, ['W'] = T_, ['X'] = T_,
    ['Y'] = T_, ['Z'] = T_,
    ['a'] = T_, ['b'] = T_, ['c'] = T_, ['d'] = T_, ['e'] = T_, ['f'] = T_, ['g'] = T_, ['h'] = T_,
    ['i'] = T_, ['j'] = T_, ['k'] = T_, ['l'] = T_, ['m'] = T_, ['n'] = T_, ['o'] = T_, ['p'] = T_,
    ['q'] = T_, ['r'] = T_, ['s'] = T_, ['t'] = T_, ['u'] = T_, ['v'] = T_, ['w'] = T_, ['x'] = T_,
    ['y'] = T_, ['z'] = T_,
};
#undef T_

static int tchar(uint8_t c)
{
    return tchars[c];
}

/* The separators servers split a request line at (Python's str.split() takes VT and FF too). */
static int ws(uint8_t c)
{
    return c == ' ' || c == '\t' || c == '\v' || c == '\f';
}

static uint8_t lc(uint8_t c)
{
    return c >= 'A' && c <= 'Z' ? (uint8_t)(c + 32) : c;
}

static int ieq(const uint8_t *a, uint32_t n, const char *b)
{
    size_t m = strlen(b);
    if (n != m)
        return 0;
    for (uint32_t i = 0; i < n; i++)
        if (lc(a[i]) != (uint8_t)b[i])
            return 0;
    return 1;
}

static uint32_t field_id(const uint8_t *name, uint32_t n)
{
    if (n < 4 || n > 17)
        return F_OTHER;
    for (uint32_t k = 1; k < F_N; k++)
        if (lc(name[0]) == (uint8_t)field_names[k][0] && ieq(name, n, field_names[k]))
            return k;
    return F_OTHER;
}

struct vn_http *vn_http_new(uint32_t body_limit, int want_body, int hold_resp)
{
    if (body_limit > VN_HTTP_BODY_LIMIT_MAX)
        return NULL;
    struct vn_http *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->body_limit = body_limit;
    h->want_body = want_body && body_limit;
    h->hold_resp = !!hold_resp;
    h->mem = sizeof *h;
    return h;
}

void vn_http_free(struct vn_http *h)
{
    if (!h)
        return;
    for (int i = 0; i < 2; i++) {
        free(h->s[i].head);
        free(h->s[i].arena);
        free(h->s[i].body);
        free(h->s[i].dbody);
    }
    for (int i = 0; i < VN_HTTP_PIPELINE_MAX; i++)
        free(h->info[i]);
    free(h);
}

size_t vn_http_mem(const struct vn_http *h)
{
    return h ? h->mem : 0;
}

static int grow(struct vn_http *h, uint8_t **p, uint32_t *cap, uint32_t need, uint32_t max)
{
    if (need <= *cap)
        return 0;
    if (need > max)
        return -1;
    uint32_t n = *cap ? *cap : 1024;
    while (n < need)
        n = n > max / 2 ? max : n * 2;
    uint8_t *q = realloc(*p, n);
    if (!q)
        return VN_HTTP_E_NOMEM;
    h->mem += n - *cap;
    *p = q;
    *cap = n;
    return 0;
}

/* Gives back a message's buffers once the caller has had its events: an idle keep-alive
 * connection keeps none of them (a memcap shared by all connections must not be filled by
 * connections that wait). */
static void release(struct vn_http *h, struct side *s)
{
    /* small working buffers stay (no malloc per message); big ones go */
    if (s->arena_cap > 16384) {
        h->mem -= s->arena_cap;
        free(s->arena);
        s->arena = NULL;
        s->arena_cap = 0;
    }
    if (s->head_cap > 2048) {
        h->mem -= s->head_cap;
        free(s->head);
        s->head = NULL;
        s->head_cap = 0;
    }
    if (s->body_cap > 4096) {
        h->mem -= s->body_cap;
        free(s->body);
        s->body = NULL;
        s->body_cap = 0;
    }
    if (s->dbody) {
        h->mem -= s->dbody_cap;
        free(s->dbody);
        s->dbody = NULL;
        s->dbody_cap = 0;
    }
    s->arena_len = s->head_len = s->body_len = 0;
    s->present = 0;
}

/* The side reads no more.  When it is the response side, no pending request will be named
 * in an alert any more: their names go (the answered one's copy stays). */
static void go_dead(struct vn_http *h, struct side *s)
{
    s->state = ST_DEAD;
    s->inspecting = 0;
    if (s == &h->s[VN_HTTP_RESP])
        for (int i = 0; i < VN_HTTP_PIPELINE_MAX; i++)
            if (h->info[i]) {
                free(h->info[i]);
                h->info[i] = NULL;
                h->mem -= sizeof(struct vn_http_reqinfo);
            }
}

/* ---------------------------------------------------------------- buffers */

/* Room for n more bytes in the arena.  It was sized for the worst case (ARENA_NEED) before
 * building; every write checks anyway, and a shortfall is an error, never an overflow. */
static int room(struct side *s, uint32_t n)
{
    if (s->arena_cap - s->arena_len >= n)
        return 1;
    s->overflow = 1;
    return 0;
}

static uint8_t *ap(struct side *s, const void *d, uint32_t n)
{
    uint8_t *p = s->arena + s->arena_len;
    if (!room(s, n))
        return p;
    if (n)
        memcpy(p, d, n);
    s->arena_len += n;
    return p;
}

static void set_buf(struct side *s, int b, const uint8_t *p, uint32_t n)
{
    s->bp[b] = p;
    s->bl[b] = n;
    s->present |= 1u << b;
}

static int hexv(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = lc(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* %XX and %uXXXX decoding (see the top of this file); `slashes`: backslash reads as slash. */
static uint32_t decode(const uint8_t *u, uint32_t n, uint8_t *out, int slashes)
{
    uint32_t o = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t c = u[i];
        if (c == '%' && i + 2 < n && hexv(u[i + 1]) >= 0 && hexv(u[i + 2]) >= 0) {
            c = (uint8_t)(hexv(u[i + 1]) << 4 | hexv(u[i + 2]));
            i += 2;
        } else if (c == '%' && i + 5 < n && lc(u[i + 1]) == 'u' && hexv(u[i + 2]) >= 0 &&
                   hexv(u[i + 3]) >= 0 && hexv(u[i + 4]) >= 0 && hexv(u[i + 5]) >= 0) {
            uint32_t v = (uint32_t)(hexv(u[i + 2]) << 12 | hexv(u[i + 3]) << 8 | hexv(u[i + 4]) << 4 |
                                    hexv(u[i + 5]));
            c = v < 0x100 ? (uint8_t)v : (v >= 0xFF01 && v <= 0xFF5E) ? (uint8_t)(v - 0xFEE0) : '?';
            i += 5;
        }
        if (slashes && c == '\\')
            c = '/';
        out[o++] = c;
    }
    return o;
}

/* Removes empty and "." segments and resolves ".." in a path that starts with '/'. */
static uint32_t norm_path(const uint8_t *p, uint32_t n, uint8_t *out)
{
    uint32_t o = 0;
    uint32_t i = 0;
    int trailing = 0;
    while (i < n) {
        while (i < n && p[i] == '/')
            i++;
        uint32_t j = i;
        while (j < n && p[j] != '/')
            j++;
        uint32_t sl = j - i;
        trailing = j < n || (sl == 0);
        if (sl == 1 && p[i] == '.') {
            trailing = 1;
        } else if (sl == 2 && p[i] == '.' && p[i + 1] == '.') {
            while (o > 0 && out[o - 1] != '/')
                o--;
            if (o > 0)
                o--;                    /* the slash before the removed segment */
            trailing = 1;
        } else if (sl) {
            out[o++] = '/';
            memcpy(out + o, p + i, sl);
            o += sl;
            trailing = j < n;
        }
        i = j;
    }
    if (o == 0 || trailing)
        out[o++] = '/';
    return o;
}

/* The host without userinfo and port, lower case. */
static uint32_t norm_host(const uint8_t *a, uint32_t n, uint8_t *out)
{
    for (uint32_t i = n; i > 0; i--)
        if (a[i - 1] == '@') {
            a += i;
            n -= i;
            break;
        }
    uint32_t end = n;
    if (n && a[0] == '[') {
        for (uint32_t i = 0; i < n; i++)
            if (a[i] == ']') {
                end = i + 1;
                break;
            }
    } else {
        for (uint32_t i = n; i > 0; i--)
            if (a[i - 1] == ':') {
                uint32_t k = i;
                while (k < n && a[k] >= '0' && a[k] <= '9')
                    k++;
                if (k == n)
                    end = i - 1;
                break;
            }
    }
    for (uint32_t i = 0; i < end; i++)
        out[i] = lc(a[i]);
    return end;
}

/* One header's value into buffer b: several fields of that name join with ", ". */
static void join_field(struct side *s, int b, uint32_t id, uint32_t *count)
{
    uint8_t *start = s->arena + s->arena_len;
    uint32_t n = 0;
    *count = 0;
    for (uint32_t i = 0; i < s->nf; i++) {
        const struct field *f = &s->f[i];
        if (f->id != id)
            continue;
        if (n)
            ap(s, ", ", 2), n += 2;
        ap(s, f->v, f->vl);
        n += f->vl;
        (*count)++;
    }
    if (*count)
        set_buf(s, b, start, n);
}

static int build_bufs(struct vn_http *h, struct side *s, int side)
{
    (void)h;
    const uint8_t *hd = s->head;
    uint32_t l0 = s->line0_len;
    /* the start line: request (method SP target [SP version]) or status (version SP code [SP msg]) */
    if (side == VN_HTTP_REQ) {
        uint32_t i = 0, le = l0;
        while (le > 0 && ws(hd[le - 1]))
            le--;                       /* separators after the version */
        while (i < le && !ws(hd[i]))
            i++;
        set_buf(s, VN_HTTP_B_METHOD, hd, i);
        while (i < le && ws(hd[i]))
            i++;
        uint32_t t0 = i, t1 = le;
        /* the version: the last word, if it is HTTP/ */
        uint32_t k = le;
        while (k > t0 && !ws(hd[k - 1]))
            k--;
        if (k > t0 && le - k >= 5 && !memcmp(hd + k, "HTTP/", 5)) {
            set_buf(s, VN_HTTP_B_PROTOCOL, hd + k, le - k);
            t1 = k;
            while (t1 > t0 && ws(hd[t1 - 1]))
                t1--;
        }
        set_buf(s, VN_HTTP_B_REQUEST_LINE, hd, l0);
        set_buf(s, VN_HTTP_B_URI_RAW, hd + t0, t1 - t0);
        set_buf(s, VN_HTTP_B_START, NULL, 0);       /* filled below */
        /* http.uri */
        const uint8_t *u = hd + t0;
        uint32_t un = t1 - t0, auth0 = 0, authn = 0;
        int absolute = 0;
        if (un >= 7 && ieq(u, 7, "http://"))
            absolute = 7;
        else if (un >= 8 && ieq(u, 8, "https://"))
            absolute = 8;
        if (absolute) {
            auth0 = (uint32_t)absolute;
            uint32_t j = auth0;
            while (j < un && u[j] != '/' && u[j] != '?' && u[j] != '#')
                j++;
            authn = j - auth0;
            u += j;
            un -= j;
        }
        uint32_t q = 0;
        while (q < un && u[q] != '?')
            q++;
        if (!room(s, 2 * un + 2 * (authn + 1) + 4))      /* decoded path, URI, host twice */
            return VN_HTTP_E_NOMEM;
        uint8_t *tmp = s->arena + s->arena_len;
        uint32_t pn = decode(u, q, tmp, 1);
        s->arena_len += pn;
        uint8_t *uri = s->arena + s->arena_len;
        uint32_t n;
        if (absolute && pn == 0) {
            uri[0] = '/';
            n = 1;
        } else if (pn && tmp[0] == '/') {
            n = norm_path(tmp, pn, uri);
        } else {
            memcpy(uri, tmp, pn);
            n = pn;
        }
        n += decode(u + q, un - q, uri + n, 0);
        s->arena_len += n;
        set_buf(s, VN_HTTP_B_URI, uri, n);
        if (absolute) {
            const uint8_t *a = hd + t0 + auth0;
            set_buf(s, VN_HTTP_B_HOST_RAW, ap(s, a, authn), authn);
            uint8_t *o = s->arena + s->arena_len;
            uint32_t hn = norm_host(a, authn, o);
            s->arena_len += hn;
            set_buf(s, VN_HTTP_B_HOST, o, hn);
        }
    } else {
        uint32_t i = 0;
        while (i < l0 && hd[i] != ' ' && hd[i] != '\t')
            i++;
        set_buf(s, VN_HTTP_B_PROTOCOL, hd, i);
        while (i < l0 && (hd[i] == ' ' || hd[i] == '\t'))
            i++;
        uint32_t c0 = i;
        while (i < l0 && hd[i] != ' ' && hd[i] != '\t')
            i++;
        set_buf(s, VN_HTTP_B_STAT_CODE, hd + c0, i - c0);
        while (i < l0 && (hd[i] == ' ' || hd[i] == '\t'))
            i++;
        set_buf(s, VN_HTTP_B_STAT_MSG, hd + i, l0 - i);
        set_buf(s, VN_HTTP_B_RESPONSE_LINE, hd, l0);
    }
    /* http.header.raw: everything after the start line, the empty line included */
    uint32_t r0 = l0;
    if (r0 < s->head_len && hd[r0] == '\r')
        r0++;
    if (r0 < s->head_len && hd[r0] == '\n')
        r0++;
    if (s->nf)
        set_buf(s, VN_HTTP_B_HEADER_RAW, hd + r0, s->head_len - r0);
    /* http.header: "Name: value\r\n" per field but the cookies, then "\r\n" */
    uint32_t cookie = side == VN_HTTP_REQ ? F_COOKIE : F_SET_COOKIE;
    uint8_t *hb = s->arena + s->arena_len;
    uint32_t hn = 0, nc = 0;
    for (uint32_t i = 0; i < s->nf; i++) {
        const struct field *f = &s->f[i];
        if (f->id == cookie)
            continue;
        ap(s, hd + f->no, f->nl);
        ap(s, ": ", 2);
        ap(s, f->v, f->vl);
        ap(s, "\r\n", 2);
        hn += f->nl + f->vl + 4;
        nc++;
    }
    if (nc) {
        ap(s, "\r\n", 2);
        set_buf(s, VN_HTTP_B_HEADER, hb, hn + 2);
    }
    /* http.start: the start line and every field, normalised, then "\r\n" */
    uint8_t *sb = s->arena + s->arena_len;
    ap(s, hd, l0);
    ap(s, "\r\n", 2);
    uint32_t sn = l0 + 2;
    for (uint32_t i = 0; i < s->nf; i++) {
        const struct field *f = &s->f[i];
        ap(s, hd + f->no, f->nl);
        ap(s, ": ", 2);
        ap(s, f->v, f->vl);
        ap(s, "\r\n", 2);
        sn += f->nl + f->vl + 4;
    }
    ap(s, "\r\n", 2);
    set_buf(s, VN_HTTP_B_START, sb, sn + 2);
    /* http.header_names: "\r\n" Name "\r\n" ... "\r\n" */
    if (s->nf) {
        uint8_t *nb = s->arena + s->arena_len;
        uint32_t nn = 2;
        ap(s, "\r\n", 2);
        for (uint32_t i = 0; i < s->nf; i++) {
            ap(s, hd + s->f[i].no, s->f[i].nl);
            ap(s, "\r\n", 2);
            nn += s->f[i].nl + 2;
        }
        ap(s, "\r\n", 2);
        set_buf(s, VN_HTTP_B_HEADER_NAMES, nb, nn + 2);
    }
    uint32_t cnt;
    join_field(s, VN_HTTP_B_COOKIE, cookie, &cnt);
    join_field(s, VN_HTTP_B_CONTENT_TYPE, F_CONTENT_TYPE, &cnt);
    join_field(s, VN_HTTP_B_CONTENT_LEN, F_CONTENT_LENGTH, &cnt);
    if (side == VN_HTTP_REQ) {
        join_field(s, VN_HTTP_B_USER_AGENT, F_USER_AGENT, &cnt);
        join_field(s, VN_HTTP_B_ACCEPT, F_ACCEPT, &cnt);
        join_field(s, VN_HTTP_B_ACCEPT_LANG, F_ACCEPT_LANGUAGE, &cnt);
        join_field(s, VN_HTTP_B_ACCEPT_ENC, F_ACCEPT_ENCODING, &cnt);
        join_field(s, VN_HTTP_B_REFERER, F_REFERER, &cnt);
        join_field(s, VN_HTTP_B_CONNECTION, F_CONNECTION, &cnt);
        if (!(s->present & 1u << VN_HTTP_B_HOST_RAW)) {
            join_field(s, VN_HTTP_B_HOST_RAW, F_HOST, &cnt);
            if (cnt && !room(s, s->bl[VN_HTTP_B_HOST_RAW]))
                return VN_HTTP_E_NOMEM;
            if (cnt == 1) {
                uint8_t *o = s->arena + s->arena_len;
                uint32_t n = norm_host(s->bp[VN_HTTP_B_HOST_RAW], s->bl[VN_HTTP_B_HOST_RAW], o);
                s->arena_len += n;
                set_buf(s, VN_HTTP_B_HOST, o, n);
            } else if (cnt > 1) {           /* several: lower case, as they are */
                uint8_t *o = ap(s, s->bp[VN_HTTP_B_HOST_RAW], s->bl[VN_HTTP_B_HOST_RAW]);
                for (uint32_t i = 0; i < s->bl[VN_HTTP_B_HOST_RAW]; i++)
                    o[i] = lc(o[i]);
                set_buf(s, VN_HTTP_B_HOST, o, s->bl[VN_HTTP_B_HOST_RAW]);
            }
        }
    } else {
        join_field(s, VN_HTTP_B_SERVER, F_SERVER, &cnt);
        join_field(s, VN_HTTP_B_LOCATION, F_LOCATION, &cnt);
    }
    return 0;
}

/* ---------------------------------------------------------------- heads */

/* Splits the head into its fields (obs-fold continuations joined with one space). */
static int split_fields(struct side *s)
{
    const uint8_t *hd = s->head;
    uint32_t i = s->line0_len, n = s->head_len;
    s->nf = 0;
    /* past the first line's end */
    while (i < n && hd[i] != '\n')
        i++;
    i++;
    while (i < n) {
        const uint8_t *lf = memchr(hd + i, '\n', n - i);
        uint32_t j = lf ? (uint32_t)(lf - hd) : n;
        uint32_t e = j;
        if (e > i && hd[e - 1] == '\r')
            e--;
        if (e == i)
            break;                          /* the empty line */
        if (hd[i] == ' ' || hd[i] == '\t') {
            /* obs-fold: a continuation of the previous field's value */
            if (!s->nf)
                return VN_HTTP_E_SYNTAX;
            struct field *f = &s->f[s->nf - 1];
            uint32_t a = i, b = e;
            while (a < b && (hd[a] == ' ' || hd[a] == '\t'))
                a++;
            while (b > a && (hd[b - 1] == ' ' || hd[b - 1] == '\t'))
                b--;
            /* the joined value goes into the arena's fold area (at most twice the head's size:
             * a value already there, at its end, grows in place) */
            if (!room(s, f->vl + 1 + (e - i)))
                return VN_HTTP_E_NOMEM;
            uint8_t *p = s->arena + s->arena_len;
            uint32_t vl = f->vl;
            if (f->v + f->vl == p && f->v >= s->arena)
                p = (uint8_t *)f->v, s->arena_len -= vl;
            else
                memcpy(p, f->v, vl);
            if (b > a) {
                p[vl++] = ' ';
                memcpy(p + vl, hd + a, b - a);
                vl += b - a;
            }
            s->arena_len += vl;
            f->v = p;
            f->vl = vl;
        } else {
            if (s->nf >= VN_HTTP_FIELDS_MAX)
                return VN_HTTP_E_SYNTAX;
            uint32_t c = i;
            while (c < e && tchar(hd[c]))
                c++;
            /* a name, then the colon at once: whitespace before it is read differently by
             * different servers (RFC 9112 5.1 says reject) */
            if (c == i || c >= e || hd[c] != ':')
                return VN_HTTP_E_SYNTAX;
            uint32_t a = c + 1, b = e;
            while (a < b && (hd[a] == ' ' || hd[a] == '\t'))
                a++;
            while (b > a && (hd[b - 1] == ' ' || hd[b - 1] == '\t'))
                b--;
            struct field *f = &s->f[s->nf++];
            f->no = i;
            f->nl = c - i;
            f->id = field_id(hd + i, c - i);
            f->v = hd + a;
            f->vl = b - a;
        }
        i = j + 1;
    }
    return 0;
}

/* The last comma-separated token of a field list, trimmed. */
static void last_token(const uint8_t *v, uint32_t n, const uint8_t **t, uint32_t *tn)
{
    uint32_t e = n;
    while (e > 0 && (v[e - 1] == ' ' || v[e - 1] == '\t'))
        e--;
    uint32_t b = e;
    while (b > 0 && v[b - 1] != ',')
        b--;
    while (b < e && (v[b] == ' ' || v[b] == '\t'))
        b++;
    *t = v + b;
    *tn = e - b;
}

/* The message's body framing from its fields: 0 none, 1 Content-Length (s->left), 2 chunked,
 * 3 to the end of the connection; or an error. */
static int framing(struct side *s, int side)
{
    int te = 0, chunked = 0, have_cl = 0;
    uint64_t cl = 0;
    for (uint32_t i = 0; i < s->nf; i++) {
        const struct field *f = &s->f[i];
        if (f->id == F_TRANSFER_ENCODING) {
            const uint8_t *t;
            uint32_t tn;
            last_token(f->v, f->vl, &t, &tn);
            te = 1;
            chunked = ieq(t, tn, "chunked");    /* the last field's last coding decides */
        } else if (f->id == F_CONTENT_LENGTH) {
            /* a list of equal values is one value (RFC 9110 8.6); anything else is ambiguous */
            uint32_t k = 0;
            while (k <= f->vl) {
                uint32_t a = k;
                while (k < f->vl && f->v[k] != ',')
                    k++;
                uint32_t b = k;
                while (a < b && (f->v[a] == ' ' || f->v[a] == '\t'))
                    a++;
                while (b > a && (f->v[b - 1] == ' ' || f->v[b - 1] == '\t'))
                    b--;
                if (b == a || b - a > 18)
                    return side == VN_HTTP_REQ ? VN_HTTP_E_SMUGGLING : 3;
                uint64_t v = 0;
                for (uint32_t x = a; x < b; x++) {
                    if (f->v[x] < '0' || f->v[x] > '9')
                        return side == VN_HTTP_REQ ? VN_HTTP_E_SMUGGLING : 3;
                    v = v * 10 + (uint64_t)(f->v[x] - '0');
                }
                if (have_cl && v != cl)
                    return side == VN_HTTP_REQ ? VN_HTTP_E_SMUGGLING : 3;
                cl = v;
                have_cl = 1;
                k++;
            }
        }
    }
    /* a request the server may frame differently from us is refused (smuggling); a response
     * is read as a client reads it: Transfer-Encoding over Content-Length, and a length it
     * cannot trust runs to the end of the connection (RFC 9112 6.3) */
    if (te && have_cl && side == VN_HTTP_REQ)
        return VN_HTTP_E_SMUGGLING;
    if (te && !chunked)
        return side == VN_HTTP_REQ ? VN_HTTP_E_SMUGGLING : 3;
    if (te)
        return 2;
    if (have_cl) {
        s->left = cl;
        return cl ? 1 : 0;
    }
    return side == VN_HTTP_REQ ? 0 : 3;
}

static int has_field(const struct side *s, uint32_t id)
{
    for (uint32_t i = 0; i < s->nf; i++)
        if (s->f[i].id == id)
            return 1;
    return 0;
}

static void end_message(struct vn_http *h, int side);

static void copy_name(char *dst, size_t cap, const struct side *s, int b, uint8_t *trunc, uint8_t bit)
{
    uint32_t n = (s->present >> b) & 1 ? s->bl[b] : 0;
    if (n >= cap) {
        n = (uint32_t)cap - 1;
        *trunc |= bit;
    }
    if (n)
        memcpy(dst, s->bp[b], n);
    dst[n] = 0;
}

/* Keeps the names of the request just queued in pend slot `slot` (hold_resp readers). */
static int keep_info(struct vn_http *h, const struct side *s, unsigned slot)
{
    struct vn_http_reqinfo *ri = h->info[slot];
    if (!ri) {
        if (!(ri = malloc(sizeof *ri)))
            return VN_HTTP_E_NOMEM;
        h->info[slot] = ri;
        h->mem += sizeof *ri;
    }
    ri->trunc = 0;
    copy_name(ri->method, sizeof ri->method, s, VN_HTTP_B_METHOD, &ri->trunc, 1);
    copy_name(ri->host, sizeof ri->host, s, VN_HTTP_B_HOST, &ri->trunc, 2);
    copy_name(ri->url, sizeof ri->url, s, VN_HTTP_B_URI_RAW, &ri->trunc, 4);
    return 0;
}

/* The head is complete: fields, buffers, framing.  Returns an event or an error. */
static int head_done(struct vn_http *h, int side)
{
    struct side *s = &h->s[side];
    int e = grow(h, &s->arena, &s->arena_cap, ARENA_NEED(s->head_len), ARENA_NEED(VN_HTTP_HEAD_MAX));
    if (e)
        return e < -1 ? e : VN_HTTP_E_NOMEM;
    s->arena_len = 0;
    s->present = 0;
    s->overflow = 0;
    if ((e = split_fields(s)) < 0)
        return e;
    /* the fold area stays at the arena's start; buffers follow it */
    if ((e = build_bufs(h, s, side)) < 0)
        return e;
    if (s->overflow)
        return VN_HTTP_E_NOMEM;
    s->has_body = 0;
    s->body_len = 0;
    s->body_ev = 0;
    if (side == VN_HTTP_REQ) {
        h->seen_request = 1;
        uint8_t kind = 0;
        const uint8_t *m = s->bp[VN_HTTP_B_METHOD];
        uint32_t ml = s->bl[VN_HTTP_B_METHOD];
        if (ml == 4 && !memcmp(m, "HEAD", 4))
            kind |= K_HEAD;
        if (ml == 7 && !memcmp(m, "CONNECT", 7))
            kind |= K_CONNECT;
        if (has_field(s, F_UPGRADE))
            kind |= K_UPGRADE;
        h->tunnel_probe = 0;            /* a request after an accepted CONNECT: still HTTP */
        int fr = framing(s, side);
        if (fr < 0)
            return fr;
        uint8_t rs = h->s[VN_HTTP_RESP].state;
        if (rs == ST_DEAD || rs == ST_BODY_CLOSE) {
            /* no response will be read any more (the server is not speaking HTTP, or its
             * last response runs to the connection's end): nothing to frame, nothing to wait for */
            kind &= (uint8_t)~(K_CONNECT | K_UPGRADE);
        } else if (h->pend_n >= VN_HTTP_PIPELINE_MAX && !h->hold_resp) {
            /* more requests wait than responses are framed for, and no rule reads responses:
             * responses are not read any more (nothing else needs them) */
            go_dead(h, &h->s[VN_HTTP_RESP]);
            kind &= (uint8_t)~(K_CONNECT | K_UPGRADE);
        } else {
            if (h->pend_n >= VN_HTTP_PIPELINE_MAX)
                return VN_HTTP_E_PIPELINE;
            unsigned slot = (h->pend_head + h->pend_n) % VN_HTTP_PIPELINE_MAX;
            if (h->hold_resp && (e = keep_info(h, s, slot)) < 0)
                return e;
            h->pend[slot] = kind;
            h->pend_n++;
        }
        s->kind = kind;
        s->has_body = fr != 0;
        s->keep_body = h->want_body && s->has_body;
        s->state = fr == 1 ? ST_BODY_CL : fr == 2 ? ST_CHUNK_SIZE : ST_START;
        if (!s->keep_body)
            s->inspecting = 0;
        if (!fr)
            end_message(h, side);
        return VN_HTTP_EV_HEAD;
    }
    /* a response */
    const uint8_t *c = s->bp[VN_HTTP_B_STAT_CODE];
    uint32_t cl = s->bl[VN_HTTP_B_STAT_CODE];
    if (cl != 3 || c[0] < '1' || c[0] > '5' || c[1] < '0' || c[1] > '9' || c[2] < '0' || c[2] > '9')
        return VN_HTTP_E_SYNTAX;
    int code = (c[0] - '0') * 100 + (c[1] - '0') * 10 + (c[2] - '0');
    s->inspecting = 0;
    struct side *rq = &h->s[VN_HTTP_REQ];
    /* the request this response answers (an interim one too, without taking it off the queue) */
    h->has_answered = 0;
    if (h->pend_n && h->info[h->pend_head]) {
        h->answered = *h->info[h->pend_head];
        h->has_answered = 1;
    }
    if (code == 101) {                   /* switched protocols: a tunnel from here */
        go_dead(h, s);
        go_dead(h, rq);
        return VN_HTTP_EV_HEAD;
    }
    if (code < 200) {                   /* interim: no body, the request still waits */
        s->state = ST_START;
        return VN_HTTP_EV_HEAD;
    }
    uint8_t kind = 0;
    if (h->pend_n) {
        struct vn_http_reqinfo *ri = h->info[h->pend_head];
        if (ri) {                       /* answered: an idle connection keeps no names */
            free(ri);
            h->info[h->pend_head] = NULL;
            h->mem -= sizeof *ri;
        }
        kind = h->pend[h->pend_head];
        h->pend_head = (h->pend_head + 1) % VN_HTTP_PIPELINE_MAX;
        h->pend_n--;
    }
    if ((kind & K_CONNECT) && code < 300) {
        /* accepted: a proxy tunnels from here, but some servers answer CONNECT with an
         * ordinary handler and go on reading requests.  The request side reads on: a request
         * line keeps it HTTP, anything else makes it the tunnel it was said to be. */
        go_dead(h, s);
        if (rq->state == ST_WAIT)
            rq->state = ST_START;
        h->tunnel_probe = 1;
        return VN_HTTP_EV_HEAD;
    }
    if (rq->state == ST_WAIT && (kind & (K_CONNECT | K_UPGRADE)))
        rq->state = ST_START;           /* not switched: the client's next bytes are HTTP again */
    int fr = (kind & K_HEAD) || code == 204 || code == 304 ? 0 : framing(s, side);
    if (fr < 0)
        return fr;
    s->state = fr == 1 ? ST_BODY_CL : fr == 2 ? ST_CHUNK_SIZE : fr == 3 ? ST_BODY_CLOSE : ST_START;
    if (!fr)
        end_message(h, side);
    return VN_HTTP_EV_HEAD;
}

static void end_message(struct vn_http *h, int side)
{
    struct side *s = &h->s[side];
    s->state = (side == VN_HTTP_REQ && (s->kind & (K_CONNECT | K_UPGRADE))) ? ST_WAIT : ST_START;
    s->kind = 0;
}

/* Methods a server acts on even without a version on the line (busybox httpd reads the
 * headers of "GET /x" too; Apache answers it as HTTP/0.9). */
static int known_method(const uint8_t *m, uint32_t n)
{
    static const char *const k[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE",
                                    "CONNECT", "PATCH", "PROPFIND", "PROPPATCH", "MKCOL", "COPY",
                                    "MOVE", "LOCK", "UNLOCK", "SEARCH"};
    for (size_t i = 0; i < sizeof k / sizeof *k; i++)
        if (strlen(k[i]) == n && !memcmp(m, k[i], n))
            return 1;
    return 0;
}

/* The version at the end of a request line (trailing separators allowed): HTTP/d+.d+ */
static int has_version(const uint8_t *hd, uint32_t i, uint32_t n)
{
    while (n > i && ws(hd[n - 1]))
        n--;
    uint32_t k = n;
    while (k > i && !ws(hd[k - 1]))
        k--;
    if (k <= i || n - k < 8 || memcmp(hd + k, "HTTP/", 5))
        return 0;
    uint32_t x = k + 5, d1 = 0, d2 = 0;
    while (x < n && hd[x] >= '0' && hd[x] <= '9')
        x++, d1++;
    if (!d1 || x >= n || hd[x++] != '.')
        return 0;
    while (x < n && hd[x] >= '0' && hd[x] <= '9')
        x++, d2++;
    return d2 && x == n;
}

/* Is the first line HTTP?  While it arrives (line_done 0) only its first bytes can say no: a
 * request starts with a method token and a separator, a response with "HTTP/".  At its end,
 * a request line is HTTP if it ends in a version or starts with a method servers know;
 * 0 yes (or not yet known), 1 not HTTP, 2 HTTP but malformed (a control byte in the target:
 * servers differ on it, so it fails closed). */
static int not_http_yet(const struct side *s, int side, int line_done)
{
    const uint8_t *hd = s->head;
    uint32_t n = s->line_len;
    if (side == VN_HTTP_RESP) {
        uint32_t k = n < 5 ? n : 5;
        return memcmp(hd, "HTTP/", k) != 0;
    }
    uint32_t i = 0;
    while (i < n && tchar(hd[i]))
        i++;
    if (i == n)
        return line_done ? 1 : 0;
    if (i == 0 || !ws(hd[i]))
        return 1;
    if (!line_done)
        return 0;
    uint32_t t = i;
    while (t < n && ws(hd[t]))
        t++;
    if (t == n)
        return 1;                       /* a method and nothing after it */
    if (!has_version(hd, i, n) && !known_method(hd, i))
        return 1;
    for (uint32_t k = t; k < n; k++)
        if ((hd[k] < 0x20 && !ws(hd[k])) || hd[k] == 0x7f)
            return 2;
    return 0;
}

/* Head bytes: copies until the empty line.  Returns the bytes used and sets *ev, or an error. */
static int64_t feed_head(struct vn_http *h, int side, const uint8_t *d, size_t len, int *ev)
{
    struct side *s = &h->s[side];
    size_t i = 0;
    for (; i < len; i++) {
        if ((s->first_done || s->method_done) && !s->cr && d[i] != '\n') {
            /* the rest of a line at once: up to its LF, with no NUL and no CR but before the
             * LF (or at the input's end, where the LF must come next) */
            const uint8_t *nl = memchr(d + i, '\n', len - i);
            size_t end = nl ? (size_t)(nl - d) : len, run = end - i;
            const uint8_t *cr = memchr(d + i, '\r', run);
            if ((cr && cr != d + end - 1) || memchr(d + i, 0, run))
                return VN_HTTP_E_SYNTAX;
            if (s->head_len + run > VN_HTTP_HEAD_MAX)
                return VN_HTTP_E_HEAD_TOO_LONG;
            int e = grow(h, &s->head, &s->head_cap, s->head_len + (uint32_t)run, VN_HTTP_HEAD_MAX);
            if (e)
                return VN_HTTP_E_NOMEM;
            memcpy(s->head + s->head_len, d + i, run);
            s->head_len += (uint32_t)run;
            s->line_len += (uint32_t)(run - (cr ? 1 : 0));
            s->cr = cr != NULL;
            i = end - 1;                /* the loop's i++ lands on the LF (or the end) */
            continue;
        }
        uint8_t c = d[i];
        if (s->head_len >= VN_HTTP_HEAD_MAX)
            return VN_HTTP_E_HEAD_TOO_LONG;
        if (s->head_len >= s->head_cap) {
            int e = grow(h, &s->head, &s->head_cap, s->head_len + 1, VN_HTTP_HEAD_MAX);
            if (e)
                return e < -1 ? e : VN_HTTP_E_NOMEM;
        }
        if (s->cr && c != '\n')
            return VN_HTTP_E_SYNTAX;    /* a bare CR: servers split lines differently on it */
        if (c == 0)
            return VN_HTTP_E_SYNTAX;
        s->head[s->head_len++] = c;
        if (c == '\r') {
            s->cr = 1;
            continue;
        }
        if (c != '\n') {
            s->line_len++;
            /* the method and its separator are decided in the first bytes (the whole line is
             * checked at its end) */
            if (!s->first_done && !s->method_done) {
                if (not_http_yet(s, side, 0))
                    goto not_http;
                if (side == VN_HTTP_RESP ? s->line_len >= 5 : ws(c))
                    s->method_done = 1;
            }
            continue;
        }
        /* the end of a line */
        s->cr = 0;
        if (!s->first_done) {
            int nh = not_http_yet(s, side, 1);
            if (nh == 2)
                return VN_HTTP_E_SYNTAX;
            if (nh)
                goto not_http;
            /* a line without a version is read with its fields too (busybox does; a server
             * that answers it as HTTP/0.9 ignores them, and holding them costs nothing) */
            s->first_done = 1;
            s->line0_len = s->line_len;
            s->line_len = 0;
            continue;
        }
        if (s->line_len == 0) {
            int r = head_done(h, side);
            if (r < 0)
                return r;
            *ev = r;
            return (int64_t)i + 1;
        }
        s->line_len = 0;
    }
    return (int64_t)i;
not_http:
    /* not HTTP: a first request (or the first after a CONNECT the server accepted) means the
     * connection is something else, and the rules for HTTP do not apply to it; after HTTP
     * was spoken it is an error (fail closed) */
    if (side == VN_HTTP_REQ && h->seen_request && !h->tunnel_probe)
        return VN_HTTP_E_SYNTAX;
    if (side == VN_HTTP_REQ)
        go_dead(h, &h->s[VN_HTTP_RESP]);
    go_dead(h, s);
    return (int64_t)len;
}

static void keep(struct vn_http *h, struct side *s, const uint8_t *d, size_t n)
{
    if (!s->keep_body || s->body_ev)
        return;
    uint32_t room = h->body_limit - s->body_len;
    if (n > room)
        n = room;
    if (!n)
        return;
    if (grow(h, &s->body, &s->body_cap, s->body_len + (uint32_t)n, h->body_limit))
        return;                          /* no memory: the body buffer stays as it is */
    memcpy(s->body + s->body_len, d, n);
    s->body_len += (uint32_t)n;
}

/* Body bytes (Content-Length or a chunk's data): up to what is left of it, kept for
 * inspection if wanted.  Returns the bytes used. */
static size_t take_body(struct vn_http *h, struct side *s, const uint8_t *d, size_t len)
{
    size_t n = len < s->left ? len : (size_t)s->left;
    keep(h, s, d, n);
    s->left -= n;
    return n;
}

/* Inflates `in` (gzip or zlib, or raw deflate when `raw`) into `out`, at most `max` bytes: the
 * bytes produced (what decodes of a body cut at the limit, or before damage, is kept), or -1
 * if nothing decoded and the stream did not end there (not this coding: an empty stream that
 * ends is a body of 0 bytes). */
static int64_t inflate_to(const uint8_t *in, uint32_t n, uint8_t *out, uint32_t max, int raw)
{
    z_stream z;
    memset(&z, 0, sizeof z);
    if (inflateInit2(&z, raw ? -15 : 15 + 32) != Z_OK)
        return -1;
    z.next_in = (Bytef *)in;
    z.avail_in = n;
    z.next_out = out;
    z.avail_out = max;
    int rc;
    do
        rc = inflate(&z, Z_NO_FLUSH);
    while (rc == Z_OK && z.avail_out && z.avail_in);
    uint32_t got = max - z.avail_out;
    inflateEnd(&z);
    return got || rc == Z_STREAM_END ? (int64_t)got : -1;
}

/* A request body sent with Content-Encoding gzip, x-gzip or deflate (servers such as Apache's
 * mod_deflate input filter decode it before the application reads it; Suricata inspects it
 * decoded): the body the rules see is decoded, at most body_limit bytes, each coding undone
 * in reverse order.  Any other coding (br, compress, ...) leaves the body as sent. */
static void decode_body(struct vn_http *h, struct side *s)
{
    const uint8_t *tok[8];
    uint32_t tl[8], nt = 0;
    for (uint32_t i = 0; i < s->nf; i++) {
        const struct field *f = &s->f[i];
        if (f->id != F_CONTENT_ENCODING)
            continue;
        uint32_t k = 0;
        while (k < f->vl) {
            uint32_t a = k;
            while (k < f->vl && f->v[k] != ',')
                k++;
            uint32_t b = k++;
            while (a < b && (f->v[a] == ' ' || f->v[a] == '\t'))
                a++;
            while (b > a && (f->v[b - 1] == ' ' || f->v[b - 1] == '\t'))
                b--;
            if (b == a || ieq(f->v + a, b - a, "identity"))
                continue;
            if (nt == 8 || !(ieq(f->v + a, b - a, "gzip") || ieq(f->v + a, b - a, "x-gzip") ||
                             ieq(f->v + a, b - a, "deflate")))
                return;                  /* a coding it does not know: as sent */
            tok[nt] = f->v + a;
            tl[nt++] = b - a;
        }
    }
    if (!nt || !s->body_len)
        return;
    if (s->dbody) {                      /* an earlier message's, not yet given back */
        h->mem -= s->dbody_cap;
        free(s->dbody);
        s->dbody = NULL;
        s->dbody_cap = 0;
    }
    const uint8_t *src = s->body;
    uint32_t srclen = s->body_len;
    uint8_t *bufs[2] = {NULL, NULL};
    uint32_t cap = h->body_limit;
    int failed = 0;
    for (uint32_t j = nt; j-- > 0;) {
        uint8_t **dst = &bufs[(nt - 1 - j) & 1];
        if (!*dst) {
            *dst = malloc(cap ? cap : 1);
            if (!*dst) {
                failed = 1;              /* read as sent, not half decoded */
                break;
            }
        }
        int deflate = ieq(tok[j], tl[j], "deflate");
        int64_t got = inflate_to(src, srclen, *dst, cap, 0);
        if (got < 0 && deflate)          /* deflate as raw deflate, as browsers accept it */
            got = inflate_to(src, srclen, *dst, cap, 1);
        if (got < 0) {
            failed = 1;
            break;
        }
        src = *dst;
        srclen = (uint32_t)got;
    }
    /* keep the last result (none if a step did not decode: the body is read as sent, as a
     * server that cannot decode it refuses it), give back the other buffer */
    uint8_t *keepb = !failed && (uint8_t *)src != s->body ? (uint8_t *)src : NULL;
    for (int b = 0; b < 2; b++)
        if (bufs[b] && bufs[b] != keepb)
            free(bufs[b]);
    if (!keepb)
        return;
    s->dbody = keepb;
    s->dbody_cap = cap ? cap : 1;
    h->mem += s->dbody_cap;
    s->bp[VN_HTTP_B_REQUEST_BODY] = s->dbody;
    s->bl[VN_HTTP_B_REQUEST_BODY] = srclen;
}

/* The request body is complete or at its limit: the BODY event. */
static int body_event(struct vn_http *h, struct side *s)
{
    s->body_ev = 1;
    s->inspecting = 0;
    s->present |= 1u << VN_HTTP_B_REQUEST_BODY;
    s->bp[VN_HTTP_B_REQUEST_BODY] = s->body;
    s->bl[VN_HTTP_B_REQUEST_BODY] = s->body_len;
    decode_body(h, s);
    return VN_HTTP_EV_BODY;
}

int64_t vn_http_feed(struct vn_http *h, int side, const uint8_t *d, size_t len, int *ev)
{
    *ev = VN_HTTP_EV_NONE;
    if (!h || (side != 0 && side != 1) || (!d && len))
        return VN_HTTP_E_SYNTAX;
    struct side *s = &h->s[side];
    size_t i = 0;
    int64_t r = 0;
    if (s->state != ST_HEAD && !s->inspecting && s->present)
        release(h, s);                  /* the last message's events were delivered */
    if (side == VN_HTTP_REQ && s->state == ST_WAIT) {
        uint8_t rs = h->s[VN_HTTP_RESP].state;
        if (rs == ST_DEAD || rs == ST_BODY_CLOSE)
            s->state = ST_START;        /* no answer will come: read on as HTTP */
    }
    while (i < len && *ev == VN_HTTP_EV_NONE) {
        if (s->keep_body && !s->body_ev && s->state >= ST_BODY_CL && s->state <= ST_TRAILER &&
            s->pos + i - s->msg_start > (uint64_t)VN_HTTP_HEAD_MAX + 4ull * h->body_limit + 65536) {
            /* chunk framing (long extensions, tiny chunks) must not hold a message without
             * bound before its body reaches the limit: the body is inspected as it stands */
            *ev = body_event(h, s);
            break;
        }
        switch (s->state) {
        case ST_DEAD:
            i = len;
            break;
        case ST_WAIT:
            goto out;                   /* consumes nothing until the response came */
        case ST_START:
            if (d[i] == '\r' || d[i] == '\n') {  /* empty lines before a message are ignored */
                i++;
                break;
            }
            s->state = ST_HEAD;
            s->msg_start = s->pos + i;
            s->inspecting = side == VN_HTTP_REQ || h->hold_resp;
            s->first_done = 0;
            s->method_done = 0;
            s->cr = 0;
            s->line_len = 0;
            s->head_len = 0;
            s->present = 0;
            s->nf = 0;
            break;
        case ST_HEAD:
            r = feed_head(h, side, d + i, len - i, ev);
            if (r < 0)
                goto fail_r;
            i += (size_t)r;
            if (s->state == ST_DEAD)
                i = len;
            break;
        case ST_BODY_CL:
            i += take_body(h, s, d + i, len - i);
            if (s->keep_body && !s->body_ev && (s->body_len >= h->body_limit || !s->left))
                *ev = body_event(h, s);
            if (!s->left)
                end_message(h, side);
            break;
        case ST_CHUNK_SIZE: {
            uint8_t c = d[i++];
            if (c != '\n') {
                if (s->cline_len >= CHUNK_LINE_MAX) {
                    r = VN_HTTP_E_CHUNK;
                    goto fail_r;
                }
                s->cline[s->cline_len++] = (char)c;
                break;
            }
            uint32_t n = s->cline_len, k = 0;
            if (n && s->cline[n - 1] == '\r')
                n--;
            uint64_t v = 0;
            while (k < n && hexv((uint8_t)s->cline[k]) >= 0 && k < 15)
                v = v << 4 | (uint64_t)hexv((uint8_t)s->cline[k++]);
            if (k == 0 || (k < n && s->cline[k] != ';' && s->cline[k] != ' ' && s->cline[k] != '\t')) {
                r = VN_HTTP_E_CHUNK;
                goto fail_r;
            }
            for (uint32_t x = k; x < n; x++)
                if (s->cline[x] == '\r') {
                    r = VN_HTTP_E_CHUNK;
                    goto fail_r;
                }
            s->cline_len = 0;
            s->left = v;
            s->trailer_len = 0;
            s->state = v ? ST_CHUNK_DATA : ST_TRAILER;
            s->line_len = 0;
            break;
        }
        case ST_CHUNK_DATA: {
            i += take_body(h, s, d + i, len - i);
            if (!s->left)
                s->state = ST_CHUNK_END, s->cr = 0;
            if (s->keep_body && !s->body_ev && s->body_len >= h->body_limit)
                *ev = body_event(h, s);
            break;
        }
        case ST_CHUNK_END: {
            uint8_t c = d[i++];
            if (c == '\r' && !s->cr) {
                s->cr = 1;
                break;
            }
            if (c != '\n') {
                r = VN_HTTP_E_CHUNK;
                goto fail_r;
            }
            s->cr = 0;
            s->state = ST_CHUNK_SIZE;
            break;
        }
        case ST_TRAILER: {
            uint8_t c = d[i++];
            if (++s->trailer_len > TRAILER_MAX) {
                r = VN_HTTP_E_CHUNK;
                goto fail_r;
            }
            if (c == '\r')
                break;
            if (c != '\n') {
                s->line_len++;
                break;
            }
            if (s->line_len) {
                s->line_len = 0;
                break;
            }
            if (s->keep_body && !s->body_ev)
                *ev = body_event(h, s);
            end_message(h, side);
            break;
        }
        case ST_BODY_CLOSE:
            i = len;
            break;
        }
    }
out:
    s->pos += i;
    return (int64_t)i;
fail_r:
    s->pos += i;
    go_dead(h, s);
    if (side == VN_HTTP_RESP && !h->hold_resp)
        return (int64_t)i;              /* no rule reads responses: a server's odd framing is
                                           not a reason to stop the connection; only framing ends */
    return r;
}

void vn_http_settle(struct vn_http *h, int side)
{
    if (!h || (side != 0 && side != 1))
        return;
    struct side *s = &h->s[side];
    if (s->state != ST_HEAD && !s->inspecting && s->present)
        release(h, s);
}

int vn_http_eof(struct vn_http *h, int side)
{
    if (!h || (side != 0 && side != 1))
        return VN_HTTP_EV_NONE;
    struct side *s = &h->s[side];
    int ev = VN_HTTP_EV_NONE;
    if (s->state == ST_HEAD && s->head_len) {
        /* a head the connection's end cut short: read as it stands (servers act on it) */
        if (!s->first_done) {
            int nh = not_http_yet(s, side, 1);
            if (nh) {
                int bad = nh == 2 || (side == VN_HTTP_REQ && h->seen_request && !h->tunnel_probe);
                go_dead(h, s);
                return bad ? VN_HTTP_E_SYNTAX : VN_HTTP_EV_NONE;
            }
            s->first_done = 1;
            s->line0_len = s->line_len;
        }
        int r = head_done(h, side);
        go_dead(h, s);
        return r;
    } else if (s->keep_body && !s->body_ev && (s->state == ST_BODY_CL || s->state == ST_CHUNK_SIZE ||
               s->state == ST_CHUNK_DATA || s->state == ST_CHUNK_END || s->state == ST_TRAILER)) {
        ev = body_event(h, s);
    }
    go_dead(h, s);
    return ev;
}

int vn_http_buf(const struct vn_http *h, int side, int b, const uint8_t **p, uint32_t *len)
{
    if (!h || (side != 0 && side != 1) || b < 0 || b >= VN_HTTP_NBUF)
        return 0;
    const struct side *s = &h->s[side];
    if (!(s->present & 1u << b))
        return 0;
    static const uint8_t empty[1];
    *p = s->bp[b] ? s->bp[b] : empty;
    *len = s->bl[b];
    return 1;
}

uint64_t vn_http_hold(const struct vn_http *h, int side)
{
    const struct side *s = &h->s[side];
    if (s->state == ST_DEAD)
        return UINT64_MAX;
    return s->inspecting ? s->msg_start : s->pos;
}

uint64_t vn_http_pos(const struct vn_http *h, int side)
{
    return h->s[side].pos;
}

uint64_t vn_http_msg_start(const struct vn_http *h, int side)
{
    return h->s[side].msg_start;
}

const struct vn_http_reqinfo *vn_http_answered(const struct vn_http *h)
{
    return h->has_answered ? &h->answered : NULL;
}

int vn_http_active(const struct vn_http *h, int side)
{
    return h->s[side].state != ST_DEAD;
}

int vn_http_waiting(const struct vn_http *h)
{
    uint8_t rs = h->s[VN_HTTP_RESP].state;
    return h->s[VN_HTTP_REQ].state == ST_WAIT && rs != ST_DEAD && rs != ST_BODY_CLOSE;
}
