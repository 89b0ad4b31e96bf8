"""cffi build script for the C virtio-net data path (csrc/vnet.c, API mode).

Build in place from the repository root:  python3 vmm/net/_build_vnet.py
(setup.py can list it as "vmm/net/_build_vnet.py:ffibuilder").
"""

import os

import cffi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CDEF = """
#define VNET_RX 0
#define VNET_TX 1
#define VNET_NQUEUES 2
#define VNET_MAX_REGIONS 8

struct vnet_mem_region { uint64_t gpa; uint64_t size; uint64_t host_addr; };
struct vnet_stats {
    uint64_t rx_packets, rx_bytes, rx_dropped;
    uint64_t tx_packets, tx_bytes, tx_dropped;
    uint64_t kicks, interrupts, wakeups;
};
struct vnet;

struct vnet *vnet_new(void);
void vnet_free(struct vnet *n);
int vnet_set_owner(struct vnet *n);
int vnet_reset_owner(struct vnet *n);
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
int vnet_start(struct vnet *n);
int vnet_stop(struct vnet *n);
int vnet_running(struct vnet *n);
uint32_t vnet_isr_read(struct vnet *n);
void vnet_isr_ack(struct vnet *n, uint32_t bits);
int vnet_get_error(struct vnet *n, char *msg, int msglen);
void vnet_get_stats(struct vnet *n, struct vnet_stats *out);
int vnet_walk_chain(struct vnet *n, int q, uint16_t head, uint32_t *total_len);
int vnet_poll(struct vnet *n);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vmm.net._vnet",
    '#include "vnet.h"',
    sources=["csrc/vnet.c", "csrc/virtq.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-Wall", "-Wextra", "-Werror", "-O2", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    os.chdir(ROOT)  # sources are relative to the repository root
    ffibuilder.compile(tmpdir=ROOT, verbose=True)
