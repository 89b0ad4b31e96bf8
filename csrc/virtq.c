/*
 * virtq: checked guest-memory translation and the split-virtqueue walker.
 *
 * Ring layout (virtio 1.2 section 2.7), little endian:
 *   desc:  num x {le64 addr; le32 len; le16 flags; le16 next}      align 16
 *   avail: le16 flags; le16 idx; le16 ring[num]; le16 used_event     align 2
 *   used:  le16 flags; le16 idx; {le32 id; le32 len} ring[num];
 *          le16 avail_event                                          align 4
 */
#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "virtq.h"

#define AVAIL_IDX	2
#define AVAIL_RING	4
#define USED_IDX	2
#define USED_RING	4

void *vq_translate(const struct vq_mem *m, uint64_t gpa, uint64_t len)
{
	for (int i = 0; i < m->nregions; i++) {
		const struct vnet_mem_region *r = &m->r[i];
		uint64_t off;

		if (gpa < r->gpa)
			continue;
		off = gpa - r->gpa;
		if (off >= r->size || len > r->size - off)
			continue;
		return (void *)(uintptr_t)(r->host_addr + off);
	}
	return NULL;
}

int vq_mem_check(const struct vnet_mem_region *r, int count)
{
	if (count < 0 || count > VNET_MAX_REGIONS || (count && !r))
		return -EINVAL;
	for (int i = 0; i < count; i++) {
		if (!r[i].size || !r[i].host_addr)
			return -EINVAL;
		if (r[i].size - 1 > UINT64_MAX - r[i].gpa ||
		    r[i].size - 1 > (uint64_t)UINTPTR_MAX - r[i].host_addr)
			return -EOVERFLOW;
		for (int j = 0; j < i; j++) {
			uint64_t a_end = r[i].gpa + (r[i].size - 1);
			uint64_t b_end = r[j].gpa + (r[j].size - 1);

			if (r[i].gpa <= b_end && r[j].gpa <= a_end)
				return -EINVAL;		/* overlapping regions */
		}
	}
	return 0;
}

int vq_map(struct virtq *vq, const struct vq_mem *m)
{
	uint64_t num = vq->num;
	void *d, *a, *u;

	if (!num)
		return -EINVAL;
	if (vq->desc_gpa % 16 || vq->avail_gpa % 2 || vq->used_gpa % 4)
		return -EINVAL;
	d = vq_translate(m, vq->desc_gpa, 16 * num);
	a = vq_translate(m, vq->avail_gpa, 6 + 2 * num);
	u = vq_translate(m, vq->used_gpa, 6 + 8 * num);
	if (!d || !a || !u)
		return -EFAULT;
	if ((uintptr_t)a % 2 || (uintptr_t)u % 4)
		return -EINVAL;		/* host alignment, needed for atomics */
	vq->desc = d;
	vq->avail = a;
	vq->used = u;
	return 0;
}

static int bad(struct vq_walk *w, int err, const char *fmt, ...)
{
	va_list ap;

	if (w->err && w->errlen) {
		va_start(ap, fmt);
		vsnprintf(w->err, w->errlen, fmt, ap);
		va_end(ap);
	}
	return err;
}

/* Copy a descriptor out of guest memory once; only the copy is checked and used. */
static void read_desc(const uint8_t *table, unsigned int i, struct virtq_desc *d)
{
	struct virtq_desc raw;

	memcpy(&raw, table + 16 * (size_t)i, sizeof(raw));
	d->addr = le64toh(raw.addr);
	d->len = le32toh(raw.len);
	d->flags = le16toh(raw.flags);
	d->next = le16toh(raw.next);
}

static int add_seg(const struct vq_mem *m, struct vq_walk *w,
		   const struct virtq_desc *d, bool indirect, unsigned int i)
{
	const char *where = indirect ? "indirect descriptor" : "descriptor";
	bool wr = d->flags & VRING_DESC_F_WRITE;
	void *p;

	if (!d->len)
		return bad(w, -EINVAL, "zero-length %s %u", where, i);
	if (wr != w->write)
		return bad(w, -EINVAL, wr ? "write-only %s %u in a device-readable chain"
				       : "read-only %s %u in a device-writable chain", where, i);
	if (w->niov >= w->max_iov)
		return bad(w, -E2BIG, "chain has more than %d segments", w->max_iov);
	if (d->len > w->max_len - w->total)
		return bad(w, -E2BIG, "chain is longer than %llu bytes",
			   (unsigned long long)w->max_len);
	p = vq_translate(m, d->addr, d->len);
	if (!p)
		return bad(w, -EFAULT, "%s %u: buffer %#llx+%#x is outside guest memory",
			   where, i, (unsigned long long)d->addr, d->len);
	w->iov[w->niov].iov_base = p;
	w->iov[w->niov].iov_len = d->len;
	w->niov++;
	w->total += d->len;
	return 0;
}

