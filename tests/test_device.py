"""Which device a worker trains on: the one Paddle's launcher assigned it (FLAGS_selected_gpus,
what ``paddle.distributed.ParallelEnv().device_id`` reads), not ``gpu:LOCAL_RANK``.

The environment-to-device rule runs without a GPU; the last test asks the real launcher what
it sets, so a Paddle release that renames the variable fails here.
"""
import subprocess
import sys

import pytest

from paddlerun.trainer.device import SELECTED_GPUS, choose_device

from helpers import REPO


@pytest.mark.parametrize("selected, local_rank, device", [
    ("3", 0, "gpu:3"),        # --devices 3, one worker: its GPU, not gpu:0
    ("1", 0, "gpu:1"),
    ("0", 1, "gpu:0"),        # the launcher's choice wins over the local rank
    ("2,3", 0, "gpu:2"),      # one worker given several: the first, as ParallelEnv takes it
    (None, 1, "gpu:1"),       # no launcher choice (run without paddle.distributed.launch)
])
def test_a_gpu_worker_trains_on_the_gpu_paddle_selected(selected, local_rank, device):
    environ = {} if selected is None else {SELECTED_GPUS: selected}
    assert choose_device("auto", True, environ, local_rank) == device
    assert choose_device("gpu", True, environ, local_rank) == device


@pytest.mark.parametrize("want", ["auto", "cpu"])
def test_a_cpu_run_uses_cpu_whatever_the_launcher_set(want):
    assert choose_device(want, False, {SELECTED_GPUS: "3"}, 0) == "cpu"
    assert choose_device("cpu", True, {SELECTED_GPUS: "3"}, 0) == "cpu"


def test_gpu_without_one_and_a_bad_selection_are_named():
    with pytest.raises(RuntimeError, match="launch.device is 'gpu' but this Paddle has no usable GPU"):
        choose_device("gpu", False, {}, 0)
    with pytest.raises(RuntimeError, match=r"FLAGS_selected_gpus='x' .*not a GPU index"):
        choose_device("auto", True, {SELECTED_GPUS: "x"}, 0)


def test_paddle_launch_passes_the_selection_in_the_variable_we_read(tmp_path):
    # What Paddle's launcher itself would give a GPU worker: its device object's key, and the
    # index it makes of --devices 3 among eight visible GPUs (CUDA_VISIBLE_DEVICES).
    probe = ("import os; os.environ['CUDA_VISIBLE_DEVICES'] = '0,1,2,3,4,5,6,7'\n"
             "from paddle.distributed.launch.context.device import Device, DeviceType\n"
             "d = Device.parse_device(); d._dtype = DeviceType.GPU\n"
             "print(d.get_selected_device_key(), d.get_selected_devices('3'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == f"{SELECTED_GPUS} ['3']"
