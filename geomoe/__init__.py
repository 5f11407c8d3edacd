"""geomoe: federated geographic mixture-of-experts species recognition on edge devices."""

__version__ = "0.1.0"
