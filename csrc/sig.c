/* Signature matcher: Hyperscan finds candidates, C confirms them exactly.  See sig.h.
 *
 * Each rule has at most one *anchor* (its fast pattern: a positive content, or a chop of one, or
 * a positive pcre compiled by Hyperscan in prefilter mode).  A Hyperscan hit on the anchor makes
 * the rule a candidate; the candidate is then confirmed by walking the rule's items in order with
 * Suricata's semantics (relative items are positioned after the previous positive match;
 * backtracking over later occurrences when a relative item depends on it).  Rules without an
 * anchor (header-only, negation-only) are confirmed on every block; the compiler never puts them
 * into a stream database.
 *
 * Stream mode and the bounded look-back.  A stream keeps Hyperscan's stream state plus the last
 * `lookback` bytes it has scanned.  A confirmation sees those bytes plus the chunk being scanned,
 * so a rule matches in stream mode exactly as it would over the whole stream as one block as long
 * as everything the rule reads lies within `lookback` bytes before the end of the chunk in which
 * it completes.  A confirmation that cannot be decided yet (a positive item whose window reaches
 * past the data, a negated item whose window is not complete, isdataat beyond the data) leaves the
 * rule *pending*: it is confirmed again after each chunk until it is decided, and decided on the
 * data there is once its anchor hit leaves the look-back (or the stream closes).  A *resumable*
 * rule (anchor = item 0, everything else after it) is re-confirmed only from its first undecided
 * occurrence of item 0, so a fast pattern that traffic carries all the time does not make each
 * chunk re-search the whole look-back.
 *
 * Never fail open on cost: a confirmation cut short by PCRE2's match limit or EVAL_STEPS_MAX, and
 * an undecided candidate with no room left on its stream's pending list, are reported as matches
 * flagged VN_SIG_F_LIMIT for the caller's exception policy.  Every length and offset from the blob
 * and from callers is checked; memory is bounded by the build caps and the per-database stream
 * memcap.
 */
#define _GNU_SOURCE
#include "sig.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hs/hs.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#define EVAL_NOMATCH 0
#define EVAL_MORE 1
#define EVAL_MATCH 2
#define EVAL_LIMIT 3                /* undecidable within the limits: the caller's policy decides */
#define EVAL_STEPS_MAX 20000
#define PCRE_MATCH_LIMIT 100000
#define INF_POS INT64_MAX

struct sig_item {
    uint8_t kind, flags;
    uint8_t dependent;          /* a later item is positioned relative to this one's match */
    int32_t offset, depth, distance, within;
    uint32_t pflags;
    uint32_t len;
    uint8_t *bytes;             /* content bytes (lower-cased when nocase) */
    pcre2_code *re;
};

struct sig_rule {
    uint32_t id, flags, dsize_lo, dsize_hi;
    uint32_t nitems, anchor;
    uint32_t anchor_off, anchor_len;
    uint8_t disabled;           /* left out at build (its error is reported) */
    uint8_t resumable;          /* the anchor is item 0, every later item reads only after it */
    struct sig_item *items;
};

struct vn_sig_db {
    int mode;
    uint32_t nrules;
    struct sig_rule *rules;
    uint32_t *always;           /* block mode: rules without an anchor */
    uint32_t nalways;
    hs_database_t *hs;
    hs_scratch_t *scratch;
    size_t hs_stream_size;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    uint32_t lookback;
    uint64_t stream_memcap;
    uint8_t *view;              /* lookback + VN_SIG_MAX_CHUNK bytes: history + chunk */
    uint32_t *cand;             /* block mode: candidate rule indexes of one scan */
    uint32_t ncand;
    uint32_t *seen;             /* block mode: seen[rule] == gen when already a candidate */
    uint32_t gen;
    uint64_t *hitat;            /* stream mode: the end of a candidate's last anchor hit */
    uint64_t *firstat;          /* stream mode: the end of its first anchor hit in this scan */
    struct vn_sig_stats st;
};

struct pending {
    uint32_t rule;
    uint64_t hit;               /* stream offset of the anchor hit's end */
    uint64_t resume;            /* resumable rules: item 0 occurrences before this are decided */
};

struct vn_sig_stream {
    hs_stream_t *hs;
    uint64_t off;               /* bytes scanned so far */
    uint8_t *hist;              /* ring of the last `lookback` bytes */
    uint32_t hist_len, hist_head;
    uint32_t npending, cap;     /* the pending list grows by doubling, up to VN_SIG_PENDING_MAX */
    struct pending *pending;
    uint8_t *matched;           /* bitmap over rules, allocated at the first match */
    size_t mem;
};

/* A confirmation's view of the data: buf[0] is stream offset `base`; `final` once no more comes. */
struct view {
    const uint8_t *buf;
    int64_t base, len;
    int final;
    int dsize;                  /* block mode: the payload length; -1 in stream mode */
};

struct out {
    struct vn_sig_match *m;
    uint32_t max, n;
};

static uint8_t lower[256];

/* ---------------------------------------------------------------- blob reading */

struct rd {
    const uint8_t *p;
    size_t len, off;
};

static int rd_u32(struct rd *r, uint32_t *v)
{
    if (r->len - r->off < 4)
        return -1;
    const uint8_t *p = r->p + r->off;
    *v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    r->off += 4;
    return 0;
}

static int rd_i32(struct rd *r, int32_t *v)
{
    uint32_t u;
    if (rd_u32(r, &u) < 0)
        return -1;
    memcpy(v, &u, sizeof *v);
    return 0;
}

static void set_err(struct vn_sig_build_error *errs, uint32_t max_errs, uint32_t *nerrs,
                    uint32_t rule, const char *fmt, const char *detail)
{
    if (*nerrs < max_errs && errs) {
        errs[*nerrs].rule = rule;
        snprintf(errs[*nerrs].message, sizeof errs[*nerrs].message, fmt, detail ? detail : "");
    }
    (*nerrs)++;
}

static void free_rules(struct vn_sig_db *db)
{
    if (!db->rules)
        return;
    for (uint32_t i = 0; i < db->nrules; i++) {
        struct sig_rule *r = &db->rules[i];
        if (!r->items)
            continue;
        for (uint32_t j = 0; j < r->nitems; j++) {
            free(r->items[j].bytes);
            if (r->items[j].re)
                pcre2_code_free(r->items[j].re);
        }
        free(r->items);
    }
    free(db->rules);
    db->rules = NULL;
}

