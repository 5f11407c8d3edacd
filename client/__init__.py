"""geomoe.client"""
