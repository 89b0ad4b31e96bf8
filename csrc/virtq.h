/*
 * virtq: split virtqueue (virtio 1.2 section 2.7) helpers for the vnet data path.
 *
 * Guest memory is only ever reached through vq_translate(), which checks that
 * a whole [gpa, gpa+len) range lies inside one region of the memory table.
 * Descriptors are copied out of guest memory before they are checked, so the
 * guest cannot change a descriptor between the check and the use.
 */
#ifndef PYVMM_VIRTQ_H
#define PYVMM_VIRTQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "vnet.h"

#define VRING_DESC_F_NEXT	1
#define VRING_DESC_F_WRITE	2
#define VRING_DESC_F_INDIRECT	4
#define VRING_AVAIL_F_NO_INTERRUPT 1

#define VIRTQ_MAX_SIZE		32768	/* split ring maximum queue size */
#define VIRTQ_MAX_IOV		1024	/* UIO_MAXIOV: segments per readv/writev */

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vq_mem {
	int nregions;
	struct vnet_mem_region r[VNET_MAX_REGIONS];
};

struct virtq {
	unsigned int num;		/* 0: not configured */
	uint64_t desc_gpa, avail_gpa, used_gpa;
	/* host views of the rings, valid after vq_map() */
	uint8_t *desc, *avail, *used;
	uint16_t last_avail;		/* next avail entry to take */
	uint16_t used_idx;		/* next used entry to fill */
	uint16_t signalled_used;
	bool signalled_valid;
	bool event_idx, indirect;	/* negotiated features */
	int kick_fd, call_fd;
};

/* One chain walk: where segments go and what is allowed. */
struct vq_walk {
	struct iovec *iov;
	int max_iov;		/* room in iov */
	int niov;		/* out: segments */
	uint64_t total;		/* out: bytes */
	uint64_t max_len;	/* longest chain accepted */
	bool write;		/* device-writable (RX) or device-readable (TX) chain */
	char *err;		/* out: why the chain is bad */
	size_t errlen;
};

void *vq_translate(const struct vq_mem *m, uint64_t gpa, uint64_t len);
int vq_mem_check(const struct vnet_mem_region *r, int count);
int vq_map(struct virtq *vq, const struct vq_mem *m);
int vq_walk_chain(const struct virtq *vq, const struct vq_mem *m, uint16_t head,
		  struct vq_walk *w);

uint16_t vq_avail_idx(const struct virtq *vq);
uint16_t vq_avail_head(const struct virtq *vq, uint16_t idx);
uint16_t vq_used_idx_read(const struct virtq *vq);
void vq_set_avail_event(struct virtq *vq, uint16_t val);
void vq_push_used(struct virtq *vq, uint32_t head, uint32_t len);
void vq_publish_used(struct virtq *vq);
bool vq_need_signal(struct virtq *vq);

#endif
