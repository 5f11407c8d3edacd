"""Data: S2 cells, Hsu et al. partitions and splits, real-format loaders, the synthetic world."""
