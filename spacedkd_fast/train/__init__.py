"""The trainer: ``python -m spacedkd_fast.train`` (CLI, configuration and recipes), the training
loop that wires data, models and the engine, evaluation, reports, checkpoints, DDP, LR schedules.
"""
