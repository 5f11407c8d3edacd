"""The simulation: the world file first, then the ServerApp and ClientApps on Flower's simulation runtime."""
