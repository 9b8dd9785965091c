"""GPU tests: they run only where Paddle is a CUDA build and at least two GPUs are visible
(one per worker), and say why they were skipped everywhere else."""
import pytest


def _why_not() -> str:
    try:
        import paddle
    except ImportError as e:
        return f"paddle does not import: {e}"
    if not paddle.is_compiled_with_cuda():
        return f"Paddle {paddle.__version__} is a CPU build (install paddlepaddle-gpu, docs/install.md)"
    count = paddle.device.cuda.device_count()
    if count < 2:
        return f"{count} GPU visible; these tests start 2 workers with one GPU each"
    return ""


REASON = _why_not()


def pytest_collection_modifyitems(config, items):
    if not REASON:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA machine: {REASON}")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
