"""geomoe.server"""
