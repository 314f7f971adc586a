/*
 * vhostni fast path: guest memory, split virtqueues and an L2 switch between NIs and TAPs.
 *
 * Pure C, no Python: the Python layer (vhostni/fastpath.py) owns the vhost-user control
 * protocol and calls these functions to configure ports; the per-frame work happens here.
 *
 * Everything a guest writes (descriptors, ring indices, addresses, lengths, virtio-net
 * headers) is hostile.  Each value is loaded from guest memory once, into a local, and
 * validated there; a guest that breaks the rules marks its own port broken and the rest of
 * the switch carries on.
 *
 * This header is also fed to cffi's cdef (between the VN_CDEF markers), so it only uses
 * declarations cffi understands there.
 */
#ifndef VHOSTNI_H
#define VHOSTNI_H

#include <stdint.h>

/* VN_CDEF_BEGIN */
#define VN_MAX_REGIONS 32
#define VN_MAX_PORTS 256
#define VN_MAX_QUEUE_PAIRS 8
#define VN_MAX_QUEUES 16
#define VN_MAX_QUEUE_SIZE 32768
/* A 64 KiB TSO frame plus Ethernet and one VLAN tag. */
#define VN_MAX_FRAME 65550
#define VN_BATCH 64

/* Port kinds. */
#define VN_PORT_VHOST 1
#define VN_PORT_TAP 2
#define VN_PORT_SINK 3

/* Return codes of configuration calls (negative), see vn_strerror(). */
#define VN_OK 0
#define VN_EINVAL -1
#define VN_ENOMEM -2
#define VN_EMAP -3
#define VN_ERANGE -4
#define VN_ESTATE -5
#define VN_ENOPORT -6
#define VN_ESYS -7

/* vn_switch_run() results. */
#define VN_RUN_TIMEOUT 0
#define VN_RUN_WAKE 1

/* Why a port was marked broken (first reason wins). */
#define VN_BROKEN_NONE 0
#define VN_BROKEN_RING_ADDR 1      /* ring not inside one mapped region */
#define VN_BROKEN_AVAIL_IDX 2      /* avail idx moved by more than the ring size */
#define VN_BROKEN_HEAD 3           /* head index >= ring size */
#define VN_BROKEN_DESC_ADDR 4      /* buffer outside guest memory */
#define VN_BROKEN_CHAIN_LOOP 5     /* chain longer than the ring: loop */
#define VN_BROKEN_INDIRECT 6       /* bad indirect table */
#define VN_BROKEN_DESC_NEXT 7      /* next index >= table size */
#define VN_BROKEN_DESC_DIR 8       /* device-writable buffer where readable expected, or v.v. */
#define VN_BROKEN_CHAIN_LEN 9      /* chain total length too large */
#define VN_BROKEN_KICK_FD 10       /* the kick fd hit end of file or failed (not an eventfd) */
#define VN_BROKEN_MEM_GONE 11      /* the frontend shrank the file of mapped guest memory or log */

struct vn_region_spec {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
};

