"""Networking for virtio-net: the tap device and the interchangeable data paths.

Every data path (C in cpath.py, Python in pypath.py, kernel in vhost.py) has the
same vhost-like control API, so virtio_net.py and the CPR code drive them alike.
"""
