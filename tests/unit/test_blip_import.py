"""`trimvlm import blip`: tiny random BLIP models built with transformers from small configs (no
downloads), saved, imported without transformers, and compared with transformers' own outputs:
vision embeddings, ITM logits, ITC similarities, caption logits and greedy tokens, VQA answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO

transformers = pytest.importorskip("transformers")

from compression.artifacts import load_model_dir  # noqa: E402
from compression.blip_import import BlipImportError, build_from_blip, import_blip  # noqa: E402
from compression.torch_runtime import TorchTasks  # noqa: E402

TOL = 1e-4
WORDS = "what color is the shape a picture of red blue green circle square triangle there how many one two yes no".split()
QUESTIONS = ["what color is the circle", "how many circle is there"]  # same token length: HF's VQA decoder sees no mask
CAPTIONS = ["a red circle", "a picture of two blue squares", "green"]


def tiny_tokenizer(folder):
    """A BERT WordPiece tokenizer saved the way BLIP's processor saves it: [DEC] bos, [ENC] extra."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", *WORDS]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = list(dict.fromkeys(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(
        vocab={t: i for i, t in enumerate(vocab)}, bos_token="[DEC]", additional_special_tokens=["[ENC]"]
    )
    assert len(tok) == len(vocab) + 2 and tok.convert_tokens_to_ids("[DEC]") == len(vocab)
    return tok


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random (LayerNorms around 1/0, biases non-zero), so a swapped or dropped
    tensor in the mapping changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            norm = any(s in name for s in ("LayerNorm", "layer_norm", "layernorm"))
            p.copy_(1 + 0.2 * noise if norm and name.endswith("weight") else 0.2 * noise)


CLASSES = {
    "vqa": "BlipForQuestionAnswering",
    "caption": "BlipForConditionalGeneration",
    "itr": "BlipForImageTextRetrieval",
}


def tiny_blip_config(tok):
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=48,
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def save_tiny_blip(root, kind: str, seed: int = 0):
    """A tiny random BLIP of one class saved as a Hugging Face folder (weights, config, tokenizer,
    processor); returns (model, tokenizer, folder)."""
    tok = tiny_tokenizer(root / "vocab")
    processor = transformers.BlipProcessor(
        transformers.BlipImageProcessorPil(
            size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25]
        ),
        tok,
    )
    torch.manual_seed(seed)
    hf = getattr(transformers, CLASSES[kind])(tiny_blip_config(tok)).eval()
    randomize(hf, seed=10 + seed)
    folder = root / f"hf-{kind}"
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    return hf, tok, folder


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """The three BLIP classes, tiny and random, saved as Hugging Face folders and imported."""
    root = tmp_path_factory.mktemp("blip")
    out = {"root": root}
    for i, kind in enumerate(CLASSES):
        hf, out["tokenizer"], hf_dir = save_tiny_blip(root, kind, seed=i)
        import_blip(hf_dir, root / f"ours-{kind}")
        out[kind] = (hf, hf_dir, load_model_dir(root / f"ours-{kind}"))
    return out


def pixels(n=3, seed=0, size=32):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32))


