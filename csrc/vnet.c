/*
 * vnet: virtio-net data path (split virtqueues) with a vhost-like control API.
 * See vnet.h for the contract.
 *
 * Locking: `ctl` serialises control-plane calls (held across thread joins);
 * `lock` protects the configuration against the I/O thread, which holds it
 * while it processes a batch and drops it in epoll_wait.  Stats and ISR are
 * atomics; the error message has its own small lock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vnet.h"
#include "virtq.h"

#define F(bit)				(1ULL << (bit))
#define VIRTIO_NET_F_GUEST_TSO4		7
#define VIRTIO_NET_F_GUEST_TSO6		8
#define VIRTIO_NET_F_GUEST_UFO		10
#define VIRTIO_NET_F_MRG_RXBUF		15
#define VIRTIO_RING_F_INDIRECT_DESC	28
#define VIRTIO_RING_F_EVENT_IDX		29
#define VIRTIO_F_VERSION_1		32
#define VIRTIO_F_RING_PACKED		34
#define VIRTIO_NET_F_GUEST_USO4		54
#define VIRTIO_NET_F_GUEST_USO6		55
#define GUEST_GSO (F(VIRTIO_NET_F_GUEST_TSO4) | F(VIRTIO_NET_F_GUEST_TSO6) | \
		   F(VIRTIO_NET_F_GUEST_UFO) | F(VIRTIO_NET_F_GUEST_USO4) | \
		   F(VIRTIO_NET_F_GUEST_USO6))

#define ETH_VLAN_HLEN	(14 + 4)
#define VNET_MAX_FRAME	(65535 + ETH_VLAN_HLEN)	/* a GSO frame */
#define VNET_MTU_FRAME	(1500 + ETH_VLAN_HLEN)
#define VNET_SCRATCH	(VNET_MAX_FRAME + 4096)	/* catches frames too big for the buffers */
#define TX_WEIGHT	256
#define RX_WEIGHT	256

enum { TAG_STOP = 1, TAG_KICK = 2 /* + queue */, TAG_TAP = 4 };

struct rx_chain {
	uint16_t head;
	int iov0, niov;
	uint32_t len, used;
};

struct vnet {
	pthread_mutex_t ctl, lock, err_lock;
	bool owned;
	struct vq_mem mem;
	struct virtq vq[VNET_NQUEUES];
	uint64_t features;
	int tap_fd, hdr_len;
	bool active;			/* rings mapped, used index loaded */

	pthread_t thread;
	bool running;			/* the I/O thread exists */
	bool armed;			/* fds registered with epfd */
	int epfd, stopfd;
	int stop_req;			/* atomic */
	uint32_t tap_events;
	bool tap_registered;
	bool tx_pending, tx_blocked, rx_pending, rx_wait_bufs;

	uint32_t isr;			/* atomic */
	int broken;			/* atomic */
	char errmsg[256];
	struct vnet_stats stats;	/* atomic counters */

	uint64_t *log_bits;		/* device dirty log (vnet_set_dirty_log), or NULL */
	uint64_t log_base, log_npages;

	struct iovec iov[VIRTQ_MAX_IOV + 1];
	struct rx_chain rxc[VIRTQ_MAX_IOV];
	uint8_t *scratch;
};

#define STAT_ADD(n, f, v) __atomic_fetch_add(&(n)->stats.f, (v), __ATOMIC_RELAXED)

static bool is_broken(struct vnet *n)
{
	return __atomic_load_n(&n->broken, __ATOMIC_ACQUIRE);
}

static bool stop_requested(struct vnet *n)
{
	return __atomic_load_n(&n->stop_req, __ATOMIC_ACQUIRE);
}

/* One eventfd for both queues (a transport with a single notify): it is
 * registered once, as the RX kick, and wakes both queues. */
static bool shared_kick(struct vnet *n)
{
	return n->vq[VNET_RX].kick_fd >= 0 && n->vq[VNET_RX].kick_fd == n->vq[VNET_TX].kick_fd;
}

static void eventfd_kick(int fd)
{
	uint64_t one = 1;

	if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
		/* counter overflow or a closed fd: nothing useful to do */
	}
}

static void eventfd_drain(int fd)
{
	uint64_t v;

	if (read(fd, &v, sizeof(v)) < 0) {
		/* EAGAIN: already drained */
	}
}

/* Set the tap's epoll mask: EPOLLIN unless broken or waiting for RX buffers,
 * EPOLLOUT while a TX packet waits for room. */
