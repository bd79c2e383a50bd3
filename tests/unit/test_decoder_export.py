"""Caption decoder graphs: ONNX Runtime matches torch, numpy decoding matches TrimVLM.generate."""

import numpy as np
import pytest
import torch

from compression.export_decoder import decoder_graph_modules, example_inputs, export_decoder, ort_runner
from compression.modeling import TrimVLM
from service.generation import beam_search, greedy_decode
from tests.unit.test_modeling import tiny_config

pytest.importorskip("onnxruntime")

MAX_LEN = 12
SEP_BIAS = 2.0  # makes [SEP] likely enough that captions end at different steps (10, 10, 11, 2, 5, 9)


def decoder_model() -> TrimVLM:
    """Tiny model, two decoder layers of different widths, with sharp image-dependent logits."""
    torch.manual_seed(0)
    cfg = tiny_config(decoder_self_heads=[4, 3], decoder_cross_heads=[4, 2], decoder_mlp=[40, 30])
    model = TrimVLM(cfg).eval()
    with torch.no_grad():
        for p in model.text_decoder.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
        model.text_decoder.cls.predictions.bias[cfg.sep_token_id] = SEP_BIAS
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = decoder_model()
    graphs = export_decoder(model, tmp_path_factory.mktemp("decoder"))
    states = torch.randn(6, model.config.num_image_tokens, model.config.vision_width)
    cfg = model.config
    return model, graphs, ort_runner(graphs), states, (cfg.bos_token_id, cfg.sep_token_id, cfg.pad_token_id)


