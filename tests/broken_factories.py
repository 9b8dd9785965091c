"""Factories that fail, for the supervisor's give-up tests (importable by the workers via PYTHONPATH)."""


def unreachable_dataset(split, **kwargs):
    raise RuntimeError("dataset server unreachable")


def lenet_failing_on_rank(rank, after_steps, num_classes=10):
    """The built-in LeNet, whose training forward raises a plain Python exception on ``rank``
    after ``after_steps`` steps, in a run's first attempt only (the rerun trains on)."""
    import os

    from paddlerun.trainer.models import lenet

    model = lenet(num_classes=num_classes)
    if os.environ.get("PADDLE_GLOBAL_RANK") != str(rank) or os.environ.get("PADDLERUN_ATTEMPT") != "0":
        return model
    forward = model.forward
    calls = [0]

    def failing_forward(inputs):
        if model.training:
            calls[0] += 1
            if calls[0] > after_steps:
                raise ValueError(f"injected fault in rank {rank}'s forward at step {calls[0]}")
        return forward(inputs)

    model.forward = failing_forward
    return model