def tokens(blip, texts):
    enc = blip["tokenizer"](texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def maxdiff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def test_folder_config_tokenizer_and_preprocessing_come_from_the_checkpoint(blip):
    hf, hf_dir, lm = blip["vqa"]
    cfg = lm.model.config
    assert cfg.itc_text_through_fusion and cfg.text_heads == [] and cfg.generative_vqa
    assert cfg.fusion_self_heads == [4, 4] and cfg.decoder_mlp == [40, 40] and cfg.vision_heads == [4, 4]
    assert (cfg.bos_token_id, cfg.sep_token_id, cfg.pad_token_id) == (
        blip["tokenizer"].convert_tokens_to_ids("[DEC]"),
        blip["tokenizer"].sep_token_id,
        blip["tokenizer"].pad_token_id,
    )
    spec = lm.preprocessing.image
    assert spec.size == 32 and spec.mean == pytest.approx((0.5, 0.4, 0.3)) and spec.std == pytest.approx((0.2, 0.3, 0.25))
    assert spec.resample == "bicubic"
    ids, _ = TorchTasks(lm, "cpu").tokenize(QUESTIONS + CAPTIONS)
    ref, _ = tokens(blip, QUESTIONS + CAPTIONS)
    assert np.array_equal(ids, ref.numpy())
    record = json.loads((lm.path / "blip_import.json").read_text())
    assert record["architecture"] == "BlipForQuestionAnswering" and record["parts"] == ["vision", "text_encoder", "text_decoder"]
    assert set(record["fresh_modules"]) == {"vision_proj", "text_proj", "temp", "itm_head", "vqa_head"}


@torch.no_grad()
def test_vision_embeddings_itm_logits_and_itc_similarities_match_transformers(blip):
    hf, _, lm = blip["itr"]
    m, tasks = lm.model, TorchTasks(lm, "cpu")
    pix = pixels()
    ids, mask = tokens(blip, CAPTIONS)  # padded batch
    ref_img = hf.vision_model(pixel_values=pix).last_hidden_state
    img = m.encode_image(pix).last_hidden_state
    itm_ref = hf(input_ids=ids, pixel_values=pix, attention_mask=mask, use_itm_head=True).itm_score
    text_states, text_emb = tasks.encode_texts(ids.numpy(), mask.numpy())
    itm = tasks.fuse(text_states, mask.numpy(), img.numpy())["itm_logits"]
    itc_ref = hf(input_ids=ids, pixel_values=pix, attention_mask=mask, use_itm_head=False).itm_score
    _, img_emb = tasks.encode_images(pix.numpy())
    itc = img_emb @ text_emb.T
    diffs = {"vision": maxdiff(img, ref_img), "itm": maxdiff(itm, itm_ref), "itc": maxdiff(itc, itc_ref)}
    print("max |diff| ITR", diffs)
    assert all(d <= TOL for d in diffs.values()), diffs
    assert itm_ref.abs().max() > 0.1 and itc_ref.std() > 0.01  # not trivially zero


@torch.no_grad()
def test_caption_logits_and_greedy_tokens_match_transformers(blip):
    hf, _, lm = blip["caption"]
    m, cfg = lm.model, lm.model.config
    pix = pixels(seed=1)
    ids, mask = tokens(blip, CAPTIONS)
    ids[:, 0] = cfg.bos_token_id  # BLIP's decoder input: [DEC] caption [SEP]
    ref = hf(pixel_values=pix, input_ids=ids, attention_mask=mask).logits
    img = m.encode_image(pix).last_hidden_state
    logits, _ = m.text_decoder(ids, mask.bool(), encoder_states=img)
    valid = mask.bool()
    d_logits = maxdiff(logits[valid], ref[valid])
    assert maxdiff(img, hf.vision_model(pixel_values=pix).last_hidden_state) <= TOL

    n = 8
    gen_ref = hf.generate(pixel_values=pix, do_sample=False, num_beams=1, max_new_tokens=n)
    gen = m.generate(img, max_new_tokens=n)
    assert torch.equal(gen_ref[:, 0], torch.full((3,), cfg.bos_token_id))
    assert torch.equal(gen, gen_ref[:, 1:]), (gen, gen_ref)
    # with a text prompt ("a picture of" -> [DEC] a picture of, then continue)
    p_ids, p_mask = tokens(blip, ["a picture of"] * 3)
    gen_ref = hf.generate(
        pixel_values=pix, input_ids=p_ids.clone(), attention_mask=p_mask, do_sample=False, num_beams=1, max_new_tokens=n
    )
    prompt = p_ids[:, 1:-1]
    gen = m.generate(img, max_new_tokens=n, prompt_ids=prompt)
    assert torch.equal(gen, gen_ref[:, 1 + prompt.shape[1] :]), (gen, gen_ref)
    # stopping at [SEP] and padding after it: raise [SEP]'s LM bias so some captions end early
    pix6, sep = pixels(n=6, seed=1), cfg.sep_token_id
    for model in (hf, m):
        model.text_decoder.cls.predictions.bias[sep] += 1.5
    try:
        gen_ref = hf.generate(pixel_values=pix6, do_sample=False, num_beams=1, max_new_tokens=n)
        gen = m.generate(m.encode_image(pix6).last_hidden_state, max_new_tokens=n)
    finally:
        for model in (hf, m):
            model.text_decoder.cls.predictions.bias[sep] -= 1.5
    ended = (gen_ref[:, 1:-1] == sep).any(1)
    assert ended.any() and not ended.all()
    assert torch.equal(gen, gen_ref[:, 1:]), (gen, gen_ref)
    print("max |diff| caption logits", d_logits)
    assert d_logits <= TOL


@torch.no_grad()
def test_vqa_fused_states_and_generated_answers_match_transformers(blip):
    hf, _, lm = blip["vqa"]
    m, tasks = lm.model, TorchTasks(lm, "cpu")
    pix = pixels(n=2, seed=2)
    ids, mask = tokens(blip, QUESTIONS)
    assert bool(mask.all())  # equal lengths: HF's VQA decoder attends to every question position
    img = hf.vision_model(pixel_values=pix).last_hidden_state
    fused_ref = hf.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=img).last_hidden_state
    image_states, _ = tasks.encode_images(pix.numpy())
    text_states, _ = tasks.encode_texts(ids.numpy(), mask.numpy())
    fused = tasks.fuse(text_states, mask.numpy(), image_states)["fused_states"]
    d_fused = maxdiff(fused, fused_ref)

    n = 6
    gen_ref = hf.generate(input_ids=ids, pixel_values=pix, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=n)
    gen = m.generate(torch.from_numpy(fused), mask.bool(), max_new_tokens=n)
    assert torch.equal(gen, gen_ref[:, 1:]), (gen, gen_ref)
    # as answer text, through the evaluation code, at the folder's max answer length
    answers = tasks.generate_answers(fused, mask.numpy())
    n_ans = lm.preprocessing.max_answer_length
    gen_ref = hf.generate(
        input_ids=ids, pixel_values=pix, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=n_ans
    )
    expected = blip["tokenizer"].batch_decode(gen_ref, skip_special_tokens=True)
    assert [a.replace(" ", "") for a in answers] == [e.replace(" ", "") for e in expected]
    # a padded batch: the same tokens when our decoder, like HF's, attends to every question position
    ids, mask = tokens(blip, ["what color", "is there a red circle"])
    gen_ref = hf.generate(input_ids=ids, pixel_values=pix, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=n)
    fused = m.fuse(m.text_encoder(ids, mask.bool()).last_hidden_state, mask.bool(), m.encode_image(pix).last_hidden_state)
    assert torch.equal(m.generate(fused.last_hidden_state, None, max_new_tokens=n), gen_ref[:, 1:])
    print("max |diff| VQA fused states", d_fused)
    assert d_fused <= TOL