static void update_tap_watch(struct vnet *n)
{
	struct epoll_event ev = { .data.u32 = TAG_TAP };
	uint32_t want = 0;

	if (!is_broken(n) && !n->rx_wait_bufs && !stop_requested(n))
		want |= EPOLLIN;
	if (n->tx_blocked && !is_broken(n))
		want |= EPOLLOUT;
	if (!n->armed || !n->tap_registered || want == n->tap_events)
		return;
	ev.events = want;
	if (epoll_ctl(n->epfd, EPOLL_CTL_MOD, n->tap_fd, &ev) == 0)
		n->tap_events = want;
}

static void vnet_fail(struct vnet *n, int q, const char *fmt, ...)
{
	struct virtq *vq = &n->vq[q];
	va_list ap;
	int len;

	if (is_broken(n))
		return;
	pthread_mutex_lock(&n->err_lock);
	len = snprintf(n->errmsg, sizeof(n->errmsg), "%s queue: ", q == VNET_RX ? "rx" : "tx");
	va_start(ap, fmt);
	vsnprintf(n->errmsg + len, sizeof(n->errmsg) - len, fmt, ap);
	va_end(ap);
	pthread_mutex_unlock(&n->err_lock);
	__atomic_store_n(&n->broken, 1, __ATOMIC_RELEASE);
	update_tap_watch(n);
	/* config change: the transport shows DEVICE_NEEDS_RESET */
	__atomic_fetch_or(&n->isr, 2, __ATOMIC_SEQ_CST);
	eventfd_kick(vq->call_fd >= 0 ? vq->call_fd : n->vq[!q].call_fd);
}

/* Mark [p, p+len) in the device dirty log; anything outside the logged RAM is ignored. */
static void log_write(struct vnet *n, const void *p, uint64_t len)
{
	uint64_t off = (uint64_t)(uintptr_t)p - n->log_base, last;

	if (!n->log_bits || !len || (uint64_t)(uintptr_t)p < n->log_base ||
	    off >= n->log_npages * 4096)
		return;
	last = off + len - 1;
	if (last >= n->log_npages * 4096)
		last = n->log_npages * 4096 - 1;
	for (uint64_t pg = off / 4096; pg <= last / 4096; pg++)
		__atomic_fetch_or(&n->log_bits[pg / 64], 1ULL << (pg % 64), __ATOMIC_RELAXED);
}

/* The used ring (and its avail_event) is the device's to write. */
static void log_used_ring(struct vnet *n, struct virtq *vq)
{
	if (n->log_bits && vq->used)
		log_write(n, vq->used, 6 + 8ULL * vq->num);
}

static void vnet_signal(struct vnet *n, struct virtq *vq, uint16_t before)
{
	log_used_ring(n, vq);
	if (vq->used_idx == before)
		return;
	/* once broken, no ring reads: vnet_fail() already signalled the call fd */
	if (is_broken(n)) {
		__atomic_fetch_or(&n->isr, 1, __ATOMIC_SEQ_CST);
		return;
	}
	if (!vq_need_signal(vq))
		return;
	__atomic_fetch_or(&n->isr, 1, __ATOMIC_SEQ_CST);
	STAT_ADD(n, interrupts, 1);
	eventfd_kick(vq->call_fd);
}

/* Take the next available head: 1 got one, 0 ring empty (with EVENT_IDX the
 * driver is asked to kick on the next entry), -1 the device broke. */
static int next_avail(struct vnet *n, int q, uint16_t *head)
{
	struct virtq *vq = &n->vq[q];
	uint16_t avail = vq_avail_idx(vq);

	if (avail == vq->last_avail) {
		if (!vq->event_idx)
			return 0;
		vq_set_avail_event(vq, vq->last_avail);
		avail = vq_avail_idx(vq);
		if (avail == vq->last_avail)
			return 0;
	}
	if ((uint16_t)(avail - vq->last_avail) > vq->num) {
		vnet_fail(n, q, "avail index %u is more than the queue size %u ahead of %u",
			  avail, vq->num, vq->last_avail);
		return -1;
	}
	*head = vq_avail_head(vq, vq->last_avail);
	return 1;
}

