"""Analyses of a finished run: communication cost and link times, routing graph, affinity, pruning sweep."""
