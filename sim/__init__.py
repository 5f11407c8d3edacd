"""geomoe.sim"""
