/*
 * Internal structures of the fast path, shared by the .c files in csrc/ (not exposed to Python).
 */
#ifndef VN_INTERNAL_H
#define VN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "vhostni.h"

/* virtio feature bits the fast path looks at */
#define VIRTIO_NET_F_CSUM 0
#define VIRTIO_NET_F_GUEST_CSUM 1
#define VIRTIO_NET_F_GUEST_TSO4 7
#define VIRTIO_NET_F_GUEST_TSO6 8
#define VIRTIO_NET_F_GUEST_ECN 9
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_HOST_TSO6 12
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VHOST_F_LOG_ALL 26
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

/* smallest TSO segment size accepted from a guest (IPv4 minimum MTU 576 - 40) */
#define VN_MIN_GSO_SIZE 536

#define HAS_FEATURE(f, bit) (((f) >> (bit)) & 1ULL)

/* split virtqueue layout (virtio 1.x, 2.7) */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
    /* uint16_t used_event follows ring[num] */
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];
    /* uint16_t avail_event follows ring[num] */
};

/* virtio-net header, the 12-byte layout (VERSION_1 or MRG_RXBUF); little-endian on x86. */
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_HDR_F_DATA_VALID 2
#define VIRTIO_NET_HDR_GSO_NONE 0
#define VIRTIO_NET_HDR_GSO_TCPV4 1
#define VIRTIO_NET_HDR_GSO_UDP 3
#define VIRTIO_NET_HDR_GSO_TCPV6 4
#define VIRTIO_NET_HDR_GSO_ECN 0x80

struct vn_net_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
    uint16_t num_buffers;
};

/* A piece of guest memory a chain maps to, already translated and bounds-checked. */
struct vn_iov {
    uint8_t *p;
    uint32_t len;
    uint64_t gpa;      /* guest-physical address of p (for the dirty log) */
};

/* Free blocks the data path keeps for reuse (blkcache.c) are poisoned for the sanitizer
 * while they wait: a use after free still faults under ASan, as it would with free(), and
 * the caches themselves are tested by the sanitizer run too. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define VN_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define VN_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define VN_POISON(p, n) ((void)(p), (void)(n))
#define VN_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* blkcache.c: free blocks of records made and freed per frame, in power-of-two classes
 * from VN_BLK_MIN to VN_BLK_MAX bytes (a record takes at most twice what it needs); at most
 * max_bytes of them wait.  A zeroed struct with max_bytes set is an empty cache. */
#define VN_BLK_MIN 256
#define VN_BLK_MAX 4096
#define VN_BLK_CLASSES 5
struct vn_blkcache {
    void *head[VN_BLK_CLASSES];
    size_t bytes, max_bytes;
};
/* A block of at least `size` bytes (NULL if out of memory). */
void *vn_blk_get(struct vn_blkcache *c, size_t size);
/* Gives back a block of vn_blk_get with the same `size` (NULL: nothing). */
void vn_blk_put(struct vn_blkcache *c, void *b, size_t size);
/* Frees every waiting block. */
void vn_blk_drain(struct vn_blkcache *c);

/* One frame in the switch's packet buffer: header immediately followed by data, so a TAP
 * read or write of (header, frame) is one contiguous buffer. */
/* A frame taken from a guest's TX ring may leave its bytes from VN_COPY_HEAD on in the
 * guest's buffers (tail_len of them, in tail[]): when nothing but the receiver's ring needs
 * them, vn_vq_push_rx copies them there straight, once; anything else that reads or keeps
 * the frame calls vn_pkt_fill first.  The head holds every byte the switch reads (MACs, the
 * receive-queue hash: at most 14 + 60 + 4). */
#define VN_COPY_HEAD 128
#define VN_TAIL_IOV 8
struct vn_pkt {
    uint32_t len;
    struct vn_net_hdr hdr;
    uint8_t data[VN_MAX_FRAME];
    uint32_t tail_len;             /* data[len - tail_len, len) is still in tail[] */
    unsigned ntail;
    struct vn_iov tail[VN_TAIL_IOV];
};
_Static_assert(offsetof(struct vn_pkt, data) == offsetof(struct vn_pkt, hdr) + 12,
               "header and data must be contiguous");

struct vn_region {
    uint64_t gpa, size, uva;
    uint8_t *host;     /* host address of gpa */
    void *map_base;    /* what mmap returned (covers mmap_offset + size) */
    size_t map_len;
    size_t map_page;   /* the file's page size (st_blksize: huge pages in hugetlbfs) */
};

