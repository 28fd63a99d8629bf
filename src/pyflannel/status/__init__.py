"""`pyflannel status`: the leases in the store, and whether this node's kernel matches them."""