void vn_sig_db_free(struct vn_sig_db *db)
{
    if (!db)
        return;
    free_rules(db);
    free(db->always);
    free(db->cand);
    free(db->seen);
    free(db->hitat);
    free(db->firstat);
    free(db->view);
    if (db->scratch)
        hs_free_scratch(db->scratch);
    if (db->hs)
        hs_free_database(db->hs);
    if (db->md)
        pcre2_match_data_free(db->md);
    if (db->mctx)
        pcre2_match_context_free(db->mctx);
    free(db);
}

static uint32_t pcre2_opts(uint32_t pf)
{
    uint32_t o = 0;
    if (pf & VN_SIG_P_CASELESS) o |= PCRE2_CASELESS;
    if (pf & VN_SIG_P_DOTALL) o |= PCRE2_DOTALL;
    if (pf & VN_SIG_P_MULTILINE) o |= PCRE2_MULTILINE;
    if (pf & VN_SIG_P_EXTENDED) o |= PCRE2_EXTENDED;
    if (pf & VN_SIG_P_ANCHORED) o |= PCRE2_ANCHORED;
    if (pf & VN_SIG_P_DOLLAR_ENDONLY) o |= PCRE2_DOLLAR_ENDONLY;
    if (pf & VN_SIG_P_UNGREEDY) o |= PCRE2_UNGREEDY;
    return o;
}

/* Reads one rule's items; returns 0, or -1 for a malformed blob (the whole build fails). */
static int read_rule(struct rd *r, struct sig_rule *rule, int mode, struct vn_sig_build_error *errs,
                     uint32_t max_errs, uint32_t *nerrs)
{
    if (rd_u32(r, &rule->id) || rd_u32(r, &rule->flags) || rd_u32(r, &rule->dsize_lo) ||
        rd_u32(r, &rule->dsize_hi) || rd_u32(r, &rule->nitems) || rd_u32(r, &rule->anchor) ||
        rd_u32(r, &rule->anchor_off) || rd_u32(r, &rule->anchor_len))
        return -1;
    if (rule->nitems > VN_SIG_MAX_ITEMS || rule->flags & ~(uint32_t)(VN_SIG_R_DSIZE | VN_SIG_R_DSIZE_NOT))
        return -1;
    if (rule->dsize_lo > rule->dsize_hi)
        return -1;
    if (mode == VN_SIG_MODE_STREAM && (rule->flags & VN_SIG_R_DSIZE))
        return -1;                          /* dsize is per packet: the compiler never does this */
    if (rule->anchor != VN_SIG_NO_ANCHOR && rule->anchor >= rule->nitems)
        return -1;
    if (mode == VN_SIG_MODE_STREAM && rule->anchor == VN_SIG_NO_ANCHOR)
        return -1;
    rule->items = calloc(rule->nitems ? rule->nitems : 1, sizeof *rule->items);
    if (!rule->items)
        return -2;
    for (uint32_t j = 0; j < rule->nitems; j++) {
        struct sig_item *it = &rule->items[j];
        uint32_t head, len;
        if (rd_u32(r, &head) || rd_i32(r, &it->offset) || rd_i32(r, &it->depth) ||
            rd_i32(r, &it->distance) || rd_i32(r, &it->within) || rd_u32(r, &it->pflags) ||
            rd_u32(r, &len))
            return -1;
        it->kind = head & 0xff;
        it->flags = (head >> 8) & 0xff;
        if (head >> 16)
            return -1;
        if (it->kind < VN_SIG_K_CONTENT || it->kind > VN_SIG_K_ISDATAAT || it->flags & 0x80)
            return -1;
        if (len > VN_SIG_MAX_PATTERN || r->len - r->off < len)
            return -1;
        if (it->kind != VN_SIG_K_ISDATAAT && len == 0)
            return -1;
        if (it->offset < 0 || it->depth < 0 || it->within < 0 || it->pflags > 127)
            return -1;
        if ((it->flags & (VN_SIG_I_OFFSET | VN_SIG_I_DEPTH)) &&
            (it->flags & (VN_SIG_I_DISTANCE | VN_SIG_I_WITHIN | VN_SIG_I_RELATIVE)))
            return -1;
        if (it->distance < -VN_SIG_MAX_LOOKBACK || it->distance > 0x7fffffff / 2 ||
            it->within > 0x7fffffff / 2 || it->offset > 0x7fffffff / 2 || it->depth > 0x7fffffff / 2)
            return -1;
        it->len = len;
        it->bytes = malloc(len + 1);
        if (!it->bytes)
            return -2;
        memcpy(it->bytes, r->p + r->off, len);
        it->bytes[len] = 0;
        r->off += len;
        if (it->kind == VN_SIG_K_CONTENT && (it->flags & VN_SIG_I_NOCASE))
            for (uint32_t k = 0; k < len; k++)
                it->bytes[k] = lower[it->bytes[k]];
        if (it->kind == VN_SIG_K_CONTENT && (it->flags & VN_SIG_I_WITHIN) && (uint32_t)it->within < len)
            return -1;
        if (it->kind == VN_SIG_K_CONTENT && (it->flags & VN_SIG_I_DEPTH) && (uint32_t)it->depth < len)
            return -1;
        if (it->kind == VN_SIG_K_PCRE && !rule->disabled) {
            int ec;
            PCRE2_SIZE eo;
            it->re = pcre2_compile(it->bytes, len, pcre2_opts(it->pflags), &ec, &eo, NULL);
            if (!it->re) {
                char msg[120];
                pcre2_get_error_message(ec, (PCRE2_UCHAR *)msg, sizeof msg);
                set_err(errs, max_errs, nerrs, rule->id, "pcre: PCRE2 rejects it: %s", msg);
                rule->disabled = 1;
            } else {
                (void)pcre2_jit_compile(it->re, PCRE2_JIT_COMPLETE);   /* the interpreter if not */
            }
        }
    }
    if (rule->anchor != VN_SIG_NO_ANCHOR) {
        struct sig_item *a = &rule->items[rule->anchor];
        if (a->flags & VN_SIG_I_NEGATED || a->kind == VN_SIG_K_ISDATAAT)
            return -1;
        if (a->kind == VN_SIG_K_CONTENT &&
            (rule->anchor_len == 0 || rule->anchor_off > a->len || a->len - rule->anchor_off < rule->anchor_len))
            return -1;
    }
    /* Resumable: the anchor is item 0 (a positive content) and every later item is positioned
     * after it (relative, no negative distance).  Then a confirmation reads nothing before an
     * occurrence of item 0, and occurrences already decided need not be searched again. */
    rule->resumable = rule->anchor == 0 && rule->items[0].kind == VN_SIG_K_CONTENT &&
                      !(rule->items[0].flags & VN_SIG_I_NEGATED);
    for (uint32_t j = 1; j < rule->nitems && rule->resumable; j++) {
        const struct sig_item *it = &rule->items[j];
        if (!(it->flags & VN_SIG_I_RELATIVE) || ((it->flags & VN_SIG_I_DISTANCE) && it->distance < 0))
            rule->resumable = 0;
    }
    /* which positive items have a later item positioned relative to them (backtracking needed) */
    for (uint32_t j = 0; j < rule->nitems; j++) {
        struct sig_item *it = &rule->items[j];
        if (it->flags & VN_SIG_I_NEGATED || it->kind == VN_SIG_K_ISDATAAT)
            continue;
        for (uint32_t k = j + 1; k < rule->nitems; k++) {
            struct sig_item *n = &rule->items[k];
            if (n->flags & VN_SIG_I_RELATIVE) {
                it->dependent = 1;
                break;
            }
            if (!(n->flags & VN_SIG_I_NEGATED) && n->kind != VN_SIG_K_ISDATAAT)
                break;
        }
    }
    return 0;
}

