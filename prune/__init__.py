"""A finished run cut down for one location (keep set, pruned model) and the experts a fleet needs."""
