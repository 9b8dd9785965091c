"""Paddle versions: the supervisor's refusal of an old Paddle (without importing it), the
features probed in the worker, and the fallbacks that keep every supported version exact."""
import dataclasses
import gc
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from helpers import REPO
from paddlerun.trainer import host_copy, paddle_features
from paddlerun.trainer.rundir import paddle_build
from paddlerun.trainer import state as tstate


def _fake_paddle(root, version, cuda="False"):
    """A ``paddle`` package that only has the generated version file; importing it fails
    loudly, so a test proves nobody imported it."""
    pkg = root / "paddle"
    (pkg / "version").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the supervisor imported paddle')\n")
    (pkg / "version" / "__init__.py").write_text(
        f"full_version     = '{version}'\nmajor = '{version.split('.')[0]}'\n"
        f"cuda_version     = '{cuda}'\ncudnn_version    = 'False'\nnccl_version     = '0'\n")
    return root


def test_an_old_paddle_is_refused_in_one_line_with_exit_2_before_any_worker(tmp_path):
    fake = _fake_paddle(tmp_path / "site", "2.6.2")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "run", "mnist_lenet",
                             "--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Paddle 2.6.2 is installed" in lines[0] and ">= 3.0.0" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (run_dir / "logs").exists()  # no attempt was started


def test_sharding_with_a_fleet_that_needs_protobuf_below_7_is_refused_up_front(tmp_path):
    import importlib.metadata
    fake = _fake_paddle(tmp_path / "site", "3.1.1")
    strategy = fake / "paddle" / "distributed" / "fleet" / "base" / "distributed_strategy.py"
    strategy.parent.mkdir(parents=True)
    strategy.write_text("if f.label == 3:\n    pass\n")  # what Paddle 3.0.0-3.3.0 do
    env = {**os.environ, "PYTHONPATH": str(fake)}
    result = subprocess.run([sys.executable, "-m", "paddlerun.launcher.cli", "run", "mnist_lenet",
                             "--run-dir", str(tmp_path / "run"), "--set", "train.sharded_optimizer=true"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    protobuf = importlib.metadata.version("protobuf")
    if paddle_build.version_tuple(protobuf) >= (7,):
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip().count("\n") == 0 and "pip install 'protobuf<7'" in result.stderr
    else:  # with protobuf < 7 that fleet works: no refusal (the fake paddle then fails to import)
        assert "protobuf" not in result.stderr


def test_the_protobuf_refusal_names_a_newer_paddle_than_the_installed_one():
    # Paddle 3.3.0's fleet still reads FieldDescriptor.label (.ci/paddle-core-check 3.3.0 found
    # it); the line told its user "or Paddle >= 3.3", the version they had.
    build = paddle_build.PaddleBuild(version="3.3.0", location="/site/paddle", protobuf="7.36.2",
                                     fleet_reads_protobuf_label=True)
    problem = build.sharding_problem()
    assert problem.startswith("Paddle 3.3.0's fleet cannot read") and "pip install 'protobuf<7'" in problem
    suggested = problem.rsplit("Paddle >= ", 1)[1]
    assert paddle_build.version_tuple(suggested) > paddle_build.version_tuple(build.version), problem


def test_the_build_is_read_from_the_installed_files():
    build = paddle_build.read()
    assert build is not None and build.version == paddle.__version__
    assert build.with_cuda == paddle.is_compiled_with_cuda()
    assert build.unsupported_reason() is None
    assert any(d.startswith(("paddlepaddle==", "paddlepaddle-gpu==")) for d in build.distributions)


def test_another_interpreter_is_asked_in_a_subprocess(tmp_path):
    fake = _fake_paddle(tmp_path / "site", "3.1.0", cuda="12.6")
    wrapper = tmp_path / "python"  # another interpreter, as launch.python would name it
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={fake} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    build = paddle_build.read(str(wrapper))
    assert (build.version, build.cuda, build.cudnn, build.nccl) == ("3.1.0", "12.6", None, None)
    assert build.location == str(fake / "paddle")


@pytest.mark.parametrize("version, supported", [("2.6.2", False), ("2.99.0", False), ("3.0.0", True),
                                                ("3.1.0rc1", True), ("3.3.1", True), ("0.0.0", True)])
def test_minimum_version(version, supported):
    build = paddle_build.PaddleBuild(version=version, location="/x/paddle")
    assert (build.unsupported_reason() is None) == supported


def test_the_probe_matches_what_this_paddle_does():
    found = paddle_features.probe()
    found.check()  # the installed Paddle is a supported one
    assert found.dlpack == hasattr(paddle.Tensor, "__dlpack__")
    if found.dlpack:
        assert found.dlpack_writable == np.from_dlpack(paddle.zeros([2])).flags.writeable
    assert found.generator_engine_state and found.address_views
    assert (found.fallbacks == ()) == (found.dlpack_writable and (found.pinned_copy or not found.cuda))


def test_without_writable_views_the_gradient_sync_uses_paddle_ops(monkeypatch):
    from paddlerun.trainer import grad_sync
    from paddlerun.trainer.models import LeNet
    monkeypatch.setattr(grad_sync, "features", lambda: dataclasses.replace(
        paddle_features.features(), dlpack_writable=False, address_views=False))
    monkeypatch.setattr(grad_sync.dist, "all_reduce", lambda flat: flat.set_value(flat * 2))
    model = LeNet()
    model(paddle.randn([2, 1, 28, 28])).sum().backward()
    before = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    sync = grad_sync.GradientSync(model.parameters(), world_size=2)
    assert not sync.on_host
    sync()
    assert not sync._flat  # no bucket took the copy-by-address path
    for n, p in model.named_parameters():  # (g + g) / 2
        assert np.array_equal(p.grad.numpy(), before[n]), n


def test_a_writable_host_view_writes_into_the_tensor_on_every_version():
    # The gradient sync writes through this view: on Paddle 3.0-3.2 np.from_dlpack gave a
    # read-only one ("assignment destination is read-only" at the first step).
    tensor = paddle.zeros([6], dtype="float32")
    view = host_copy.host_view(tensor, writable=True)
    view[2:4] = [1.5, -2.0]
    assert tensor.numpy().tolist() == [0, 0, 1.5, -2.0, 0, 0]
    tensor.scale_(2.0)  # and it sees Paddle's in-place updates
    assert view.tolist() == [0, 0, 3.0, -4.0, 0, 0]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "uint8", "bool"])
