"""Simulation: Hsu et al. adaptive partitions, the run's world (clients and splits) and its export."""
