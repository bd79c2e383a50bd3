"""The compression report's retention table: each metric over the teacher's, unsaturated first,
per question type included, metrics a model lacks left out."""

from compression.compression_report import retention_table
from compression.evaluate import flat_metrics


def test_retention_lists_unsaturated_metrics_first_with_ratios():
    def metrics(vqa, relation, r1, easy):
        results = {
            "easy_vqa": {"accuracy": easy},
            "scenes": {"vqa_accuracy": vqa, "vqa_by_type": {"relation": relation}, "r1_i2t": r1, "caption_examples": []},
        }
        return {"metrics": flat_metrics(results)}

    rows = {"teacher": metrics(0.8, 0.5, 0.75, 0.998), "student": metrics(0.6, 0.45, 0.6, 0.99)}
    lines = retention_table(rows, "teacher")
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| metric")]
    assert [line.split(" | ")[0] for line in body] == [
        "| scenes VQA",
        "| scenes VQA: relation",
        "| R@1 image->text, ITC only",
        "| easy-VQA (saturated)",
    ]
    assert body[0] == "| scenes VQA | 0.800 | 0.600 | 75.0% |"
    assert "| 90.0% |" in body[1] and "R@1 text->image" not in "\n".join(lines)  # absent metrics are left out


def test_the_exported_models_card_has_a_retention_section_when_the_teacher_was_evaluated():
    from compression.report import retention_section

    def results(vqa, r1):
        return {"easy_vqa": {"accuracy": 0.99}, "scenes": {"vqa_accuracy": vqa, "r1_i2t_rerank": r1, "caption_examples": []}}

    columns = {
        "exported (ONNX Runtime)": results(0.7, 0.5),
        "torch source": results(0.72, 0.52),
        "teacher (torch)": results(0.8, 0.75),
    }
    section = retention_section(columns)
    assert section.lstrip().startswith("### Retention")
    assert "| metric | teacher (torch) | exported (ONNX Runtime) | kept | torch source | kept |" in section
    assert "| scenes VQA | 0.800 | 0.700 | 87.5% | 0.720 | 90.0% |" in section
    assert "ITC top-16 re-ranked by ITM + w x ITC | 0.750 | 0.500 | 66.7% |" in section
    assert retention_section({"exported (ONNX Runtime)": results(0.7, 0.5)}) == ""


def test_the_metrics_table_shows_re_ranked_recall_when_evaluated():
    from compression.report import metrics_table

    sc = {"vqa_n": 5, "vqa_accuracy": 0.7, "bleu4": 0.5, "cider": 1.7}
    for d in ("i2t", "t2i"):
        sc |= {f"r1_{d}": 0.5, f"r5_{d}": 0.8, f"r10_{d}": 0.9, f"chance_r1_{d}": 0.002}
    assert "re-ranked" not in metrics_table({"scenes": sc})
    sc |= {"r1_i2t_rerank": 0.58, "r5_i2t_rerank": 0.88, "r10_i2t_rerank": 0.95}
    table = metrics_table({"scenes": sc})
    assert (
        "| scenes test retrieval i2t R@1 / R@5 / R@10, ITC top-k re-ranked by ITM + w x ITC | 0.5800 / 0.8800 / 0.9500 |" in table
    )
    assert "t2i R@1 / R@5 / R@10, ITC top-k" not in table