static void handle_tx(struct vnet *n)
{
	struct virtq *vq = &n->vq[VNET_TX];
	uint16_t before = vq->used_idx, head;
	char why[160];
	int done = 0;

	while (!is_broken(n) && !stop_requested(n)) {
		struct vq_walk w = {
			.iov = n->iov, .max_iov = VIRTQ_MAX_IOV, .write = false,
			.max_len = (uint64_t)n->hdr_len + VNET_MAX_FRAME,
			.err = why, .errlen = sizeof(why),
		};
		ssize_t len;

		if (done >= TX_WEIGHT) {
			n->tx_pending = true;
			break;
		}
		if (next_avail(n, VNET_TX, &head) <= 0)
			break;
		if (vq_walk_chain(vq, &n->mem, head, &w) < 0) {
			vnet_fail(n, VNET_TX, "chain at head %u: %s", head, why);
			break;
		}
		do
			len = writev(n->tap_fd, n->iov, w.niov);
		while (len < 0 && errno == EINTR);
		if (len < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			/* the chain stays available; resume when the tap has room */
			n->tx_blocked = true;
			update_tap_watch(n);
			break;
		}
		if (len < 0) {
			STAT_ADD(n, tx_dropped, 1);
		} else {
			STAT_ADD(n, tx_packets, 1);
			STAT_ADD(n, tx_bytes, w.total > (uint64_t)n->hdr_len ?
				 w.total - n->hdr_len : 0);
		}
		vq_push_used(vq, head, 0);
		vq->last_avail++;
		vq_publish_used(vq);
		done++;
	}
	vnet_signal(n, vq, before);
}

/* Write a little-endian u16 at byte `off` of an iovec (num_buffers). */
static void iov_put_u16(const struct iovec *iov, int niov, size_t off, uint16_t v)
{
	uint8_t b[2] = { v & 0xff, v >> 8 };
	size_t k = 0;

	for (int i = 0; i < niov && k < 2; i++) {
		if (off >= iov[i].iov_len) {
			off -= iov[i].iov_len;
			continue;
		}
		while (k < 2 && off < iov[i].iov_len)
			((uint8_t *)iov[i].iov_base)[off++] = b[k++];
		off = 0;
	}
}

/* No (or not enough) RX buffers: leave packets in the tap until the driver
 * kicks.  Returns true if buffers appeared meanwhile (try again). */
static bool rx_wait_buffers(struct vnet *n)
{
	struct virtq *vq = &n->vq[VNET_RX];
	uint16_t seen = vq_avail_idx(vq);

	n->rx_wait_bufs = true;
	update_tap_watch(n);
	if (!vq->event_idx)
		return false;
	vq_set_avail_event(vq, seen);
	if (vq_avail_idx(vq) == seen)
		return false;
	n->rx_wait_bufs = false;
	update_tap_watch(n);
	return true;
}

/* Take one more RX chain into n->iov / n->rxc: 1 taken, 0 none (ring empty,
 * *empty set, or out of iovecs), -1 the device broke. */
static int rx_take(struct vnet *n, int *nch, int *niov, uint64_t *total, bool *empty)
{
	struct virtq *vq = &n->vq[VNET_RX];
	char why[160];
	struct vq_walk w = {
		.iov = n->iov + *niov, .max_iov = VIRTQ_MAX_IOV - *niov,
		.write = true, .max_len = UINT32_MAX,
		.err = why, .errlen = sizeof(why),
	};
	uint16_t head;
	int r;

	*empty = false;
	if (*niov >= VIRTQ_MAX_IOV || *nch >= VIRTQ_MAX_IOV)
		return 0;
	r = next_avail(n, VNET_RX, &head);
	if (r <= 0) {
		*empty = r == 0;
		return r;
	}
	r = vq_walk_chain(vq, &n->mem, head, &w);
	if (r == -E2BIG && *nch > 0 && w.niov >= w.max_iov)
		return 0;		/* out of iovecs, not the guest's fault */
	if (r < 0) {
		vnet_fail(n, VNET_RX, "chain at head %u: %s", head, why);
		return -1;
	}
	if (w.total < (uint64_t)n->hdr_len) {
		vnet_fail(n, VNET_RX, "chain at head %u: %llu bytes cannot hold the %d-byte "
			  "header", head, (unsigned long long)w.total, n->hdr_len);
		return -1;
	}
	n->rxc[*nch] = (struct rx_chain){ head, *niov, w.niov, (uint32_t)w.total, 0 };
	(*nch)++;
	*niov += w.niov;
	*total += w.total;
	vq->last_avail++;
	return 1;
}

