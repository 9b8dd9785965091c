"""Config loading: good input, every kind of bad input and the message it gets."""
import pytest

from paddlerun.trainer.rundir.config import Config, ConfigError, dump_config, load_config


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_config_loads_with_defaults(tmp_path):
    config = load_config("configs/mnist_lenet.yaml")
    assert config.train.model == "lenet" and config.train.epochs == 3
    assert config.train.global_batch_size == 64 and config.train.lr == 0.001
    assert config.supervisor.max_restarts == Config().supervisor.max_restarts


def test_overrides_are_parsed_against_the_schema(tmp_path):
    config = load_config("configs/mnist_lenet.yaml", [
        "train.max_steps=40", "train.lr=1e-2", "checkpoint.async=false",
        "launch.nproc_per_node=3", "checkpoint.every_seconds=2", "train.model_args.num_classes=10"])
    assert config.train.max_steps == 40
    assert config.train.lr == 0.01
    assert config.checkpoint.async_save is False
    assert config.launch.nproc_per_node == 3
    assert config.checkpoint.every_seconds == 2.0 and isinstance(config.checkpoint.every_seconds, float)
    assert config.train.model_args == {"num_classes": 10}


def test_resolved_config_round_trips(tmp_path):
    config = load_config("configs/mnist_lenet.yaml", ["train.max_steps=7"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("text,overrides,message", [
    ("train:\n  lr: 0.1\n  epoch: 3\n", [], r"unknown key 'train.epoch'; did you mean 'train.epochs'\?"),
    ("trian:\n  lr: 0.1\n", [], r"unknown key 'trian'; did you mean 'train'\?"),
    ("train:\n  lr: fast\n", [], r"train.lr must be a number, got 'fast'"),
    ("train:\n  epochs: 2.5\n", [], r"train.epochs must be an integer, got 2.5"),
    ("train:\n  epochs: true\n", [], r"train.epochs must be an integer, got True"),
    ("train:\n  epochs: 0\n", [], r"train.epochs must be >= 1, got 0"),
    ("train:\n  global_batch_size: -4\n", [], r"train.global_batch_size must be >= 1"),
    ("train:\n  max_steps: 0\n", [], r"train.max_steps must be >= 1 or null"),
    ("checkpoint:\n  keep_last: 0\n", [], r"checkpoint.keep_last must be >= 1"),
    ("launch:\n  nproc_per_node: many\n", [], r"launch.nproc_per_node must be"),
    ("launch:\n  nnodes: 2\n", [], r"launch.master must be set"),
    ("train: 3\n", [], r"train must be a mapping, got int 3"),
    ("- a\n- b\n", [], r"top level must be a mapping"),
    ("", [], r"the file is empty"),
    ("train:\n  lr: [0.1\n", [], r"line 3, column 1: not valid YAML"),
    ("train: {}\n", ["train.max_step=3"], r"--set: unknown key 'train.max_step'; did you mean 'train.max_steps'\?"),
    ("train: {}\n", ["train.max_steps"], r"expected KEY=VALUE"),
    ("train: {}\n", ["train.max_steps=many"], r"train.max_steps must be an integer or null, got 'many'"),
])
def test_bad_config_names_key_and_file(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, overrides)
    if not overrides:
        assert str(path) in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'nope.yaml'}"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_ignores_budgets_but_not_the_model(tmp_path):
    base = load_config("configs/mnist_lenet.yaml")
    longer = load_config("configs/mnist_lenet.yaml", ["train.max_steps=99", "train.epochs=9"])
    other = load_config("configs/mnist_lenet.yaml", ["train.lr=0.5"])
    assert base.hash() == longer.hash() != other.hash()


def test_builtin_factory_names_match_their_implementations():
    from paddlerun.trainer import factories
    from paddlerun.trainer.rundir.config import BUILTIN_FACTORIES
    assert tuple(factories.OPTIMIZERS) == BUILTIN_FACTORIES["optimizer"]
    assert tuple(factories.LR_SCHEDULES) == BUILTIN_FACTORIES["lr_schedule"]
    assert tuple(factories.LOSSES) == BUILTIN_FACTORIES["loss"]
    assert tuple(factories._model_builtins()) == BUILTIN_FACTORIES["model"]
    assert tuple(factories._dataset_builtins()) == BUILTIN_FACTORIES["dataset"]


def test_extra_args_may_not_repeat_any_flag_paddlerun_passes(tmp_path):
    # LAUNCH_FLAGS is what config validation refuses in launch.extra_args: it must cover
    # every flag LaunchSpec puts before the script, multi-node included.
    from paddlerun.launcher.launch import LaunchSpec
    from paddlerun.trainer.rundir.config import LAUNCH_FLAGS, config_from_dict
    config = config_from_dict({"launch": {"nproc_per_node": 2, "nnodes": 2, "master": "127.0.0.1:1"}})
    argv = LaunchSpec(config=config, run_dir=tmp_path).argv(0)
    script = next(i for i, a in enumerate(argv) if a.endswith("worker.py"))
    passed = {a for a in argv[3:script] if a.startswith("--")}
    assert passed == set(LAUNCH_FLAGS)
    for flag in passed:
        with pytest.raises(ConfigError, match=r"launch\.extra_args\[1\]"):
            config_from_dict({"launch": {"extra_args": ["--log_level=DEBUG", f"{flag}=1"]}})
    config_from_dict({"launch": {"extra_args": ["--log_level", "DEBUG", "--job_id", "x"]}})  # others pass
