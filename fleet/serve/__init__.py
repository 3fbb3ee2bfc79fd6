"""fleet.serve"""
