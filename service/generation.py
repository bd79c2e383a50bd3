"""Caption decoding (greedy, beam search) in numpy over the exported decoder graphs.

No torch: every model call goes through `run(graph, feeds) -> outputs` (`Runtime.run`), over the
graphs `compression/export_decoder.py` writes: `decoder_cross_kv` once per image, then
`decoder_prefill` and `decoder_step` (KV cache) or `decoder_nocache` (whole prefix every step).

Rows whose caption is finished are dropped from the batch (cache, cross K/V and all), so a
batch costs what its unfinished captions cost; outputs are the same as decoding each image
alone. Per-step numpy work is a log-softmax / argmax over [rows, vocab] and one `take` of the
cache when rows change.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Run = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


def _cross(run: Run, states: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Cross-attention K/V of the states decoded from (image tokens, or fused question states),
    with their mask (all ones when not given): it travels with them (one row per row, selected
    alike). Decoder graphs that take no mask ignore it (Runtime.run drops feeds a graph lacks)."""
    out = dict(run("decoder_cross_kv", {"image_states": np.ascontiguousarray(states)}))
    out["cross_attention_mask"] = np.ones(states.shape[:2], np.int64) if mask is None else np.ascontiguousarray(mask, np.int64)
    return out


def kv_shape(like: np.ndarray, batch: int, tokens: int) -> tuple[int, ...]:
    """Shape of a K/V array laid out like `like` (a decoder graph's cross_*/past_*/present_*: [B,
    tokens, heads * d] or head-split [B, heads, tokens, d]) with `batch` rows and `tokens` tokens."""
    return (batch, *like.shape[1:-2], tokens, like.shape[-1])


def _start_ids(b: int, bos_id: int, prompt_ids: np.ndarray | None) -> np.ndarray:
    ids = np.full((b, 1), bos_id, np.int64)
    if prompt_ids is not None:
        ids = np.concatenate([ids, np.broadcast_to(np.asarray(prompt_ids, np.int64), (b, np.shape(prompt_ids)[-1]))], 1)
    return ids


def _take(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in arrays.items()}


class _Decoder:
    """One decoding state: the cross K/V and the self-attention cache of the current rows."""

    def __init__(self, run: Run, cross: dict[str, np.ndarray], use_cache: bool):
        self.run, self.cross, self.use_cache = run, cross, use_cache
        self.past: dict[str, np.ndarray] | None = None

    def logits(self, ids: np.ndarray, new: int) -> np.ndarray:
        """Last-position logits [rows, V] after feeding the `new` last tokens of ids [rows, L]."""
        mask = np.ones(ids.shape, np.int64)
        if not self.use_cache:
            return self.run("decoder_nocache", {"input_ids": ids, "attention_mask": mask, **self.cross})["logits"][:, -1]
        feeds = {"input_ids": ids[:, -new:], "attention_mask": mask, **self.cross}
        out = self.run("decoder_step", feeds | self.past) if self.past else self.run("decoder_prefill", feeds)
        self.past = {k.replace("present_", "past_", 1): v for k, v in out.items() if k.startswith("present_")}
        return out["logits"][:, -1]

    def select(self, rows: np.ndarray, cross_rows: np.ndarray | None = None) -> None:
        """Keep (and reorder) cache rows; cross_rows likewise for the cross K/V (None: unchanged)."""
        if self.past is not None:
            self.past = _take(self.past, rows)
        if cross_rows is not None:
            self.cross = _take(self.cross, cross_rows)