/* MRG_RXBUF, frame longer than the chains gathered (a jumbo frame without
 * GSO): its tail is in the scratch buffer; copy it into more chains.
 * Returns 1 if it all fits, 0 if buffers ran out, -1 if the device broke. */
static int rx_spill(struct vnet *n, int *nch, int *niov, uint64_t *total, uint64_t len)
{
	uint64_t pos = 0, extra = len - *total;
	bool empty;

	while (pos < extra) {
		int first = *niov, r = rx_take(n, nch, niov, total, &empty);

		if (r <= 0)
			return r;
		for (int i = first; i < *niov && pos < extra; i++) {
			size_t c = n->iov[i].iov_len < extra - pos ? n->iov[i].iov_len : extra - pos;

			memcpy(n->iov[i].iov_base, n->scratch + pos, c);
			pos += c;
		}
	}
	return 1;
}

static void handle_rx(struct vnet *n)
{
	struct virtq *vq = &n->vq[VNET_RX];
	bool mrg = n->features & F(VIRTIO_NET_F_MRG_RXBUF);
	uint64_t want = (uint64_t)n->hdr_len +
		((n->features & GUEST_GSO) ? VNET_MAX_FRAME : VNET_MTU_FRAME);
	uint16_t before = vq->used_idx;
	int done = 0;

	while (!is_broken(n) && !stop_requested(n)) {
		int nch = 0, niov = 0, used = 0, r = 0;
		bool empty = false;
		uint64_t total = 0, left;
		ssize_t len;

		if (done >= RX_WEIGHT) {
			n->rx_pending = true;
			break;
		}
		/* gather chains: enough for the largest frame with MRG_RXBUF, else one */
		while ((mrg && total < want) || nch == 0) {
			r = rx_take(n, &nch, &niov, &total, &empty);
			if (r <= 0)
				break;
		}
		if (r < 0) {
			vq->last_avail -= nch;
			break;
		}
		if (!nch || (mrg && total < want && empty)) {
			vq->last_avail -= nch;		/* give back (vhost_discard_vq_desc) */
			if (rx_wait_buffers(n))
				continue;
			break;
		}
		n->iov[niov].iov_base = n->scratch;
		n->iov[niov].iov_len = VNET_SCRATCH;
		do
			len = readv(n->tap_fd, n->iov, niov + 1);
		while (len < 0 && errno == EINTR);
		if (len < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			vq->last_avail -= nch;		/* tap empty */
			break;
		}
		if (mrg && len > 0 && (uint64_t)len > total &&
		    (uint64_t)len < total + VNET_SCRATCH) {
			r = rx_spill(n, &nch, &niov, &total, len);
			if (r < 0) {
				vq->last_avail -= nch;
				break;
			}
		}
		if (len > 0 && n->log_bits)
			for (int i = 0; i < niov; i++)
				log_write(n, n->iov[i].iov_base, n->iov[i].iov_len);
		if (len <= 0 || (uint64_t)len > total || len < n->hdr_len) {
			vq->last_avail -= nch;
			STAT_ADD(n, rx_dropped, 1);	/* too big, runt, or read error */
			done++;
			if (len <= 0)
				break;
			continue;
		}
		for (left = len; used < nch && left; used++) {
			struct rx_chain *c = &n->rxc[used];

			c->used = left < c->len ? (uint32_t)left : c->len;
			left -= c->used;
		}
		if (n->hdr_len >= 12)
			iov_put_u16(n->iov + n->rxc[0].iov0, n->rxc[0].niov, 10, used);
		for (int i = 0; i < used; i++)
			vq_push_used(vq, n->rxc[i].head, n->rxc[i].used);
		vq->last_avail -= nch - used;
		vq_publish_used(vq);
		STAT_ADD(n, rx_packets, 1);
		STAT_ADD(n, rx_bytes, len - n->hdr_len);
		done++;
	}
	vnet_signal(n, vq, before);
}