/* Hyperscan expression for an anchor: literal bytes escaped, or the pcre itself. */
static char *anchor_expr(const struct sig_rule *r, unsigned *flags)
{
    const struct sig_item *a = &r->items[r->anchor];
    if (a->kind == VN_SIG_K_PCRE) {
        *flags = HS_FLAG_PREFILTER | HS_FLAG_ALLOWEMPTY;
        if (a->pflags & VN_SIG_P_CASELESS) *flags |= HS_FLAG_CASELESS;
        if (a->pflags & VN_SIG_P_DOTALL) *flags |= HS_FLAG_DOTALL;
        if (a->pflags & VN_SIG_P_MULTILINE) *flags |= HS_FLAG_MULTILINE;
        const char *pre = (a->pflags & VN_SIG_P_EXTENDED) ? "(?x)" : "";
        size_t n = strlen(pre) + a->len + 1;
        char *e = malloc(n);
        if (!e)
            return NULL;
        snprintf(e, n, "%s%s", pre, (const char *)a->bytes);
        if (strlen(e) != n - 1) {           /* a NUL inside the pattern */
            free(e);
            return NULL;
        }
        return e;
    }
    *flags = (a->flags & VN_SIG_I_NOCASE) ? HS_FLAG_CASELESS : 0;
    char *e = malloc((size_t)r->anchor_len * 4 + 1);
    if (!e)
        return NULL;
    for (uint32_t k = 0; k < r->anchor_len; k++)
        snprintf(e + 4 * k, 5, "\\x%02x", a->bytes[r->anchor_off + k]);
    return e;
}

static int compile_hs(struct vn_sig_db *db, struct vn_sig_build_error *errs, uint32_t max_errs,
                      uint32_t *nerrs)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < db->nrules; i++)
        if (!db->rules[i].disabled && db->rules[i].anchor != VN_SIG_NO_ANCHOR)
            n++;
    if (n == 0)
        return 0;
    char **exprs = calloc(n, sizeof *exprs);
    unsigned *flags = calloc(n, sizeof *flags), *ids = calloc(n, sizeof *ids);
    int rc = VN_SIG_ENOMEM;
    if (!exprs || !flags || !ids)
        goto out;
    uint32_t k = 0;
    for (uint32_t i = 0; i < db->nrules; i++) {
        struct sig_rule *r = &db->rules[i];
        if (r->disabled || r->anchor == VN_SIG_NO_ANCHOR)
            continue;
        unsigned f = 0;
        char *e = anchor_expr(r, &f);
        if (!e) {
            set_err(errs, max_errs, nerrs, r->id, "pcre: a NUL byte in the pattern%s", NULL);
            r->disabled = 1;
            continue;
        }
        if (r->items[r->anchor].kind == VN_SIG_K_PCRE) {
            hs_expr_info_t *info = NULL;
            hs_compile_error_t *ce = NULL;
            if (hs_expression_info(e, f, &info, &ce) != HS_SUCCESS) {
                set_err(errs, max_errs, nerrs, r->id, "pcre: Hyperscan cannot prefilter it: %s",
                        ce ? ce->message : "?");
                hs_free_compile_error(ce);
                free(e);
                r->disabled = 1;
                continue;
            }
            free(info);
        }
        exprs[k] = e;
        flags[k] = f;
        ids[k] = i;
        k++;
    }
    /* A pattern hs_expression_info passed can still fail to compile: drop it and retry. */
    for (uint32_t tries = 0; k > 0; tries++) {
        hs_compile_error_t *ce = NULL;
        unsigned hmode = db->mode == VN_SIG_MODE_STREAM ? HS_MODE_STREAM : HS_MODE_BLOCK;
        if (hs_compile_multi((const char *const *)exprs, flags, ids, k, hmode, NULL, &db->hs, &ce)
            == HS_SUCCESS)
            break;
        int bad = ce ? ce->expression : -1;
        if (bad < 0 || (uint32_t)bad >= k || tries > 64) {
            set_err(errs, max_errs, nerrs, VN_SIG_NO_ANCHOR, "Hyperscan: %s", ce ? ce->message : "?");
            hs_free_compile_error(ce);
            rc = VN_SIG_ECOMPILE;
            goto out;
        }
        set_err(errs, max_errs, nerrs, db->rules[ids[bad]].id, "Hyperscan rejects the pattern: %s",
                ce->message);
        hs_free_compile_error(ce);
        db->rules[ids[bad]].disabled = 1;
        free(exprs[bad]);
        exprs[bad] = exprs[k - 1];
        flags[bad] = flags[k - 1];
        ids[bad] = ids[k - 1];
        k--;
    }
    rc = 0;
    if (db->hs) {
        if (hs_alloc_scratch(db->hs, &db->scratch) != HS_SUCCESS) {
            rc = VN_SIG_ENOMEM;
            goto out;
        }
        if (db->mode == VN_SIG_MODE_STREAM && hs_stream_size(db->hs, &db->hs_stream_size) != HS_SUCCESS)
            rc = VN_SIG_ECOMPILE;
    }
