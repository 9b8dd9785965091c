"""GradientSync's gather and scatter in one process; the real 2-rank all-reduce is in test_run_e2e."""
import numpy as np
import paddle
import pytest

from paddlerun.trainer import grad_sync
from paddlerun.trainer.grad_sync import GradientSync
from paddlerun.trainer.models import LeNet


def peer_sums(flat):
    """All-reduce as two ranks with gradients [own, own + 1] would see it, in place."""
    flat.set_value(flat * 2 + 1)


def backward(model, seed=0):
    paddle.seed(seed)
    x = paddle.randn([8, 1, 28, 28])
    y = paddle.randint(0, 10, [8, 1])
    paddle.nn.CrossEntropyLoss()(model(x), y).backward()


def grads(model):
    return {n: (p.grad.numpy().copy() if p.grad is not None else None) for n, p in model.named_parameters()}


@pytest.fixture
def fake_peer(monkeypatch):
    monkeypatch.setattr(grad_sync.dist, "all_reduce", peer_sums)


@pytest.mark.parametrize("bucket_bytes", [grad_sync.BUCKET_BYTES, 64 << 10])  # one bucket, several
def test_host_memory_copies_and_paddle_ops_give_the_same_bits(fake_peer, bucket_bytes):
    paddle.seed(0)
    model = LeNet()
    backward(model)
    before = grads(model)
    sync = GradientSync(model.parameters(), world_size=2, bucket_bytes=bucket_bytes)
    assert sync.on_host
    assert (len(sync.buckets) > 1) == (bucket_bytes < grad_sync.BUCKET_BYTES)
    sync()
    assert set(sync._flat) == set(range(len(sync.buckets))), "every bucket took the host-memory path"
    via_host = grads(model)
    for name, g in before.items():  # the average of g and g + 1, to the bit as Paddle computes it
        want = (paddle.to_tensor(g) * 2 + 1).scale_(0.5).numpy()
        assert np.array_equal(via_host[name], want), name
    # The same gradients through the Paddle-op path (GPU's) give the same bits.
    model.clear_gradients(set_to_zero=False)
    backward(model)
    for i, (bucket, sizes) in enumerate(zip(sync.buckets, sync.sizes)):
        sync._sync_with_paddle_ops(i, bucket, sizes, None)
    via_ops = grads(model)
    assert all(np.array_equal(via_host[n], via_ops[n]) for n in via_host)


def test_only_dense_gradients_of_the_parameters_dtype_are_copied_by_address():
    """Copying by data pointer trusts size and layout: anything else takes the Paddle ops."""
    dense = paddle.randn([3])
    assert grad_sync._copyable([dense, None], dense.dtype)
    assert not grad_sync._copyable([dense, paddle.randn([3], dtype="float64")], dense.dtype)
    strided = paddle.randn([4, 3]).transpose([1, 0])
    assert not strided.is_contiguous()
    assert not grad_sync._copyable([strided], strided.dtype)


def test_a_parameter_without_a_gradient_counts_as_zeros(fake_peer):
    paddle.seed(0)
    used, unused = paddle.nn.Linear(4, 3), paddle.nn.Linear(4, 3)
    params = list(used.parameters()) + list(unused.parameters())
    used(paddle.ones([2, 4])).sum().backward()
    before = used.weight.grad.numpy().copy()
    GradientSync(params, world_size=2)()
    assert unused.weight.grad is None, "no gradient is made up for it"
    assert np.array_equal(used.weight.grad.numpy(), (paddle.to_tensor(before) * 2 + 1).scale_(0.5).numpy())


def test_the_flat_buffer_is_kept_between_steps(fake_peer):
    paddle.seed(0)
    model = LeNet()
    sync = GradientSync(model.parameters(), world_size=2)
    backward(model)
    sync()
    flat = sync._flat[0][0]
    model.clear_gradients()
    backward(model, seed=1)
    sync()
    assert sync._flat[0][0] is flat


def test_extra_numbers_ride_the_first_all_reduce_on_both_paths(monkeypatch):
    sizes = []

    def recording_peer_sums(flat):
        sizes.append(flat.shape[0])
        peer_sums(flat)

    monkeypatch.setattr(grad_sync.dist, "all_reduce", recording_peer_sums)
    paddle.seed(0)
    model = LeNet()
    backward(model)
    before = grads(model)
    sync = GradientSync(model.parameters(), world_size=2)
    extra = [2.5, 64.0, 1.0, 0.0, 0.0, 1.0]
    assert sync(extra) == [2 * x + 1 for x in extra]  # as two ranks' sums would be
    assert sync() is None
    for name, g in grads(model).items():  # the gradients are averaged as without them (twice here)
        once = (paddle.to_tensor(before[name]) * 2 + 1).scale_(0.5)
        assert np.array_equal(g, (once * 2 + 1).scale_(0.5).numpy()), name
    model.clear_gradients(set_to_zero=False)
    backward(model)
    assert sync._sync_with_paddle_ops(0, sync.buckets[0], sync.sizes[0], extra) == [2 * x + 1 for x in extra]
    n = sum(sync.sizes[0]) + grad_sync.EXTRA_SLOTS
    assert sizes == [n, n, n], "every path and call all-reduces the same size: ranks never mismatch"
    with pytest.raises(ValueError, match="at most 8"):
        sync([0.0] * 9)


def test_gradients_too_coarse_to_carry_them_sum_the_extra_numbers_apart(monkeypatch):
    calls = []

    def recording_peer_sums(tensor):
        calls.append(str(tensor.dtype))
        peer_sums(tensor)

    monkeypatch.setattr(grad_sync.dist, "all_reduce", recording_peer_sums)
    half = paddle.create_parameter([3], dtype="float16")  # CPU Paddle has few float16 kernels;
    half.astype("float32").sum().backward()                # a cast back has one
    sync = GradientSync([half], world_size=2)
    assert sync([1.0, 3.0]) == [3.0, 7.0]
    assert calls == ["paddle.float16", "paddle.float64"]
