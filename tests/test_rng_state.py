"""The RNG states a snapshot holds: JSON and back, in the compact form and the older one."""
import json
import random

import numpy as np
import paddle
import pytest

from paddlerun.trainer import state as tstate


@pytest.fixture(autouse=True)
def keep_global_rngs():
    saved = paddle.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    paddle.set_rng_state(saved[0]), np.random.set_state(saved[1]), random.setstate(saved[2])


def _draws():
    return (paddle.rand([4]).numpy().tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)],
            np.random.randn(), random.gauss(0, 1))


def _older_form(saved):
    """What snapshots of earlier versions hold: every long part as a list of ints."""
    paddle_states = [[*head, list(engine.encode("latin-1"))] for *head, engine in saved["paddle"]]
    return {"paddle": paddle_states,
            "numpy": [saved["numpy"][0], tstate._words(saved["numpy"][1]), *saved["numpy"][2:]],
            "python": [saved["python"][0], tstate._words(saved["python"][1]), saved["python"][2]]}


def test_restored_states_draw_what_the_saved_ones_would_in_either_form():
    paddle.seed(7), np.random.seed(7), random.seed(7)
    _draws()
    np.random.randn(), random.gauss(0, 1)  # leave a cached Gaussian in both
    saved = json.loads(json.dumps(tstate.rng_state()))
    expected = _draws()
    assert isinstance(saved["paddle"][0][-1], str) and isinstance(saved["numpy"][1], str)
    assert len(json.dumps(saved)) < 25_000  # ~40 KB as lists of ints

    for form in (saved, json.loads(json.dumps(_older_form(saved)))):
        _draws()  # move every generator on
        tstate.restore_rng(form)
        assert _draws() == expected


def test_an_engine_state_that_is_not_bytes_is_kept_as_a_list():
    assert tstate._paddle_generator_json((1, 2, 3, [300, 5])) == [1, 2, 3, [300, 5]]
    assert tstate._paddle_generator_json((1, 2, 3, [49, 32, 255])) == [1, 2, 3, "1 \xff"]
