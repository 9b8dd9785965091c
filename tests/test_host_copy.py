"""The capture copy into reused host buffers: exact, reused, and a copy rather than a view."""
import numpy as np
import paddle
import pytest

from paddlerun.trainer import host_copy
from paddlerun.trainer.host_copy import HostBuffers


@pytest.fixture
def buffers():
    b = HostBuffers(threads=2)
    yield b
    b.close()


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int64", "int32",
                                   "uint8", "bool"])
def test_every_dtype_copies_exactly_as_numpy_does(buffers, dtype):
    paddle.seed(1)
    tensor = (paddle.randn([3, 5]) * 10).astype(dtype)
    got = buffers.copy({"g": {"t": tensor}})["g"]["t"]
    want = tensor.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


def test_scalars_strided_views_and_parameters(buffers):
    layer = paddle.nn.Linear(4, 3)  # parameters require gradients: DLPack needs detach()
    strided = paddle.arange(24, dtype="float32").reshape([4, 6])[:, 1:3]
    tensors = {"w": layer.weight, "scalar": paddle.to_tensor(2.5), "strided": strided}
    got = buffers.copy({"g": tensors})["g"]
    for name, tensor in tensors.items():
        assert np.array_equal(got[name], tensor.numpy()), name
        assert got[name].shape == tuple(tensor.shape)


def test_buffers_are_reused_and_hold_a_copy_not_a_view(buffers):
    tensor = paddle.ones([64, 64])
    first = buffers.copy({"g": {"t": tensor}})["g"]["t"]
    tensor.set_value(paddle.full([64, 64], 7.0))  # the live tensor changes ...
    assert np.all(first == 1.0)  # ... the captured copy does not
    second = buffers.copy({"g": {"t": tensor}})["g"]["t"]
    assert second is first  # the same buffer, overwritten by the next capture
    assert np.all(second == 7.0)


def test_groups_keep_equal_names_apart_and_stale_buffers_are_freed(buffers):
    a, b = paddle.zeros([3]), paddle.ones([3])
    got = buffers.copy({"model": {"x": a}, "optimizer": {"x": b}})
    assert np.all(got["model"]["x"] == 0) and np.all(got["optimizer"]["x"] == 1)
    buffers.copy({"model": {"x": a}})
    assert set(buffers._buffers) == {("model", "x")}


def test_a_changed_shape_gets_a_new_buffer(buffers):
    first = buffers.copy({"g": {"t": paddle.ones([4])}})["g"]["t"]
    second = buffers.copy({"g": {"t": paddle.ones([2, 3])}})["g"]["t"]
    assert second is not first and second.shape == (2, 3)


def test_large_state_is_split_over_threads_and_stays_exact(buffers, monkeypatch):
    # Small thresholds so that a few MB take the threaded path with several pieces each.
    monkeypatch.setattr(host_copy, "PARALLEL_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(host_copy, "PIECE_BYTES", 256 << 10)
    paddle.seed(3)
    tensors = {f"t{i}": paddle.randn([301, 517]) for i in range(6)}  # pieces do not divide evenly
    tensors["small"] = paddle.randn([7])
    got = buffers.copy({"g": tensors})["g"]
    assert buffers._pool is not None  # the threaded path ran
    for name, tensor in tensors.items():
        assert np.array_equal(got[name], tensor.numpy()), name


def test_views_are_kept_while_tensors_are_updated_in_place(buffers):
    layer = paddle.nn.Linear(8, 8)
    opt = paddle.optimizer.Adam(parameters=layer.parameters())
    for _ in range(3):
        layer(paddle.randn([2, 8])).mean().backward()
        opt.step()
        opt.clear_grad()
        got = buffers.copy({"model": dict(layer.state_dict())})["model"]
        assert all(np.array_equal(got[n], t.numpy()) for n, t in layer.state_dict().items())
    assert buffers.keep_views and len(buffers._views) == 2


def test_a_tensor_with_new_memory_or_another_layout_is_viewed_afresh(buffers):
    square = paddle.arange(16, dtype="float32").reshape([4, 4])
    buffers.copy({"g": {"t": square}})
    # The same memory, shape and dtype, other strides: a kept view would read it untransposed.
    transposed = square.transpose([1, 0])
    assert transposed.data_ptr() == square.data_ptr()
    assert np.array_equal(buffers.copy({"g": {"t": transposed}})["g"]["t"], square.numpy().T)
    assert not buffers.keep_views and not buffers._views  # it moved: nothing pinned from now on
    other = paddle.full([4, 4], 3.0)  # new memory under the same name
    assert np.array_equal(buffers.copy({"g": {"t": other}})["g"]["t"], np.full((4, 4), 3.0))


def test_the_premise_a_view_holds_its_tensors_memory():
    """Kept views are safe only because no other tensor can get a viewed address."""

    def address_taken_again(fill, make_view):
        tensor = paddle.full([256, 256], fill)
        address, view = tensor.data_ptr(), make_view(tensor)
        del tensor
        later = [paddle.full([256, 256], -1.0) for _ in range(4)]
        return address in [t.data_ptr() for t in later], view

    # The allocator does not promise to hand a freed block out again at once (a
    # process's first large free may go back to the OS), so the control asks for
    # reuse in some of several tries, while a viewed block must never come back.
    freed_reused = [address_taken_again(1.0, lambda t: None)[0] for _ in range(8)]
    assert any(freed_reused), "freed memory was never reused; this test shows nothing"
    for _ in range(8):
        reused, view = address_taken_again(3.0, host_copy.host_view)
        assert not reused
        assert np.all(view == 3.0)