def test_cli_imports_a_torch_bin_with_tied_duplicates_and_position_ids(blip, tmp_path):
    """pytorch_model.bin (torch.save of the full state dict: tied LM-head duplicates included) plus
    position-id buffers and vocab.txt without tokenizer.json, as older BLIP folders ship them."""
    from typer.testing import CliRunner

    from compression.cli import app

    hf, hf_dir, lm = blip["vqa"]
    src = tmp_path / "old"
    shutil.copytree(hf_dir, src)
    (src / "model.safetensors").unlink()
    (src / "tokenizer.json").unlink()
    shutil.copy(blip["root"] / "vocab" / "vocab.txt", src / "vocab.txt")
    state = dict(hf.state_dict())
    assert "text_decoder.cls.predictions.decoder.weight" in state
    state["text_encoder.embeddings.position_ids"] = torch.arange(48)[None]
    torch.save(state, src / "pytorch_model.bin")
    (tmp_path / "answers.txt").write_text("red\nblue\n")
    res = CliRunner().invoke(
        app, ["import", "blip", str(src), "--out", str(tmp_path / "m"), "--answers", str(tmp_path / "answers.txt")]
    )
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "m" / "blip_import.json").read_text())
    assert {"text_decoder.cls.predictions.decoder.weight", "text_encoder.embeddings.position_ids"} <= set(record["ignored"])
    again = load_model_dir(tmp_path / "m")
    assert again.model.config.answers == ["red", "blue"]
    ours, theirs = again.model.state_dict(), lm.model.state_dict()
    assert record["mapped_tensors"] == len(record["mapping"]) > 100
    for k in record["mapping"]:
        assert torch.equal(ours[k], theirs[k]), k
    ids, _ = TorchTasks(again, "cpu").tokenize(QUESTIONS)
    assert np.array_equal(ids, tokens(blip, QUESTIONS)[0].numpy())


