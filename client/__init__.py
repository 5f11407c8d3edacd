"""The Flower training node: ClientApp, its Flower-free task code and the node's data."""
