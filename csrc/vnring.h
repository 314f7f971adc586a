/*
 * vhostni scanner rings: the shared-memory data plane between an NI and one scanner.
 *
 * This header is the ABI.  It depends on nothing else of vhostni, so a scanner written in C
 * includes it alone (the VN_CDEF markers only feed its constants to the NI's cffi build) (tests/c/null_ring_scanner.c is one); the Python SDK
 * (vhostni/scanner/ring.py) reads the same layout.
 *
 * Each scanner process gets, for its lifetime, four file descriptors (their numbers in
 * $VHOSTNI_RING_FDS, "ni,sc,kick_scanner,kick_ni"):
 *
 *   ni            a sealed memfd, region A.  The NI writes it; the scanner can only map it
 *                 read-only (F_SEAL_FUTURE_WRITE) and can neither shrink nor grow it.  It
 *                 holds the header below, the descriptor ring and the data area: the bytes
 *                 of the frames the scanner's subscriptions matched, and nothing else.
 *   sc            a sealed (size only) memfd, region B.  The scanner writes it: how far it
 *                 has read, and its decisions.  The NI reads every field of it once, into a
 *                 local, and validates it there; nothing in it is trusted.
 *   kick_scanner  an eventfd the NI writes when it published descriptors while the scanner
 *                 said it was about to sleep (vnr_sc.want_kick).
 *   kick_ni       an eventfd the scanner writes when it published decisions while the NI
 *                 said it was about to sleep (vnr_ni.want_kick).
 *
 * Indices are free-running 64-bit counters (never wrap in practice); a slot is
 * index & (slots - 1).  Every field written by one side and read by the other is one
 * naturally aligned 8- or 4-byte word: publish with a release store (or a store after a
 * full barrier), read with an acquire load.
 *
 * The NI -> scanner direction (descriptors):
 *   - The NI fills vnr_desc slots [desc_prod, new) and the data they point at, then stores
 *     desc_prod = new.  It publishes in batches (once per burst of frames it switched), and
 *     then, after a full barrier, reads vnr_sc.want_kick and writes kick_scanner if it is 1.
 *   - The scanner reads descriptors below desc_prod.  When it no longer needs the bytes of
 *     the descriptors below some index it stores vnr_sc.desc_cons = that index (monotonic,
 *     never beyond desc_prod); the NI then reuses their slots and data.  A descriptor's
 *     bytes stay valid until the scanner moves desc_cons past it, whether it decided it or
 *     not: deciding and consuming are independent.
 *   - To sleep, the scanner stores want_kick = 1, issues a full barrier, re-reads desc_prod,
 *     and blocks on kick_scanner only if nothing new came; it clears want_kick on waking.
 *
 * The scanner -> NI direction (decisions):
 *   - For a descriptor with VNR_F_HELD, the NI holds the frame until the scanner decides it:
 *     the scanner writes a vnr_dec {seq, verdict} at slot dec_prod and stores dec_prod + 1
 *     (batches: many entries, one store).  Decisions may come in any order.
 *   - After a full barrier the scanner reads vnr_ni.want_kick and writes kick_ni if it is 1.
 *   - The NI reads decisions below dec_prod and then stores vnr_ni.dec_cons; the scanner may
 *     reuse a decision slot once dec_cons is past it (at most dec_slots outstanding).
 *
 * What the NI does with what the scanner wrote:
 *   - A decision for a held descriptor the NI gave and has not settled: applied (cut is
 *     final for the frame; pass counts once every party holding the frame passed it).
 *   - A decision for a descriptor already settled (the hold timeout gave the policy's
 *     default, another scanner cut it, it was not held): counted as stale, ignored.
 *   - A decision for a descriptor never given, or a verdict that is neither PASS nor CUT,
 *     desc_cons going back or past desc_prod, dec_prod more than dec_slots ahead of
 *     dec_cons or going back: the ring is broken (vnr_ni.broken says why).  The NI stops
 *     reading it, applies the policy's default to what the scanner owed, alerts, and kills
 *     the scanner (it is restarted with a new ring).
 *   - A scanner that never decides or never consumes only stalls itself: each held frame
 *     gets the policy's default at its hold timeout, and while the ring (or its data area)
 *     is full, frames the scanner would have held get the default at once and read-only
 *     copies are dropped; both are counted (ring_full).
 */
