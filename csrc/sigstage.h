/* vhostni's in-line signature stage (SafeCard's payload stage in the data path): the rule
 * databases of csrc/sig.c bound to one NI, with the rules' headers, the actions and the
 * alerts.  See sigstage.c.
 *
 * Header blob (little-endian), written by vhostni/signatures/stage.py, bounds-checked here:
 *   "VSH3" u32 nrules, u32 track_entries (the threshold table's size: 0 if no rule has
 *          threshold or detection_filter, else a power of two, VN_SIG_TRACK_MIN..MAX),
 *          u32 http_body_limit (request body bytes kept for HTTP rules, <= VN_HTTP_BODY_LIMIT_MAX),
 *          u32 http_memcap_kib (all connections' HTTP reader memory, KiB)
 *   per rule: u8 action (VN_SIGA_*), u8 proto (0 ip, 1 icmp, 6 tcp, 17 udp), u8 dir
 *             (0 any, 1 to_server, 2 to_client), u8 flags (VN_SIGH_*), u32 sid, u32 rev,
 *             u8 th_type (VN_SIGT_*), u8 th_track (VN_SIGK_*), u8 df_track (VN_SIGK_*, 0: no
 *             detection_filter), u8 zero, u32 th_count, th_seconds, df_count, df_seconds
 *             (counts 1..VN_SIG_TRACK_COUNT_MAX, seconds 1..VN_SIG_TRACK_SECONDS_MAX when set),
 *             u32 hmask[VN_SIG_NHG] (an HTTP rule's buffers per group, bit b = VN_HTTP_B_*: the
 *             rule matches a message when every buffer it names matched; 0: not in the group),
 *             u32 n_src4, n_src6, n_dst4, n_dst6, n_sport, n_dport, then the ranges:
 *             src v4 (u32 lo, u32 hi), src v6 (16 bytes lo, 16 bytes hi, big-endian),
 *             dst v4, dst v6, sport (u16 lo, u16 hi), dport (u16 lo, u16 hi)
 * Stream rules come first in the header list (the plain ones, then the HTTP ones), then packet
 * rules (VN_SIGH_STREAM and VN_SIGH_HTTP say which).
 */
#ifndef VN_SIGSTAGE_H
#define VN_SIGSTAGE_H

#include <stddef.h>
#include <stdint.h>

/* VN_CDEF_BEGIN */
#define VN_SIGA_ALERT 0
#define VN_SIGA_DROP 1
#define VN_SIGA_REJECT 2
#define VN_SIGA_PASS 3

#define VN_SIGH_BIDIR 1
#define VN_SIGH_STREAM 2
#define VN_SIGH_HTTP 4          /* an HTTP rule: its contents are in HTTP buffers (with STREAM) */

/* HTTP rule groups: which message and phase a rule is matched at */
#define VN_SIG_HG_REQ 0         /* a request's head */
#define VN_SIG_HG_REQ_BODY 1    /* a request's body (the head's buffers too) */
#define VN_SIG_HG_RESP 2        /* a response's head */
#define VN_SIG_NHG 3

#define VN_SIG_ALERT_RING 4096

/* threshold types and what a threshold or detection_filter tracks */
#define VN_SIGT_NONE 0
#define VN_SIGT_LIMIT 1
#define VN_SIGT_THRESHOLD 2
#define VN_SIGT_BOTH 3
#define VN_SIGK_NONE 0
#define VN_SIGK_SRC 1
#define VN_SIGK_DST 2
#define VN_SIGK_RULE 3
#define VN_SIGK_BOTH 4
#define VN_SIG_TRACK_COUNT_MAX 1000000
#define VN_SIG_TRACK_SECONDS_MAX 604800
#define VN_SIG_TRACK_MIN 8
#define VN_SIG_TRACK_MAX 1048576
#define VN_SIG_TRACK_WAYS 8

/* The threshold table of a stage (vn_sigstage_track_stats). */
struct vn_sig_track_stats {
    uint64_t entries;           /* slots (0: no rule thresholds) */
    uint64_t used;              /* slots holding a key now */
    uint64_t evictions;         /* a live key's slot taken for another (its counting restarts) */
    uint64_t alerts_suppressed; /* matches whose alert a threshold held back */
    uint64_t matches_filtered;  /* matches a detection_filter or threshold kept from acting at all */
};