struct vn_mem {
    unsigned n;
    unsigned hint;     /* the region the last translation hit: tried first */
    int faulted;       /* set by the SIGBUS guard: the frontend shrank a mapped file */
    struct vn_region r[VN_MAX_REGIONS];
};


#define VN_USED_SHADOW 32
struct vn_vq {
    unsigned num;                 /* 0: not configured */
    uint64_t desc_uva, used_uva, avail_uva;
    int addr_set;
    volatile struct vring_desc *desc;   /* host pointers; NULL until mapped */
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    uint16_t last_avail;          /* next avail ring entry we consume */
    uint16_t avail_known;         /* heads from last_avail on that the last read of avail idx
                                   * showed (checked then): taken without reading it again */
    uint16_t used_idx;            /* our copy of used->idx */
    uint16_t shadow_idx;          /* the used index of shadow[0] */
    uint16_t nshadow;             /* used entries not yet written to the ring (vn_vq_push_used) */
    struct { uint32_t id, len; } shadow[VN_USED_SHADOW];
    uint16_t signalled_used;      /* used idx at the last interrupt */
    int signalled_valid;
    int kickfd, callfd;
    int started;                  /* between SET_VRING_KICK and GET_VRING_BASE */
    int enabled;
    int active;                   /* has (or may have) work: serviced without a kick */
    int call_pending;             /* used entries written since the last interrupt */
    int log_used;                 /* VHOST_VRING_F_LOG: log used-ring writes at log_used_gpa */
    uint64_t log_used_gpa;        /* guest-physical address of the used ring */
};

struct vn_backlog_frame {
    uint32_t len;
    struct vn_net_hdr hdr;
    uint8_t data[];
};

#define VN_BACKLOG 256

/* Transport headers of recent first fragments, per port: later fragments are matched by
 * the datagram they belong to (vn_frag_track). */
#define VN_FRAG_FIRSTS 128
#define VN_FRAG_FIRST_NS (30ULL * 1000000000ULL)
struct vn_frag_first {
    uint64_t seen_ns;          /* 0: free */
    uint32_t id;
    uint8_t family, dir, key_proto, l4_known;
    uint8_t src[16], dst[16];
    int16_t proto;
    uint16_t sport, dport;
    uint8_t tcp_flags;
    uint32_t data_end;         /* bytes of the fragmentable part the first fragment carried */
};

struct vn_port {
    int kind;                     /* 0: free slot */
    int id;
    struct vn_port_stats st;
    /* frames and bytes per virtqueue (indexed like vq[]); not reset with the device */
    struct vn_qcount { uint64_t frames, bytes; } qst[VN_MAX_QUEUES];
    /* vhost */
    struct vn_mem mem;
    struct vn_vq vq[VN_MAX_QUEUES];
    unsigned nqp;                 /* queue pairs [0, nqp) were ever started (SET_VRING_KICK):
                                   * no later one can be ready, so the loops stop there */
    uint64_t features;
    unsigned hdr_len;             /* 10 or 12 */
    int broken;
    /* dirty-page log of a live migration (SET_LOG_BASE): one bit per 4 KiB guest page,
     * written while VHOST_F_LOG_ALL is negotiated; NULL: none */
    uint8_t *log;
    uint64_t log_size;            /* bytes of the bitmap */
    void *log_map;                /* what mmap returned */
    size_t log_map_len;
    int log_faulted;              /* set by the SIGBUS guard: the log's file was shrunk */
    /* frames waiting for guest receive buffers, oldest first */
    struct vn_backlog_frame *backlog[VN_BACKLOG];
    unsigned bl_head, bl_count;
    /* tap */
    int tapfd;
    unsigned tap_hdr_len;         /* 0 (no vnet header) or 12 */
    int tap_readable;
    uint8_t mac[6];
    int mac_set;
    /* NI policy (NULL: none) and what it holds */
    struct vn_policy *pol;
    uint64_t held_bytes;
    unsigned held_frames;
    struct vn_frag_first frag_first[VN_FRAG_FIRSTS];
    struct vn_sigport *sig;       /* the signature stage (sigstage.c); NULL: none */
    struct vn_chan *chan[VN_CHANS];   /* scanner rings (ring.c); NULL: free slot */
    uint8_t sink_discard;         /* a sink that keeps nothing (vn_port_sink_discard) */
};

#define VN_MAC_TABLE 4096         /* power of two */
#define VN_MAC_AGE_NS (300ULL * 1000000000ULL)

