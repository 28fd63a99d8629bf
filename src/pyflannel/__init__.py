"""pyflannel: flannel, the layer-3 network fabric for Kubernetes, in Python."""

__version__ = "0.1.0"
