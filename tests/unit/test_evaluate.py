"""Retrieval recall with duplicate captions: exact ties must rank the same way every time."""

import numpy as np

from compression import data as D
from compression.evaluate import evaluate_retrieval


class _Tasks:
    """Stands in for TorchTasks / TaskModel: embeddings straight from a table."""

    def __init__(self, image_emb, text_emb, texts):
        self.image_emb, self.text_emb, self.texts = image_emb, text_emb, texts

    def pixels(self, images):
        return images

    def encode_images(self, pixels):
        return None, self.image_emb[pixels[:, 0, 0, 0]]

    def tokenize(self, texts):
        return np.array([self.texts.index(t) for t in texts]), None

    def encode_texts(self, ids, mask):
        return None, self.text_emb[ids]


def test_tied_duplicate_captions_rank_by_position_not_by_sort_accident():
    """Each of n images owns one caption; a decoy image (embedding zero) owns an exact duplicate
    of every one of them, listed after them. Each real image's own caption and its duplicate tie
    exactly; the tie goes to the earlier caption, its own, every time (quicksort's unstable order
    among ties gave 151 of them to the decoy: R@1 then depended on last-bit noise elsewhere)."""
    rng = np.random.default_rng(0)
    n = 250  # long rows: numpy's quicksort leaves short ones to insertion sort, which keeps ties in order
    # multiples of 1/8: every dot product is exact, so duplicates tie exactly, as duplicate texts do
    words = (4 * np.eye(n) + rng.integers(0, 4, (n, n)) / 8).astype(np.float32)
    texts = [f"caption {j}" for j in range(n)] + [f"caption {j} (again)" for j in range(n)]
    text_emb = np.concatenate([words, words])
    image_emb = np.concatenate([words, np.zeros((1, n), np.float32)])
    images = np.zeros((n + 1, 1, 1, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n + 1)
    split = D.CaptionSplit("ties", images, list(range(n + 1)), [[t] for t in texts[:n]] + [texts[n:]])
    r = evaluate_retrieval(_Tasks(image_emb, text_emb, texts), split)
    # every real image hits at R@1; the decoy's all-tied row puts caption 0 (not its own) first
    assert r["r1_i2t"] == n / (n + 1)
