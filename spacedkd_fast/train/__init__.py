"""The trainer: ``python -m spacedkd_fast.train`` (CLI, configuration and recipes), the training
loop that wires data, models and the engine, evaluation, reports, checkpoints, DDP, LR schedules.

``run(config, train_set=..., test_set=...)`` (:mod:`.user_data`) trains on your own Datasets from
Python; it is resolved lazily so that the CLI answers ``--help`` without importing torch.
"""


def __getattr__(name: str):
    if name == "run":
        from .user_data import run

        return run
    raise AttributeError(f"module 'spacedkd_fast.train' has no attribute {name!r}")
