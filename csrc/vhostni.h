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
#define VN_MAX_PORTS 64
#define VN_MAX_QUEUE_PAIRS 8
#define VN_MAX_QUEUES 16
#define VN_MAX_QUEUE_SIZE 32768
/* A 64 KiB TSO frame plus Ethernet and one VLAN tag. */
#define VN_MAX_FRAME 65550
#define VN_BATCH 64

/* Port kinds. */
#define VN_PORT_VHOST 1
#define VN_PORT_TAP 2

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
    uint64_t drop_broken;        /* frames for a broken or stopped port */
    uint64_t kicks;              /* guest notifications received */
    uint64_t calls;              /* interrupts sent to the guest */
    uint64_t kicks_suppressed;   /* TX passes done without being kicked (notify off) */
    uint64_t calls_suppressed;   /* interrupts the guest asked us not to send */
    uint64_t tso_segmented;      /* GSO frames cut into MSS segments for this port */
    uint64_t csum_completed;     /* partial checksums completed for this port */
    uint64_t backlog_max;        /* deepest RX backlog seen */
    uint64_t unknown_unicast;    /* frames from this port flooded for an unknown MAC */
};

struct vn_switch;

/* Switch lifetime.  vn_switch_new returns NULL on allocation failure. */
struct vn_switch *vn_switch_new(void);
void vn_switch_free(struct vn_switch *sw);
const char *vn_strerror(int code);
const char *vn_broken_reason(int code);

/* Ports.  Return the port index (>= 0) or a negative VN_E* code. */
int vn_port_add_vhost(struct vn_switch *sw);
int vn_port_add_tap(struct vn_switch *sw, int fd, int vnet_hdr_len);
int vn_port_remove(struct vn_switch *sw, int port);
/* Returns a stable pointer into the switch; valid until the port is removed. */
const struct vn_port_stats *vn_port_stats(struct vn_switch *sw, int port);
int vn_port_broken(struct vn_switch *sw, int port);
int vn_port_set_mac(struct vn_switch *sw, int port, const uint8_t *mac);

/* vhost-user device state of a VN_PORT_VHOST port. */
int vn_dev_set_features(struct vn_switch *sw, int port, uint64_t features);
int vn_dev_set_mem(struct vn_switch *sw, int port, unsigned n,
                   const struct vn_region_spec *regions, const int *fds);
int vn_dev_reset(struct vn_switch *sw, int port);
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
/* Injects a frame as if the guest behind `port` had sent it (SEND_RARP). */
int vn_port_inject_from(struct vn_switch *sw, int port, const uint8_t *frame, unsigned len);

/* The data plane loop.  Waits on every kick eventfd and TAP fd (or busy-polls when
 * poll_mode is set) and forwards frames until timeout_ms passes (-1: forever) or
 * wake_fd becomes readable (returns VN_RUN_WAKE; wake_fd is not read). */
int vn_switch_set_wake_fd(struct vn_switch *sw, int fd);
int vn_switch_run(struct vn_switch *sw, int timeout_ms, int poll_mode);
/* One non-blocking pass over all ports (tests). Returns frames forwarded. */
int vn_switch_service(struct vn_switch *sw);
/* VN_CDEF_END */

#endif
