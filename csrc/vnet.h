/*
 * vnet: pyvmm's virtio-net data path in C, driven like vhost-net.
 *
 * Python keeps the control plane (virtio-mmio registers, feature negotiation,
 * CPR); this library owns the data path: one I/O thread per device, woken by
 * epoll on the queues' kick eventfds (registered as KVM ioeventfds) and on the
 * tap fd, signalling the guest through call eventfds (KVM irqfds).
 *
 * The control API mirrors vhost's ioctls so that the CPR code drives the C
 * path and /dev/vhost-net the same way:
 *   set_owner / reset_owner       VHOST_SET_OWNER / VHOST_RESET_OWNER
 *   set_mem_table                 VHOST_SET_MEM_TABLE
 *   set_features                  VHOST_SET_FEATURES
 *   set_vring_num/addr/base       VHOST_SET_VRING_NUM/ADDR/BASE
 *   get_vring_base                VHOST_GET_VRING_BASE
 *   set_vring_kick/call           VHOST_SET_VRING_KICK/CALL
 *   set_backend                   VHOST_NET_SET_BACKEND
 *   start / stop                  (vhost starts when a backend is set)
 *
 * All functions return 0 or a negative errno.  No function closes an fd it
 * was given: fds belong to the caller (they travel to the new VMM in a CPR).
 *
 * Every guest-supplied address and length is checked against the memory
 * table.  A malformed descriptor chain (loop, out of range, too long, zero
 * length, bad indirect table) never crashes the process: the device is
 * marked broken (vnet_get_error() != 0, with a message), the I/O thread stops
 * touching the rings, and the config-change bit is set in the ISR and the call
 * fd signalled, so the transport can show DEVICE_NEEDS_RESET.
 *
 * Implementation notes (csrc/vnet.c, csrc/virtq.c):
 *  - Like vhost, every set_* call and start need set_owner first (-EPERM).
 *    set_features/num/addr/base/backend return -EBUSY while running;
 *    set_mem_table (-EFAULT if the rings would fall outside the new table),
 *    set_vring_call and set_vring_kick may be called while running.
 *  - set_backend makes the tap fd O_NONBLOCK (a file status flag, shared).
 *  - Both queues may share one kick eventfd; it then wakes both.
 *  - start begins a fresh run: it reloads used->idx from the ring and clears
 *    a previous error (a still-pending bad chain is detected again).
 *  - RX without MRG_RXBUF puts a frame in one chain; with it, chains are
 *    gathered for the largest frame the features allow (64 KiB with guest
 *    GSO, else 1518 bytes + header) and the unused ones are given back; if the
 *    ring holds less, packets wait in the tap until the next RX kick.  Frames
 *    that do not fit are dropped (rx_dropped), never truncated.
 */
#ifndef PYVMM_VNET_H
#define PYVMM_VNET_H

#include <stdint.h>

#define VNET_RX 0
#define VNET_TX 1
#define VNET_NQUEUES 2
#define VNET_MAX_REGIONS 8

struct vnet_mem_region {
	uint64_t gpa;
	uint64_t size;
	uint64_t host_addr;
};

struct vnet_stats {
	uint64_t rx_packets, rx_bytes, rx_dropped;
	uint64_t tx_packets, tx_bytes, tx_dropped;
	uint64_t kicks, interrupts, wakeups;
};

struct vnet;

struct vnet *vnet_new(void);
void vnet_free(struct vnet *n);               /* stops the thread first */

int vnet_set_owner(struct vnet *n);           /* -EBUSY if already owned */
int vnet_reset_owner(struct vnet *n);         /* stop + forget rings/backend/fds */
int vnet_set_mem_table(struct vnet *n, const struct vnet_mem_region *r, int count);
int vnet_set_features(struct vnet *n, uint64_t features);
int vnet_set_vring_num(struct vnet *n, int q, unsigned int num);
int vnet_set_vring_addr(struct vnet *n, int q, uint64_t desc_gpa,
			uint64_t avail_gpa, uint64_t used_gpa);
int vnet_set_vring_base(struct vnet *n, int q, uint16_t last_avail_idx);
int vnet_get_vring_base(struct vnet *n, int q, uint16_t *last_avail_idx);
int vnet_set_vring_kick(struct vnet *n, int q, int eventfd);
int vnet_set_vring_call(struct vnet *n, int q, int eventfd);
int vnet_set_backend(struct vnet *n, int tap_fd, int vnet_hdr_len);
int vnet_start(struct vnet *n);               /* start the I/O thread */
int vnet_stop(struct vnet *n);                /* finish the chain in hand, join the thread;
                                                 afterwards no access to guest memory */
int vnet_running(struct vnet *n);

/* Interrupt status shared with the transport's InterruptStatus/ACK registers. */
uint32_t vnet_isr_read(struct vnet *n);
void vnet_isr_ack(struct vnet *n, uint32_t bits);

/* 0 while healthy; otherwise the device is broken and msg says why. */
int vnet_get_error(struct vnet *n, char *msg, int msglen);
void vnet_get_stats(struct vnet *n, struct vnet_stats *out);

/* The ring walker on its own, for the fuzzer and unit tests: walk one chain
 * starting at head in queue q; returns the number of segments or -errno. */
int vnet_walk_chain(struct vnet *n, int q, uint16_t head, uint32_t *total_len);

/* Live migration's device dirty log: KVM logs only the vCPUs' writes to guest
 * RAM, so the data path marks each page it writes itself (RX buffers, used
 * rings) in `bits`, one bit per 4 KiB page of the RAM mapped at host_base
 * (npages pages), with an atomic OR; an address outside that range is never
 * marked (bounds-checked).  bits NULL stops logging.  The array is the
 * caller's and may be shared by several devices; it survives reset_owner.
 * vnet_dirty_collect moves it into out (each word exchanged with 0, ORed into
 * out): a page written after its word was taken is marked again for the next
 * collect, and after vnet_stop every write is in. */
int vnet_set_dirty_log(struct vnet *n, uint64_t *bits, uint64_t host_base, uint64_t npages);
void vnet_dirty_collect(uint64_t *bits, uint64_t *out, uint64_t nwords);

/* Addition: one synchronous pass over both queues (TX then RX) in the
 * caller's thread, for tests and the fuzzer.  The device must be owned,
 * configured and not running (-EBUSY).  Returns 0, or -EIO once broken. */
int vnet_poll(struct vnet *n);

#endif