int vq_walk_chain(const struct virtq *vq, const struct vq_mem *m, uint16_t head,
		  struct vq_walk *w)
{
	const uint8_t *table = vq->desc;
	unsigned int size = vq->num, i = head, count = 0;
	bool indirect = false;
	struct virtq_desc d;
	int r;

	w->niov = 0;
	w->total = 0;
	if (!table || !size)
		return bad(w, -EINVAL, "queue is not set up");
	if (head >= size)
		return bad(w, -EINVAL, "head index %u >= queue size %u", head, size);
	for (;;) {
		if (++count > size)
			return bad(w, -ELOOP, "%s loops (more than %u descriptors)",
				   indirect ? "indirect table" : "descriptor chain", size);
		read_desc(table, i, &d);
		if (d.flags & VRING_DESC_F_INDIRECT) {
			if (!vq->indirect)
				return bad(w, -EINVAL, "indirect descriptor %u without "
					   "VIRTIO_RING_F_INDIRECT_DESC", i);
			if (indirect)
				return bad(w, -EINVAL, "nested indirect descriptor %u", i);
			if (d.flags & VRING_DESC_F_NEXT)
				return bad(w, -EINVAL, "descriptor %u has both INDIRECT and NEXT", i);
			if (!d.len || d.len % 16)
				return bad(w, -EINVAL, "indirect table length %u is not a "
					   "non-zero multiple of 16", d.len);
			table = vq_translate(m, d.addr, d.len);
			if (!table)
				return bad(w, -EFAULT, "indirect table %#llx+%#x is outside "
					   "guest memory", (unsigned long long)d.addr, d.len);
			size = d.len / 16;
			i = 0;
			count = 0;
			indirect = true;
			continue;
		}
		r = add_seg(m, w, &d, indirect, i);
		if (r < 0)
			return r;
		if (!(d.flags & VRING_DESC_F_NEXT))
			return w->niov;
		if (d.next >= size)
			return bad(w, -EINVAL, "%s %u: next index %u out of range (table size %u)",
				   indirect ? "indirect descriptor" : "descriptor", i, d.next, size);
		i = d.next;
	}
}

static inline uint16_t *u16p(uint8_t *base, size_t off)
{
	return (uint16_t *)(void *)(base + off);
}

static inline uint32_t *u32p(uint8_t *base, size_t off)
{
	return (uint32_t *)(void *)(base + off);
}

uint16_t vq_avail_idx(const struct virtq *vq)
{
	/* acquire: ring entries written before idx are visible after this load */
	return le16toh(__atomic_load_n(u16p(vq->avail, AVAIL_IDX), __ATOMIC_ACQUIRE));
}

uint16_t vq_avail_head(const struct virtq *vq, uint16_t idx)
{
	size_t off = AVAIL_RING + 2 * (size_t)(idx & (vq->num - 1));

	return le16toh(__atomic_load_n(u16p(vq->avail, off), __ATOMIC_RELAXED));
}

uint16_t vq_used_idx_read(const struct virtq *vq)
{
	return le16toh(__atomic_load_n(u16p(vq->used, USED_IDX), __ATOMIC_ACQUIRE));
}

/* Ask the driver to kick when it makes entry `val` available (EVENT_IDX).
 * The full fence orders this store before the caller's re-read of avail->idx. */
void vq_set_avail_event(struct virtq *vq, uint16_t val)
{
	size_t off = USED_RING + 8 * (size_t)vq->num;

	__atomic_store_n(u16p(vq->used, off), htole16(val), __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void vq_push_used(struct virtq *vq, uint32_t head, uint32_t len)
{
	size_t off = USED_RING + 8 * (size_t)(vq->used_idx & (vq->num - 1));

	__atomic_store_n(u32p(vq->used, off), htole32(head), __ATOMIC_RELAXED);
	__atomic_store_n(u32p(vq->used, off + 4), htole32(len), __ATOMIC_RELAXED);
	vq->used_idx++;
}

void vq_publish_used(struct virtq *vq)
{
	/* release: the entries (and the buffers' contents) before the index */
	__atomic_store_n(u16p(vq->used, USED_IDX), htole16(vq->used_idx), __ATOMIC_RELEASE);
}

/* Should the driver be interrupted for the entries published since the last
 * check?  vring_need_event() with EVENT_IDX, else VRING_AVAIL_F_NO_INTERRUPT. */
bool vq_need_signal(struct virtq *vq)
{
	uint16_t old, new, event;
	bool valid;

	/* order the used->idx store before reading used_event / avail->flags */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (!vq->event_idx)
		return !(le16toh(__atomic_load_n(u16p(vq->avail, 0), __ATOMIC_RELAXED)) &
			 VRING_AVAIL_F_NO_INTERRUPT);
	old = vq->signalled_used;
	new = vq->used_idx;
	valid = vq->signalled_valid;
	vq->signalled_used = new;
	vq->signalled_valid = true;
	if (!valid)
		return true;
	event = le16toh(__atomic_load_n(u16p(vq->avail, AVAIL_RING + 2 * (size_t)vq->num),
					__ATOMIC_RELAXED));
	return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}
