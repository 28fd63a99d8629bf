"""pyflannel.cni: the flannel CNI plugin and its installer."""
