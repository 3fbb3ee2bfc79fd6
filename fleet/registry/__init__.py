"""fleet.registry"""