#ifndef VHOSTNI_RING_H
#define VHOSTNI_RING_H

#include <stdint.h>

#define VNR_ENV "VHOSTNI_RING_FDS"

/* VN_CDEF_BEGIN */
#define VNR_MAGIC 0x31524e56      /* "VNR1" little-endian */
#define VNR_VERSION 1

/* vnr_desc.kind */
#define VNR_KIND_FRAME 1           /* a whole Ethernet frame */
/* vnr_desc.dir: as the guest sees it */
#define VNR_FROM_GUEST 1
#define VNR_TO_GUEST 2
/* vnr_desc.flags */
#define VNR_F_HELD 1               /* the NI holds the frame until this scanner decides it */
/* vnr_dec.verdict (the wire protocol's values) */
#define VNR_PASS 0
#define VNR_CUT 1
/* vnr_ni.broken: why the NI stopped reading the ring (first reason wins) */
#define VNR_BROKEN_NONE 0
#define VNR_BROKEN_DESC_CONS 1     /* desc_cons went back or past desc_prod */
#define VNR_BROKEN_DEC_PROD 2      /* dec_prod went back or more than dec_slots ahead */
#define VNR_BROKEN_DEC_SEQ 3       /* a decision for a descriptor never given */
#define VNR_BROKEN_VERDICT 4       /* a verdict neither PASS nor CUT */

#define VNR_DATA_ALIGN 64          /* every frame's bytes start at a multiple of this */
/* VN_CDEF_END */

/* Region A starts with this (one 4 KiB page); all offsets are from the start of region A. */
struct vnr_ni {
    uint32_t magic;                /* VNR_MAGIC */
    uint32_t version;              /* VNR_VERSION */
    uint32_t desc_slots;           /* power of two */
    uint32_t dec_slots;            /* power of two */
    uint64_t desc_off;             /* struct vnr_desc[desc_slots] */
    uint64_t data_off;             /* the data area */
    uint64_t data_size;
    uint64_t size;                 /* of region A */
    uint64_t sc_size;              /* of region B */
    uint64_t _res0;
    /* written by the NI while it runs, each on its own cache line */
    uint64_t desc_prod;            /* offset 64: descriptors published below this */
    uint8_t _pad1[56];
    uint64_t dec_cons;             /* offset 128: decisions read below this */
    uint8_t _pad2[56];
    uint32_t want_kick;            /* offset 192: 1 while the NI may sleep: kick after publishing */
    uint32_t broken;               /* VNR_BROKEN_*: the NI stopped reading this ring */
    uint8_t _pad3[56];
};

struct vnr_desc {                  /* 32 bytes */
    uint64_t seq;                  /* its index: the number decisions name */
    uint64_t time_ns;              /* Unix time the NI took the frame (the NI's clock) */
    uint32_t data;                 /* offset of its bytes from vnr_ni.data_off */
    uint32_t len;
    uint8_t kind;                  /* VNR_KIND_* */
    uint8_t dir;                   /* VNR_FROM_GUEST, VNR_TO_GUEST */
    uint8_t flags;                 /* VNR_F_* */
    uint8_t _pad[5];
};

/* Region B: the scanner's words, then the decision ring at VNR_DEC_OFF. */
struct vnr_sc {
    uint64_t desc_cons;            /* offset 0: done with the bytes of descriptors below */
    uint8_t _pad0[56];
    uint64_t dec_prod;             /* offset 64: decisions written below this */
    uint8_t _pad1[56];
    uint32_t want_kick;            /* offset 128: 1 while the scanner may sleep */
    uint8_t _pad2[124];
};
#define VNR_DEC_OFF 256

struct vnr_dec {                   /* 16 bytes */
    uint64_t seq;                  /* the descriptor decided */
    uint32_t verdict;              /* VNR_PASS, VNR_CUT */
    uint32_t _pad;
};

#endif