static void *vnet_thread(void *arg)
{
	struct vnet *n = arg;
	struct epoll_event ev[8];

	for (;;) {
		bool pending;
		int k;

		pthread_mutex_lock(&n->lock);
		pending = (n->tx_pending && !n->tx_blocked) ||
			  (n->rx_pending && !n->rx_wait_bufs);
		pthread_mutex_unlock(&n->lock);
		k = epoll_wait(n->epfd, ev, 8, pending ? 0 : -1);
		if (stop_requested(n))
			break;
		if (k < 0)
			continue;		/* EINTR */
		pthread_mutex_lock(&n->lock);
		STAT_ADD(n, wakeups, 1);
		for (int i = 0; i < k; i++) {
			uint32_t tag = ev[i].data.u32, e = ev[i].events;

			if (tag == TAG_KICK + VNET_TX) {
				eventfd_drain(n->vq[VNET_TX].kick_fd);
				STAT_ADD(n, kicks, 1);
				n->tx_pending = true;
			} else if (tag == TAG_KICK + VNET_RX) {
				eventfd_drain(n->vq[VNET_RX].kick_fd);
				STAT_ADD(n, kicks, 1);
				n->rx_wait_bufs = false;
				n->rx_pending = true;
				update_tap_watch(n);
				if (n->vq[VNET_TX].kick_fd == n->vq[VNET_RX].kick_fd)
					n->tx_pending = true;
			} else if (tag == TAG_TAP) {
				if (e & EPOLLIN)
					n->rx_pending = true;
				if (e & EPOLLOUT) {
					n->tx_blocked = false;
					n->tx_pending = true;
					update_tap_watch(n);
				}
				if ((e & (EPOLLHUP | EPOLLERR)) && !(e & EPOLLIN)) {
					/* peer gone: stop polling it, or we would spin */
					epoll_ctl(n->epfd, EPOLL_CTL_DEL, n->tap_fd, NULL);
					n->tap_registered = false;
				}
			}
		}
		if (is_broken(n)) {
			n->tx_pending = n->rx_pending = false;
		} else {
			if (n->tx_pending && !n->tx_blocked) {
				n->tx_pending = false;
				handle_tx(n);
			}
			if (n->rx_pending && !n->rx_wait_bufs) {
				n->rx_pending = false;
				handle_rx(n);
			}
		}
		pthread_mutex_unlock(&n->lock);
	}
	return NULL;
}

/* ---- control plane ------------------------------------------------------ */

struct vnet *vnet_new(void)
{
	struct vnet *n = calloc(1, sizeof(*n));
	struct epoll_event ev = { .events = EPOLLIN, .data.u32 = TAG_STOP };

	if (!n)
		return NULL;
	n->scratch = malloc(VNET_SCRATCH);
	n->epfd = epoll_create1(EPOLL_CLOEXEC);
	n->stopfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (!n->scratch || n->epfd < 0 || n->stopfd < 0 ||
	    epoll_ctl(n->epfd, EPOLL_CTL_ADD, n->stopfd, &ev) < 0) {
		if (n->epfd >= 0)
			close(n->epfd);
		if (n->stopfd >= 0)
			close(n->stopfd);
		free(n->scratch);
		free(n);
		return NULL;
	}
	pthread_mutex_init(&n->ctl, NULL);
	pthread_mutex_init(&n->lock, NULL);
	pthread_mutex_init(&n->err_lock, NULL);
	n->tap_fd = -1;
	for (int q = 0; q < VNET_NQUEUES; q++)
		n->vq[q].kick_fd = n->vq[q].call_fd = -1;
	return n;
}

static void disarm(struct vnet *n)
{
	for (int q = 0; q < VNET_NQUEUES; q++)
		if (n->vq[q].kick_fd >= 0)	/* EBADF/ENOENT for a shared one: harmless */
			epoll_ctl(n->epfd, EPOLL_CTL_DEL, n->vq[q].kick_fd, NULL);
	if (n->tap_registered)
		epoll_ctl(n->epfd, EPOLL_CTL_DEL, n->tap_fd, NULL);
	n->tap_registered = false;
	n->armed = false;
}

/* with ctl held */
static void stop_thread(struct vnet *n)
{
	if (!n->running)
		return;
	__atomic_store_n(&n->stop_req, 1, __ATOMIC_RELEASE);
	eventfd_kick(n->stopfd);
	pthread_join(n->thread, NULL);
	n->running = false;
	__atomic_store_n(&n->stop_req, 0, __ATOMIC_RELEASE);
	pthread_mutex_lock(&n->lock);
	disarm(n);
	n->active = false;
	pthread_mutex_unlock(&n->lock);
	eventfd_drain(n->stopfd);
}

