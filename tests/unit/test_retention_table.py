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