out:
    if (exprs)
        for (uint32_t j = 0; j < n; j++)
            free(exprs[j]);
    free(exprs);
    free(flags);
    free(ids);
    return rc;
}

struct vn_sig_db *vn_sig_db_build(const uint8_t *blob, size_t len, int mode, uint32_t lookback,
                                  uint64_t stream_memcap, struct vn_sig_build_error *errs,
                                  uint32_t max_errs, uint32_t *nerrs, int *rc)
{
    uint32_t nerr_local = 0;
    if (!nerrs)
        nerrs = &nerr_local;
    *nerrs = 0;
    *rc = VN_SIG_EINVAL;
    if (!lower['A'])
        for (int c = 0; c < 256; c++)
            lower[c] = (uint8_t)tolower(c);
    if (!blob || len < 8 || memcmp(blob, "VSG1", 4) != 0 ||
        (mode != VN_SIG_MODE_BLOCK && mode != VN_SIG_MODE_STREAM) || lookback > VN_SIG_MAX_LOOKBACK)
        return NULL;
    struct vn_sig_db *db = calloc(1, sizeof *db);
    if (!db) {
        *rc = VN_SIG_ENOMEM;
        return NULL;
    }
    db->mode = mode;
    db->lookback = lookback;
    db->stream_memcap = stream_memcap;
    db->st.lookback = lookback;
    struct rd r = {blob, len, 4};
    uint32_t nrules;
    if (rd_u32(&r, &nrules) || nrules > VN_SIG_MAX_RULES || (len - 8) / 32 < nrules)
        goto fail;                  /* each rule takes at least its 32-byte head */
    db->rules = calloc(nrules ? nrules : 1, sizeof *db->rules);
    db->always = calloc(nrules ? nrules : 1, sizeof *db->always);
    db->cand = calloc(nrules ? nrules : 1, sizeof *db->cand);
    db->seen = calloc(nrules ? nrules : 1, sizeof *db->seen);
    db->hitat = calloc(nrules ? nrules : 1, sizeof *db->hitat);
    db->firstat = calloc(nrules ? nrules : 1, sizeof *db->firstat);
    db->md = pcre2_match_data_create(1, NULL);
    db->mctx = pcre2_match_context_create(NULL);
    if (!db->rules || !db->always || !db->cand || !db->seen || !db->hitat || !db->firstat || !db->md || !db->mctx) {
        *rc = VN_SIG_ENOMEM;
        goto fail;
    }
    pcre2_set_match_limit(db->mctx, PCRE_MATCH_LIMIT);
    pcre2_set_depth_limit(db->mctx, PCRE_MATCH_LIMIT / 10);
    db->nrules = nrules;
    for (uint32_t i = 0; i < nrules; i++) {
        int e = read_rule(&r, &db->rules[i], mode, errs, max_errs, nerrs);
        if (e == -2) {
            *rc = VN_SIG_ENOMEM;
            goto fail;
        }
        if (e < 0)
            goto fail;
    }
    if (r.off != r.len)
        goto fail;
    for (uint32_t i = 0; i < nrules; i++)
        if (!db->rules[i].disabled && db->rules[i].anchor == VN_SIG_NO_ANCHOR)
            db->always[db->nalways++] = i;
    int e = compile_hs(db, errs, max_errs, nerrs);
    if (e < 0) {
        *rc = e;
        goto fail;
    }
    if (mode == VN_SIG_MODE_STREAM) {
        db->view = malloc((size_t)lookback + VN_SIG_MAX_CHUNK);
        if (!db->view) {
            *rc = VN_SIG_ENOMEM;
            goto fail;
        }
    }
    db->st.nrules = nrules;
    db->st.hs_stream_size = db->hs_stream_size;
    *rc = 0;
    return db;
fail:
    vn_sig_db_free(db);
    return NULL;
}

int vn_sig_db_mode(const struct vn_sig_db *db)
{
    return db ? db->mode : -1;
}

uint32_t vn_sig_db_ids(const struct vn_sig_db *db, uint32_t *out, uint32_t max)
{
    if (!db)
        return 0;
    for (uint32_t i = 0; i < db->nrules && i < max; i++)
        out[i] = db->rules[i].id;
    return db->nrules;
}

int vn_sig_db_stats(const struct vn_sig_db *db, struct vn_sig_stats *out)
{
    if (!db || !out)
        return VN_SIG_EINVAL;
    *out = db->st;
    return 0;
}

/* ---------------------------------------------------------------- exact confirmation */

/* First occurrence of pat (plen bytes; lower-cased if nocase) in buf[from, to), or -1. */
static int64_t find(const uint8_t *buf, int64_t from, int64_t to, const uint8_t *pat, uint32_t plen,
                    int nocase)
{
    if (from < 0)
        from = 0;
    if (to - from < (int64_t)plen)
        return -1;
    if (!nocase) {
        const uint8_t *p = memmem(buf + from, (size_t)(to - from), pat, plen);
        return p ? p - buf : -1;
    }
    uint8_t c0 = pat[0], c1 = (uint8_t)toupper(c0);
    for (int64_t i = from; i + plen <= to; i++) {
        uint8_t c = buf[i];
        if (c != c0 && c != c1)
            continue;
        uint32_t k = 1;
        while (k < plen && lower[buf[i + k]] == pat[k])
            k++;
        if (k == plen)
            return i;
    }
    return -1;
}

struct ectx {
    struct vn_sig_db *db;
    const struct sig_rule *r;
    const struct view *v;
    int steps;
    int64_t matchend;           /* stream offset past the last byte of the successful path */
    int64_t resume;             /* resumable rules: item 0 is searched from here ... */
    int64_t hit_end;            /* ... to the end of the last anchor hit (INF_POS otherwise) */
    int64_t undecided;          /* out: the first item 0 occurrence more data could still decide */
    int limit;                  /* out: PCRE2's match limit (or an error) cut a search short */
};