struct vn_mac_entry {
    uint8_t mac[6];
    uint8_t used;
    int16_t port;
    uint64_t seen_ns;
};

#define VN_MAX_IOV 4096

/* Parsed view of a frame's headers, filled once per frame by vn_parse (parse.c). */
struct vn_hdrs {
    uint16_t ethertype;        /* innermost: after VLAN tags and LLC/SNAP */
    uint8_t nvlan;             /* VLAN tags walked */
    uint8_t snap;              /* the type came from an 802.3 LLC/SNAP header */
    int unparsed;              /* VN_UNPARSED_*: where the walk stopped (0: it got through) */
    int family;                /* 0, 4, 6 */
    const uint8_t *src, *dst;  /* IP addresses inside the frame */
    int proto;                 /* transport protocol; -1: none */
    int l4_known;              /* transport header seen, or taken from the first fragment */
    int l4_from_first;         /* ports are the first fragment's (vn_frag_track) */
    uint16_t sport, dport;
    uint8_t tcp_flags;
    int icmp_type, icmp_code;  /* ICMP / ICMPv6; -1: none */
    int l4_off;                /* transport header (or a later fragment's payload) */
    int frag;                  /* an IP fragment (first or later; IPv6 atomic ones too) */
    int frag_later;            /* offset > 0: no transport header in this frame */
    int frag_more;             /* more fragments follow */
    uint32_t frag_id;
    uint32_t frag_off;         /* a later fragment's offset in its datagram's fragmentable part */
    uint32_t frag_part;        /* where the fragmentable part starts in the frame */
    uint8_t frag_key_proto;    /* IPv4 header's protocol field (part of the datagram key) */
    int l3_off;                /* where the IP (or ARP) header starts */
    uint32_t ip_end;           /* end of the IP datagram by its length field */
    /* set by the flow stage (vn_flow_input), zero otherwise: the frame's flow (id and
     * table hash; 0: none), and 1 if a frame of it already left the NI in this direction
     * (vn_match.flow_new does not match it) */
    uint64_t flow_id;
    uint32_t flow_hash;
    uint8_t flow_admitted;
};


/* A frame held for (or copied to) the NI kernel. */
struct vn_held {
    uint64_t id;
    struct vn_held *hnext;     /* hash chain */
    int port;                  /* NI whose policy matched */
    int dir;
    int egress_to;             /* -1: held at ingress from `port`; else deliver to this port */
    uint64_t subs, contain, time_ns;
    uint64_t rings;            /* the scanner rings that got it too (vn_punt.rings) */
    uint64_t flow_id;          /* its flow (vn_hdrs.flow_id): admitted when passed */
    uint64_t need;             /* who still owes a pass: bit k the ring in slot k of `port`,
                                * VN_NEED_KERNEL the NI kernel; released when none is left */
    uint32_t flow_hash;
    uint32_t len;
    struct vn_net_hdr hdr;
    uint8_t data[];
};

/* A frame delivered to a sink port, waiting for vn_sink_next(). */
struct vn_sink_rec {
    struct vn_sink_rec *next;
    int port;
    uint32_t len;
    uint8_t data[];
};

#define VN_NEED_KERNEL (1ULL << 63)
#define VN_CHAN_MAX 1024           /* scanner rings per switch */

#define VN_HELD_HASH 4096
#define VN_PUNT_QUEUE 4096

/* The switch's emit queue (emit.c): frames the policy and the TCP engine produce wait there,
 * copied, for the switch to send them on through the stages they have left. */
enum {
    VN_EMIT_POLICY = 1,        /* the whole policy of `port` in `dir` (a reassembled datagram) */
    VN_EMIT_SUBS,              /* the frame subscriptions of `port` (a segment a stream released) */
    VN_EMIT_OUT,               /* no stage of `port` left: switched, or delivered to egress_to */
};
#define VN_EMIT_BYTES (64u << 20)  /* one buffer, touched as used */
#define VN_EMIT_KEEP (1u << 20)    /* bytes kept touched when the queue empties */
#define VN_EMIT_DRAIN_MAX (4u * VN_EMIT_FRAMES)   /* frames one drain sends on at most */
struct vn_emitq {
    uint8_t *buf;
    uint32_t head, tail;       /* records in [head, tail), or from head to a wrap and [0, tail) */
    uint32_t hi;               /* highest tail since the queue was last empty */
    unsigned count, max;       /* frames queued; at most (vn_switch_set_emit_max) */
};
/* Where a frame popped from the queue goes next. */
struct vn_emit_to {
    int stage, port, dir;
    int egress_to;             /* -1: into the switch from `port`; else delivered to this port */
    uint64_t flow_id;          /* VN_EMIT_SUBS: the flow stage's note on the frame, if it */
    uint32_t flow_hash;        /* passed the stage before it was queued (vn_hdrs.flow_*) */
    uint8_t flow_admitted;
};

