"""The Flower ClientApp and the camera-trap device runtime (model export, atomic updates)."""