static int eval_items(struct ectx *c, uint32_t i, int64_t prev, int64_t maxend);

/* The stream window [ws, we) a content searches (INF_POS: no end). */
static void item_window(const struct sig_item *it, int64_t prev, int64_t *ws, int64_t *we)
{
    if (it->flags & (VN_SIG_I_RELATIVE | VN_SIG_I_DISTANCE | VN_SIG_I_WITHIN)) {
        int64_t d = (it->flags & VN_SIG_I_DISTANCE) ? it->distance : 0;
        *ws = prev + d;
        *we = (it->flags & VN_SIG_I_WITHIN) ? prev + d + it->within : INF_POS;
        if (*ws < 0)
            *ws = 0;
    } else {
        *ws = (it->flags & VN_SIG_I_OFFSET) ? it->offset : 0;
        *we = (it->flags & VN_SIG_I_DEPTH) ? *ws + it->depth : INF_POS;
    }
}

static int eval_content(struct ectx *c, uint32_t i, int64_t prev, int64_t maxend)
{
    const struct sig_item *it = &c->r->items[i];
    const struct view *v = c->v;
    int64_t ws, we, end = v->base + v->len;
    item_window(it, prev, &ws, &we);
    int truncated = we > end && !v->final;
    if (i == 0 && c->hit_end != INF_POS) {
        /* A resumable rule's item 0 holds its anchor: every occurrence of it is a Hyperscan hit,
         * so none ends past the last hit (plus what a chopped fast pattern leaves out), and one
         * still to come brings its own hit. */
        if (ws < c->resume)
            ws = c->resume;
        if (we > c->hit_end)
            we = c->hit_end;
        truncated = we > end && !v->final;     /* a chopped hit's content not all here yet */
    }
    int64_t from = ws - v->base, to = (we > end ? end : we) - v->base;
    int nocase = it->flags & VN_SIG_I_NOCASE;
    if (it->flags & VN_SIG_I_NEGATED) {
        if (find(v->buf, from, to, it->bytes, it->len, nocase) >= 0)
            return EVAL_NOMATCH;
        int rest = eval_items(c, i + 1, prev, maxend);
        return (truncated && rest == EVAL_MATCH) ? EVAL_MORE : rest;
    }
    int more = truncated;
    while (from <= to) {
        int64_t at = find(v->buf, from, to, it->bytes, it->len, nocase);
        if (at < 0)
            break;
        int64_t mend = v->base + at + it->len;
        int rest = eval_items(c, i + 1, mend, mend > maxend ? mend : maxend);
        if (rest == EVAL_MATCH)
            return EVAL_MATCH;
        if (rest == EVAL_MORE) {
            more = 1;
            if (i == 0 && v->base + at < c->undecided)
                c->undecided = v->base + at;
        }
        if (!it->dependent || ++c->steps > EVAL_STEPS_MAX)
            break;
        from = at + 1;
    }
    if (c->steps > EVAL_STEPS_MAX)
        return EVAL_NOMATCH;
    return more ? EVAL_MORE : EVAL_NOMATCH;
}

static int eval_pcre(struct ectx *c, uint32_t i, int64_t prev, int64_t maxend)
{
    const struct sig_item *it = &c->r->items[i];
    const struct view *v = c->v;
    int64_t start = (it->flags & VN_SIG_I_RELATIVE) ? prev : 0;
    uint32_t opts = 0;
    if (start < v->base) {          /* the subject's start is gone: ^ cannot match there */
        start = v->base;
        opts |= PCRE2_NOTBOL;
        if (it->pflags & VN_SIG_P_ANCHORED)
            return (it->flags & VN_SIG_I_NEGATED) ? eval_items(c, i + 1, prev, maxend) : EVAL_NOMATCH;
    }
    if (start > v->base + v->len)
        start = v->base + v->len;
    if (!v->final)
        opts |= PCRE2_NOTEOL;       /* $ is not the end of a stream that goes on */
    const uint8_t *subj = v->buf + (start - v->base);
    PCRE2_SIZE slen = (PCRE2_SIZE)(v->base + v->len - start), from = 0;
    int more = !v->final;
    for (;;) {
        int n = pcre2_match(it->re, subj, slen, from, opts, c->db->md, c->db->mctx);
        if (n < 0 && n != PCRE2_ERROR_NOMATCH) {
            c->db->st.pcre_errors++;
            c->limit = 1;
            return EVAL_NOMATCH;
        }
        if (it->flags & VN_SIG_I_NEGATED) {
            if (n >= 0)
                return EVAL_NOMATCH;
            int rest = eval_items(c, i + 1, prev, maxend);
            return (more && rest == EVAL_MATCH) ? EVAL_MORE : rest;
        }
        if (n < 0)
            break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->db->md);
        if (ov[1] < ov[0] || ov[1] > slen)
            break;                  /* \K games: not a position we can use */
        int64_t mend = start + (int64_t)ov[1];
        int rest = eval_items(c, i + 1, mend, mend > maxend ? mend : maxend);
        if (rest == EVAL_MATCH)
            return EVAL_MATCH;
        if (rest == EVAL_MORE)
            more = 1;
        if (!it->dependent || ++c->steps > EVAL_STEPS_MAX || ov[0] >= slen)
            break;
        from = ov[0] + 1;
    }
    return more ? EVAL_MORE : EVAL_NOMATCH;
}

