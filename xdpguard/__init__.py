"""xdpguard: an inline DDoS-filtering appliance built on XDP and AF_XDP."""

__version__ = "0.1.0"
