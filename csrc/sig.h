/* vhostni signature matcher (SafeCard's payload stage): Suricata-syntax rules, compiled by
 * vhostni/signatures/rules.py into a binary rule set (the "blob", format below), matched with
 * Hyperscan (block mode for packet rules, stream mode per TCP direction) and confirmed exactly
 * in C: contents with offset/depth/distance/within, negations, PCRE2, dsize, isdataat.
 *
 * One database (struct vn_sig_db) per rule group and mode; it is owned by one thread (it holds
 * the Hyperscan scratch and the PCRE2 match data).  No Python anywhere in here.
 *
 * Blob (little-endian), everything bounds-checked by vn_sig_db_build:
 *   "VSG1" u32 nrules
 *   per rule:  u32 id, u32 flags (VN_SIG_R_*), u32 dsize_lo, u32 dsize_hi,
 *              u32 nitems, u32 anchor (item index, or VN_SIG_NO_ANCHOR), u32 anchor_off, u32 anchor_len
 *   per item:  u8 kind (VN_SIG_K_*), u8 flags (VN_SIG_I_*), u16 zero,
 *              i32 offset, i32 depth, i32 distance, i32 within, u32 pcre_flags (VN_SIG_P_*),
 *              u32 len, len bytes (content bytes or the PCRE pattern without delimiters)
 */
#ifndef VN_SIG_H
#define VN_SIG_H

#include <stddef.h>
#include <stdint.h>

/* VN_CDEF_BEGIN */
#define VN_SIG_MODE_BLOCK 0
#define VN_SIG_MODE_STREAM 1

#define VN_SIG_MAX_RULES 65536
#define VN_SIG_MAX_ITEMS 32
#define VN_SIG_MAX_PATTERN 8192
#define VN_SIG_MAX_LOOKBACK 1048576
#define VN_SIG_MAX_CHUNK 65536
#define VN_SIG_PENDING_MAX 1024
#define VN_SIG_NO_ANCHOR 4294967295

#define VN_SIG_R_DSIZE 1
#define VN_SIG_R_DSIZE_NOT 2

#define VN_SIG_K_CONTENT 1
#define VN_SIG_K_PCRE 2
#define VN_SIG_K_ISDATAAT 3

#define VN_SIG_I_NEGATED 1
#define VN_SIG_I_NOCASE 2
#define VN_SIG_I_RELATIVE 4
#define VN_SIG_I_OFFSET 8
#define VN_SIG_I_DEPTH 16
#define VN_SIG_I_DISTANCE 32
#define VN_SIG_I_WITHIN 64

#define VN_SIG_P_CASELESS 1
#define VN_SIG_P_DOTALL 2
#define VN_SIG_P_MULTILINE 4
#define VN_SIG_P_EXTENDED 8
#define VN_SIG_P_ANCHORED 16
#define VN_SIG_P_DOLLAR_ENDONLY 32
#define VN_SIG_P_UNGREEDY 64

/* A confirmation that hit a limit (PCRE2's match limit, the backtracking step limit) cannot say
 * whether the rule matches; it is reported as a match with this flag, so that traffic crafted to
 * make confirmations costly is not a way past a rule, and the caller's policy decides. */
#define VN_SIG_F_LIMIT 1

#define VN_SIG_EINVAL -1
#define VN_SIG_ENOMEM -2
#define VN_SIG_EMEMCAP -3
#define VN_SIG_ECOMPILE -4
#define VN_SIG_ESCAN -5

struct vn_sig_match {
    uint32_t rule;        /* the rule's id from the blob */
    uint32_t flags;       /* VN_SIG_F_LIMIT: not a proven match, see below */
    uint64_t offset;      /* stream (or packet) offset just past the last byte the match needed */
};

/* A rule the database left out, and why (a pattern Hyperscan or PCRE2 rejected). */
struct vn_sig_build_error {
    uint32_t rule;
    char message[200];
};

struct vn_sig_stats {
    uint64_t nrules;             /* rules in the database */
    uint64_t scans;              /* scan calls (blocks or stream chunks) */
    uint64_t bytes;              /* bytes scanned */
    uint64_t hits;               /* Hyperscan anchor hits */
    uint64_t evals;              /* exact confirmations run */
    uint64_t matches;            /* rules that matched */
    uint64_t matches_lost;       /* matches beyond the caller's output array */
    uint64_t pcre_errors;        /* PCRE2 match limit or error (the match is flagged LIMIT) */
    uint64_t steps_exceeded;     /* confirmations cut at the step limit (flagged LIMIT) */
    uint64_t pending_evicted;    /* undecided candidates with no room to wait (flagged LIMIT) */
    uint64_t pending_expired;    /* pending candidates decided when they left the look-back */
    uint64_t streams_open;
    uint64_t stream_mem;         /* bytes of stream state now allocated */
    uint64_t streams_refused;    /* stream opens refused by the memcap */
    uint64_t hs_stream_size;     /* Hyperscan's state per stream */
    uint64_t lookback;           /* bytes of history kept per stream */
};

struct vn_sig_db;
struct vn_sig_stream;

struct vn_sig_db *vn_sig_db_build(const uint8_t *blob, size_t len, int mode, uint32_t lookback,
                                  uint64_t stream_memcap, struct vn_sig_build_error *errs,
                                  uint32_t max_errs, uint32_t *nerrs, int *rc);
void vn_sig_db_free(struct vn_sig_db *db);
int vn_sig_db_stats(const struct vn_sig_db *db, struct vn_sig_stats *out);
/* VN_SIG_MODE_BLOCK or VN_SIG_MODE_STREAM (-1: no database). */
int vn_sig_db_mode(const struct vn_sig_db *db);
/* The database's rule ids, in its order: returns how many (at most max written). */
uint32_t vn_sig_db_ids(const struct vn_sig_db *db, uint32_t *out, uint32_t max);
int vn_sig_scan_block(struct vn_sig_db *db, const uint8_t *data, size_t len,
                      struct vn_sig_match *out, uint32_t max);
struct vn_sig_stream *vn_sig_stream_open(struct vn_sig_db *db, int *rc);
int vn_sig_stream_scan(struct vn_sig_db *db, struct vn_sig_stream *st, const uint8_t *data,
                       size_t len, struct vn_sig_match *out, uint32_t max);
int vn_sig_stream_close(struct vn_sig_db *db, struct vn_sig_stream *st,
                        struct vn_sig_match *out, uint32_t max);
int64_t vn_sig_bench_streams(struct vn_sig_db *db, const uint8_t *data, size_t len, uint32_t chunk,
                             uint32_t nstreams, int raw);
/* VN_CDEF_END */

#endif