static int eval_items(struct ectx *c, uint32_t i, int64_t prev, int64_t maxend)
{
    if (++c->steps > EVAL_STEPS_MAX) {
        return EVAL_NOMATCH;
    }
    if (i >= c->r->nitems) {
        c->matchend = maxend;
        return EVAL_MATCH;
    }
    const struct sig_item *it = &c->r->items[i];
    const struct view *v = c->v;
    switch (it->kind) {
    case VN_SIG_K_CONTENT:
        return eval_content(c, i, prev, maxend);
    case VN_SIG_K_PCRE:
        return eval_pcre(c, i, prev, maxend);
    default: {                      /* isdataat */
        /* Suricata: absolute isdataat:N wants a byte at offset N; relative wants prev + N <= len */
        int64_t pos = (it->flags & VN_SIG_I_RELATIVE) ? prev + it->offset - 1 : it->offset;
        int present = pos < v->base + v->len;
        if (it->flags & VN_SIG_I_NEGATED) {
            if (present)
                return EVAL_NOMATCH;
            int rest = eval_items(c, i + 1, prev, maxend);
            return (!v->final && rest == EVAL_MATCH) ? EVAL_MORE : rest;
        }
        if (!present)
            return v->final ? EVAL_NOMATCH : EVAL_MORE;
        return eval_items(c, i + 1, prev, maxend);
    }
    }
}

/* Confirms rule `ri` over the view; on a match fills *end.  Resumable rules search item 0 only
 * in [resume, hit_end) (see struct pending); on EVAL_MORE, *undecided says where the next
 * confirmation may resume. */
static int confirm(struct vn_sig_db *db, uint32_t ri, const struct view *v, int64_t *end,
                   int64_t resume, int64_t hit_end, int64_t *undecided)
{
    const struct sig_rule *r = &db->rules[ri];
    db->st.evals++;
    if (!r->resumable) {
        resume = 0;
        hit_end = INF_POS;
    } else if (hit_end != INF_POS) {
        /* a chopped fast pattern's hit ends before item 0 does */
        hit_end += (int64_t)r->items[0].len - r->anchor_off - r->anchor_len;
    }
    if (r->flags & VN_SIG_R_DSIZE) {
        int in = v->dsize >= (int64_t)r->dsize_lo && v->dsize <= (int64_t)r->dsize_hi;
        if (v->dsize < 0 || in == !!(r->flags & VN_SIG_R_DSIZE_NOT))
            return EVAL_NOMATCH;
    }
    struct ectx c = {db, r, v, 0, 0, resume, hit_end, INF_POS, 0};
    int res = eval_items(&c, 0, 0, 0);
    if (undecided)
        *undecided = c.undecided;
    if (res != EVAL_MATCH && (c.steps > EVAL_STEPS_MAX || c.limit)) {
        /* Traffic that makes a confirmation too costly must not be a way past a rule: this
         * is reported as a match flagged VN_SIG_F_LIMIT and the caller's policy decides. */
        if (c.steps > EVAL_STEPS_MAX)
            db->st.steps_exceeded++;
        *end = v->base + v->len;
        return EVAL_LIMIT;
    }
    if (res == EVAL_MATCH)
        *end = c.matchend > 0 ? c.matchend : v->base + v->len;
    return res;
}

static void emit(struct vn_sig_db *db, struct out *o, uint32_t ri, int64_t end, int res)
{
    db->st.matches++;
    if (o->n >= o->max) {
        db->st.matches_lost++;
        return;
    }
    o->m[o->n].rule = db->rules[ri].id;
    o->m[o->n].flags = res == EVAL_LIMIT ? VN_SIG_F_LIMIT : 0;
    o->m[o->n].offset = (uint64_t)end;
    o->n++;
}

/* ---------------------------------------------------------------- block mode */

static void next_gen(struct vn_sig_db *db)
{
    if (++db->gen == 0) {           /* wrapped: forget every old generation */
        memset(db->seen, 0, db->nrules * sizeof *db->seen);
        db->gen = 1;
    }
    db->ncand = 0;
}

static int on_block_hit(unsigned int id, unsigned long long from, unsigned long long to,
                        unsigned int flags, void *ctx)
{
    struct vn_sig_db *db = ctx;
    (void)from; (void)to; (void)flags;
    db->st.hits++;
    if (id < db->nrules && db->seen[id] != db->gen) {
        db->seen[id] = db->gen;
        db->cand[db->ncand++] = id;
    }
    return 0;
}

int vn_sig_scan_block(struct vn_sig_db *db, const uint8_t *data, size_t len,
                      struct vn_sig_match *out, uint32_t max)
{
    if (!db || db->mode != VN_SIG_MODE_BLOCK || (!data && len) || (!out && max) || len > 0xffffffffu)
        return VN_SIG_EINVAL;
    static const uint8_t empty[1];
    if (!data)
        data = empty;
    db->st.scans++;
    db->st.bytes += len;
    next_gen(db);
    if (db->hs && hs_scan(db->hs, (const char *)data, (unsigned)len, 0, db->scratch, on_block_hit, db)
                      != HS_SUCCESS)
        return VN_SIG_ESCAN;
    struct view v = {data, 0, (int64_t)len, 1, (int)(len > 0x7fffffff ? 0x7fffffff : len)};
    struct out o = {out, max, 0};
    int64_t end;
    for (uint32_t k = 0; k < db->nalways + db->ncand; k++) {
        uint32_t ri = k < db->nalways ? db->always[k] : db->cand[k - db->nalways];
        int res = confirm(db, ri, &v, &end, 0, INF_POS, NULL);
        if (res == EVAL_MATCH || res == EVAL_LIMIT)
            emit(db, &o, ri, end, res);
    }
    return (int)o.n;
}

/* ---------------------------------------------------------------- stream mode */

struct vn_sig_stream *vn_sig_stream_open(struct vn_sig_db *db, int *rc)
{
    *rc = VN_SIG_EINVAL;
    if (!db || db->mode != VN_SIG_MODE_STREAM)
        return NULL;
    size_t mem = sizeof(struct vn_sig_stream) + db->hs_stream_size + db->lookback;
    if (db->st.stream_mem + mem > db->stream_memcap) {
        db->st.streams_refused++;
        *rc = VN_SIG_EMEMCAP;
        return NULL;
    }
    struct vn_sig_stream *st = calloc(1, sizeof *st);
    *rc = VN_SIG_ENOMEM;
    if (!st)
        return NULL;
    st->hist = malloc(db->lookback ? db->lookback : 1);
    if (!st->hist || (db->hs && hs_open_stream(db->hs, 0, &st->hs) != HS_SUCCESS)) {
        free(st->hist);
        free(st);
        return NULL;
    }
    st->mem = mem;
    db->st.stream_mem += mem;
    db->st.streams_open++;
    *rc = 0;
    return st;
}