struct vn_switch {
    struct vn_port ports[VN_MAX_PORTS];
    /* the slots in use (kind != 0), ascending: what the per-burst and flood loops walk
     * instead of VN_MAX_PORTS slots of a few KiB each (live_rebuild, on add and remove) */
    uint8_t live[VN_MAX_PORTS];
    unsigned nlive;
    struct vn_mac_entry macs[VN_MAC_TABLE];
    struct vn_mac_entry *mac_hint_src, *mac_hint_dst;   /* the entries last found (hints) */
    int epfd;
    int wake_fd;
    uint64_t now_ns;
    uint64_t manual_ns;           /* 0: the system clocks; else the time handed in (replay) */
    struct vn_pkt *batch;         /* VN_BATCH frames, one mmap */
    struct vn_pkt *seg;           /* scratch for one GSO segment */
    struct vn_iov iov[VN_MAX_IOV];
    struct vn_iov iov_first[64];  /* first RX buffer's pieces, for num_buffers */
    struct vn_pkt *rel;           /* a released held frame, then a frame leaving the emit queue */
    struct vn_pkt *flood;         /* a flooded frame's copy for a port whose egress may edit it */
    struct vn_emitq emit;
    int draining;
    /* NI kernel hand-off */
    int punt_fd;
    uint64_t next_held_id;
    struct vn_held *held_hash[VN_HELD_HASH];
    struct vn_held *punt_q[VN_PUNT_QUEUE];
    unsigned punt_head, punt_count;
    struct vn_held *punt_last;    /* handed out by vn_punt_next; freed on the next call if a copy */
    struct vn_blkcache held_blocks;   /* free held-frame records (policy.c, held_new) */
#define VN_HELD_CACHE_BYTES (2u << 20)   /* ... kept at most */
    /* frames delivered to sink ports, oldest first */
    struct vn_sink_rec *sink_head, *sink_tail, *sink_last;
    unsigned sink_count;
    struct vn_tcp *tcp;           /* stream reconstruction state (tcp.c); NULL until needed */
    struct vn_flows *flows;       /* the flow stage (flow.c); NULL until a policy turns it on */
    /* scanner rings (ring.c): all open ones, and those with descriptors not yet published */
    struct vn_chan *chans[VN_CHAN_MAX];
    unsigned nchans;
    struct vn_chan *dirty[VN_CHAN_MAX];
    unsigned ndirty;
    uint64_t chan_pub_ns;         /* when descriptors were last published (vn_chan_spin) */
};

/* ring.c */
/* Publishes a frame on ring `slot` of `port` (held_id 0: a read-only copy), stamped
 * time_ns (vn_clock_real, read once per frame by the caller).  0: taken; -1: the ring is
 * full, broken or gone (counted). */
int vn_chan_push(struct vn_switch *sw, int port, int slot, const struct vn_pkt *pkt, int dir,
                 uint64_t held_id, uint64_t time_ns);
/* TCP streams on rings: a handle for a stream given to ring `slot` (0, or -1 if none
 * left); a descriptor of kind VNR_KIND_STREAM_* (`extra`: what follows the header, `copy`
 * writes the `len` payload bytes from stream offset `offset`); the stream is over for the
 * ring (`pushed`: its CLOSE was published, the handle is free once consumed) */
#define VN_CHAN_STREAMS 65536
typedef void (*vn_chan_copy_fn)(void *arg, uint8_t *dst, uint64_t off, uint32_t len);
int vn_chan_stream_handle(struct vn_switch *sw, int port, int slot, uint64_t stream, uint32_t *handle);
int vn_chan_stream_push(struct vn_switch *sw, int port, int slot, int kind, uint32_t handle,
                        uint64_t stream, int dir, uint64_t offset, uint32_t len, int held,
                        uint32_t reason, const void *extra, uint32_t extra_len,
                        vn_chan_copy_fn copy, void *arg);
