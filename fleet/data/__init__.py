"""fleet.data"""