struct sctx {
    struct vn_sig_db *db;
    struct vn_sig_stream *st;
    struct view *v;             /* NULL while Hyperscan runs */
    struct out *o;
};

static int is_matched(const struct vn_sig_stream *st, uint32_t ri)
{
    return st->matched && (st->matched[ri >> 3] >> (ri & 7) & 1);
}

static void mark_matched(struct vn_sig_db *db, struct vn_sig_stream *st, uint32_t ri)
{
    if (!st->matched) {
        size_t n = (db->nrules + 7) / 8;    /* beyond the memcap if need be: never lose a verdict */
        st->matched = calloc(1, n);
        if (!st->matched)
            return;                 /* the rule may be reported again: harmless */
        st->mem += n;
        db->st.stream_mem += n;
    }
    st->matched[ri >> 3] |= (uint8_t)(1u << (ri & 7));
}

/* The view over the history ring from stream offset `from` on, plus `chunk`; only built when
 * some candidate needs it, and only from where the candidates need it. */
static void build_view(struct vn_sig_db *db, struct vn_sig_stream *st, const uint8_t *chunk, size_t len,
                       struct view *v, int final, uint64_t from)
{
    uint32_t W = db->lookback, hl = st->hist_len;
    uint64_t hstart = st->off - hl;
    uint32_t skip = from <= hstart ? 0 : (from >= st->off ? hl : (uint32_t)(from - hstart));
    uint32_t n = hl - skip;
    if (W && n) {
        uint32_t start = (uint32_t)(((uint64_t)st->hist_head + W - hl + skip) % W);
        uint32_t first = n < W - start ? n : W - start;
        memcpy(db->view, st->hist + start, first);
        memcpy(db->view + first, st->hist, n - first);
    }
    if (n == 0 && len) {
        v->buf = chunk;         /* nothing from the history: the chunk itself is the view */
    } else {
        if (len)
            memcpy(db->view + n, chunk, len);
        v->buf = db->view;
    }
    v->base = (int64_t)(st->off - n);
    v->len = (int64_t)n + (int64_t)len;
    v->final = final;
    v->dsize = -1;
}

/* Decides an entry now (force) or keeps it; returns 1 when it leaves the pending list. */
static int settle(struct sctx *c, struct pending *p, int force)
{
    int64_t end, undecided;
    struct view fv = *c->v;
    if (force)
        fv.final = 1;
    int res = confirm(c->db, p->rule, &fv, &end, (int64_t)p->resume, (int64_t)p->hit, &undecided);
    if (res == EVAL_MATCH || res == EVAL_LIMIT) {
        mark_matched(c->db, c->st, p->rule);
        emit(c->db, c->o, p->rule, end, res);
        return 1;
    }
    if (res == EVAL_MORE && c->db->rules[p->rule].resumable && undecided != INF_POS &&
        undecided > (int64_t)p->resume)
        p->resume = (uint64_t)undecided;
    return res == EVAL_NOMATCH || force;
}

/* Hyperscan's callback: the rule becomes a candidate of this scan (decided after it). */
static int on_stream_hit(unsigned int id, unsigned long long from, unsigned long long to,
                         unsigned int flags, void *ctx)
{
    struct sctx *c = ctx;
    struct vn_sig_db *db = c->db;
    (void)from; (void)flags;
    db->st.hits++;
    if (id >= db->nrules || is_matched(c->st, id))
        return 0;
    if (db->seen[id] != db->gen) {
        db->seen[id] = db->gen;
        db->cand[db->ncand++] = id;
        db->firstat[id] = to;
    }
    db->hitat[id] = to;
    return 0;
}

static int grow_pending(struct vn_sig_db *db, struct vn_sig_stream *st)
{
    uint32_t cap = st->cap ? st->cap * 2 : 8;
    size_t add = (size_t)(cap - st->cap) * sizeof *st->pending;
    if (cap > VN_SIG_PENDING_MAX || db->st.stream_mem + add > db->stream_memcap)
        return -1;
    struct pending *p = realloc(st->pending, (size_t)cap * sizeof *p);
    if (!p)
        return -1;
    st->pending = p;
    st->cap = cap;
    st->mem += add;
    db->st.stream_mem += add;
    return 0;
}

/* After a scan: decide the pending rules and this scan's candidates over the view; those that
 * cannot be decided yet stay pending (a full list decides the newcomer on the data there is). */
static void settle_all(struct sctx *c, const uint8_t *chunk, size_t len, int final)
{
    struct vn_sig_db *db = c->db;
    struct vn_sig_stream *st = c->st;
    uint64_t end = st->off + len, need = end;
    /* Where the view must begin: a new candidate of a resumable rule at its first hit's item 0
     * (earlier occurrences were hits before, and decided), a pending one where it resumes,
     * anything else at the start of the history. */
    for (uint32_t k = 0; k < st->npending; k++) {
        struct pending *p = &st->pending[k];
        if (db->seen[p->rule] == db->gen) {
            p->hit = db->hitat[p->rule];
            db->seen[p->rule] = 0;          /* consumed: not a newcomer below */
        }
        uint64_t from = db->rules[p->rule].resumable ? p->resume : 0;
        need = from < need ? from : need;
    }
    for (uint32_t k = 0; k < db->ncand; k++) {
        uint32_t ri = db->cand[k];
        if (db->seen[ri] != db->gen)
            continue;
        const struct sig_rule *r = &db->rules[ri];
        uint64_t back = (uint64_t)r->anchor_off + r->anchor_len, from = 0;
        if (r->resumable)
            from = db->firstat[ri] > back ? db->firstat[ri] - back : 0;
        db->firstat[ri] = from;
        need = from < need ? from : need;
    }
    struct view v;
    build_view(db, st, chunk, len, &v, final, need);
    c->v = &v;
    uint32_t keep = 0;
    for (uint32_t k = 0; k < st->npending; k++) {
        struct pending p = st->pending[k];
        int expired = !final && p.hit + db->lookback < end;
        if (expired)
            db->st.pending_expired++;
        if (!settle(c, &p, expired || final))
            st->pending[keep++] = p;
    }
    st->npending = keep;
    for (uint32_t k = 0; k < db->ncand; k++) {
        uint32_t ri = db->cand[k];
        if (db->seen[ri] != db->gen)
            continue;
        struct pending p = {ri, db->hitat[ri], db->firstat[ri]};
        if (settle(c, &p, final))
            continue;
        if (st->npending == st->cap && grow_pending(db, st) < 0) {
            /* Undecided and no room to wait: flooding a stream with candidates must not be a
             * way past a rule, so it is reported flagged LIMIT for the caller's policy. */
            db->st.pending_evicted++;
            mark_matched(db, st, ri);
            emit(db, c->o, ri, (int64_t)end, EVAL_LIMIT);
            continue;
        }
        st->pending[st->npending++] = p;
    }
    c->v = NULL;
}