@pytest.mark.parametrize(("batch", "new", "past", "image_tokens"), [(1, 1, 0, 17), (3, 1, 5, 17), (2, 4, 3, 9)])
def test_every_graph_matches_its_torch_module(setup, batch, new, past, image_tokens):
    model, _, run, _, _ = setup
    for name, gm in decoder_graph_modules(model).items():
        # past = 0 in the step graph too: ORT takes an empty cache (prefill exists for callers)
        ex = example_inputs(model, batch, new, past if name == "decoder_step" else 0, image_tokens)
        if name == "decoder_step" and past:
            ex["attention_mask"][0, 0] = 0  # a masked cache position must stay masked
        with torch.no_grad():
            ref = gm.module(*(ex[k] for k in gm.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = run(name, {k: ex[k].numpy() for k in gm.inputs})
        assert list(got) == gm.outputs
        for out, r in zip(gm.outputs, ref, strict=True):
            assert got[out].shape == tuple(r.shape), (name, out)
            assert np.allclose(got[out], r.numpy(), atol=1e-4), (name, out)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_decoding_matches_generate(setup, use_cache):
    model, _, run, states, special = setup
    ref = model.generate(states, max_new_tokens=MAX_LEN, use_cache=use_cache).numpy()
    lengths = [list(r).index(special[1]) + 1 if special[1] in r else MAX_LEN for r in ref]
    assert len(set(lengths)) > 2 and ref.shape[1] < MAX_LEN  # ragged endings, early stop
    got = greedy_decode(run, states.numpy(), *special, max_length=MAX_LEN, use_cache=use_cache)
    np.testing.assert_array_equal(got, ref)
    prompt = np.array([7, 9])
    ref = model.generate(states, max_new_tokens=MAX_LEN, prompt_ids=torch.from_numpy(prompt)[None].expand(6, -1))
    got = greedy_decode(run, states.numpy(), *special, max_length=MAX_LEN, use_cache=use_cache, prompt_ids=prompt)
    np.testing.assert_array_equal(got, ref.numpy())


def test_graphs_of_the_old_tokens_layout_decode_alike(setup, tmp_path):
    """Exports before the head-split cache kept K/V as [B, tokens, heads * d]; the service decodes
    those (the committed models) the same way, and kv_shape makes cache arrays for either."""
    from service.generation import kv_shape

    model, _, run, states, special = setup
    old = ort_runner(export_decoder(model, tmp_path, kv_layout="tokens"))
    x = states[:3].numpy()
    new_cross, old_cross = run("decoder_cross_kv", {"image_states": x}), old("decoder_cross_kv", {"image_states": x})
    heads, head_dim = model.config.decoder_cross_heads[1], model.config.text_head_dim
    assert new_cross["cross_key.1"].shape == (3, heads, x.shape[1], head_dim)
    assert old_cross["cross_key.1"].shape == (3, x.shape[1], heads * head_dim)
    assert kv_shape(new_cross["cross_key.1"], 2, 5) == (2, heads, 5, head_dim)
    assert kv_shape(old_cross["cross_key.1"], 2, 5) == (2, 5, heads * head_dim)
    for use_cache in (True, False):
        np.testing.assert_array_equal(
            greedy_decode(old, x, *special, max_length=MAX_LEN, use_cache=use_cache),
            greedy_decode(run, x, *special, max_length=MAX_LEN, use_cache=use_cache),
        )
    np.testing.assert_array_equal(
        beam_search(old, x, *special, max_length=MAX_LEN, num_beams=3),
        beam_search(run, x, *special, max_length=MAX_LEN, num_beams=3),
    )
    with pytest.raises(ValueError, match="kv_layout"):
        decoder_graph_modules(model, "rows")


def test_one_beam_is_greedy(setup):
    _, _, run, states, special = setup
    greedy = greedy_decode(run, states.numpy(), *special, max_length=MAX_LEN)
    np.testing.assert_array_equal(beam_search(run, states.numpy(), *special, max_length=MAX_LEN, num_beams=1), greedy)


def _score(run, image_states: np.ndarray, ids: np.ndarray, bos: int, sep: int) -> np.ndarray:
    """Length-normalised log-prob of each generated row (through [SEP]), from the no-cache graph."""
    cross = run("decoder_cross_kv", {"image_states": image_states})
    scores = []
    for i, row in enumerate(ids):
        seq = list(row[: list(row).index(sep) + 1]) if sep in row else list(row)
        full = np.array([[bos, *seq]], np.int64)
        feeds = {"input_ids": full, "attention_mask": np.ones_like(full)} | {k: v[i : i + 1] for k, v in cross.items()}
        logits = run("decoder_nocache", feeds)["logits"][0, :-1].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        scores.append(logp[np.arange(len(seq)), seq].sum() / len(seq))
    return np.array(scores)


def test_three_beams_score_at_least_greedy(setup):
    _, _, run, states, special = setup
    x = states.numpy()
    greedy = greedy_decode(run, x, *special, max_length=MAX_LEN)
    beams = beam_search(run, x, *special, max_length=MAX_LEN, num_beams=3)
    g, b = _score(run, x, greedy, *special[:2]), _score(run, x, beams, *special[:2])
    assert np.all(b >= g - 1e-5), (b, g)
    assert np.any(b > g + 1e-3)  # the search does find better captions somewhere


def test_batch_decodes_each_image_as_if_alone(setup):
    _, _, run, states, special = setup
    x = states.numpy()
    for decode in (
        lambda s: greedy_decode(run, s, *special, max_length=MAX_LEN),
        lambda s: greedy_decode(run, s, *special, max_length=MAX_LEN, use_cache=False),
        lambda s: beam_search(run, s, *special, max_length=MAX_LEN, num_beams=3),
    ):
        batch = decode(x)
        for i in range(len(x)):
            alone = decode(x[i : i + 1])[0]
            np.testing.assert_array_equal(batch[i, : len(alone)], alone)
            assert np.all(batch[i, len(alone) :] == special[2])


def test_measure_caption_speed_reports_both_paths(setup):
    from compression.export_decoder import measure_caption_speed

    _, graphs, _, states, special = setup
    res = measure_caption_speed(graphs, states.numpy()[:2], MAX_LEN, rounds=1, special_ids=special, batch=2)
    assert res["cache_p50_ms"] > 0 and res["nocache_p50_ms"] > 0
    assert res["speedup"] == pytest.approx(res["nocache_p50_ms"] / res["cache_p50_ms"])


def test_manifests_without_a_layout_are_the_old_tokens_layout(tmp_path):
    """Exports from before the head-split cache have no decoder_kv_layout in their manifests: they
    read as `tokens`. The committed default is a current export, with the head-split layout."""
    import json

    from service.repository import load_manifest
    from tests.conftest import REPO

    committed = REPO / "models" / "trimvlm-default" / "1"
    assert load_manifest(committed).decoder_kv_layout == "heads"
    shape = next(t.shape for t in load_manifest(committed).graphs["decoder_cross_kv"].outputs if t.name == "cross_key.0")
    assert len(shape) == 4  # [B, heads, tokens, d]
    old = json.loads((committed / "manifest.json").read_text())
    del old["decoder_kv_layout"]
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert load_manifest(tmp_path).decoder_kv_layout == "tokens"