struct vn_port_stats {
    /* frames that entered the switch from this port (guest TX or TAP read) */
    uint64_t in_frames;
    uint64_t in_bytes;
    /* frames the switch delivered to this port (guest RX or TAP write) */
    uint64_t out_frames;
    uint64_t out_bytes;
    uint64_t drop_no_rx_buffer;  /* guest posted no receive buffers, backlog full */
    uint64_t drop_oversize;      /* frame larger than VN_MAX_FRAME or the guest's buffers */
    uint64_t drop_runt;          /* shorter than an Ethernet header */
    uint64_t drop_bad_desc;      /* descriptor chain rejected (port then broken) */
    uint64_t drop_bad_offload;   /* virtio-net header we cannot honour */
    uint64_t drop_tap_write;     /* TAP refused the frame */
    uint64_t drop_broken;        /* frames for a port whose guest broke the virtio rules */
    uint64_t drop_link_down;     /* frames for a guest whose receive queue is not running */
    uint64_t kicks;              /* guest notifications received */
    uint64_t calls;              /* interrupts sent to the guest */
    uint64_t kicks_suppressed;   /* TX passes done without being kicked (notify off) */
    uint64_t calls_suppressed;   /* interrupts the guest asked us not to send */
    uint64_t tso_segmented;      /* GSO frames cut into MSS segments for this port */
    uint64_t csum_completed;     /* partial checksums completed for this port */
    uint64_t backlog_max;        /* deepest RX backlog seen */
    uint64_t unknown_unicast;    /* frames from this port flooded for an unknown MAC */
    uint64_t drop_spoofed;       /* from the guest with a MAC or address not its own */
    uint64_t drop_prevented;     /* matched a prevent rule */
    uint64_t held;               /* held for scanner decisions */
    uint64_t held_passed;
    uint64_t held_cut;
    uint64_t held_over_cap;      /* past the held-frames memcap: exception policy applied */
    uint64_t punted_copies;      /* copies for read-only subscriptions */
    uint64_t punt_queue_full;    /* read-only copies lost because the kernel lagged */
    uint64_t injected;           /* pre-registered frames sent by the kernel */
    uint64_t drop_quarantine;    /* quarantined NI: matched no quarantine-allow rule */
    uint64_t drop_isolated;      /* NI isolated (link set down): every frame either way */
    /* frames whose headers the parser (csrc/parse.c) could not walk to the end, by reason
     * (VN_UNPARSED_*), either way: dropped unless the policy says unparsed = pass */
    uint64_t drop_unparsed_truncated;   /* a header runs past the frame or the IP length */
    uint64_t drop_unparsed_bad_header;  /* IP version, header or total length inconsistent */
    uint64_t drop_unparsed_vlan_depth;  /* more than VN_PARSE_MAX_VLAN VLAN tags */
    uint64_t drop_unparsed_encap;       /* 802.3 LLC other than SNAP, MPLS, PPPoE, 802.1ah */
    uint64_t drop_unparsed_ipv6_chain;  /* IPv6 extension chain too long or of an unknown kind */
    uint64_t drop_unparsed_fragment;    /* first fragment without the whole header chain, or a
                                         * later one overlapping its first fragment */
    uint64_t drop_unparsed_tunnel;      /* IP-in-IP, 6in4, GRE, EtherIP, MPLS-in-IP (tunnels = pass
                                         * lets them through) */
    uint64_t drop_unparsed_source_route;   /* IPv4 source route options, IPv6 routing headers
                                            * with segments left: not the final destination */
    uint64_t unparsed_passed;    /* unparsed frames let through (unparsed = pass, tunnels = pass) */
    uint64_t drop_frag_unmatched;  /* later IP fragment whose first fragment was not seen */
    uint64_t drop_guest_vlan;    /* VLAN-tagged from the guest, and the policy says guest_vlan = drop */
    uint64_t drop_dhcp_answer;   /* DHCP/DHCPv6 answers from a guest without [ni] dhcp_server */
    /* TCP stream reconstruction (stream subscriptions, csrc/tcp.c) */
    uint64_t tcp_flows_opened;   /* connections on subscribed ports taken into the flow table */
    uint64_t tcp_flows_over;     /* new connections past tcp_flows_max: exception policy applied */
    uint64_t tcp_no_flow;        /* data on a subscribed port of no tracked connection */
    uint64_t tcp_midstream_reset;   /* ... of which reset both ways (tcp_midstream reset) */
    uint64_t tcp_midstream_pass;    /* connections picked up mid-stream let through uninspected */
    uint64_t tcp_midstream_adopt;   /* connections picked up mid-stream and inspected from there */
    uint64_t tcp_bad_csum;       /* bad IPv4 header or TCP checksum (the receiver drops it too) */
    uint64_t tcp_bad_header;     /* truncated or inconsistent IP/TCP header */
    uint64_t tcp_bad_handshake;  /* SYN, SYN-ACK or ACK that does not fit the shadow state */
    uint64_t tcp_conflict;       /* overlapping data differing from what was seen first: dropped */
    uint64_t tcp_retransmit;     /* data seen before, byte for byte */
    uint64_t tcp_out_of_window;  /* data beyond the receiver's window, or an ACK of unsent data */
    uint64_t tcp_after_fin;      /* data beyond the sender's FIN, or a second FIN elsewhere */
    uint64_t tcp_syn_data;       /* SYN or SYN-ACK carrying data: dropped */
    uint64_t tcp_rst_data;       /* RST carrying data: dropped */
    uint64_t tcp_rst_out_of_window;
    uint64_t tcp_paws;           /* data with a timestamp older than the sender's last in-order one */
    uint64_t tcp_urg_cleared;    /* urgent flag and pointer cleared: the byte stays in the stream */
    uint64_t tcp_frag_dropped;   /* IP fragments of TCP dropped: malformed, duplicate, over limits, late */
    uint64_t tcp_frag_overlap;   /* fragments of a datagram whose fragments overlap: all dropped */
    uint64_t tcp_frag_reassembled;  /* TCP datagrams reassembled from fragments, inspected whole */
    uint64_t tcp_bytes_over;     /* segments past tcp_bytes_max: exception policy applied */
    uint64_t tcp_depth_over;     /* out-of-order bytes past tcp_depth_max: exception policy */
    uint64_t tcp_held_segments;  /* data segments held for stream scanners */
    uint64_t tcp_released_segments;
    uint64_t tcp_killed;         /* connections ended with forged RSTs (kill) */
    uint64_t tcp_bypassed;       /* connections let through uninspected (exception policy pass) */
    uint64_t tcp_cut_bytes;      /* stream bytes scanners cut */
    uint64_t tcp_injected_bytes; /* stream bytes the NI sent for injections (retransmits too) */
    uint64_t tcp_inject_retransmits;
    uint64_t tcp_edit_segments;  /* segments built where an edit split a frame */
    uint64_t tcp_forged_acks;    /* ACKs to a sender for bytes cut out of its stream */
    uint64_t tcp_ack_unsent;     /* ACKs of bytes the NI still held: counted as acking what went */
    uint64_t tcp_more_acks;      /* ACKs the NI sent for held bytes on the receiver's behalf (more) */
    uint64_t tcp_acks_absorbed;  /* receiver ACKs below what the NI acknowledged already: dropped */
    uint64_t tcp_vouched_retransmits;  /* segments the NI resent for bytes it acknowledged */
    uint64_t tcp_ni_gave_up;     /* connections reset: the receiver never took what the NI owed it */
    uint64_t tcp_emit_dropped;   /* segments the TCP engine could not forge: no Ethernet header
                                    seen on the connection to build one with */
    uint64_t drop_same_port;     /* destination learned behind the port the frame came from:
                                    a switch never sends a frame back where it came from */
    uint64_t drop_emit_queue_full;  /* frames this NI's policy or TCP engine produced (a
                                    released held frame or segment, a reassembled datagram, an
                                    edited piece, a forged segment) dropped: the switch's emit
                                    queue was full (see vn_switch_set_emit_max) */
    /* the flow stage (csrc/flow.c), while the policy turns it on */
    uint64_t flows_active;       /* flows in the table now (a gauge, not a counter) */
    uint64_t flows_opened;
    uint64_t flows_closed;
    uint64_t flows_over;         /* new flows past flows_max: exception policy applied */
    uint64_t flow_events;        /* flow events queued for the NI kernel */
    uint64_t flow_events_dropped;  /* ... lost: the queue was full (the kernel lagged) */
    uint64_t flow_icmp_errors;   /* ICMP errors attributed to the flow whose packet they quote */
    uint64_t flow_icmp_unmatched;  /* ICMP errors quoting no known flow, or a cut header */
    uint64_t flow_unattributed;  /* IP packets no flow could take: a later fragment whose first
                                    was not seen, an ICMP message that is neither echo-like
                                    nor an error (neighbour discovery, ...) */
    uint64_t sig_matches;        /* signature rule matches (alert, drop, reject, pass) */
    uint64_t sig_dropped;        /* frames (packet rules) or connections (stream rules) a
                                    drop/reject rule stopped, or a failed scan (fail closed) */
    uint64_t sig_flow_dropped;   /* frames of connections stopped by a rule, dropped */
    uint64_t sig_passed_flows;   /* connections a pass rule let go uninspected */
    uint64_t sig_packets_scanned;
    uint64_t sig_stream_bytes;   /* stream bytes scanned */
    uint64_t sig_frag_dropped;   /* IP fragments of a protocol packet rules cover (not reassembled) */
    uint64_t sig_streams_refused;  /* connections dropped: stream state over the stage's memcap */
    uint64_t sig_scan_errors;    /* Hyperscan scan errors (the frame or connection is dropped) */
    uint64_t sig_alerts_lost;    /* alerts beyond the alert ring (the kernel drains it) */
    uint64_t sig_http_requests;  /* HTTP request heads the stage read (its HTTP rules' input) */
    uint64_t sig_http_responses; /* HTTP response heads it read */
    uint64_t sig_http_errors;    /* connections stopped: HTTP the stage could not read as a
                                    server would (smuggling, bad syntax, limits; fail closed) */
    uint64_t sig_http_memcap;    /* connections stopped: the HTTP reader's memory over its cap */
    uint64_t ring_frames;        /* frame copies published on scanner rings */
    uint64_t ring_stream_bytes;  /* stream bytes published on scanner rings */
    uint64_t ring_streams_lost;  /* streams a scanner ring could not take more bytes of */
    uint64_t drop_ring_full;     /* frames cut at once: a full scanner ring could not take
                                    them and the default decision is cut */
};

