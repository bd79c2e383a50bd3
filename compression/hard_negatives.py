"""Hard-negative images for caption batches, mined from the teacher's ITC similarities.

Random caption batches rarely hold two images that differ in one attribute, so the in-batch
ITC and ITM negatives never teach the student to bind attributes to objects, which is what the
full-description captions test (text->image R@1). Pairing each image with one the teacher finds
hard for its captions puts those near-duplicates into every batch.

The teacher's embeddings come either from a teacher cache (compression/teacher_cache.py, which has
them for every caption once prefilled) or from one pass of the teacher's two encoders over the
transfer set; the mined table is small and kept in the run folder, so a resumed run reuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from compression.modeling import TrimVLM
from compression.training import TrainData, normalize_on_device, trim_padding

ProgressFn = Callable[[int, int], None]


@torch.no_grad()
def mine_partners(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, owner: torch.Tensor, key: torch.Tensor, k: int, chunk: int = 512
) -> torch.Tensor:
    """For each image, the k other images whose captions score highest against it: [M, k] image
    rows. img_emb [M, D] and txt_emb [C, D] are normalised embeddings, owner [C] the image row of
    each caption and key [C] its text identity; a caption equal to one of the image's own does
    not count (it is true of both)."""
    n_img = len(img_emb)
    if not 0 < k < n_img:
        raise ValueError(f"hard_negative_k must be between 1 and {n_img - 1} images, got {k}")
    img_emb, txt_emb = img_emb.float().cpu(), txt_emb.float().cpu()
    owner, key = owner.cpu(), key.cpu()
    own_keys = [set() for _ in range(n_img)]
    for o, kk in zip(owner.tolist(), key.tolist(), strict=True):
        own_keys[o].add(kk)
    out = []
    for s in range(0, n_img, chunk):
        rows = torch.arange(s, min(n_img, s + chunk))
        sim = img_emb[rows] @ txt_emb.t()  # [c, C]
        same_text = torch.zeros_like(sim, dtype=torch.bool)
        for r, i in enumerate(rows.tolist()):
            same_text[r] = torch.isin(key, torch.tensor(sorted(own_keys[i])))
        sim = sim.masked_fill(same_text, float("-inf"))
        per_image = torch.full((len(rows), n_img), float("-inf")).scatter_reduce(
            1, owner.expand(len(rows), -1), sim, reduce="amax"
        )
        per_image[torch.arange(len(rows)), rows] = float("-inf")
        out.append(per_image.topk(k, dim=1).indices)
    return torch.cat(out)


@torch.no_grad()
def teacher_embeddings(
    teacher: TrimVLM, data: TrainData, spec, batch: int = 256, progress: ProgressFn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's normalised ITC embeddings of every caption image and every caption."""
    teacher.eval()
    n_img, n_cap = len(data.cap_images), len(data.cap_ids)
    total, done = n_img + n_cap, 0
    images, texts = [], []
    for s in range(0, n_img, batch):
        pixels = normalize_on_device(data.cap_images[s : s + batch], spec)
        images.append(teacher.image_embeds(teacher.encode_image(pixels).last_hidden_state).cpu())
        done += len(pixels)
        if progress:
            progress(done, total)
    for s in range(0, n_cap, batch):
        ids, mask = trim_padding(data.cap_ids[s : s + batch], teacher.config.pad_token_id)
        texts.append(teacher.text_embeds(teacher.encode_text(ids, mask).last_hidden_state, mask).cpu())
        done += len(ids)
        if progress:
            progress(done, total)
    return torch.cat(images), torch.cat(texts)


def load_or_mine(
    path: Path, teacher: TrimVLM, data: TrainData, spec, k: int, identity: str, progress: ProgressFn | None = None
) -> torch.Tensor:
    """The [M, k] partner table stored at `path`, or mined from the teacher now and stored there.
    A table for another teacher, k or transfer set is mined again."""
    stamp = {"teacher": identity, "k": k, "images": len(data.cap_images), "captions": len(data.cap_ids)}
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("stamp") == stamp:
            return saved["partners"]
    img_emb, txt_emb = teacher_embeddings(teacher, data, spec, progress=progress)
    partners = mine_partners(img_emb, txt_emb, data.cap_image_index, data.cap_text_key, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"stamp": stamp, "partners": partners}, path)
    return partners
