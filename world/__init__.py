"""The run's world: Hsu et al. adaptive partitions, the clients and their splits, the world config, exports."""
