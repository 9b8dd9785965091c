"""The readers must say exactly what np.random.get_state() and random.getstate() say,
whatever drew in between."""
import random

import numpy as np
import pytest

from paddlerun.trainer.rng_cache import NumpyRngReader, PythonRngReader


def assert_same_state(got, want):
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2:] == want[2:]


@pytest.fixture(autouse=True)
def keep_global_rng():
    saved, saved_python = np.random.get_state(), random.getstate()
    yield
    np.random.set_bit_generator(np.random.MT19937())  # undo any swap below
    np.random.set_state(saved)
    random.setstate(saved_python)


def test_unchanged_state_is_reused_and_any_draw_is_seen():
    np.random.seed(3)
    reader = NumpyRngReader()
    first = reader.get_state()
    assert reader.get_state() is first  # nothing drew: the same tuple, no full read
    assert reader._fast
    for draw in (lambda: np.random.rand(), lambda: np.random.randint(10, size=700),
                 lambda: np.random.seed(4), lambda: np.random.set_state(first),
                 lambda: np.random.shuffle(np.arange(5))):
        draw()
        assert_same_state(reader.get_state(), np.random.get_state())
    assert reader._fast


def test_cached_gaussian_consumed_without_a_draw_is_seen():
    np.random.seed(5)
    reader = NumpyRngReader()
    np.random.standard_normal()  # draws a pair and caches the second: has_gauss = 1
    cached = reader.get_state()
    assert cached[3] == 1
    np.random.standard_normal()  # uses the cache: key and pos unchanged, has_gauss = 0
    assert_same_state(reader.get_state(), np.random.get_state())
    assert reader.get_state()[3] == 0


@pytest.mark.filterwarnings("ignore:get_state and legacy")
def test_another_bit_generator_falls_back_to_full_reads():
    reader = NumpyRngReader()
    reader.get_state()
    np.random.set_bit_generator(np.random.PCG64(1))
    np.random.random()
    assert reader.get_state()["bit_generator"] == "PCG64"  # get_state's dict form for non-MT
    np.random.random()
    assert reader.get_state()["state"] == np.random.get_state()["state"]
    np.random.set_bit_generator(np.random.MT19937(2))
    assert_same_state(reader.get_state(), np.random.get_state())
    np.random.random()
    assert_same_state(reader.get_state(), np.random.get_state())


def test_a_layout_it_does_not_understand_turns_the_fast_path_off():
    reader = NumpyRngReader()
    reader.get_state()
    reader._address += 4  # as if the struct had another layout
    assert_same_state(reader.get_state(), np.random.get_state())
    assert not reader._fast
    np.random.rand()
    assert_same_state(reader.get_state(), np.random.get_state())


def test_python_unchanged_state_is_reused_and_any_draw_is_seen():
    random.seed(3)
    reader = PythonRngReader()
    first = reader.get_state()
    assert first == random.getstate()
    assert reader.get_state() is first  # nothing drew: the same tuple, no full read
    assert reader._fast
    for draw in (lambda: random.random(), lambda: random.getrandbits(20000), lambda: random.seed(4),
                 lambda: random.setstate(first), lambda: random.shuffle(list(range(5))),
                 lambda: random.randint(0, 10)):
        draw()
        assert reader.get_state() == random.getstate()
    assert reader._fast


def test_python_cached_gaussian_consumed_without_a_draw_is_seen():
    random.seed(5)
    reader = PythonRngReader()
    random.gauss()  # draws a pair and caches the second in gauss_next
    cached = reader.get_state()
    assert cached[2] is not None
    random.gauss()  # uses the cache: the C state unchanged, gauss_next back to None
    assert reader.get_state() == random.getstate()
    assert reader.get_state()[2] is None


def test_python_reader_of_its_own_generator_and_a_layout_it_does_not_understand():
    mine = random.Random(7)
    reader = PythonRngReader(mine)
    assert reader.get_state() == mine.getstate()
    random.random()  # the module's generator is not this one
    assert reader.get_state() is reader.get_state()
    mine.random()
    assert reader.get_state() == mine.getstate()
    reader._address += 4  # as if the struct had another layout
    mine.random()
    assert reader.get_state() == mine.getstate()
    assert not reader._fast
    mine.random()
    assert reader.get_state() == mine.getstate()
