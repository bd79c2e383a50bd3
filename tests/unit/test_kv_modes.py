"""The bench's no-cache decoding (benchmarks/kv_modes.py): the cross K/V projected once per step,
the same tokens as the cached-cross path, and the weight-streaming floor measured."""

import numpy as np
import pytest

from benchmarks.kv_modes import recomputing_cross, weight_stream_ms
from service.generation import greedy_decode

VOCAB, STEPS = 11, 6


def fake_decoder(calls: list[str]):
    """decoder_cross_kv / decoder_nocache stand-ins whose next token depends on the prefix and the cross K/V."""

    def run(graph, feeds):
        calls.append(graph)
        if graph == "decoder_cross_kv":
            s = feeds["image_states"]
            return {"cross_key.0": s * 2.0, "cross_value.0": s * 3.0}
        assert graph == "decoder_nocache"
        ids, key = feeds["input_ids"], feeds["cross_key.0"]
        b, t = ids.shape
        logits = np.zeros((b, t, VOCAB), np.float32)
        tok = (ids.sum(1) + np.rint(key.sum((1, 2))).astype(np.int64)) % (VOCAB - 1) + 1  # never 0 ([SEP] below)
        logits[np.arange(b), -1, tok] = 1.0
        return {"logits": logits}

    return run


def test_no_cache_projects_the_image_once_per_step_and_decodes_the_same_tokens():
    states = np.random.default_rng(0).integers(0, 3, (2, 5, 4)).astype(np.float32)
    kept, none = [], []
    ref = greedy_decode(fake_decoder(kept), states, 1, 0, 0, STEPS, use_cache=False)
    got = greedy_decode(recomputing_cross(fake_decoder(none), states), states, 1, 0, 0, STEPS, use_cache=False)
    np.testing.assert_array_equal(got, ref)
    assert kept.count("decoder_cross_kv") == 1 and kept.count("decoder_nocache") == STEPS
    assert none.count("decoder_cross_kv") == STEPS and none.count("decoder_nocache") == STEPS
    assert none[:3] == ["decoder_cross_kv", "decoder_nocache", "decoder_cross_kv"]


def test_no_cache_rows_get_their_own_image():
    """A recomputed cross K/V comes from the first `rows` image states, not a stale copy."""
    seen = []
    states = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)

    def run(graph, feeds):
        if graph == "decoder_cross_kv":
            return {"cross_key.0": feeds["image_states"] + 100.0}
        seen.append(feeds["cross_key.0"].copy())
        return {"logits": np.ones((feeds["input_ids"].shape[0], 1, VOCAB), np.float32)}

    greedy_decode(recomputing_cross(run, states), states, 1, 5, 0, 3, use_cache=False)  # argmax 0, never [SEP]
    assert len(seen) == 3 and all(np.array_equal(k, states + 100.0) for k in seen)


@pytest.mark.parametrize("mib", [4])
def test_weight_stream_time_grows_with_the_bytes(mib):
    from service.runtime import RuntimeOptions

    t = weight_stream_ms({"small": mib * 2**20, "large": 16 * mib * 2**20}, RuntimeOptions(), repeats=5)
    assert 0 < t["small"] < t["large"]
