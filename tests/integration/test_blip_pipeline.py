"""An imported BLIP through the whole offline pipeline: a tiny random BLIP (transformers, no
download) -> `trimvlm import blip` -> distil (as the teacher) -> prune -> trim -> export -> evaluate
-> report via `trimvlm pipeline run`, then served by the service's task model."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from tests.unit.test_blip_import import save_tiny_blip  # noqa: E402

# tiny.yaml's data settings at BLIP's tiny resolution, a few steps per stage
DATA = {"image_size": 32, "limit": 60, "scenes_counts": {"n_train": 20, "n_val": 10, "n_test": 10}, "easy_vqa_val_images": 10}
RUN = {"batch_size": 8, "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "warmup_steps": 1, "lr": 1e-4}


def test_imported_blip_distils_prunes_trims_exports_and_serves(tmp_path):
    from typer.testing import CliRunner

    from compression.artifacts import load_model_dir
    from compression.cli import app
    from compression.pipeline import run_pipeline
    from service.repository import load_manifest
    from service.tasks import TaskModel

    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    base = {k: v for k, v in tiny.items() if k not in ("model", "tokenizer", "text_init", "out")} | DATA | RUN
    distill_yaml = tmp_path / "distill.yaml"
    distill_yaml.write_text(yaml.safe_dump(base | {"steps": 3, "student_name": "blip-student"}))
    prune_yaml = tmp_path / "prune.yaml"
    prune_yaml.write_text(yaml.safe_dump(base | {"prune_steps": 3, "finetune_steps": 2, "target_sparsity": 0.3}))
    trim_yaml = tmp_path / "trim.yaml"
    trim_yaml.write_text(
        yaml.safe_dump(base | {"steps": 3, "hidden": 8, "thresholds": [0.3, 0.7], "calibration_limit": 10, "lr": 1e-4})
    )

    _, _, hf_dir = save_tiny_blip(tmp_path / "hf", "vqa")
    teacher = tmp_path / "blip-teacher"
    res = CliRunner().invoke(app, ["import", "blip", str(hf_dir), "--out", str(teacher), "--answers-for", str(distill_yaml)])
    assert res.exit_code == 0, res.output
    assert load_model_dir(teacher).model.config.answers  # the closed vocabulary of the training splits

    export_dir = tmp_path / "models" / "tiny-blip" / "1"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-blip",
                "version": "1",
                "work": str(tmp_path / "work"),
                "device": "cpu",
                "teacher": {"reuse": str(teacher)},
                "distill": {"config": str(distill_yaml)},
                "prune": {"config": str(prune_yaml)},
                "trim": {"config": str(trim_yaml)},
                "export": {"out": str(export_dir), "precisions": ["int8"]},
                "evaluate": {"limit": 6, "precision": "fp32", "teacher": True},
                "report": {},
            }
        )
    )
    outputs = run_pipeline(pipeline)
    assert {"distill", "prune", "trim", "export", "evaluate", "report"} <= set(outputs)

    student = load_model_dir(outputs["prune"]).model.config
    assert student.itc_text_through_fusion and student.text_heads == []  # BLIP's layout survives
    assert len(student.fusion_self_heads) == 1 and len(student.decoder_self_heads) == 1  # half depth

    m = load_manifest(export_dir)
    assert {"vision", "text", "fusion", "vqa_trimmed", "decoder_step"} <= set(m.graphs)
    assert all(g.parity["fp32"] <= 1e-4 for g in m.graphs.values())
    assert m.preprocessing.image.size == 32 and m.preprocessing.image.mean[0] == pytest.approx(0.5)

    tasks = TaskModel(export_dir, precision="fp32")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    image_states, image_emb = tasks.encode_images(tasks.pixels(images))
    ids, mask = tasks.tokenize(["what color is the circle", "is there a square"])
    text_states, text_emb = tasks.encode_texts(ids, mask)
    fused = tasks.fuse(text_states, mask, image_states)
    assert fused["vqa_logits"].shape == (2, len(m.answers)) and np.isfinite(fused["itm_logits"]).all()
    assert len(tasks.captions(image_states, max_length=4)) == 2
    assert (tmp_path / "work" / "evaluate" / "teacher.json").is_file()

    # and over HTTP: the real app serving the exported student of the imported BLIP
    import base64
    import io

    from PIL import Image

    from tests.e2e.conftest import ready_client, settings_for

    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    with ready_client(settings_for(tmp_path, models_dir=tmp_path / "models")) as client:
        r = client.post("/vqa", json={"image": png, "question": "what color is the circle"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-blip/1" and r.json()["answer"] in m.answers
        r = client.post("/caption", json={"image": png, "max_length": 4})
        assert r.status_code == 200, r.text
