/* vhostni's HTTP/1.x message reader (the layer-7 half of the signature stage): sans-I/O and
 * pull-based.  The caller feeds each direction's in-order stream bytes (after the TCP engine's
 * conservative reassembly); the reader stops at every event (a message head complete, a
 * request body complete or at its inspection limit) so the caller can read that message's
 * buffers (the Suricata sticky buffers: http.uri, http.header, ...) and match them.
 *
 * It reads what a server would act on and refuses what servers read differently (request
 * smuggling: Content-Length with Transfer-Encoding, differing Content-Lengths, a
 * Transfer-Encoding not ending in chunked, whitespace before a header's colon, a bare CR, a
 * NUL in a head, a head over VN_HTTP_HEAD_MAX): such a message is an error, and the stage
 * fails closed on it.  A connection whose first request line is not HTTP is left alone
 * (not HTTP: the HTTP rules do not apply to it).
 *
 * No Python in here; no allocation beyond the reader's own buffers (bounded: head, buffers,
 * request body up to the inspection limit), all accounted in vn_http_mem.
 */
#ifndef VN_HTTP_H
#define VN_HTTP_H

#include <stddef.h>
#include <stdint.h>

/* VN_CDEF_BEGIN */
#define VN_HTTP_HEAD_MAX 32768          /* a message head (start line + headers) */
#define VN_HTTP_FIELDS_MAX 256          /* header fields in one head */
#define VN_HTTP_PIPELINE_MAX 64         /* requests awaiting their responses */
#define VN_HTTP_BODY_LIMIT_MAX 16777216 /* the largest request-body inspection limit */

/* sides */
#define VN_HTTP_REQ 0
#define VN_HTTP_RESP 1

/* events */
#define VN_HTTP_EV_NONE 0
#define VN_HTTP_EV_HEAD 1               /* a message's head is complete: its buffers are readable */
#define VN_HTTP_EV_BODY 2               /* a request's body is complete (or at the inspection limit) */

/* errors (negative returns of vn_http_feed) */
#define VN_HTTP_E_HEAD_TOO_LONG -1
#define VN_HTTP_E_SYNTAX -2
#define VN_HTTP_E_SMUGGLING -3
#define VN_HTTP_E_PIPELINE -4
#define VN_HTTP_E_NOMEM -5
#define VN_HTTP_E_CHUNK -6

/* buffers (Suricata's sticky buffer names; both directions where Suricata has both) */
#define VN_HTTP_B_METHOD 0
#define VN_HTTP_B_URI 1
#define VN_HTTP_B_URI_RAW 2
#define VN_HTTP_B_REQUEST_LINE 3
#define VN_HTTP_B_PROTOCOL 4
#define VN_HTTP_B_HEADER 5
#define VN_HTTP_B_HEADER_RAW 6
#define VN_HTTP_B_COOKIE 7
#define VN_HTTP_B_USER_AGENT 8
#define VN_HTTP_B_HOST 9
#define VN_HTTP_B_HOST_RAW 10
#define VN_HTTP_B_ACCEPT 11
#define VN_HTTP_B_ACCEPT_LANG 12
#define VN_HTTP_B_ACCEPT_ENC 13
#define VN_HTTP_B_REFERER 14
#define VN_HTTP_B_CONNECTION 15
#define VN_HTTP_B_CONTENT_TYPE 16
#define VN_HTTP_B_CONTENT_LEN 17
#define VN_HTTP_B_START 18
#define VN_HTTP_B_HEADER_NAMES 19
#define VN_HTTP_B_REQUEST_BODY 20
#define VN_HTTP_B_STAT_CODE 21
#define VN_HTTP_B_STAT_MSG 22
#define VN_HTTP_B_RESPONSE_LINE 23
#define VN_HTTP_B_SERVER 24
#define VN_HTTP_B_LOCATION 25
#define VN_HTTP_NBUF 26

struct vn_http;

/* What names a request in an alert about its response: its method, host (normalised) and
 * raw target, cut to fit (trunc: bit 0 method, 1 host, 2 url), NUL-terminated. */
struct vn_http_reqinfo {
    char method[16];
    char host[64];
    char url[176];
    uint8_t trunc;
};

/* body_limit: request-body bytes kept for inspection; want_body: keep them (and hold a request
 * until its body is read); hold_resp: hold a response until its head is read. */
struct vn_http *vn_http_new(uint32_t body_limit, int want_body, int hold_resp);
void vn_http_free(struct vn_http *h);
/* Feeds `len` in-order bytes of one side.  Returns the bytes consumed (it stops just after
 * an event, and consumes nothing while it waits for the other side: a CONNECT or Upgrade
 * request waits for its response), or a VN_HTTP_E_* error (the side is dead from then on).
 * *ev: the event at the stop (VN_HTTP_EV_*). */
int64_t vn_http_feed(struct vn_http *h, int side, const uint8_t *data, size_t len, int *ev);
/* The end of a side's stream: a head cut short is complete as it stands (servers act on a
 * head ended by the connection's end); returns an event as vn_http_feed's *ev. */
int vn_http_eof(struct vn_http *h, int side);
/* The caller is done with the side's last event: buffers of a message no longer inspected
 * are freed (vn_http_feed does this too, at its start). */
void vn_http_settle(struct vn_http *h, int side);
/* Buffer b of the side's current message: 1 and its bytes, or 0 (absent in this message). */
int vn_http_buf(const struct vn_http *h, int side, int b, const uint8_t **p, uint32_t *len);
/* The side's stream offset (bytes fed and consumed) below which nothing is held for
 * inspection any more: the start of a message whose inspection is not complete, else all. */
uint64_t vn_http_hold(const struct vn_http *h, int side);
/* Bytes of the side consumed so far. */
uint64_t vn_http_pos(const struct vn_http *h, int side);
/* Where the side's current message started (the stream offset of its first byte). */
uint64_t vn_http_msg_start(const struct vn_http *h, int side);
/* 1 while the side reads HTTP, 0 once it does not (not HTTP, a tunnel, an error). */
int vn_http_active(const struct vn_http *h, int side);
/* The request the response side's current message answers (kept from when the request was
 * read, for readers made with hold_resp, so pipelining cannot confuse them); NULL if the
 * response answers none the reader read. */
const struct vn_http_reqinfo *vn_http_answered(const struct vn_http *h);
/* 1 if the request side waits for a response before it can go on (CONNECT, Upgrade). */
int vn_http_waiting(const struct vn_http *h);
size_t vn_http_mem(const struct vn_http *h);
const char *vn_http_strerror(int e);
/* VN_CDEF_END */

#endif
