"""Orchestration of SynQT sweeps: sweep plans, Ray Tune, SLURM and aggregation.

Only `launcher.ray_backend` imports ray, so that Ray API changes stay in one module.
"""
