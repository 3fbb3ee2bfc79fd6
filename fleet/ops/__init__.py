"""The control loop and its tools: cycles, Ray jobs, sweeps, evaluation.

This is where the subsystems meet: a cycle reads the scheduler's plan, runs training,
scores drift and records usage, all through the registry.
"""