/* One match, as the alert log gets it (drained by vn_sig_alerts_next). */
struct vn_sig_alert {
    uint32_t rule;              /* index into the stage's rules */
    uint32_t sid, rev;
    uint8_t action;             /* the rule's VN_SIGA_* */
    uint8_t taken;              /* what the NI did: VN_SIGA_* (a pass rule's match is taken as pass) */
    uint8_t limit;              /* VN_SIG_F_LIMIT: a confirmation hit a limit (not proven) */
    uint8_t stream;             /* 1: a stream match (offset is the stream offset) */
    uint8_t family, proto;
    uint8_t to_server;          /* 1: client to server, 0: server to client, 2: unknown (packet) */
    uint8_t dir;                /* VN_DIR_* as seen from the guest */
    uint8_t src[16], dst[16];
    uint16_t sport, dport;
    uint64_t offset;            /* stream offset just past the match (packet: within the payload) */
    uint64_t flow;              /* the TCP engine's flow id (0: a packet rule) */
    uint8_t http;               /* 1: an HTTP rule's match; the fields below are set */
    uint8_t http_trunc;         /* bit 0 method, 1 host, 2 url: cut to fit */
    uint16_t http_status;       /* the response's status (0: a request) */
    char http_method[16];
    char http_host[64];
    char http_url[176];         /* the request's raw target (http.uri.raw) */
};

struct vn_sigstage;
struct vn_switch;

/* A stage from the rules' headers and the two databases (either may be NULL if there are no
 * such rules): the stream database's rule ids are header indexes 0.., the packet database's
 * follow them (its id k is header nstream + k).  Takes the databases on success (rc 0).
 * The stage is reference counted: the caller's reference goes with vn_sigstage_free, each
 * port and each open connection holds its own. */
struct vn_sigstage *vn_sigstage_build(const uint8_t *hdrs, size_t hlen, struct vn_sig_db *stream,
                                      struct vn_sig_db *pkt, int *rc);
void vn_sigstage_free(struct vn_sigstage *st);
/* Adds the block-mode database of HTTP buffer `buf` (VN_HTTP_B_*) for group `group`: its rule
 * ids are header indexes of HTTP rules whose hmask[group] names `buf`.  Takes the database on
 * success (0); before the stage is installed on a port. */
int vn_sigstage_add_http(struct vn_sigstage *st, int group, int buf, struct vn_sig_db *db);
/* Adds the block-mode database of the `tcp` stream rules with absolute positions (a content's
 * `offset`/`depth`): Suricata inspects a `tcp` rule over each packet's payload as well as over
 * the stream, and counts those positions from the packet's first byte; over the stream alone
 * they count from the stream's first byte, so a message that does not open the connection
 * (the second SMB or HTTP request) would never match.  The database runs over each in-order
 * segment's payload after the stream scan; its rule ids are header indexes of plain stream
 * rules.  Takes the database on success (0); before the stage is installed on a port. */
int vn_sigstage_add_seg(struct vn_sigstage *st, struct vn_sig_db *db);
int vn_port_set_sigstage(struct vn_switch *sw, int port, struct vn_sigstage *st);
int vn_sig_alerts_next(struct vn_switch *sw, int port, struct vn_sig_alert *out);
uint64_t vn_sig_alerts_lost(struct vn_switch *sw, int port);
int vn_sig_rule_counts(struct vn_switch *sw, int port, uint64_t *matches, uint64_t *drops, uint32_t n);
int vn_sigstage_db_stats(struct vn_sigstage *st, int stream, struct vn_sig_stats *out);
int vn_sigstage_track_stats(struct vn_sigstage *st, struct vn_sig_track_stats *out);
/* The in-line bench's inner loop (vhostni/bench/signatures.py): frames packed as
 * [u8 0: into port a, 1: into port b][u16 length, little-endian][frame], each injected
 * (vn_port_inject_from) and every frame the sink ports got drained at once; returns the
 * bytes delivered, or -1 on a malformed pack or a refused frame. */
int64_t vn_sig_bench_switch(struct vn_switch *sw, int a, int b, const uint8_t *pack, size_t len);
/* VN_CDEF_END */

#endif
