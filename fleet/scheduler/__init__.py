"""fleet.scheduler"""
