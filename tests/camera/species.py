"""Labels for test exports: a test model belongs to no run, so its species get made-up scientific names."""

from geomoe.camera.export import labels_for
from geomoe.camera.inference import Labels


def species_labels(model) -> Labels:
    """`model`'s labels with the species of class id k named "Testus speciesk"."""
    return labels_for(model, [f"Testus species{k}" for k in range(model.cfg.num_classes)])