/* What one virtqueue of a vhost port carried (vn_port_queue_stats): queue 2i is pair i's
 * receive queue (frames the switch delivered to the guest), 2i+1 its transmit queue (frames
 * the guest sent, as popped, before any check).  With VIRTIO_NET_F_MQ a guest spreads its
 * flows over the pairs it enabled; the NI's policy, held frames and streams are the port's,
 * whatever queue a frame used. */
struct vn_queue_stats {
    uint64_t frames;
    uint64_t bytes;
    uint32_t num;              /* ring size the frontend set; 0: queue not configured */
    uint8_t ready;             /* started, enabled and mapped: the queue carries frames now */
};

struct vn_switch;

/* Switch lifetime.  vn_switch_new returns NULL on allocation failure. */
struct vn_switch *vn_switch_new(void);
void vn_switch_free(struct vn_switch *sw);
/* The switch's clock: the system's clocks until a time (ns) is handed in; from then on the
 * switch uses the time handed in last, for timers and for the timestamps scanners see
 * (offline replay on a capture's timestamps).  A time handed in never goes back (not to 0,
 * the system's clocks, either: timers already set on the handed-in time would misfire), nor past VN_CLOCK_MAX_NS (2^62 ns, year 2116: far enough from
 * 2^64 that no timer added to it wraps): VN_EINVAL. */
#define VN_CLOCK_MAX_NS 4611686018427387904ULL
int vn_switch_set_clock(struct vn_switch *sw, uint64_t now_ns);
const char *vn_strerror(int code);
const char *vn_broken_reason(int code);

/* Ports.  Return the port index (>= 0) or a negative VN_E* code. */
int vn_port_add_vhost(struct vn_switch *sw);
int vn_port_add_tap(struct vn_switch *sw, int fd, int vnet_hdr_len);
int vn_port_remove(struct vn_switch *sw, int port);
/* Returns a stable pointer into the switch; valid until the port is removed. */
const struct vn_port_stats *vn_port_stats(struct vn_switch *sw, int port);
/* Copies the counters of queues 0..n-1 (n <= VN_MAX_QUEUES) of a vhost port into out[];
 * returns n, or VN_ENOPORT (not a vhost port) / VN_EINVAL (n too large). */
int vn_port_queue_stats(struct vn_switch *sw, int port, struct vn_queue_stats *out, unsigned n);
int vn_port_broken(struct vn_switch *sw, int port);
/* How many ports are broken now (one pass over the port table, for an idle daemon's tick). */
int vn_ports_broken(struct vn_switch *sw);
int vn_port_set_mac(struct vn_switch *sw, int port, const uint8_t *mac);

/* vhost-user device state of a VN_PORT_VHOST port. */
int vn_dev_set_features(struct vn_switch *sw, int port, uint64_t features);
int vn_dev_set_mem(struct vn_switch *sw, int port, unsigned n,
                   const struct vn_region_spec *regions, const int *fds);
int vn_dev_reset(struct vn_switch *sw, int port);
/* Live migration's dirty-page log (SET_LOG_BASE): maps [offset, offset+size) of fd (which
 * stays the caller's), a bitmap of one bit per 4 KiB guest-physical page that must cover
 * the memory table.  Every write to guest memory sets its pages' bits while the features
 * include VHOST_F_LOG_ALL.  size 0 unmaps it. */
int vn_dev_set_log(struct vn_switch *sw, int port, int fd, uint64_t size, uint64_t offset);
/* VHOST_VRING_F_LOG of SET_VRING_ADDR: on, writes to ring q's used ring are logged at
 * guest-physical used_gpa (the ring must lie in guest memory there). */
int vn_vq_set_log(struct vn_switch *sw, int port, unsigned q, int on, uint64_t used_gpa);
int vn_vq_set_num(struct vn_switch *sw, int port, unsigned q, unsigned num);
int vn_vq_set_addr(struct vn_switch *sw, int port, unsigned q,
                   uint64_t desc_uva, uint64_t used_uva, uint64_t avail_uva);
int vn_vq_set_base(struct vn_switch *sw, int port, unsigned q, unsigned base);
/* Stops the ring; returns its next avail index (>= 0) or a negative code. */
int vn_vq_get_base(struct vn_switch *sw, int port, unsigned q);
/* fd < 0: none (polling for kicks, or no interrupts).  Takes ownership of fd. */
int vn_vq_set_kick(struct vn_switch *sw, int port, unsigned q, int fd);
int vn_vq_set_call(struct vn_switch *sw, int port, unsigned q, int fd);
int vn_vq_set_enable(struct vn_switch *sw, int port, unsigned q, int enable);
/* 1 if the ring is started (kick received, not stopped since), 0 if not, or a code. */
int vn_vq_started(struct vn_switch *sw, int port, unsigned q);
/* Sends a frame into the switch as if `port` had received it (the guest sent it, the TAP
 * read it), through the whole ingress path: runt and offload checks, counters, the port's
 * NI policy, switching.  For SEND_RARP, and for offline replay into a sink port. */