void vn_chan_stream_closed(struct vn_switch *sw, int port, int slot, uint32_t handle, int pushed);
/* tcp_ring.c, for ring.c: a ring's stream pass (0 applied, -1 not its to pass); a held
 * chunk [.., end) of `dir`: settled? (timeout 0: 1 if passed or gone), or its hold timeout
 * (timeout 1: the default `pass`, else the connection is killed); the ring is gone */
int vn_tcp_ring_pass(struct vn_switch *sw, uint64_t stream, int port, int slot, int dir, uint64_t upto);
int vn_tcp_ring_chunk(struct vn_switch *sw, uint64_t stream, int port, int slot, int dir,
                      uint64_t end, int timeout, int pass);
void vn_tcp_ring_gone(struct vn_switch *sw, uint64_t stream, int port, int slot, int pass);
/* Connections whose ring could not take their bytes and whose default is cut: killed here,
 * out of the input path (ring.c calls it each service pass) */
void vn_tcp_ring_service(struct vn_switch *sw);
/* Publishes what was pushed and kicks scanners that sleep (once per batch). */
void vn_chan_flush(struct vn_switch *sw);
/* Before the switch sleeps: asks scanners to kick; 1 if a decision is waiting already. */
int vn_chan_arm(struct vn_switch *sw);
/* Before the switch sleeps, shortly after publishing to a scanner that owes decisions: polls
 * the decision rings up to VN_CHAN_SPIN_NS; 1 if a decision came. */
#define VN_CHAN_SPIN_NS 20000ULL
#define VN_CHAN_SPIN_AFTER_NS 200000ULL
int vn_chan_spin(struct vn_switch *sw);
void vn_chan_kicked(struct vn_switch *sw, int port, int slot);
void vn_chan_port_gone(struct vn_switch *sw, int port);
/* vn_chan_close and vn_chan_poll without draining the emit queue (switch.c drains) */
int vn_chan_close_core(struct vn_switch *sw, int port, int slot, int pass);
int vn_chan_service(struct vn_switch *sw);
/* policy.c: a party's decision on held frame `id` (bit: its `need` bit) */
int vn_held_settle(struct vn_switch *sw, uint64_t id, uint64_t bit, int pass);
int vn_held_exists(struct vn_switch *sw, uint64_t id);

/* mem.c */
uint8_t *vn_mem_gpa(struct vn_mem *m, uint64_t gpa, uint64_t len);
uint8_t *vn_mem_uva(struct vn_mem *m, uint64_t uva, uint64_t len);
int vn_mem_read(struct vn_mem *m, uint64_t gpa, void *dst, uint64_t len);
int vn_mem_iov(struct vn_mem *m, uint64_t gpa, uint64_t len,
               struct vn_iov *iov, unsigned max, unsigned *n);
void vn_mem_unmap(struct vn_mem *m);
/* Dirty log: marks the pages of guest-physical [gpa, gpa+len) written, if logging. */
void vn_log_mark(struct vn_port *p, uint64_t gpa, uint64_t len);
static inline void vn_log_write(struct vn_port *p, uint64_t gpa, uint64_t len)
{
    if (__builtin_expect(p->log != NULL, 0))
        vn_log_mark(p, gpa, len);
}
int vn_log_map(struct vn_port *p, int fd, uint64_t size, uint64_t offset);
void vn_log_unmap(struct vn_port *p);
int vn_mem_map(struct vn_mem *m, unsigned n, const struct vn_region_spec *spec, const int *fds);

/* vring.c */
int vn_vq_map(struct vn_port *p, struct vn_vq *vq);
static inline int vn_vq_ready(const struct vn_port *p, const struct vn_vq *vq)
{
    return !p->broken && vq->started && vq->enabled && vq->desc && vq->num;
}
int vn_vq_avail_count(struct vn_port *p, struct vn_vq *vq);
int vn_vq_map_chain(struct vn_switch *sw, struct vn_port *p, struct vn_vq *vq, uint16_t head,
                    int writable, unsigned *niov, uint64_t *total);
void vn_vq_push_used(struct vn_port *p, struct vn_vq *vq, uint16_t head, uint32_t len);
void vn_vq_publish_used(struct vn_port *p, struct vn_vq *vq);
void vn_vq_notify_enable(struct vn_port *p, struct vn_vq *vq, int on);
void vn_vq_signal(struct vn_port *p, struct vn_vq *vq);
int vn_vq_pop_tx(struct vn_switch *sw, struct vn_port *p, struct vn_vq *vq, struct vn_pkt *pkt,
                 int direct);
