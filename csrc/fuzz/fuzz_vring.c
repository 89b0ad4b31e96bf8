/*
 * libFuzzer target for the vnet ring walker and data path.
 *
 * The input is a small guest: a 4-byte preamble, then the image of 60 KiB of
 * guest RAM at gpa 0x1000 holding both queues' descriptor tables, avail and
 * used rings, indirect tables and buffers.  A second 4 KiB region at 0x100000
 * sits elsewhere in the host heap.  Both are malloc'd at their exact size so
 * ASan catches any access outside the memory table.  The tap is a SOCK_DGRAM
 * socketpair (RX frames are queued on it, TX frames are drained from it).
 *
 * preamble: [0] log2 queue size (low 3 bits)  [1] features (bit0 INDIRECT_DESC,
 * bit1 EVENT_IDX, bit2 MRG_RXBUF, bit3 GUEST_TSO4, bit4 header 10 not 12)
 * [2] head for vnet_walk_chain  [3] RX frames to queue (low 2 bits), their size
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vnet.h"

#define RAM_GPA		0x1000
#define RAM_SIZE	0xF000
#define EXTRA_GPA	0x100000
#define EXTRA_SIZE	0x1000

static struct vnet *dev;
static int sv[2] = { -1, -1 };

static void drain(int fd)
{
	char buf[70000];

	while (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) >= 0)
		;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t pre[4] = { 0 };
	uint8_t *ram, *extra;
	struct vnet_mem_region r[2];
	unsigned int num;
	uint64_t features = 1ULL << 32;
	uint32_t total;
	char frame[4000];

	if (!dev) {
		dev = vnet_new();
		if (!dev || socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv) < 0)
			abort();
	}
	memcpy(pre, data, size < 4 ? size : 4);
	data += size < 4 ? size : 4;
	size -= size < 4 ? size : 4;

	ram = calloc(1, RAM_SIZE);
	extra = calloc(1, EXTRA_SIZE);
	if (!ram || !extra)
		abort();
	memcpy(ram, data, size < RAM_SIZE ? size : RAM_SIZE);
	if (size > RAM_SIZE)
		memcpy(extra, data + RAM_SIZE,
		       size - RAM_SIZE < EXTRA_SIZE ? size - RAM_SIZE : EXTRA_SIZE);

	r[0] = (struct vnet_mem_region){ RAM_GPA, RAM_SIZE, (uintptr_t)ram };
	r[1] = (struct vnet_mem_region){ EXTRA_GPA, EXTRA_SIZE, (uintptr_t)extra };
	num = 1u << (pre[0] & 7);		/* 1 .. 128 */
	if (pre[1] & 1)
		features |= 1ULL << 28;
	if (pre[1] & 2)
		features |= 1ULL << 29;
	if (pre[1] & 4)
		features |= 1ULL << 15;
	if (pre[1] & 8)
		features |= 1ULL << 7;

	vnet_reset_owner(dev);
	if (vnet_set_owner(dev) || vnet_set_mem_table(dev, r, 2) ||
	    vnet_set_features(dev, features) ||
	    vnet_set_vring_num(dev, VNET_TX, num) || vnet_set_vring_num(dev, VNET_RX, num) ||
	    vnet_set_vring_addr(dev, VNET_TX, 0x1000, 0x1800, 0x1a00) ||
	    vnet_set_vring_addr(dev, VNET_RX, 0x2000, 0x2800, 0x2a00) ||
	    vnet_set_backend(dev, sv[0], (pre[1] & 16) ? 10 : 12))
		abort();

	vnet_walk_chain(dev, VNET_TX, pre[2], &total);
	vnet_walk_chain(dev, VNET_RX, pre[2], &total);

	memset(frame, 0x5a, sizeof(frame));
	for (int i = 0; i < (pre[3] & 3); i++)
		if (send(sv[1], frame, 1 + ((pre[3] >> 2) * 61 + i * 997) % sizeof(frame),
			 MSG_DONTWAIT) < 0)
			break;
	vnet_poll(dev);
	vnet_poll(dev);		/* a second pass over whatever state the first left */
	drain(sv[0]);
	drain(sv[1]);

	free(ram);
	free(extra);
	return 0;
}