int vn_port_inject_from(struct vn_switch *sw, int port, const uint8_t *frame, unsigned len);

/* Sink ports (offline replay): the switch delivers to a sink port by queueing the frame for
 * the caller, in delivery order across all sink ports (egress policy applied as for any
 * port); frames enter from one with vn_port_inject_from().  A sink negotiates no offloads:
 * partial checksums are completed and TSO frames segmented before a frame is queued.  At
 * most VN_SINK_QUEUE frames wait; past that, deliveries count as drop_no_rx_buffer. */
#define VN_SINK_QUEUE 65536
struct vn_sink_frame {
    int port;                  /* the sink port it was delivered to */
    uint32_t len;
    const uint8_t *data;       /* valid until the next vn_sink_next() */
};
int vn_port_add_sink(struct vn_switch *sw);
/* A sink that counts what is delivered to it (out_frames, out_bytes) and keeps nothing
 * (benchmarks: the receiver's cost is no part of the NI's).  VN_OK, VN_ENOPORT. */
int vn_port_sink_discard(struct vn_switch *sw, int port, int on);
/* vn_port_inject_from for `n` frames laid end to end in `frames` (lens[i] bytes each), with
 * one interrupt of the guests at the end.  Returns how many went in, or a VN_E* code if
 * the port is unknown; stops at the first frame of a bad length (VN_EINVAL if it is the
 * first). */
int vn_port_inject_batch(struct vn_switch *sw, int port, const uint8_t *frames,
                         const uint32_t *lens, unsigned n);
/* 1: *out filled with the oldest queued frame; 0: none queued. */
int vn_sink_next(struct vn_switch *sw, struct vn_sink_frame *out);

/* The data plane loop.  Waits on every kick eventfd and TAP fd (or busy-polls when
 * poll_mode is set) and forwards frames until timeout_ms passes (-1: forever) or
 * wake_fd becomes readable (returns VN_RUN_WAKE; wake_fd is not read). */
int vn_switch_set_wake_fd(struct vn_switch *sw, int fd);
int vn_switch_run(struct vn_switch *sw, int timeout_ms, int poll_mode);
/* One turn of that loop: waits up to timeout_ms (0: not at all) for any event (a scanner
 * ring's kick included: it asks for one first), then one pass.  Returns the events seen
 * (>= 0) or VN_ESYS.  For harnesses that feed the switch themselves. */
int vn_switch_step(struct vn_switch *sw, int timeout_ms);
/* One non-blocking pass over all ports (tests). Returns frames forwarded. */
int vn_switch_service(struct vn_switch *sw);
/* ---- The frame parser (csrc/parse.c) ----
 * A frame is parsed when every header from Ethernet to the transport header could be walked:
 * Ethernet, up to VN_PARSE_MAX_VLAN VLAN tags (0x8100, 0x88a8, 0x9100), 802.3 LLC/SNAP with
 * an Ethernet type inside, IPv4 (options, AH) or IPv6 (up to VN_PARSE_MAX_EXT extension
 * headers: hop-by-hop, routing, fragment, destination options, AH) or ARP, and the TCP, UDP,
 * SCTP, ICMP or ICMPv6 header.  ESP and protocols the NI does not know end the walk: the
 * frame is parsed, its transport is that protocol (no ports).  Types of Ethernet the NI
 * does not know (not IP, ARP or an encapsulation of IP) are parsed at layer 2.  Anything
 * else is unparsed, for the reason below. */
#define VN_PARSE_MAX_VLAN 2
#define VN_PARSE_MAX_EXT 16
#define VN_UNPARSED_NONE 0
#define VN_UNPARSED_TRUNCATED 1
#define VN_UNPARSED_BAD_HEADER 2
#define VN_UNPARSED_VLAN_DEPTH 3
#define VN_UNPARSED_ENCAP 4
#define VN_UNPARSED_IPV6_CHAIN 5
#define VN_UNPARSED_FRAGMENT 6
#define VN_UNPARSED_TUNNEL 7    /* IP in IP, IPv6 in IP, GRE, EtherIP, MPLS in IP: a packet inside */
#define VN_UNPARSED_SOURCE_ROUTE 8   /* IPv4 LSRR/SSRR, an IPv6 routing header with segments left */

/* What the parser made of a frame (for tests and tools; the fast path keeps its own). */
struct vn_parse_result {
    int reason;                /* VN_UNPARSED_*: 0 if parsed */
    uint16_t ethertype;        /* the innermost type (after VLAN tags and SNAP) */
    uint8_t nvlan;
    uint8_t snap;
    uint8_t family;            /* 0, 4, 6 */
    int16_t proto;             /* transport protocol, -1: none */
    uint8_t l4_known;          /* the transport header was seen (ports valid) */
    uint8_t frag, frag_later;
    uint16_t sport, dport;
    int16_t icmp_type;         /* -1: none */
    uint32_t l4_off;
};
/* Parses one frame (no virtio-net header).  Returns result->reason. */
int vn_parse_frame(const uint8_t *frame, uint32_t len, struct vn_parse_result *result);

/* ---- NI policy: anti-spoofing, prevent rules, subscriptions (the NI kernel's hooks) ---- */
#define VN_DIR_FROM_GUEST 1
#define VN_DIR_TO_GUEST 2
#define VN_MAX_TERMS 8
#define VN_TERM_BYTES 16
#define VN_MAX_RULES 256
#define VN_MAX_SUBS 64
#define VN_MAX_ADDRS 32
#define VN_MAX_QALLOW 64

/* Isolation of a port (bits of vn_port_set_isolation), each independent of the policy:
 * QUARANTINE drops, both ways, every frame that matches none of the policy's quarantine-
 * allow rules; LINK_DOWN drops every frame both ways (the NI's half of a link set down, so
 * a guest that ignores its link state gains nothing). */