/* data[0, len) is the frame; with src, its last src->tail_len bytes come from src->tail */
int vn_vq_push_rx(struct vn_switch *sw, struct vn_port *p, struct vn_vq *vq,
                  const struct vn_net_hdr *hdr, const uint8_t *data, uint32_t len,
                  const struct vn_pkt *src);
/* Copies what is left of a frame in the sender's buffers into pkt->data. */
void vn_pkt_fill_tail(struct vn_pkt *pkt);
static inline void vn_pkt_fill(struct vn_pkt *pkt)
{
    if (pkt->tail_len)
        vn_pkt_fill_tail(pkt);
}
void vn_port_break(struct vn_port *p, int reason);
/* The SIGBUS guard (csrc/mem.c): a mapping of a file the frontend can shrink, whose access
 * past the new end would kill the whole daemon, registered with the flag to set instead. */
int vn_guard_add(void *start, size_t len, size_t page, int *faulted);
void vn_guard_del(void *start);

/* ---- big-endian field access and the Internet checksum, shared by the .c files ---- */
static inline uint16_t vn_rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void vn_wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline uint32_t vn_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void vn_wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* One's-complement sum of 16-bit big-endian words added to `sum` (not folded). */
static inline uint32_t vn_sum16(uint32_t sum, const uint8_t *p, size_t len)
{
    if (len >= 64) {
        /* 32-bit words into 64-bit sums (RFC 1071: the sum does not depend on the byte order
         * of its words, so native words are summed and the folded result swapped), four
         * independent sums 16 bytes a step: the TCP engine checks every payload byte, and one
         * chain of adds ran at 9 bytes/ns where four run at 22 (a 1460-byte segment: 155 ns
         * then, 65 now).  No sum overflows: a frame is far below 2^32 words. */
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (; len >= 16; p += 16, len -= 16) {
            uint32_t w[4];
            memcpy(w, p, 16);
            a0 += w[0];
            a1 += w[1];
            a2 += w[2];
            a3 += w[3];
        }
        for (; len >= 4; p += 4, len -= 4) {
            uint32_t w;
            memcpy(&w, p, 4);
            a0 += w;
        }
        uint64_t acc = (a0 & 0xffffffff) + (a0 >> 32) + (a1 & 0xffffffff) + (a1 >> 32) +
                       (a2 & 0xffffffff) + (a2 >> 32) + (a3 & 0xffffffff) + (a3 >> 32);
        while (acc >> 16)
            acc = (acc & 0xffff) + (acc >> 16);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        acc = (uint16_t)(acc << 8 | acc >> 8);
#endif
        sum = (sum & 0xffff) + (sum >> 16) + (uint32_t)acc;
    }
    while (len > 1) {
        sum += (uint32_t)p[0] << 8 | p[1];
        p += 2;
        len -= 2;
        if (sum & 0x80000000u)
            sum = (sum & 0xffff) + (sum >> 16);
    }
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

/* Folds a sum to 16 bits (not inverted: ~vn_fold(sum) is the checksum field). */
static inline uint16_t vn_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* parse.c */
/* Walks the frame's headers into *h; returns h->unparsed (0: parsed to the end). */
int vn_parse(const struct vn_pkt *pkt, struct vn_hdrs *h);
/* Do the first ``plen`` bits of ``addr`` equal those of ``pfx``?  (``plen`` at most the
 * address's length in bits: the caller caps it.) */
static inline int vn_prefix_match(const uint8_t *addr, const uint8_t *pfx, unsigned plen)
{
    unsigned full = plen / 8, rest = plen % 8;
    if (memcmp(addr, pfx, full))
        return 0;
    if (rest) {
        uint8_t m = (uint8_t)(0xff << (8 - rest));
        if ((addr[full] & m) != (pfx[full] & m))
            return 0;
    }
    return 1;
}

/* Bounds-checked view of n bytes at off of a buffer whose valid bytes end at `end`: NULL if
 * they do not all lie inside.  Every parser of frame bytes (parse.c, antispoof.c, offload.c,
 * policy.c, the TCP engine, the switch's flow hash) reads through it or the helpers below,
 * so a length check is written in one place: take the view, then read inside it. */
static inline const uint8_t *vn_get(const uint8_t *d, uint32_t end, uint32_t off, uint32_t n)
{
    return off <= end && n <= end - off ? d + off : NULL;
}
/* The same for bytes about to be rewritten in place. */
static inline uint8_t *vn_getw(uint8_t *d, uint32_t end, uint32_t off, uint32_t n)
{
    return off <= end && n <= end - off ? d + off : NULL;
}
/* A big-endian 16-bit field at off: 0 and *v, or -1 if it does not lie inside. */
static inline int vn_get16(const uint8_t *d, uint32_t end, uint32_t off, uint16_t *v)
{
    const uint8_t *p = vn_get(d, end, off, 2);
    if (!p)
        return -1;
    *v = vn_rd16(p);
    return 0;
}
/* For an IP fragment: a first fragment notes its transport header; a later one takes it
 * (h->l4_known, ports, flags, proto).  Returns -1 for a later fragment whose first was not
 * seen within VN_FRAG_FIRST_NS, -2 for one that starts inside what its first fragment
 * carried (an overlap), else 0. */
int vn_frag_track(struct vn_port *p, int dir, uint64_t now, struct vn_hdrs *h);

/* antispoof.c */
/* Non-zero if the guest may not send this frame (it claims a MAC or an address the policy did
 * not give it, or more): VN_SPOOFED_DHCP for a DHCP answer from a guest
 * that is no DHCP server (counted apart), 1 for anything else. */
#define VN_SPOOFED_DHCP 2
int vn_spoofed(const struct vn_policy *pol, const struct vn_pkt *pkt, const struct vn_hdrs *h);

/* emit.c: the producers' side (policy.c, the TCP engine) and the switch's */
int vn_emit_init(struct vn_emitq *q);
void vn_emit_free(struct vn_emitq *q);
/* Queues a copy of pkt that still has to pass `stage` of `port` (then the switch, or
 * egress_to).  0, or -1 if the queue is full: the frame is dropped, counted on `port`. */
int vn_emit_push(struct vn_switch *sw, int stage, int port, int dir, int egress_to,
                 const struct vn_pkt *pkt);
/* The same, keeping what the flow stage noted on the frame (h->flow_*), for a frame that
 * passed the stage and still meets the subscriptions (which admit its flow). */
int vn_emit_push_flow(struct vn_switch *sw, int stage, int port, int dir, int egress_to,
                      const struct vn_pkt *pkt, const struct vn_hdrs *h);
/* The same from a frame's parts (a kept record: no copy into a vn_pkt first). */
int vn_emit_push_raw(struct vn_switch *sw, int stage, int port, int dir, int egress_to,
                     const struct vn_net_hdr *hdr, const uint8_t *data, uint32_t len,
                     const struct vn_hdrs *h);
/* The oldest queued frame into *pkt and where it goes into *m; 0 if none. */
int vn_emit_pop(struct vn_emitq *q, struct vn_emit_to *m, struct vn_pkt *pkt);

/* policy.c */
int vn_match_frame(const struct vn_match *m, int dir, const struct vn_pkt *pkt, const struct vn_hdrs *h);
/* 1: frame held or dropped (caller stops), 0: continue forwarding. */
int vn_policy_apply(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt);
/* The frame-subscription stage of vn_policy_apply alone (for frames a stream releases). */
int vn_policy_subs(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt,
                   const struct vn_hdrs *h);
void vn_held_free_all(struct vn_switch *sw);
/* A copy of pkt as a held-frame record into r (sizeof *r + pkt->len bytes), not yet in the
 * hash or the punt queue, stamped time_ns (the kernel's records: the frame's real time; the
 * TCP engine's: none, it keeps no time per record). */
void vn_held_init(struct vn_held *r, const struct vn_pkt *pkt, int port, int dir, int egress_to,
                  uint64_t subs, uint64_t contain, uint64_t time_ns);
void vn_punt_signal(struct vn_switch *sw);
/* vn_held_release and vn_held_release_port without sending anything on: what a pass
 * releases joins the emit queue (the switch's wrappers drain it). */
int vn_policy_release(struct vn_switch *sw, uint64_t id, int pass);
int vn_policy_release_port(struct vn_switch *sw, int port, int pass);
/* 1 (counted) if the port's isolation (quarantine, link down) drops a frame released late. */
int vn_isolation_drops(struct vn_port *p, int dir, const struct vn_pkt *pkt);

/* tcp.c */
#define VN_TCP_FORWARD 0           /* not the engine's business, or let through */
#define VN_TCP_TAKEN 1             /* held (or already sent on) or dropped by the engine */
/* Runs a TCP frame through the stream engine of `port` (whose policy is set). */
int vn_tcp_input(struct vn_switch *sw, int port, int dir, int egress_to, struct vn_pkt *pkt,
                 const struct vn_hdrs *h);
/* Does the engine of `port` want to see TCP frames (stream subscriptions or flows)? */
int vn_tcp_active(struct vn_switch *sw, int port);
int vn_tcp_pending(struct vn_switch *sw);
void vn_tcp_port_gone(struct vn_switch *sw, int port);
void vn_tcp_free_all(struct vn_switch *sw);
/* The stream API (vn_stream_pass, _kill, _cut, _inject, _more) and the timers
 * (vn_tcp_housekeeping) without sending anything on: what they emit joins the emit queue;
 * the public functions, in switch.c, drain it and signal the guests once. */
int vn_tcp_stream_pass(struct vn_switch *sw, uint64_t stream, int dir, uint64_t upto);
int vn_tcp_stream_ring_pass(struct vn_switch *sw, uint64_t stream, int port, int slot, int dir,
                            uint64_t upto);
int vn_tcp_stream_kill(struct vn_switch *sw, uint64_t stream);
int vn_tcp_stream_cut(struct vn_switch *sw, uint64_t stream, int dir, uint64_t from, uint64_t to);
int vn_tcp_stream_inject(struct vn_switch *sw, uint64_t stream, int dir, uint64_t at,
                         const uint8_t *bytes, uint32_t len);
int vn_tcp_stream_more(struct vn_switch *sw, uint64_t stream, int dir);
int vn_tcp_timers(struct vn_switch *sw);

/* sigstage.c (the signature stage) */
/* Packet rules on one frame: 1 if a drop/reject rule (or a failed scan) drops it. */
int vn_sig_packet(struct vn_switch *sw, int port, int dir, struct vn_pkt *pkt, const struct vn_hdrs *h);
/* Does a stream rule's port set name either port (the engine then tracks the connection)? */
int vn_sig_tracks(struct vn_switch *sw, int port, uint16_t a, uint16_t b);
/* Has the port's stage stream rules (the engine must see its TCP frames)? */
int vn_sig_streams(struct vn_switch *sw, int port);
void vn_sigport_free(struct vn_switch *sw, int port);

/* switch.c: the clocks behind vn_clock / vn_clock_real (the data path reads those) */
uint64_t vn_now_ns(void);
uint64_t vn_realtime_ns(void);

/* The switch's clock.  Every timer and timestamp of the data path reads it here: the
 * monotonic clock (vn_clock) and Unix time (vn_clock_real, what scanners are told), or,
 * once vn_switch_set_clock handed a time in, that time for both (offline replay on a
 * capture's timestamps: deterministic, and as fast as the frames can be fed). */
static inline uint64_t vn_clock(const struct vn_switch *sw)
{
    return sw->manual_ns ? sw->manual_ns : vn_now_ns();
}

static inline uint64_t vn_clock_real(const struct vn_switch *sw)
{
    return sw->manual_ns ? sw->manual_ns : vn_realtime_ns();
}

/* flow.c: the flow stage, for policy.c */
/* Accounts a parsed frame to its flow (vn_policy.flows set) and notes the flow in h
 * (flow_id, flow_hash, flow_admitted).  1: drop it (a new flow found the table full and
 * flows_over is drop), 0: go on. */
int vn_flow_input(struct vn_switch *sw, int port, int dir, const struct vn_pkt *pkt,
                  struct vn_hdrs *h);
/* A frame of flow `id` (0: none) left the NI in direction `dir`: later frames that way
 * no longer open it (vn_match.flow_new).  A flow that expired meanwhile is left alone. */
void vn_flow_admit(struct vn_switch *sw, int port, int dir, uint64_t id, uint32_t hash);
/* Are flow events waiting (the punt eventfd must stay readable)? */
int vn_flow_pending(struct vn_switch *sw);
/* Forgets a port's flows (no events: nobody is left to tell). */
void vn_flow_port_gone(struct vn_switch *sw, int port);
void vn_flow_free_all(struct vn_switch *sw);

/* offload.c */
int vn_csum_complete(struct vn_pkt *pkt);
typedef void (*vn_seg_cb)(struct vn_switch *sw, int port, struct vn_pkt *seg);
int vn_gso_segment(struct vn_switch *sw, int port, const struct vn_pkt *pkt, vn_seg_cb cb);
int vn_offload_check(const struct vn_pkt *pkt);

#define VN_PUSH_OK 1
#define VN_PUSH_NOBUF 0
#define VN_PUSH_TOOBIG -1
#define VN_PUSH_BROKEN -2

#endif
