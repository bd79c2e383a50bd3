"""Retrieval recall: exact ties (duplicate captions) rank the same way every time; ITM re-ranking of
the ITC top-k changes the ranking within the top-k only."""

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
    r = evaluate_retrieval(_Tasks(image_emb, text_emb, texts), split, rerank_k=0)
    # every real image hits at R@1; the decoy's all-tied row puts caption 0 (not its own) first
    assert r["r1_i2t"] == n / (n + 1)


class _Matcher(_Tasks):
    """ITC embeddings that rank each image's own caption second; an ITM head that knows the truth:
    text and image states carry their index, and "match" wins only for a caption and its image."""

    def tokenize(self, texts):
        ids = np.array([[self.texts.index(t)] for t in texts])
        return ids, np.ones_like(ids)

    def encode_images(self, pixels):
        idx = pixels[:, 0, 0, 0].astype(np.float32)
        return np.repeat(idx[:, None, None], 2, 1), self.image_emb[pixels[:, 0, 0, 0]]

    def encode_texts(self, ids, mask):
        return ids[:, :, None].astype(np.float32), self.text_emb[ids[:, 0]]

    def fuse(self, text_states, mask, image_states):
        same = text_states[:, 0, 0] == image_states[:, 0, 0]
        return {"itm_logits": np.stack([np.zeros(len(same)), np.where(same, 5.0, -5.0)], 1)}


def test_itm_reranking_fixes_the_order_within_the_itc_top_k_only():
    n = 12
    # ITC: caption j is most similar to image j+1 and second most to its own image j
    image_emb = np.eye(n, dtype=np.float32)
    text_emb = (np.roll(np.eye(n), 1, axis=1) + 0.5 * np.eye(n)).astype(np.float32)
    texts = [f"caption {j}" for j in range(n)]
    images = np.zeros((n, 1, 1, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    split = D.CaptionSplit("rerank", images, list(range(n)), [[t] for t in texts])
    tasks = _Matcher(image_emb, text_emb, texts)
    r = evaluate_retrieval(tasks, split, rerank_k=2)
    assert r["r1_i2t"] == 0.0 and r["r1_t2i"] == 0.0  # ITC alone: every query's top-1 is wrong
    assert r["r1_i2t_rerank"] == 1.0 and r["r1_t2i_rerank"] == 1.0 and r["rerank_k"] == 2
    assert r["r5_i2t_rerank"] == r["r5_i2t"]  # re-ranking moves nothing out of the top-k
    r = evaluate_retrieval(tasks, split, rerank_k=1)  # a top-1 of one re-ranks nothing
    assert r["r1_i2t_rerank"] == 0.0
    # texts padded to different lengths in different encoder batches are re-padded together
    r = evaluate_retrieval(_Padded(image_emb, text_emb, texts), split, batch=2, rerank_k=2)
    assert r["r1_i2t_rerank"] == 1.0 and r["r1_t2i_rerank"] == 1.0


class _Padded(_Matcher):
    """Text j is 1 + j % 3 tokens long: each encoder batch pads to its own longest."""

    def tokenize(self, texts):
        idx = [self.texts.index(t) for t in texts]
        ids = np.zeros((len(idx), max(1 + i % 3 for i in idx)), np.int64)
        mask = np.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : 1 + i % 3], mask[r, : 1 + i % 3] = i, 1
        return ids, mask


class _Unsure(_Matcher):
    """An ITM head that is nearly right: it prefers the true pair by only a little, and for
    caption 0 it prefers image 1 by a little. ITC ranks each caption's own image first by a wide margin."""

    def fuse(self, text_states, mask, image_states):
        t, i = text_states[:, 0, 0], image_states[:, 0, 0]
        match = np.where(t == i, 0.2, 0.0) + np.where((t == 0) & (i == 1), 0.5, 0.0)
        return {"itm_logits": np.stack([np.zeros(len(t)), match], 1)}


def test_the_rerank_weight_blends_the_itc_cosine_into_the_itm_score():
    """log p(match) + w x ITC cosine: at w 0 the ITM head alone decides (and gets caption 0 wrong);
    a weight that lets ITC's margin count fixes it. The model's own weight is the default; an
    explicit one overrides it, and the results record which weight was used."""
    from service.tasks import log_match, rerank_scores

    n = 6
    image_emb = np.eye(n, dtype=np.float32)
    text_emb = (np.eye(n) + 0.3 * np.roll(np.eye(n), 1, axis=1)).astype(np.float32)  # own image first, next one second
    texts = [f"caption {j}" for j in range(n)]
    images = np.zeros((n, 1, 1, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    split = D.CaptionSplit("blend", images, list(range(n)), [[t] for t in texts])
    tasks = _Unsure(image_emb, text_emb, texts)
    alone = evaluate_retrieval(tasks, split, rerank_k=2)  # no calibrated weight: ITM alone
    assert alone["rerank_itc_weight"] == 0.0 and alone["r1_t2i"] == 1.0
    assert alone["r1_t2i_rerank"] == (n - 1) / n  # caption 0 goes to image 1
    blended = evaluate_retrieval(tasks, split, rerank_k=2, rerank_itc_weight=1.0)
    assert blended["rerank_itc_weight"] == 1.0 and blended["r1_t2i_rerank"] == 1.0
    tasks.rerank_itc_weight = 1.0  # the model's calibrated weight applies when none is given
    assert evaluate_retrieval(tasks, split, rerank_k=2)["r1_t2i_rerank"] == 1.0
    assert evaluate_retrieval(tasks, split, rerank_k=2, rerank_itc_weight=0.0)["r1_t2i_rerank"] == (n - 1) / n
    # the score itself: log-softmax of "match", plus the weighted cosine
    lp = log_match(np.array([[0.0, 0.0], [0.0, 3.0]]))
    np.testing.assert_allclose(lp, [np.log(0.5), 3.0 - np.log1p(np.exp(3.0))], rtol=1e-6)
    np.testing.assert_allclose(rerank_scores(lp, np.array([0.5, -0.5]), 2.0), lp + [1.0, -1.0], rtol=1e-6)