#define VN_ISOLATE_QUARANTINE 1
#define VN_ISOLATE_LINK_DOWN 2

/* A raw term: frame[offset .. offset+len) & mask == value & mask. */
struct vn_term {
    uint16_t offset;
    uint8_t len;
    uint8_t value[VN_TERM_BYTES];
    uint8_t mask[VN_TERM_BYTES];
};

/* What a prevent rule or a subscription matches.  Every field left at its "any" value
 * matches everything.  A later IP fragment is matched with the transport header of its
 * datagram's first fragment (csrc/parse.c); L4 fields of a frame whose transport header
 * nobody saw (a later fragment whose first is unknown, a cut header let through by
 * unparsed = pass) count as matching a prevent rule or subscription, so a rule cannot be
 * dodged by fragmenting, and as not matching a quarantine-allow rule. */
struct vn_match {
    uint8_t dirs;              /* VN_DIR_* bits; 0: both */
    uint16_t ethertype;        /* 0: any; the innermost (VLAN tags, SNAP skipped) */
    int16_t proto;             /* IP protocol, -1: any */
    uint8_t src_family;        /* 0: any, 4, 6 */
    uint8_t src_plen;
    uint8_t src[16];
    uint8_t dst_family;
    uint8_t dst_plen;
    uint8_t dst[16];
    uint16_t sport_lo, sport_hi;   /* 0..65535: any */
    uint16_t dport_lo, dport_hi;
    uint8_t tcp_flags_mask, tcp_flags_value;
    /* 1 (subscriptions only): just the frames that open their flow in their direction,
     * i.e. of a flow in the NI's flow table (csrc/flow.c) no frame of which has yet left
     * the NI that way: the first, and every later one until one is forwarded unheld or
     * passed by every containing scanner.  A frame the flow stage could not put in a flow
     * (a later fragment without its first, an unparsed header, ICMP other than echo-like,
     * the table full with flows_over = pass, the stage off) counts as opening one. */
    uint8_t flow_new;
    uint8_t nterms;
    struct vn_term terms[VN_MAX_TERMS];
};

/* A stream subscription: TCP connections whose server port (the SYN's destination port)
 * lies in [port_lo, port_hi]; dirs: which byte streams are read (VN_DIR_* of the data);
 * contain: they are held until passed. */
#define VN_MAX_STREAM_SUBS 64
struct vn_stream_sub {
    uint16_t port_lo, port_hi;
    uint8_t dirs;
    uint8_t contain;
};

struct vn_addr {
    uint8_t family;            /* 4 or 6 */
    uint8_t plen;
    uint8_t addr[16];
};

struct vn_policy {
    int anti_spoof;            /* frames from the guest must carry its MAC and addresses */
    int mac_set;
    uint8_t mac[6];
    unsigned naddrs;
    struct vn_addr addrs[VN_MAX_ADDRS];
    unsigned nrules;           /* prevent rules: a frame that matches one is dropped */
    struct vn_match rules[VN_MAX_RULES];
    unsigned nsubs;            /* subscriptions of the NI kernel's scanners */
    struct vn_match subs[VN_MAX_SUBS];
    uint8_t sub_contain[VN_MAX_SUBS];
    uint64_t held_bytes_max;   /* memcap of frames held for decisions on this port */
    unsigned held_frames_max;
    int over_cap_pass;         /* exception policy past the memcap: 0 drop (fail closed), 1 pass */
    unsigned nqallow;          /* what a quarantined NI may still send and receive */
    struct vn_match qallow[VN_MAX_QALLOW];
    /* VN_ISOLATE_* bits: owned by vn_port_set_isolation; vn_port_set_policy ignores the
     * value given and keeps the port's, so isolation survives policy changes */
    unsigned isolation;
    /* owned by the switch: 1 when the port had no policy and this one only carries its
     * isolation (freed again when the isolation ends); vn_port_set_policy sets it to 0 */
    unsigned isolation_carrier;
    /* stream subscriptions (TCP, by server port) and the memcaps of their reassembly; an
     * exception policy of 1 (pass) lets the connection through uninspected, 0 drops */
    unsigned nstream_subs;
    struct vn_stream_sub stream_subs[VN_MAX_STREAM_SUBS];
    uint8_t stream_sub_chan[VN_MAX_STREAM_SUBS];   /* as sub_chan, for stream subscriptions */
    unsigned tcp_flows_max;    /* connections in the flow table */
    int tcp_flows_over_pass;
    uint64_t tcp_bytes_max;    /* bytes of frames kept by the flows of this port */
    int tcp_bytes_over_pass;
    uint64_t tcp_depth_max;    /* out-of-order bytes waiting for a gap, per direction */
    int tcp_depth_over_pass;
    uint32_t tcp_idle_ms;      /* an established connection silent this long is forgotten */
    int tcp_midstream;         /* VN_MIDSTREAM_*: data of a connection on a subscribed port that
                                * the NI never saw open (a daemon restart, a new subscription) */
    unsigned tcp_resend_max;   /* the NI's own resends of bytes it owes a receiver, then RSTs */
    int unparsed_pass;         /* frames the parser cannot walk: 0 drop (counted), 1 pass */
    int tunnel_pass;           /* ... of them, IP tunnels (VN_UNPARSED_TUNNEL): 1 pass */
    int ipv6_router;           /* the guest may send router advertisements and redirects */
    int router;                /* the guest forwards others' packets: its ICMP errors may quote any */
    int dhcp_server;           /* the guest may answer DHCP (UDP from port 67) and DHCPv6 (547) */
    int guest_vlan_drop;       /* VLAN-tagged frames from the guest: 0 checked inside, 1 dropped */
    /* the flow stage (csrc/flow.c; 0: off, nothing runs): its table's bound and exception
     * policy (1 pass: a new flow past flows_max goes on untracked; 0 drop, fail closed),
     * which events (bit 1 << VN_FLOW_EV_*; 0: none, counters only) are queued for the kernel
     * and how many may wait, idle timeouts per protocol, how long a SYN waits for its
     * answer (and a reset or finished connection lingers), and how often a long flow is
     * summarised (0: never) */
    int flows;
    unsigned flows_max;
    int flows_over_pass;
    unsigned flow_events;
    unsigned flow_events_max;
    uint32_t flow_tcp_idle_ms, flow_tcp_syn_ms, flow_udp_idle_ms, flow_other_idle_ms;
    uint32_t flow_summary_ms;
    /* scanner rings (csrc/ring.c): which ring each frame subscription delivers to (its
     * slot + 1 on this port; 0: the NI kernel's punt queue), and what a scanner on a ring
     * owes: a decision within hold_timeout_ms (0: 1000), else the default (1 pass, 0 cut),
     * which a frame its full ring could not take gets at once */
    uint8_t sub_chan[VN_MAX_SUBS];
    uint32_t hold_timeout_ms;
    int hold_default_pass;
};

