"""The KVM binding: small Python classes over cffi calls into <linux/kvm.h>."""