def _variant(blip, tmp_path, edit_state=None, edit_config=None):
    from safetensors.torch import load_file, save_file

    _, hf_dir, _ = blip["itr"]
    src = tmp_path / "variant"
    shutil.copytree(hf_dir, src)
    if edit_state:
        state = load_file(str(src / "model.safetensors"))
        edit_state(state)
        save_file(state, str(src / "model.safetensors"))
    if edit_config:
        cfg = json.loads((src / "config.json").read_text())
        edit_config(cfg)
        (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize(
    "edit_state, edit_config, message",
    [
        (lambda s: s.update({"text_encoder.extra.weight": torch.zeros(2)}), None, "no place in the model: .*text_encoder.extra"),
        (
            lambda s: s.pop("text_encoder.encoder.layer.1.crossattention.self.key.bias"),
            None,
            "lacks keys .*layer.1.crossattention",
        ),
        (None, lambda c: c["text_config"].update({"intermediate_size": 44}), "checkpoint shape"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("itm_head")], None, r"no weights for \['itm'\]"),
        (None, lambda c: c.update({"architectures": ["BlipModel"]}), "not supported"),
        (None, lambda c: c["vision_config"].update({"hidden_act": "quick_gelu"}), "exact GELU"),
    ],
)
def test_unknown_missing_or_misshapen_keys_are_clear_errors(blip, tmp_path, edit_state, edit_config, message):
    src = _variant(blip, tmp_path, edit_state, edit_config)
    with pytest.raises(BlipImportError, match=message):
        build_from_blip(src)


def test_untied_lm_head_is_refused(blip, tmp_path):
    from safetensors.torch import load_file, save_file

    _, hf_dir, _ = blip["caption"]
    src = tmp_path / "untied"
    shutil.copytree(hf_dir, src)
    state = load_file(str(src / "model.safetensors"))
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"] + 1
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(BlipImportError, match="not tied"):
        build_from_blip(src)


def test_converter_does_not_import_transformers(blip, tmp_path):
    _, hf_dir, _ = blip["caption"]
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from compression.blip_import import import_blip\n"
        f"r = import_blip({str(hf_dir)!r}, {str(tmp_path / 'm')!r})\n"
        "print(r.architecture)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "BlipForConditionalGeneration"


def test_a_student_of_an_imported_blip_keeps_its_empty_text_stack(blip, tmp_path):
    """BLIP has no text-only layers: the half-depth student has none either, and distillation
    compares the text embeddings only."""
    from compression.distill import DistillConfig, Distiller, init_from_teacher, student_config, student_layers
    from compression.modeling import TrimVLM
    from tests.unit.test_prune import synthetic_batches

    import_blip(blip["vqa"][1], tmp_path / "t", answers=["a", "b", "c"])
    teacher = load_model_dir(tmp_path / "t").model
    layers = student_layers(teacher.config)
    assert layers == {"vision": 1, "text": 0, "fusion": 1, "decoder": 1}
    student = TrimVLM(student_config(teacher.config, layers, "s"))
    init_from_teacher(student, teacher)
    losses = Distiller(student, teacher, DistillConfig())(*synthetic_batches(student.config))
    assert "text_hidden" in losses and "text_attn" not in losses and torch.isfinite(losses["total"])