void vnet_free(struct vnet *n)
{
	if (!n)
		return;
	pthread_mutex_lock(&n->ctl);
	stop_thread(n);
	pthread_mutex_unlock(&n->ctl);
	close(n->epfd);
	close(n->stopfd);
	pthread_mutex_destroy(&n->ctl);
	pthread_mutex_destroy(&n->lock);
	pthread_mutex_destroy(&n->err_lock);
	free(n->scratch);
	free(n);
}

int vnet_set_owner(struct vnet *n)
{
	int r = 0;

	pthread_mutex_lock(&n->ctl);
	if (n->owned)
		r = -EBUSY;
	n->owned = true;
	pthread_mutex_unlock(&n->ctl);
	return r;
}

int vnet_reset_owner(struct vnet *n)
{
	pthread_mutex_lock(&n->ctl);
	stop_thread(n);
	pthread_mutex_lock(&n->lock);
	memset(&n->mem, 0, sizeof(n->mem));
	memset(n->vq, 0, sizeof(n->vq));
	for (int q = 0; q < VNET_NQUEUES; q++)
		n->vq[q].kick_fd = n->vq[q].call_fd = -1;
	n->features = 0;
	n->tap_fd = -1;
	n->hdr_len = 0;
	n->active = false;
	n->owned = false;
	__atomic_store_n(&n->isr, 0, __ATOMIC_SEQ_CST);
	__atomic_store_n(&n->broken, 0, __ATOMIC_SEQ_CST);
	memset(&n->stats, 0, sizeof(n->stats));
	pthread_mutex_unlock(&n->lock);
	pthread_mutex_unlock(&n->ctl);
	return 0;
}

#define BADQ(q) ((q) < 0 || (q) >= VNET_NQUEUES)

/* Lock ctl and lock, check ownership, and optionally that the thread is stopped. */
static int ctl_begin(struct vnet *n, bool stopped)
{
	pthread_mutex_lock(&n->ctl);
	if (!n->owned || (stopped && n->running)) {
		pthread_mutex_unlock(&n->ctl);
		return !n->owned ? -EPERM : -EBUSY;
	}
	pthread_mutex_lock(&n->lock);
	return 0;
}

static int ctl_end(struct vnet *n, int r)
{
	pthread_mutex_unlock(&n->lock);
	pthread_mutex_unlock(&n->ctl);
	return r;
}

int vnet_set_mem_table(struct vnet *n, const struct vnet_mem_region *r, int count)
{
	struct vq_mem m = { .nregions = count };
	struct virtq tmp;
	int err = vq_mem_check(r, count);

	if (err)
		return err;
	if (count)
		memcpy(m.r, r, sizeof(*r) * count);
	err = ctl_begin(n, false);
	if (err)
		return err;
	if (n->active) {
		/* running: the rings must stay reachable under the new table */
		for (int q = 0; q < VNET_NQUEUES; q++) {
			tmp = n->vq[q];
			if (vq_map(&tmp, &m) < 0)
				return ctl_end(n, -EFAULT);
		}
		for (int q = 0; q < VNET_NQUEUES; q++)
			vq_map(&n->vq[q], &m);
	}
	n->mem = m;
	return ctl_end(n, 0);
}

int vnet_set_dirty_log(struct vnet *n, uint64_t *bits, uint64_t host_base, uint64_t npages)
{
	pthread_mutex_lock(&n->lock);	/* the I/O thread holds it while it works */
	n->log_bits = bits;
	n->log_base = host_base;
	n->log_npages = bits ? npages : 0;
	pthread_mutex_unlock(&n->lock);
	return 0;
}

void vnet_dirty_collect(uint64_t *bits, uint64_t *out, uint64_t nwords)
{
	for (uint64_t i = 0; i < nwords; i++)
		out[i] |= __atomic_exchange_n(&bits[i], 0, __ATOMIC_RELAXED);
}

int vnet_set_features(struct vnet *n, uint64_t features)
{
	int r;

	if (features & F(VIRTIO_F_RING_PACKED))
		return -EOPNOTSUPP;
	r = ctl_begin(n, true);
	if (r)
		return r;
	n->features = features;
	n->active = false;
	return ctl_end(n, 0);
}

int vnet_set_vring_num(struct vnet *n, int q, unsigned int num)
{
	int r;

	if (BADQ(q) || num > VIRTQ_MAX_SIZE || (num & (num - 1)))
		return -EINVAL;
	r = ctl_begin(n, true);
	if (r)
		return r;
	n->vq[q].num = num;
	n->active = false;
	return ctl_end(n, 0);
}

