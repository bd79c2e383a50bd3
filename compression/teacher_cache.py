"""The teacher's outputs per training sample, computed once and read back every later step.

Distillation otherwise runs a frozen teacher forward on every batch. Everything the KD losses use
that belongs to one sample is stored in fp16 memory-mapped files in a cache folder, keyed by the
exact sample the student sees:

- VQA image variant (image row, mirrored or not): the teacher's vision hidden states and
  attention probabilities at the layers the student is distilled against;
- VQA question variant (question row, mirrored image or not): text and fusion hidden states,
  self- and cross-attention, VQA logits and generative-answer logits;
- caption image: last vision states and the normalised ITC embedding;
- caption row: last text states, ITC embedding, captioning logits, decoder states and attention.

Mirroring (easy-VQA's only augmentation) is part of the key, so a cached step sees what the
uncached one would. What depends on the whole batch is rebuilt from cached parts each step: the
in-batch ITC similarity (cached embeddings x the teacher's temperature), the ITM negatives
drawn from it, and the teacher's ITM logits, which run the teacher's fusion layers on the
cached text and image states of the 3B pairs (cheap next to the vision stack).

Rows are filled on first use (a teacher forward on the batch's missing samples only) or all at
once (`prefill_captions`, needed before mining hard negatives). Filled flags are saved with each
training checkpoint, so the cache survives a restart; rows written after the last save are
recomputed. A cache made for another teacher, student shape or data set is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from compression.hard_negatives import mine_partners as mine_partner_images
from compression.modeling import StackOutput, TrimVLM
from compression.training import TaskOutputs, TrainData, caption_batch, draw_negatives

STATE_KW = {"output_attentions": True, "output_hidden_states": True}


class TeacherCache:
    def __init__(
        self,
        root: str | Path,
        teacher: TrimVLM,
        data: TrainData,
        hidden_map: dict[str, list[int]],
        attn_map: dict[str, list[int]],
        identity: str,
        pad_id: int,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.teacher, self.data, self.pad_id = teacher, data, pad_id
        self.hidden_map, self.attn_map = hidden_map, attn_map
        cfg = teacher.config
        n_tok = cfg.num_image_tokens
        self.len_q = _max_length(data.vqa_q_ids, pad_id)
        self.len_a = _max_length(data.vqa_answer_ids, pad_id)
        self.len_c = _max_length(data.cap_ids, pad_id)
        w, vw, v = cfg.text_width, cfg.vision_width, cfg.vocab_size
        lq, lc = self.len_q, self.len_c
        heads = {
            "vision": cfg.vision_heads,
            "text": cfg.text_heads,
            "fusion": cfg.fusion_self_heads,
            "fusion_x": cfg.fusion_cross_heads,
            "decoder": cfg.decoder_self_heads,
            "decoder_x": cfg.decoder_cross_heads,
        }
        # table -> (rows, {field: shape of one row})
        vimg = {f"v_h{j}": (n_tok, vw) for j in hidden_map["vision"]}
        vimg |= {f"v_a{j}": (heads["vision"][j], n_tok, n_tok) for j in attn_map["vision"]}
        q = {f"t_h{j}": (lq, w) for j in hidden_map["text"]}
        q |= {f"t_a{j}": (heads["text"][j], lq, lq) for j in attn_map["text"]}
        q |= {f"f_h{j}": (lq, w) for j in hidden_map["fusion"]}
        q |= {f"f_a{j}": (heads["fusion"][j], lq, lq) for j in attn_map["fusion"]}
        q |= {f"f_x{j}": (heads["fusion_x"][j], lq, n_tok) for j in attn_map["fusion"]}
        q |= {"vqa": (cfg.num_answers,)}
        if cfg.generative_vqa:
            q |= {"gen": (self.len_a, v)}
        cimg = {"i_last": (n_tok, vw), "i_emb": (cfg.embed_dim,)}
        cap = {"c_last": (lc, w), "c_emb": (cfg.embed_dim,), "cap": (lc, v)}
        cap |= {f"d_h{j}": (lc, w) for j in hidden_map["decoder"]}
        cap |= {f"d_a{j}": (heads["decoder"][j], lc, lc) for j in attn_map["decoder"]}
        cap |= {f"d_x{j}": (heads["decoder_x"][j], lc, n_tok) for j in attn_map["decoder"]}
        self.layout = {
            "vimg": (2 * len(data.vqa_images), vimg),
            "q": (2 * len(data.vqa_q_ids), q),
            "cimg": (len(data.cap_images), cimg),
            "cap": (len(data.cap_ids), cap),
        }
        meta = {
            "identity": identity,
            "data": _data_digest(data),
            "layout": {t: [n, {k: list(s) for k, s in f.items()}] for t, (n, f) in self.layout.items()},
        }
        meta_path = self.root / "meta.json"
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old != json.loads(json.dumps(meta)):
                raise ValueError(f"{self.root} holds a teacher cache of another teacher, student shape or data set: delete it")
        else:
            meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        self.arrays: dict[str, np.memmap] = {}
        self.filled: dict[str, np.ndarray] = {}
        for table, (rows, fields_) in self.layout.items():
            for name, shape in fields_.items():
                path = self.root / f"{table}.{name}.f16"
                mode = "r+" if path.is_file() else "w+"  # w+ makes a sparse file: untouched rows take no disk
                self.arrays[name] = np.memmap(path, np.float16, mode, shape=(rows, *shape))
            flags = self.root / f"{table}.filled.npy"
            self.filled[table] = np.load(flags) if flags.is_file() else np.zeros(rows, bool)
        self.hits = self.misses = 0

    # ------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Flush the rows and then record which are filled (a crash in between only loses flags)."""
        for a in self.arrays.values():
            a.flush()
        for table, flags in self.filled.items():
            tmp = self.root / f"{table}.filled.tmp.npy"
            np.save(tmp, flags)
            tmp.replace(self.root / f"{table}.filled.npy")

    def fill_fraction(self) -> dict[str, float]:
        return {t: round(float(f.mean()), 4) for t, f in self.filled.items()}

    def _write(self, name: str, rows: np.ndarray, value: torch.Tensor) -> None:
        a = self.arrays[name]
        v = value.detach().to("cpu", torch.float16).numpy()
        if v.ndim > 1 and v.shape[1:] != a.shape[1:]:  # shorter than the cached length: zero-pad
            full = np.zeros((len(v), *a.shape[1:]), np.float16)
            full[tuple([slice(None)] + [slice(0, n) for n in v.shape[1:]])] = v
            v = full
        a[rows] = v

    def _read(self, name: str, rows: np.ndarray, *lengths: int | None) -> torch.Tensor:
        """Rows of a field, each following axis cut to the batch's length (None: whole axis)."""
        a = self.arrays[name]
        index = (rows,) + tuple(slice(None) if n is None else slice(0, n) for n in lengths)
        dev = self.data.vqa_images.device
        return torch.from_numpy(np.ascontiguousarray(a[index])).to(dev).float()

    # Keys ---------------------------------------------------------------------------------------
    def _vqa_keys(self, vqa: dict) -> tuple[np.ndarray, np.ndarray]:
        flip = vqa["flip"].long().cpu().numpy()
        qi = vqa["qi"].cpu().numpy()
        img = self.data.vqa_image_index.cpu().numpy()[qi]
        return 2 * img + flip, 2 * qi + flip

    def _cap_keys(self, cap: dict) -> tuple[np.ndarray, np.ndarray]:
        ci = cap["ci"].cpu().numpy()
        return self.data.cap_image_index.cpu().numpy()[ci], ci

    # Filling --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _fill_vqa(self, vqa: dict, rows: np.ndarray) -> None:
        """Teacher forward (as task_forward's VQA part) on the batch rows `rows`, written to the cache."""
        t, cfg = self.teacher, self.teacher.config
        sel = torch.from_numpy(rows).to(vqa["q_ids"].device)
        q_ids, q_mask = vqa["q_ids"][sel], vqa["q_mask"][sel]
        vision = t.encode_image(vqa["pixels"][sel], **STATE_KW)
        text = t.text_encoder(q_ids, q_mask, **STATE_KW)
        fusion = t.fuse(text.last_hidden_state, q_mask, vision.last_hidden_state, **STATE_KW)
        img_key, q_key = (k[rows] for k in self._vqa_keys(vqa))
        for j in self.hidden_map["vision"]:
            self._write(f"v_h{j}", img_key, vision.hidden_states[j])
        for j in self.attn_map["vision"]:
            self._write(f"v_a{j}", img_key, vision.attentions[j])
        for j in self.hidden_map["text"]:
            self._write(f"t_h{j}", q_key, text.hidden_states[j])
        for j in self.attn_map["text"]:
            self._write(f"t_a{j}", q_key, text.attentions[j])
        for j in self.hidden_map["fusion"]:
            self._write(f"f_h{j}", q_key, fusion.hidden_states[j])
        for j in self.attn_map["fusion"]:
            self._write(f"f_a{j}", q_key, fusion.attentions[j])
            self._write(f"f_x{j}", q_key, fusion.cross_attentions[j])
        self._write("vqa", q_key, t.vqa_logits(fusion.last_hidden_state))
        if cfg.generative_vqa:
            a_ids, a_mask = vqa["a_ids"][sel], vqa["a_mask"][sel]
            gen, _ = t.text_decoder(a_ids, a_mask, encoder_states=fusion.last_hidden_state, encoder_mask=q_mask)
            self._write("gen", q_key, gen)
        self.filled["vimg"][img_key] = True
        self.filled["q"][q_key] = True

    @torch.no_grad()
    def _fill_captions(self, cap: dict, rows: np.ndarray) -> None:
        t = self.teacher
        sel = torch.from_numpy(rows).to(cap["ids"].device)
        ids, mask = cap["ids"][sel], cap["mask"][sel]
        # captions of one image share its vision pass (prefill batches hold ~5 captions an image)
        img_rows = cap["ci"][sel].new_tensor(self.data.cap_image_index.cpu().numpy()[cap["ci"][sel].cpu().numpy()])
        unique, inverse = torch.unique(img_rows, return_inverse=True)
        first = torch.zeros_like(unique).scatter_(0, inverse, torch.arange(len(inverse), device=inverse.device))
        img = t.encode_image(cap["pixels"][sel][first]).last_hidden_state[inverse]
        txt = t.encode_text(ids, mask).last_hidden_state
        logits, decoder = t.text_decoder(cap["dec_ids"][sel], mask, encoder_states=img, **STATE_KW)
        img_key, cap_key = (k[rows] for k in self._cap_keys(cap))
        self._write("i_last", img_key, img)
        self._write("i_emb", img_key, t.image_embeds(img))
        self._write("c_last", cap_key, txt)
        self._write("c_emb", cap_key, t.text_embeds(txt, mask))
        self._write("cap", cap_key, logits)
        for j in self.hidden_map["decoder"]:
            self._write(f"d_h{j}", cap_key, decoder.hidden_states[j])
        for j in self.attn_map["decoder"]:
            self._write(f"d_a{j}", cap_key, decoder.attentions[j])
            self._write(f"d_x{j}", cap_key, decoder.cross_attentions[j])
        self.filled["cimg"][img_key] = True
        self.filled["cap"][cap_key] = True

    def prefill_captions(self, spec, bos_id: int, batch: int = 128, progress=None) -> None:
        """Fill every caption row (and caption image): ITC embeddings of the whole training set,
        which mining hard negatives needs."""
        todo = np.flatnonzero(~self.filled["cap"])
        for start in range(0, len(todo), batch):
            ci = torch.from_numpy(todo[start : start + batch]).to(self.data.cap_ids.device)
            cap = caption_batch(self.data, spec, self.pad_id, bos_id, ci)
            self._fill_captions(cap, np.arange(len(ci)))
            if progress is not None:
                progress(min(len(todo), start + batch), len(todo))
            if (start // batch) % 20 == 19:  # a restart keeps what is done
                self.save()
        self.save()

    # Reading ------------------------------------------------------------------------------------------
    def _stack(self, n_layers: int, hidden: dict, attn: dict, cross: dict | None) -> StackOutput:
        """A StackOutput with the teacher's states at the indices the losses read (others None)."""
        hs = [hidden.get(j) for j in range(n_layers + 1)]
        at = [attn.get(j) for j in range(n_layers)]
        xs = [cross.get(j) for j in range(n_layers)] if cross is not None else []
        return StackOutput(hs[-1], hs, at, xs)

    def teacher_outputs(self, vqa: dict, cap: dict) -> TaskOutputs:
        """The teacher's TaskOutputs for this batch (states included), from the cache; the batch's
        missing samples are computed first."""
        img_key, q_key = self._vqa_keys(vqa)
        cimg_key, cap_key = self._cap_keys(cap)
        miss_v = np.flatnonzero(~(self.filled["vimg"][img_key] & self.filled["q"][q_key]))
        miss_c = np.flatnonzero(~(self.filled["cimg"][cimg_key] & self.filled["cap"][cap_key]))
        self.misses += len(miss_v) + len(miss_c)
        self.hits += len(q_key) + len(cap_key) - len(miss_v) - len(miss_c)
        if len(miss_v):
            self._fill_vqa(vqa, miss_v)
        if len(miss_c):
            self._fill_captions(cap, miss_c)
        t, counts = self.teacher, self.teacher.config.layer_counts
        lq, la, lc = vqa["q_ids"].shape[1], vqa["a_ids"].shape[1], cap["ids"].shape[1]
        hm, am = self.hidden_map, self.attn_map
        vision = self._stack(
            counts["vision"],
            {j: self._read(f"v_h{j}", img_key) for j in hm["vision"]},
            {j: self._read(f"v_a{j}", img_key) for j in am["vision"]},
            None,
        )
        text = self._stack(
            counts["text"],
            {j: self._read(f"t_h{j}", q_key, lq) for j in hm["text"]},
            {j: self._read(f"t_a{j}", q_key, None, lq, lq) for j in am["text"]},
            None,
        )
        fusion = self._stack(
            counts["fusion"],
            {j: self._read(f"f_h{j}", q_key, lq) for j in hm["fusion"]},
            {j: self._read(f"f_a{j}", q_key, None, lq, lq) for j in am["fusion"]},
            {j: self._read(f"f_x{j}", q_key, None, lq) for j in am["fusion"]},
        )
        decoder = self._stack(
            counts["decoder"],
            {j: self._read(f"d_h{j}", cap_key, lc) for j in hm["decoder"]},
            {j: self._read(f"d_a{j}", cap_key, None, lc, lc) for j in am["decoder"]},
            {j: self._read(f"d_x{j}", cap_key, None, lc) for j in am["decoder"]},
        )
        gen = self._read("gen", q_key, la) if t.config.generative_vqa else None
        image_emb, text_emb = self._read("i_emb", cimg_key), self._read("c_emb", cap_key)
        with torch.no_grad():
            sim = t.itc_logits(image_emb, text_emb)
            negatives = draw_negatives(sim, cap["key"])
            img, txt, mask = self._read("i_last", cimg_key), self._read("c_last", cap_key, lc), cap["mask"]
            neg_text, neg_img = negatives
            fused_mask = torch.cat([mask, mask[neg_text], mask])
            fused = t.fuse(
                torch.cat([txt, txt[neg_text], txt]),
                fused_mask,
                torch.cat([img, img, img[neg_img]]),
            ).last_hidden_state
            itm = t.itm_logits(fused, fused_mask)
        return TaskOutputs(
            vqa_logits=self._read("vqa", q_key),
            vqa_gen_logits=gen,
            itc_sim=sim,
            image_emb=image_emb,
            text_emb=text_emb,
            itm_logits=itm,
            caption_logits=self._read("cap", cap_key, lc),
            negatives=negatives,
            caption_images=img,
            caption_texts=txt,
            vision=vision,
            text=text,
            fusion=fusion,
            decoder=decoder,
        )

    # Hard negatives -------------------------------------------------------------------------------
    @torch.no_grad()
    def mine_partners(self, k: int = 8, chunk: int = 512) -> torch.Tensor:
        """For each caption image, the k other images whose captions the teacher scores highest
        against it (a caption equal to one of its own does not count): [M, k] image rows."""
        if not self.filled["cap"].all():
            raise RuntimeError("mining hard negatives needs every caption in the cache: prefill_captions first")
        d = self.data
        img_emb = torch.from_numpy(np.asarray(self.arrays["i_emb"][:]))
        txt_emb = torch.from_numpy(np.asarray(self.arrays["c_emb"][:]))
        return mine_partner_images(img_emb, txt_emb, d.cap_image_index, d.cap_text_key, k, chunk)


def _max_length(ids: torch.Tensor, pad_id: int) -> int:
    return int((ids != pad_id).sum(1).max())


def _data_digest(d: TrainData) -> str:
    h = hashlib.sha256()
    for name in ("vqa_image_index", "vqa_q_ids", "vqa_answer_ids", "cap_image_index", "cap_ids"):
        h.update(getattr(d, name).cpu().numpy().tobytes())
    h.update(str(tuple(d.vqa_images.shape)).encode())
    h.update(d.vqa_images[:: max(1, len(d.vqa_images) // 64)].cpu().numpy().tobytes())
    h.update(d.cap_images[:: max(1, len(d.cap_images) // 64)].cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def teacher_identity(teacher_dir: str | Path) -> str:
    """The teacher's weights file digest: a cache belongs to one teacher."""
    h = hashlib.sha256(Path(teacher_dir, "model.safetensors").read_bytes()).hexdigest()[:20]
    return f"{Path(teacher_dir).name}:{h}"