/* Exception policy for a connection picked up mid-stream (no handshake seen, Suricata's
 * "midstream"): its data segment is dropped (the sender retries, and hangs until it gives
 * up), answered with RSTs to both ends (the applications learn at once and may retry), let
 * through uninspected (the connection joins the flow table as bypassed), or adopted: the
 * segment is dropped and the NI asks its receiver where it stands (an out-of-window ACK
 * draws the receiver's own ACK); that answer starts the stream, inspected from there, at the
 * byte each receiver expects next (vn_stream_event.midstream).  Window scales are unknown:
 * the largest is assumed, so no good byte is dropped; edits and `more` are refused. */
#define VN_MIDSTREAM_DROP 0
#define VN_MIDSTREAM_RESET 1
#define VN_MIDSTREAM_PASS 2
#define VN_MIDSTREAM_ADOPT 3

/* A frame handed to the NI kernel because subscriptions matched it. */
struct vn_punt {
    uint64_t id;               /* held frame id; 0 if only read subscriptions matched */
    int port;                  /* the NI whose policy matched */
    int dir;                   /* VN_DIR_* seen from that NI's guest */
    uint64_t subs;             /* bit i: subscription i matched */
    uint64_t contain;          /* the matching subscriptions with contain rights */
    uint64_t rings;            /* bit k: scanner ring k got it too (frame subscriptions) */
    uint64_t time_ns;          /* CLOCK_REALTIME when the NI took it */
    uint32_t len;
    const uint8_t *data;       /* valid until the next vn_punt_next() */
};

/* Replaces the port's policy (frames already held keep their place). */
int vn_port_set_policy(struct vn_switch *sw, int port, const struct vn_policy *pol);
int vn_port_clear_policy(struct vn_switch *sw, int port);
/* eventfd that is readable while punted frames wait; put it in the wake epoll set. */
int vn_punt_fd(struct vn_switch *sw);
/* 1: *out filled; 0: queue empty. */
int vn_punt_next(struct vn_switch *sw, struct vn_punt *out);
/* The NI kernel's own decision on a held frame it was punted: a cut is final (as
 * vn_held_release), a pass counts once every scanner ring holding the frame passed it too.
 * VN_ENOPORT if the frame is no longer held. */
int vn_held_decide(struct vn_switch *sw, uint64_t id, int pass);
/* Decides a held frame: pass (1) sends it on its way, 0 drops it.  VN_ENOPORT if unknown. */
int vn_held_release(struct vn_switch *sw, uint64_t id, int pass);
/* Decides every frame held on a port (policy removed, NI gone). Returns how many. */
int vn_held_release_port(struct vn_switch *sw, int port, int pass);
/* Sets a port's VN_ISOLATE_* bits (installing an empty policy if it has none; held frames
 * that are released later are checked against the isolation too).  Returns VN_OK. */
int vn_port_set_isolation(struct vn_switch *sw, int port, unsigned bits);
/* The port's VN_ISOLATE_* bits (>= 0) or a negative code. */
int vn_port_isolation(struct vn_switch *sw, int port);
/* Sends a frame (pre-registered by the kernel) to the guest of `port`, or from it: then exactly
 * as if the guest had sent it (vn_port_inject_from: its anti-spoofing, prevent rules and
 * subscriptions apply). */
int vn_port_inject(struct vn_switch *sw, int port, int dir, const uint8_t *frame, unsigned len);

/* ---- TCP streams (csrc/tcp.c): what the NI kernel sees of stream subscriptions ---- */
#define VN_STREAM_OPEN 1           /* handshake completed: a new stream */
#define VN_STREAM_DATA 2           /* avail[] / eof[] are current */
#define VN_STREAM_CLOSED 4         /* over (reason); its frames are gone after the next call */
#define VN_CLOSE_FIN 1             /* both FINs acknowledged */
#define VN_CLOSE_RST 2             /* an endpoint reset it (RST in window) */
#define VN_CLOSE_KILLED 3          /* vn_stream_kill */
#define VN_CLOSE_IDLE 4            /* silent past tcp_idle_ms */
#define VN_CLOSE_BYPASS 5          /* a memcap's exception policy let it through uninspected */
#define VN_CLOSE_GONE 6            /* its NI or policy went away */

/* A stream's state as vn_stream_next reports it.  Index [0] is the direction from the
 * guest, [1] to the guest; offsets count payload bytes from 0 (the byte after the ISN). */
struct vn_stream_event {
    uint64_t stream;           /* id, never reused */
    int port;
    unsigned what;             /* VN_STREAM_* bits */
    int reason;                /* VN_CLOSE_* when CLOSED */
    int client;                /* VN_DIR_FROM_GUEST: the guest connected out; TO_GUEST: in */
    uint64_t subs;             /* bit i: stream subscription i matched (at OPEN) */
    uint8_t family;            /* 4 or 6 */
    uint8_t guest_addr[16], remote_addr[16];
    uint16_t guest_port, remote_port;
    uint64_t avail[2];         /* bytes readable in order (read directions) */
    uint8_t eof[2];            /* the sender's FIN follows avail */
    uint8_t read[2], hold[2];  /* directions read / held for contain subscriptions */
    uint64_t time_ns;
    uint8_t midstream;         /* adopted mid-stream: offset 0 is where the NI picked it up */
};