int vnet_set_vring_addr(struct vnet *n, int q, uint64_t desc_gpa,
			uint64_t avail_gpa, uint64_t used_gpa)
{
	int r;

	if (BADQ(q) || desc_gpa % 16 || avail_gpa % 2 || used_gpa % 4)
		return -EINVAL;
	r = ctl_begin(n, true);
	if (r)
		return r;
	n->vq[q].desc_gpa = desc_gpa;
	n->vq[q].avail_gpa = avail_gpa;
	n->vq[q].used_gpa = used_gpa;
	n->active = false;
	return ctl_end(n, 0);
}

int vnet_set_vring_base(struct vnet *n, int q, uint16_t last_avail_idx)
{
	int r = BADQ(q) ? -EINVAL : ctl_begin(n, true);

	if (r)
		return r;
	n->vq[q].last_avail = last_avail_idx;
	n->active = false;
	return ctl_end(n, 0);
}

int vnet_get_vring_base(struct vnet *n, int q, uint16_t *last_avail_idx)
{
	if (q < 0 || q >= VNET_NQUEUES || !last_avail_idx)
		return -EINVAL;
	pthread_mutex_lock(&n->lock);
	*last_avail_idx = n->vq[q].last_avail;
	pthread_mutex_unlock(&n->lock);
	return 0;
}

int vnet_set_vring_kick(struct vnet *n, int q, int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.u32 = TAG_KICK + q };
	int r = BADQ(q) ? -EINVAL : fd < -1 ? -EBADF : ctl_begin(n, false);

	if (r)
		return r;
	if (fd == n->vq[q].kick_fd)
		return ctl_end(n, 0);
	if (n->armed && (shared_kick(n) || (fd >= 0 && fd == n->vq[!q].kick_fd)))
		return ctl_end(n, -EBUSY);	/* a shared kick fd changes only while stopped */
	if (n->armed && fd >= 0 && epoll_ctl(n->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
		return ctl_end(n, -errno);
	if (n->armed && n->vq[q].kick_fd >= 0)
		epoll_ctl(n->epfd, EPOLL_CTL_DEL, n->vq[q].kick_fd, NULL);
	n->vq[q].kick_fd = fd;
	if (n->armed && q == VNET_TX)
		n->tx_pending = true;	/* a kick may have gone to the old fd */
	return ctl_end(n, 0);
}

int vnet_set_vring_call(struct vnet *n, int q, int fd)
{
	int r = BADQ(q) ? -EINVAL : fd < -1 ? -EBADF : ctl_begin(n, false);

	if (r)
		return r;
	n->vq[q].call_fd = fd;
	return ctl_end(n, 0);
}

int vnet_set_backend(struct vnet *n, int tap_fd, int vnet_hdr_len)
{
	int r, fl;

	if (tap_fd < -1 || (vnet_hdr_len != 0 && vnet_hdr_len != 10 && vnet_hdr_len != 12))
		return -EINVAL;
	r = ctl_begin(n, true);
	if (r)
		return r;
	if (tap_fd >= 0) {
		fl = fcntl(tap_fd, F_GETFL);
		if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(tap_fd, F_SETFL, fl | O_NONBLOCK) < 0))
			return ctl_end(n, -errno);
	}
	n->tap_fd = tap_fd;
	n->hdr_len = vnet_hdr_len;
	return ctl_end(n, 0);
}

/* with lock held: map the rings and pick up used->idx where it is */
static int activate(struct vnet *n)
{
	int r;

	if (n->active)
		return 0;
	if (n->tap_fd < 0 || !n->mem.nregions)
		return -EINVAL;
	for (int q = 0; q < VNET_NQUEUES; q++) {
		struct virtq *vq = &n->vq[q];

		r = vq_map(vq, &n->mem);
		if (r < 0)
			return r;
		vq->event_idx = n->features & F(VIRTIO_RING_F_EVENT_IDX);
		vq->indirect = n->features & F(VIRTIO_RING_F_INDIRECT_DESC);
		vq->used_idx = vq_used_idx_read(vq);
		vq->signalled_valid = false;
	}
	n->active = true;
	__atomic_store_n(&n->broken, 0, __ATOMIC_SEQ_CST);
	return 0;
}

