"""fleet.base"""
