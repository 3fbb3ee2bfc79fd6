"""fleet.lora"""