static void hist_append(struct vn_sig_db *db, struct vn_sig_stream *st, const uint8_t *d, size_t len)
{
    uint32_t W = db->lookback;
    if (!W)
        return;
    if (len >= W) {
        memcpy(st->hist, d + len - W, W);
        st->hist_head = 0;
        st->hist_len = W;
        return;
    }
    uint32_t n = (uint32_t)len, first = W - st->hist_head < n ? W - st->hist_head : n;
    memcpy(st->hist + st->hist_head, d, first);
    memcpy(st->hist, d + first, n - first);
    st->hist_head = (st->hist_head + n) % W;
    st->hist_len = st->hist_len + n > W ? W : st->hist_len + n;
}

static int scan_piece(struct vn_sig_db *db, struct vn_sig_stream *st, const uint8_t *data, size_t len,
                      struct out *o)
{
    struct sctx c = {db, st, NULL, o};
    db->st.scans++;
    db->st.bytes += len;
    next_gen(db);
    if (st->hs && hs_scan_stream(st->hs, (const char *)data, (unsigned)len, 0, db->scratch,
                                 on_stream_hit, &c) != HS_SUCCESS)
        return VN_SIG_ESCAN;
    if (st->npending || db->ncand)
        settle_all(&c, data, len, 0);
    hist_append(db, st, data, len);
    st->off += len;
    return 0;
}

int vn_sig_stream_scan(struct vn_sig_db *db, struct vn_sig_stream *st, const uint8_t *data,
                       size_t len, struct vn_sig_match *out, uint32_t max)
{
    if (!db || !st || db->mode != VN_SIG_MODE_STREAM || (!data && len) || (!out && max))
        return VN_SIG_EINVAL;
    struct out o = {out, max, 0};
    for (size_t done = 0; done < len;) {
        size_t n = len - done > VN_SIG_MAX_CHUNK ? VN_SIG_MAX_CHUNK : len - done;
        int rc = scan_piece(db, st, data + done, n, &o);
        if (rc < 0)
            return rc;
        done += n;
    }
    return (int)o.n;
}

int vn_sig_stream_close(struct vn_sig_db *db, struct vn_sig_stream *st, struct vn_sig_match *out,
                        uint32_t max)
{
    if (!db || !st || db->mode != VN_SIG_MODE_STREAM || (!out && max))
        return VN_SIG_EINVAL;
    struct out o = {out, max, 0};
    struct sctx c = {db, st, NULL, &o};
    int rc = 0;
    next_gen(db);
    if (st->hs && hs_close_stream(st->hs, db->scratch, on_stream_hit, &c) != HS_SUCCESS)
        rc = VN_SIG_ESCAN;
    if (st->npending || db->ncand)
        settle_all(&c, NULL, 0, 1);
    db->st.stream_mem -= st->mem;
    db->st.streams_open--;
    free(st->matched);
    free(st->hist);
    free(st->pending);
    free(st);
    return rc < 0 ? rc : (int)o.n;
}

/* ---------------------------------------------------------------- benchmark inner loop */

static int on_bench_hit(unsigned int id, unsigned long long from, unsigned long long to,
                        unsigned int flags, void *ctx)
{
    (void)id; (void)from; (void)to; (void)flags;
    (*(int64_t *)ctx)++;
    return 0;
}

/* vhostni/bench/signatures.py's inner loop, in C so that Python's per-call cost does not hide
 * the engine's: `len` bytes in `chunk`-byte pieces, round-robin over `nstreams` streams, through
 * the engine (raw = 0: returns the matches) or through Hyperscan alone on the same database and
 * scratch (raw = 1: its physical limit; returns the hits).  A VN_SIG_E* code on error. */
int64_t vn_sig_bench_streams(struct vn_sig_db *db, const uint8_t *data, size_t len, uint32_t chunk,
                             uint32_t nstreams, int raw)
{
    enum { MAXS = 1024 };
    if (!db || db->mode != VN_SIG_MODE_STREAM || !db->hs || (!data && len) || chunk == 0 ||
        chunk > VN_SIG_MAX_CHUNK || nstreams == 0 || nstreams > MAXS)
        return VN_SIG_EINVAL;
    hs_stream_t *hs[MAXS];
    struct vn_sig_stream *st[MAXS];
    struct vn_sig_match out[64];
    int64_t n = 0;
    int rc = 0;
    uint32_t opened = 0;
    for (; opened < nstreams; opened++) {
        if (raw) {
            if (hs_open_stream(db->hs, 0, &hs[opened]) != HS_SUCCESS) {
                rc = VN_SIG_ENOMEM;
                break;
            }
        } else if (!(st[opened] = vn_sig_stream_open(db, &rc))) {
            break;
        }
    }
    for (size_t off = 0, i = 0; rc == 0 && off < len; off += chunk, i++) {
        size_t n1 = len - off < chunk ? len - off : chunk;
        if (raw) {
            if (hs_scan_stream(hs[i % nstreams], (const char *)data + off, (unsigned)n1, 0, db->scratch,
                               on_bench_hit, &n) != HS_SUCCESS)
                rc = VN_SIG_ESCAN;
        } else {
            int m = vn_sig_stream_scan(db, st[i % nstreams], data + off, n1, out, 64);
            if (m < 0)
                rc = m;
            else
                n += m;
        }
    }
    for (uint32_t k = 0; k < opened; k++) {
        if (raw)
            hs_close_stream(hs[k], db->scratch, on_bench_hit, &n);
        else {
            int m = vn_sig_stream_close(db, st[k], out, 64);
            if (m > 0)
                n += m;
        }
    }
    return rc < 0 ? rc : n;
}