/* 1: *ev filled (a stream changed); 0: none.  Drains with the punt queue (same eventfd). */
int vn_stream_next(struct vn_switch *sw, struct vn_stream_event *ev);
/* Zero-copy read: points *data at the stream's bytes from `offset` (inside one held frame)
 * and returns how many (0 at avail or when gone), or a negative VN_E* code. */
int vn_stream_read(struct vn_switch *sw, uint64_t stream, int dir, uint64_t offset,
                   const uint8_t **data);
/* The kernel has read everything below `upto`: those frames may go once acknowledged. */
int vn_stream_consume(struct vn_switch *sw, uint64_t stream, int dir, uint64_t upto);
/* Every contain scanner passed the bytes below `upto` (2^64-1: all, including future
 * ones): held segments whose bytes are all passed go to the receiver, in order. */
int vn_stream_pass(struct vn_switch *sw, uint64_t stream, int dir, uint64_t upto);
/* Forges RSTs to both ends (sequence numbers each accepts) and drops what is held. */
int vn_stream_kill(struct vn_switch *sw, uint64_t stream);
/* Stream editing.  Offsets are the sender's (as read); an edit may only touch
 * bytes not yet passed (`from`/`at` >= the pass frontier) and edits come in stream order
 * (at or beyond the end of the previous one).  The receiver gets the edited stream: every
 * later segment's sequence number (and the other direction's acknowledgements, SACK blocks
 * and windows) is shifted, segments are split at edit boundaries, cut bytes are
 * acknowledged to the sender once the receiver has everything before them, and injected
 * bytes are sent by the NI (and retransmitted until acknowledged).  A cut still needs the
 * bytes passed (the pass releases the rest of the stream around it).
 * Returns VN_OK; VN_ENOPORT (no such stream), VN_ESTATE (closed, bypassed), VN_EINVAL
 * (before the frontier or the previous edit, empty, injection over VN_TCP_INJECT_MAX),
 * VN_ERANGE (VN_TCP_EDITS_MAX edits outstanding in that direction, or the NI's tcp_bytes_max
 * reached: edits and injected bytes count with the frames kept), VN_ENOMEM. */
#define VN_TCP_EDITS_MAX 65536
#define VN_TCP_INJECT_MAX 65536
/* `more` (Siphon 4.3): a decision on `dir` needs bytes beyond the receiver's window.  The
 * NI acknowledges the held bytes on the receiver's behalf (the receiver's last window beyond
 * them) as they arrive in order, so the sender goes on; it then owns those bytes: they go to
 * the receiver as its own window allows and are resent until it acknowledges them.  Ends
 * with a pass beyond what had arrived when asked.  VN_OK, VN_ENOPORT, VN_ESTATE (not held,
 * not established). */
int vn_stream_more(struct vn_switch *sw, uint64_t stream, int dir);
int vn_stream_cut(struct vn_switch *sw, uint64_t stream, int dir, uint64_t from, uint64_t to);
int vn_stream_inject(struct vn_switch *sw, uint64_t stream, int dir, uint64_t at,
                     const uint8_t *bytes, uint32_t len);
/* Idle connections, resends the NI owes a receiver, frames of reported closes.  Call
 * periodically. */
int vn_tcp_housekeeping(struct vn_switch *sw);
/* Connections in the flow table of `port`, and bytes of frames they keep. */
int vn_tcp_flows(struct vn_switch *sw, int port);
uint64_t vn_tcp_bytes(struct vn_switch *sw, int port);
/* Frames the policy and the TCP engine produce (released, reassembled, rebuilt, forged,
 * injected) wait in the switch's emit queue until the call that made them (ingress of a
 * frame, vn_held_release, vn_stream_*, vn_tcp_housekeeping, vn_port_inject) sends them on,
 * through the stages they have left, before it returns.  The queue holds 64 MiB of frames
 * and at most `frames` of them (0..VN_EMIT_FRAMES, the default); past either, a produced frame
 * is dropped and counted (drop_emit_queue_full on the NI that produced it).  One drain
 * sends on at most 4 * VN_EMIT_FRAMES frames, those that sending them produced included; the
 * rest are dropped and counted alike (NIs answering each other's frames cannot hold the data
 * plane).  Lowering the limit is for tests of that path.  VN_OK, VN_ERANGE. */
#define VN_EMIT_FRAMES 65536
int vn_switch_set_emit_max(struct vn_switch *sw, unsigned frames);
/* ---- The flow stage (csrc/flow.c): per NI, a bounded table of flows ----
 * A flow is keyed as the guest sees it: family, protocol, guest address and port, remote
 * address and port (ICMP echo-like messages: the identifier as both ports); both directions
 * are one flow.  The table keeps what aggregate detectors need (times, packets and bytes
 * each way, who initiated, the TCP handshake, ICMP errors that answered it) and reports
 * changes as events on a bounded queue the NI kernel drains with the punt queue (same
 * eventfd).  A full queue drops the event (flow_events_dropped), never blocks a frame. */
#define VN_FLOW_QUEUE 16384        /* events waiting, all ports together */

/* Event kinds; 1 << kind is its bit in vn_policy.flow_events. */
#define VN_FLOW_EV_OPEN 1          /* a new flow (its first packet) */
#define VN_FLOW_EV_STATE 2         /* `change` became true */
#define VN_FLOW_EV_CLOSE 3         /* gone from the table (`reason`), final counters */
#define VN_FLOW_EV_SUMMARY 4       /* a long flow's counters, every flow_summary_ms */

