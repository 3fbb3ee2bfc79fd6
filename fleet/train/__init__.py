"""fleet.train"""
