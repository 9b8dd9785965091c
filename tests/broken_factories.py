"""Factories that fail, for the supervisor's give-up tests (importable by the workers via PYTHONPATH)."""


def unreachable_dataset(split, **kwargs):
    raise RuntimeError("dataset server unreachable")