static int arm(struct vnet *n)
{
	struct epoll_event ev = { .events = EPOLLIN };

	for (int q = 0; q < VNET_NQUEUES; q++) {
		if (n->vq[q].kick_fd < 0 || (q == VNET_TX && shared_kick(n)))
			continue;
		ev.data.u32 = TAG_KICK + q;
		if (epoll_ctl(n->epfd, EPOLL_CTL_ADD, n->vq[q].kick_fd, &ev) < 0)
			goto fail;
	}
	ev.data.u32 = TAG_TAP;
	if (epoll_ctl(n->epfd, EPOLL_CTL_ADD, n->tap_fd, &ev) < 0)
		goto fail;
	n->tap_registered = true;
	n->tap_events = EPOLLIN;
	n->armed = true;
	return 0;
fail:
	{
		int r = -errno;

		disarm(n);
		return r;
	}
}

int vnet_start(struct vnet *n)
{
	sigset_t all, old;
	int r = ctl_begin(n, true);

	if (r)
		return r;
	n->active = false;	/* a fresh run: reload used->idx, clear any error */
	r = activate(n);
	if (!r)
		r = arm(n);
	if (r)
		return ctl_end(n, r);
	__atomic_store_n(&n->stop_req, 0, __ATOMIC_RELEASE);
	/* look at both rings once: work may have been left by a previous run */
	n->tx_pending = n->rx_pending = true;
	n->tx_blocked = n->rx_wait_bufs = false;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);	/* signals go to other threads */
	r = -pthread_create(&n->thread, NULL, vnet_thread, n);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (r) {
		disarm(n);
		n->active = false;
		return ctl_end(n, r);
	}
	/* A name a student (and the CPR order test) can see in /proc/PID/task/TID/comm. */
	pthread_setname_np(n->thread, "vnet-io");
	n->running = true;
	return ctl_end(n, 0);
}

int vnet_stop(struct vnet *n)
{
	pthread_mutex_lock(&n->ctl);
	stop_thread(n);
	pthread_mutex_unlock(&n->ctl);
	return 0;
}

int vnet_running(struct vnet *n)
{
	int r;

	pthread_mutex_lock(&n->ctl);
	r = n->running;
	pthread_mutex_unlock(&n->ctl);
	return r;
}

int vnet_poll(struct vnet *n)
{
	int r = ctl_begin(n, true);

	if (r)
		return r;
	r = activate(n);
	if (r)
		return ctl_end(n, r);
	n->tx_blocked = n->rx_wait_bufs = false;
	if (!is_broken(n))
		handle_tx(n);
	if (!is_broken(n))
		handle_rx(n);
	return ctl_end(n, is_broken(n) ? -EIO : 0);
}

uint32_t vnet_isr_read(struct vnet *n)
{
	return __atomic_load_n(&n->isr, __ATOMIC_SEQ_CST);
}

void vnet_isr_ack(struct vnet *n, uint32_t bits)
{
	__atomic_fetch_and(&n->isr, ~bits, __ATOMIC_SEQ_CST);
}

int vnet_get_error(struct vnet *n, char *msg, int msglen)
{
	if (!is_broken(n))
		return 0;
	if (msg && msglen > 0) {
		pthread_mutex_lock(&n->err_lock);
		snprintf(msg, msglen, "%s", n->errmsg);
		pthread_mutex_unlock(&n->err_lock);
	}
	return -EIO;
}

void vnet_get_stats(struct vnet *n, struct vnet_stats *out)
{
	uint64_t *src = (uint64_t *)&n->stats, *dst = (uint64_t *)out;

	for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

int vnet_walk_chain(struct vnet *n, int q, uint16_t head, uint32_t *total_len)
{
	struct virtq tmp;
	struct vq_walk w = { .iov = n->iov, .max_iov = VIRTQ_MAX_IOV };
	int r;

	if (q < 0 || q >= VNET_NQUEUES)
		return -EINVAL;
	pthread_mutex_lock(&n->lock);
	tmp = n->vq[q];
	tmp.indirect = n->features & F(VIRTIO_RING_F_INDIRECT_DESC);
	r = vq_map(&tmp, &n->mem);
	if (!r) {
		w.write = q == VNET_RX;
		w.max_len = q == VNET_TX ? (uint64_t)n->hdr_len + VNET_MAX_FRAME : UINT32_MAX;
		r = vq_walk_chain(&tmp, &n->mem, head, &w);
		if (r >= 0 && total_len)
			*total_len = (uint32_t)w.total;
	}
	pthread_mutex_unlock(&n->lock);
	return r;
}
