"""fleet.divergence"""
