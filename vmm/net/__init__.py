"""Networking for virtio-net: the tap device and the interchangeable data paths.

(The host side only: no guest-visible device lives here.  The device the machine
sees is vmm/devices/net.py, its virtio-net model vmm/devices/virtio_net.py.)

Every data path (C in backend_c.py, Python in backend_python.py, the kernel's
vhost-net in backend_vhost.py; `--net tap,backend=c|python|vhost`) has the same
vhost-like control API, so virtio_net.py and the CPR code drive them alike.
"""

# virtio-net's numbers (virtio 1.2 §5.1), for the device model and every data path;
# the C side has the same queue indices in csrc/vnet.h (VNET_RX, VNET_TX), checked
# against these by tests/test_backend_c.py.
RX, TX = 0, 1              # the queues: receiveq1, transmitq1
VNET_HDR_LEN = 12          # virtio_net_hdr_v1: VERSION_1 always carries num_buffers
F_MRG_RXBUF = 15           # feature bit: an RX frame may span several chains
