"""geomoe.deploy"""
