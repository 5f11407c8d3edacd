"""Runs the federated job: `geomoe sim` on Flower's simulation runtime."""