def test_an_address_view_is_exact_and_keeps_its_tensor_alive(dtype):
    tensor = (paddle.arange(12, dtype="float32").reshape([3, 4]) * 3).astype(dtype)
    want = tensor.numpy().copy()
    view = host_copy.address_view(tensor)
    assert view.dtype == want.dtype and view.shape == want.shape and np.array_equal(view, want)
    del tensor
    gc.collect()
    _ = [paddle.full([3, 4], 7, dtype=dtype) for _ in range(8)]  # would reuse freed memory
    assert np.array_equal(view, want)


def test_an_address_view_declines_what_numpy_cannot_hold():
    assert host_copy.address_view(paddle.zeros([2], dtype="bfloat16")) is None
    assert host_copy.address_view(paddle.zeros([0, 3])).shape == (0, 3)


class _CountingStaging(host_copy.DeviceStaging):
    """The GPU staging logic run on CPU tensors: 'pinned' buffers are plain clones."""

    def __init__(self):
        self.allocations = 0
        self.waits = 0

        def allocate(tensor):
            self.allocations += 1
            return tensor.clone()

        def synchronize():
            self.waits += 1
        super().__init__(allocate=allocate, synchronize=synchronize)


def test_device_staging_reuses_one_buffer_per_tensor_and_copies_into_it():
    staging = _CountingStaging()
    a = paddle.arange(5, dtype="float32")
    first = staging.copy(("g", "a"), a)
    address = first.ctypes.data
    a.scale_(3.0)
    second = staging.copy(("g", "a"), a)
    staging.wait()
    assert second.ctypes.data == address and staging.allocations == 1 and staging.waits == 1
    assert second.tolist() == [0, 3, 6, 9, 12]
    grown = staging.copy(("g", "a"), paddle.ones([7]))  # a new shape: a new buffer
    assert staging.allocations == 2 and grown.tolist() == [1] * 7
    assert staging.copy(("g", "b"), paddle.zeros([2], dtype="bfloat16")) is None
    staging.keep_only({("g", "a")})
    assert list(staging._buffers) == [("g", "a")]


def test_generator_states_of_ints_only_stay_ints():
    # A CUDA generator's state is (device, seed, offset): bytes(offset) would be zeros.
    assert tstate._paddle_generator_json((0, 42, 1024)) == [0, 42, 1024]


def test_non_tensor_optimizer_entries_go_to_json():
    layer = paddle.nn.Linear(2, 2)
    opt = paddle.optimizer.Adam(parameters=layer.parameters())
    layer(paddle.ones([1, 2])).sum().backward()
    opt.step()
    sd = opt.state_dict()
    sd_extra = {"some_version_counter": 3}
    opt.state_dict = lambda: {**sd, **sd_extra}
    tensors, extra = tstate.optimizer_tensors(opt)
    assert extra["some_version_counter"] == 3
    assert all(isinstance(t, paddle.Tensor) for t in tensors.values())


def test_ci_runs_the_oldest_supported_paddle():
    ci = (REPO / ".ci" / "run").read_text()
    assert f"OLDEST_PADDLE={paddle_build.MINIMUM}\n" in ci
