"""Data: the published formats (iNaturalist, Hsu et al. splits, iWildCam-WILDS, Camtrap DP, device folders),
the synthetic world, and the image pipeline that decodes and caches what they name."""