/* Flow state bits (vn_flow_event.state; `change` names one). */
#define VN_FLOW_SYN 0x1            /* TCP: the initiator's SYN seen */
#define VN_FLOW_SYNACK 0x2         /* TCP: answered with a SYN-ACK */
#define VN_FLOW_ESTABLISHED 0x4    /* TCP: the initiator acknowledged the SYN-ACK */
#define VN_FLOW_RESET 0x8          /* TCP: a RST, either way */
#define VN_FLOW_FIN_INIT 0x10      /* TCP: the initiator's FIN */
#define VN_FLOW_FIN_RESP 0x20      /* TCP: the responder's FIN */
#define VN_FLOW_UNANSWERED 0x40    /* TCP: no SYN-ACK within flow_tcp_syn_ms of the SYN */
#define VN_FLOW_INCOMPLETE 0x80    /* TCP: SYN-ACK, but the initiator never completed */
#define VN_FLOW_ANSWERED 0x100     /* a packet came back (non-TCP: the event; TCP: SYNACK's) */
#define VN_FLOW_ICMP_ERROR 0x200   /* an ICMP error quoting one of its packets came */
#define VN_FLOW_MIDSTREAM 0x400    /* TCP: first seen without a SYN */

/* Why a flow closed. */
#define VN_FLOW_END_IDLE 1         /* silent past its protocol's idle timeout */
#define VN_FLOW_END_FIN 2          /* both FINs, then flow_tcp_syn_ms of lingering */
#define VN_FLOW_END_RESET 3        /* a RST, then lingering */
#define VN_FLOW_END_UNANSWERED 4   /* a handshake that never completed, then lingering */
#define VN_FLOW_END_GONE 5         /* the NI, its policy or its flow stage went away */

/* One event.  Pairs are per direction: [0] from the guest, [1] to it. */
struct vn_flow_event {
    uint64_t flow;             /* id, never reused */
    int port;
    int kind;                  /* VN_FLOW_EV_* */
    unsigned change;           /* STATE: the VN_FLOW_* bit that became set */
    int reason;                /* CLOSE: VN_FLOW_END_* */
    unsigned state;            /* VN_FLOW_* bits */
    uint8_t family;            /* 4 or 6 */
    uint8_t proto;
    uint8_t initiator;         /* VN_DIR_FROM_GUEST: the guest sent the first packet */
    uint8_t guest_addr[16], remote_addr[16];
    uint16_t guest_port, remote_port;   /* ICMP echo-like: its identifier, both */
    uint64_t packets[2], bytes[2];      /* IP bytes */
    uint64_t start_ns, last_ns;         /* Unix time (the switch's clock) */
    uint64_t time_ns;          /* when the event happened */
    int16_t icmp_type, icmp_code;       /* the last ICMP error that answered it; -1: none */
    uint8_t icmp_from[16];     /* who sent that error (a router, or the remote host) */
};

/* 1: *ev filled; 0: none waiting. */
int vn_flow_next(struct vn_switch *sw, struct vn_flow_event *ev);
/* Idle flows and lingering handshakes: expires them (CLOSE events); frees the tables of NIs
 * whose policy turned the stage off.  Called on the TCP engine's housekeeping tick. */
int vn_flow_housekeeping(struct vn_switch *sw);
/* Flows in the table of `port` (0 if none), or VN_ENOPORT. */
int vn_flow_count(struct vn_switch *sw, int port);
/* ---- Scanner rings (csrc/ring.c, ABI in csrc/vnring.h) ----
 * A ring carries the frames a scanner's subscriptions matched to it, and its decisions
 * back, through shared memory: the switch's loop fills and reads it, no Python per frame.
 * Up to VN_CHANS rings per port (one per scanner process). */
#define VN_CHANS 62
struct vn_chan_info {
    int ni_fd, sc_fd, kick_scanner_fd, kick_ni_fd;   /* what the scanner inherits */
    int broken;                /* VNR_BROKEN_*: the scanner broke the protocol */
    uint64_t delivered;        /* descriptors published */
    uint64_t held;             /* of them held for a decision */
    uint64_t passed, cut;      /* decisions applied */
    uint64_t stale;            /* decisions for frames already settled (ignored) */
    uint64_t timeouts;         /* held frames given the default at the hold timeout */
    uint64_t timeouts_in_a_row;/* since the last decision applied */
    uint64_t ring_full;        /* frames the full ring (or data area) could not take */
    uint64_t owed;             /* held frames (and stream chunks) still waiting for this scanner */
    uint64_t streams;          /* streams given (OPEN) */
    uint64_t stream_bytes;     /* stream bytes given (DATA) */
    uint64_t desc_prod, desc_cons, dec_cons;
};
/* Opens a ring on `port`: desc_slots and dec_slots powers of two (64..65536), data_bytes
 * of data area (>= 256 KiB, <= 1 GiB).  Returns its slot (>= 0) or a VN_E* code. */
int vn_chan_open(struct vn_switch *sw, int port, unsigned desc_slots, unsigned dec_slots,
                 uint64_t data_bytes);
/* Closes it: what its scanner still owed gets `pass` (1) or a cut (0); fds closed. */
int vn_chan_close(struct vn_switch *sw, int port, int slot, int pass);
int vn_chan_info(struct vn_switch *sw, int port, int slot, struct vn_chan_info *out);
/* Reads every ring's decisions and applies hold timeouts now (the switch's loop does this
 * on its own; offline replay calls it after a scanner answered a sync).  Returns decisions
 * applied. */
int vn_chan_poll(struct vn_switch *sw);
/* A scanner ring's part in a stream (vn_stream_ring_part): the directions it reads and
 * holds (VN_DIR_* bits), how far it passed and was given each ([0] from the guest), and how
 * far the NI let each go (every party's pass). */
struct vn_stream_ring_part {
    unsigned read, hold;
    uint64_t passed[2], given[2], released[2];
};
int vn_stream_ring_part(struct vn_switch *sw, uint64_t stream, int port, int slot,
                        struct vn_stream_ring_part *out);
/* The ring's pass of a stream's direction up to `upto` (what its edits count as): VN_OK, or
 * VN_ENOPORT if it does not hold that direction of a live stream. */
int vn_stream_ring_pass(struct vn_switch *sw, uint64_t stream, int port, int slot, int dir,
                        uint64_t upto);
/* The earliest hold deadline of a ring (vn_clock time), or UINT64_MAX. */
uint64_t vn_chan_deadline(struct vn_switch *sw);
/* VN_CDEF_END */

#endif
