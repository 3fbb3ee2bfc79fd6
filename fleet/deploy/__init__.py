"""fleet.deploy"""
