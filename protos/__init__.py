"""geomoe.protos"""