def greedy_decode(
    run: Run,
    image_states: np.ndarray,
    bos_id: int,
    sep_id: int,
    pad_id: int,
    max_length: int,
    use_cache: bool = True,
    prompt_ids: np.ndarray | None = None,
    memory_mask: np.ndarray | None = None,
    logprobs: np.ndarray | None = None,
    on_step: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Greedy decoding from image_states [B, N, D] (or fused question states, padded: then
    memory_mask [B, N] marks the real ones): ids [B, <=max_length] as `TrimVLM.generate` returns
    them ([SEP] kept, [PAD] after it, prompt excluded, stop when every row is done). `logprobs`
    [B], when given, receives each row's summed token log-probabilities ([SEP] included).
    `on_step(rows, tokens)`, when given, is told each step's new token of each live row (rows: their
    indices in the batch) as it is chosen: streamed captions (service/routes/openai.py)."""
    b = image_states.shape[0]
    dec = _Decoder(run, _cross(run, image_states, memory_mask), use_cache)
    ids = _start_ids(b, bos_id, prompt_ids)
    out = np.full((b, max_length), pad_id, np.int64)
    rows = np.arange(b)  # original index of each live row
    new, steps = ids.shape[1], 0
    if logprobs is not None:
        logprobs[:] = 0.0
    while steps < max_length and len(rows):
        step_logits = dec.logits(ids, new)
        tok = step_logits.argmax(-1)
        if logprobs is not None:
            logprobs[rows] += np.take_along_axis(_log_softmax(step_logits), tok[:, None], 1)[:, 0]
        out[rows, steps] = tok
        if on_step is not None:
            on_step(rows, tok)
        ids = np.concatenate([ids, tok[:, None]], 1)
        new, steps = 1, steps + 1
        live = tok != sep_id
        if not live.all():
            keep = np.flatnonzero(live)
            rows, ids = rows[keep], ids[keep]
            dec.select(keep, keep)
    return out[:, :steps]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _done(hyps: list[tuple[float, np.ndarray, float]], k: int, best_running: float, length: int, lp: float) -> bool:
    """HF's early_stopping=False rule: k hypotheses have finished and the best running beam, at
    its current length, would not beat the worst of the k best (with k = 1: greedy's stop)."""
    if len(hyps) < k:
        return False
    return sorted(h[0] for h in hyps)[-k] >= float(best_running) / length**lp


def beam_search(
    run: Run,
    image_states: np.ndarray,
    bos_id: int,
    sep_id: int,
    pad_id: int,
    max_length: int,
    num_beams: int = 3,
    length_penalty: float = 1.0,
    prompt_ids: np.ndarray | None = None,
    memory_mask: np.ndarray | None = None,
    logprobs: np.ndarray | None = None,
) -> np.ndarray:
    """Beam-search captions for image_states [B, N, D]: the best hypothesis per image, ids
    [B, <=max_length] laid out as greedy_decode's.

    A hypothesis ends at [SEP] (counted in its length) or at max_length; its score is the sum of
    its token log-probs / length ** length_penalty. As in Hugging Face's beam search, each step
    keeps the 2K best (beam, token) extensions: [SEP] among the top K finishes a hypothesis, the
    best K others continue; an image stops by HF's default rule (`_done`), under which
    num_beams=1 is exactly greedy decoding. memory_mask and logprobs as in greedy_decode (the
    best hypothesis's summed log-probs, before the length penalty).
    """
    b, k = image_states.shape[0], num_beams
    if max_length < 1 or k < 1:
        raise ValueError(f"need max_length >= 1 and num_beams >= 1, got {max_length}, {num_beams}")
    cross = _cross(run, image_states, memory_mask)
    dec = _Decoder(run, cross, use_cache=True)
    ids = _start_ids(b, bos_id, prompt_ids)
    start = ids.shape[1]
    hyps: list[list[tuple[float, np.ndarray, float]]] = [[] for _ in range(b)]  # (score, ids, log-prob)
    images = np.arange(b)  # original index of each live image; its rows are i*k .. i*k+k-1
    scores = np.zeros((b, k), np.float32)
    scores[:, 1:] = -np.inf  # all beams start identical: only beam 0 may extend at step 0
    logp = _log_softmax(dec.logits(ids, start))
    # Beams share the prefill: repeat its rows (and the cross K/V, once) k times.
    expand = np.repeat(np.arange(b), k)
    dec.select(expand, expand)
    ids, logp = ids[expand], logp[expand]
    for step in range(max_length):
        n, vocab = len(images), logp.shape[-1]
        cand = (scores[:, :, None] + logp.reshape(n, k, vocab)).reshape(n, k * vocab)
        top = np.argpartition(-cand, 2 * k - 1, axis=1)[:, : 2 * k]
        top_score = np.take_along_axis(cand, top, 1)
        order = np.lexsort((top, -top_score), axis=1)  # best first; ties: lowest (beam, token)
        top, top_score = np.take_along_axis(top, order, 1), np.take_along_axis(top_score, order, 1)
        beam, tok = top // vocab, top % vocab
        is_sep = tok == sep_id
        length = step + 1
        for i, r in zip(*np.nonzero(is_sep[:, :k]), strict=True):  # finished hypotheses (rare)
            if np.isfinite(top_score[i, r]):
                seq = np.append(ids[i * k + beam[i, r], start:], sep_id)
                hyps[images[i]].append((float(top_score[i, r]) / length**length_penalty, seq, float(top_score[i, r])))
        # Continue with the K best non-[SEP] extensions (a stable sort keeps their rank order);
        # at most K of the 2K candidates are [SEP], one per beam.
        cont = np.argsort(is_sep, axis=1, kind="stable")[:, :k]
        src = (np.arange(n)[:, None] * k + np.take_along_axis(beam, cont, 1)).ravel()
        scores = np.take_along_axis(top_score, cont, 1)
        ids = np.concatenate([ids[src], np.take_along_axis(tok, cont, 1).reshape(-1, 1)], 1)
        if length == max_length:
            break
        live = np.array([not _done(hyps[j], k, scores[i, 0], length, length_penalty) for i, j in enumerate(images)])
        if not live.all():
            images, scores = images[live], scores[live]
            rows = (np.flatnonzero(live)[:, None] * k + np.arange(k)).ravel()
            src, ids = src[rows], ids[rows]
            dec.select(src, rows)
        elif not np.array_equal(src, np.arange(len(src))):
            dec.select(src)
        if not len(images):
            break
        logp = _log_softmax(dec.logits(ids, 1))
    for i, j in enumerate(images):  # still running at max_length: unfinished hypotheses count
        if _done(hyps[j], k, scores[i, 0], max_length, length_penalty):
            continue
        for r in range(k):
            if np.isfinite(scores[i, r]):
                hyps[j].append((float(scores[i, r]) / max_length**length_penalty, ids[i * k + r, start:], float(scores[i, r])))
    winners = [max(h, key=lambda t: t[0]) for h in hyps]
    best = [w[1] for w in winners]
    if logprobs is not None:
        logprobs[:] = [w[2] for w in winners]
    out = np.full((b, max(len(s) for s in best)), pad_id, np.int64)
    for j, seq in enumerate(best):
        out[j, : len(seq)] = seq
    return out
