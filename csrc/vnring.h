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
/* Reconstructed TCP streams (a scanner whose ring request said "streams": true): the bytes
 * start with a struct vnr_stream */
#define VNR_KIND_STREAM_OPEN 2     /* a new stream: a struct vnr_stream_open follows the header */
#define VNR_KIND_STREAM_DATA 3     /* in-order bytes of direction `dir` follow the header */
#define VNR_KIND_STREAM_END 4      /* direction `dir` ended (FIN) at header.offset */
#define VNR_KIND_STREAM_CLOSE 5    /* the stream is over (header.reason); its handle is free
                                    * for a new stream once the scanner consumed this */
/* vnr_desc.dir: as the guest sees it */
#define VNR_FROM_GUEST 1
#define VNR_TO_GUEST 2
/* vnr_desc.flags */
#define VNR_F_HELD 1               /* the NI holds the frame until this scanner decides it */
/* vnr_dec.verdict (the wire protocol's values) */
#define VNR_PASS 0
#define VNR_CUT 1
/* A stream pass: VNR_STREAM_PASS | dir, with vnr_dec.seq the offset below which every byte
 * of that direction is passed (2^64-1: all of it, later bytes too) and vnr_dec.handle the
 * stream's handle.  Only a held direction can be passed; a pass never goes back. */
#define VNR_STREAM_PASS 0x10
/* vnr_ni.broken: why the NI stopped reading the ring (first reason wins) */
#define VNR_BROKEN_NONE 0
#define VNR_BROKEN_DESC_CONS 1     /* desc_cons went back or past desc_prod */
#define VNR_BROKEN_DEC_PROD 2      /* dec_prod went back or more than dec_slots ahead */
#define VNR_BROKEN_DEC_SEQ 3       /* a decision for a descriptor never given */
#define VNR_BROKEN_VERDICT 4       /* a verdict none of the above */
#define VNR_BROKEN_HANDLE 5        /* a stream handle the ring never had */

/* vnr_stream.reason of a CLOSE */
#define VNR_CLOSE_FIN 1
#define VNR_CLOSE_RST 2
#define VNR_CLOSE_KILLED 3
#define VNR_CLOSE_IDLE 4
#define VNR_CLOSE_BYPASS 5
#define VNR_CLOSE_GONE 6
#define VNR_CLOSE_OVERRUN 7        /* this ring could not take its bytes: the scanner lost it */
#define VNR_STREAM_CHUNK 65536     /* payload bytes of one DATA descriptor at most */

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
    uint64_t seq;                  /* the descriptor decided (a stream pass: the offset) */
    uint32_t verdict;              /* VNR_PASS, VNR_CUT, VNR_STREAM_PASS | dir */
    uint32_t handle;               /* a stream pass: the stream's handle; else 0 */
};

/* The head of a stream descriptor's bytes (VNR_DATA_ALIGN-aligned, like every record). */
struct vnr_stream {                /* 32 bytes */
    uint64_t stream;               /* the NI's stream id: what socket requests name it by */
    uint64_t offset;               /* DATA: offset of its first byte; END: where the FIN is */
    uint32_t handle;               /* what this ring's stream passes name it by */
    uint32_t reason;               /* CLOSE: VNR_CLOSE_* */
    uint64_t _res;
};

struct vnr_stream_open {           /* 48 bytes, after the header of an OPEN */
    uint8_t family;                /* 4 or 6 */
    uint8_t client;                /* VNR_FROM_GUEST: the guest connected out; VNR_TO_GUEST: in */
    uint8_t read;                  /* directions (VNR_FROM_GUEST | VNR_TO_GUEST bits) read */
    uint8_t held;                  /* ... held until this scanner passes them */
    uint8_t midstream;             /* picked up mid-stream: offset 0 is where the NI joined */
    uint8_t _pad[3];
    uint16_t guest_port, remote_port, server_port, _pad2;
    uint8_t guest_addr[16];        /* IPv4: the first 4 bytes */
    uint8_t remote_addr[16];
};

#endif
