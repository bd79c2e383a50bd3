// TrimVLM demo page: plain browser JavaScript, no build step, no third-party code.
// Every server value is written with textContent (never as HTML). API paths are relative to the
// page, so it also works behind a reverse proxy that serves the API under a path prefix.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const LEVELS = ["full", "accurate", "balanced", "fast"];
  const state = {
    image: null, // data URI of the uploaded image
    name: null,
    models: [],
    thumbs: new Map(), // gallery id -> data URI, for images added from this page
  };

  class ApiCallError extends Error {
    constructor(code, message, status, rtt, requestId) {
      super(message);
      Object.assign(this, { code, status, rtt, requestId });
    }
  }

  // ---- HTTP ---------------------------------------------------------------------------

  function headers(json) {
    const h = { Accept: "application/json" };
    if (json) h["Content-Type"] = "application/json";
    const key = $("api-key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // Resolves to {data, rtt, requestId}; rejects with ApiCallError (the server's
  // {"error": {"code", "message"}} when it sent one).
  async function call(method, path, body) {
    const t0 = performance.now();
    let res;
    try {
      res = await fetch(path, {
        method,
        headers: headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (e) {
      throw new ApiCallError("network_error", "could not reach the server (" + e.message + ")", 0, performance.now() - t0);
    }
    const text = await res.text();
    const rtt = performance.now() - t0;
    const requestId = res.headers.get("x-request-id");
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = null;
    }
    if (!res.ok) {
      const err = data && data.error && typeof data.error === "object" ? data.error : null;
      const code = err && err.code ? String(err.code) : "http_" + res.status;
      const message = err && err.message ? String(err.message) : (text.trim().slice(0, 300) || res.statusText || "request failed");
      throw new ApiCallError(code, message, res.status, rtt, requestId);
    }
    if (data === null) throw new ApiCallError("bad_response", "the server did not answer with JSON", res.status, rtt, requestId);
    return { data, rtt, requestId };
  }

  function withModel(body) {
    const model = $("model").value;
    if (model) body.model = model;
    return body;
  }

  function withDeadline(body) {
    const raw = $("deadline").value.trim();
    if (raw === "") return body;
    const ms = Number(raw);
    if (!Number.isFinite(ms) || ms <= 0) {
      throw new ApiCallError("invalid_deadline", "the deadline must be a positive number of milliseconds", 0, null);
    }
    body.deadline_ms = ms;
    return body;
  }

  function needImage() {
    if (!state.image) throw new ApiCallError("no_image", "choose an image first (Image → Upload an image)", 0, null);
    return state.image;
  }

  // ---- rendering ----------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  const ms = (v) => (v === null || v === undefined ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(1)) + " ms");
  const pct = (v) => (100 * v).toFixed(1) + "%";

  function meta(pairs) {
    const dl = el("dl", { class: "meta" });
    for (const [label, field, value] of pairs) {
      dl.append(el("div", {}, el("dt", {}, label), el("dd", { "data-field": field }, value)));
    }
    return dl;
  }

  function computeMeta(compute, latency, rtt) {
    const tokens = compute.tokens_kept === null || compute.tokens_kept === undefined
      ? "–"
      : compute.tokens_kept + " / " + compute.tokens_total;
    return meta([
      ["Level", "level", compute.level + (compute.reason ? " (" + compute.reason + ")" : "")],
      ["FLOPs ratio", "flops", Number(compute.flops_ratio).toFixed(2)],
      ["Tokens kept", "tokens", tokens],
      ["Server latency", "latency", ms(latency)],
      ["Round trip", "rtt", ms(rtt)],
    ]);
  }

  function show(out, ...nodes) {
    out.classList.remove("busy");
    out.removeAttribute("aria-busy");
    out.replaceChildren(...nodes);
  }

  function showError(out, e) {
    if (!(e instanceof ApiCallError)) e = new ApiCallError("client_error", String(e && e.message ? e.message : e), 0, null);
    const title = el("strong", { class: "code" }, e.code);
    const detail = [];
    if (e.status) detail.push("HTTP " + e.status);
    if (e.rtt !== null && e.rtt !== undefined) detail.push(ms(e.rtt));
    if (e.requestId) detail.push("request " + e.requestId);
    show(
      out,
      el("div", { class: "error", role: "alert" },
        title, detail.length ? el("span", { class: "detail" }, " (" + detail.join(", ") + ")") : null,
        el("p", { class: "message" }, e.message)),
    );
  }

  // Runs one action: disables its button, marks the output busy, renders the result or the error.
  async function run(button, out, action) {
    button.disabled = true;
    out.classList.add("busy");
    out.setAttribute("aria-busy", "true");
    try {
      show(out, ...(await action()));
    } catch (e) {
      showError(out, e);
    } finally {
      button.disabled = false;
    }
  }

  // ---- models -------------------------------------------------------------------------

  async function loadModels() {
    const select = $("model");
    const info = $("model-info");
    info.textContent = "loading the model list…";
    try {
      const { data } = await call("GET", "v1/models");
      state.models = Array.isArray(data) ? data : [];
      const previous = select.value;
      select.replaceChildren(el("option", { value: "" }, "(server default)"));
      for (const m of state.models) {
        const label = m.id + (m.default ? " (default)" : "") + (m.ready ? "" : " – loading");
        select.append(el("option", { value: m.id }, label));
      }
      const chosen = state.models.find((m) => m.id === previous) || state.models.find((m) => m.default);
      select.value = chosen ? chosen.id : "";
      info.textContent = state.models.length ? "" : "the server lists no models yet (still loading?)";
    } catch (e) {
      info.textContent = "could not load the model list: " + e.code + ": " + e.message;
    }
    updateModelInfo();
  }

  function currentModel() {
    const id = $("model").value;
    return state.models.find((m) => m.id === id) || state.models.find((m) => m.default) || null;
  }

  function updateModelInfo() {
    const m = currentModel();
    const select = $("compute");
    const previous = select.value;
    const levels = m && m.levels ? Object.entries(m.levels) : LEVELS.map((n) => [n, null]);
    levels.sort((a, b) => (b[1] ? b[1].flops_ratio : 0) - (a[1] ? a[1].flops_ratio : 0));
    select.replaceChildren(el("option", { value: "auto" }, "auto (most accurate level that meets the deadline)"));
    for (const [name, p] of levels) {
      const label = p ? name + " (" + Number(p.flops_ratio).toFixed(2) + "× FLOPs)" : name;
      select.append(el("option", { value: name }, label));
    }
    select.value = [...select.options].some((o) => o.value === previous) ? previous : "auto";
    if (m && m.description) {
      // the selected model's own account of its domain replaces the default's in the notice
      const size = m.image_size ? " Input: " + m.image_size + "×" + m.image_size + " pixels." : "";
      const answers = m.answer_vocabulary === "closed" && m.answers ? " Answers: " + m.answers.join(", ") + "." : "";
      $("domain-text").textContent = m.description + size + answers;
    }
    if (m && !$("model-info").textContent) {
      const backend = m.backend && m.backend.runtime ? m.backend.runtime + "/" + (m.backend.device || "?") : "";
      $("model-info").textContent = [m.tasks.join(", "), backend, m.precision].filter(Boolean).join(" · ");
    }
  }

  // ---- image --------------------------------------------------------------------------

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error || new Error("could not read the file"));
      reader.readAsDataURL(file);
    });
  }

  async function onImage() {
    const file = $("image-file").files[0];
    const out = $("image-out");
    state.image = null;
    state.name = null;
    $("preview-box").hidden = true;
    out.replaceChildren();
    // answers and captions belong to the previous image (the gallery results stay)
    $("vqa-out").replaceChildren();
    $("caption-out").replaceChildren();
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(out, new ApiCallError("not_an_image", file.name + " is " + file.type + ", not an image", 0, null));
      return;
    }
    try {
      state.image = await readAsDataURL(file);
      state.name = file.name;
      $("preview").src = state.image;
      $("preview-caption").textContent = file.name + " · " + (file.size / 1024).toFixed(1) + " KiB";
      $("preview-box").hidden = false;
    } catch (e) {
      showError(out, new ApiCallError("read_error", e.message, 0, null));
    }
  }

  // ---- actions ------------------------------------------------------------------------

  async function ask() {
    const image = needImage();
    const question = $("question").value.trim();
    if (!question) throw new ApiCallError("no_question", "type a question first", 0, null);
    const body = withDeadline(withModel({ image, question, top_k: 3, compute: $("compute").value }));
    const { data, rtt } = await call("POST", "vqa", body);
    const top = el("ol", { class: "topk", "aria-label": "Top answers" });
    for (const a of data.top_k || []) top.append(el("li", {}, a.answer + " ", el("span", { class: "score" }, pct(a.score))));
    return [
      el("p", { class: "answer" }, el("span", { class: "label" }, "Answer: "), el("span", { class: "value" }, data.answer),
        " ", el("span", { class: "score" }, pct(data.score))),
      top,
      ...(data.warnings || []).map((w) => el("p", { class: "warning", role: "status" }, "⚠ " + w)),
      computeMeta(data.compute, data.latency_ms, rtt),
      el("p", { class: "hint" }, "model " + data.model),
    ];
  }

  async function caption() {
    const body = withDeadline(withModel({ image: needImage() }));
    const { data, rtt } = await call("POST", "caption", body);
    return [
      el("p", { class: "answer caption" }, el("span", { class: "label" }, "Caption: "), el("span", { class: "value" }, data.caption)),
      computeMeta(data.compute, data.latency_ms, rtt),
      el("p", { class: "hint" }, "model " + data.model),
    ];
  }

  async function addToGallery() {
    const image = needImage();
    const body = withModel({ image, metadata: { name: state.name || "upload", source: "demo page" } });
    const { data, rtt } = await call("POST", "retrieval/index", body);
    state.thumbs.set(data.id, image);
    return [
      el("p", { class: "answer" }, "Added ", el("code", {}, data.id), " · the gallery has " + data.gallery_size + " image(s)."),
      meta([["Round trip", "rtt", ms(rtt)]]),
    ];
  }

  async function search() {
    const text = $("search-text").value.trim();
    if (!text) throw new ApiCallError("no_text", "type a search text first", 0, null);
    const body = withDeadline(withModel({ text, top_k: 5 }));
    const { data, rtt } = await call("POST", "retrieval/search", body);
    const nodes = [];
    if (!data.results.length) {
      nodes.push(el("p", { class: "answer empty" }, "No results: the gallery has " + data.gallery_size + " image(s)."));
    } else {
      const list = el("ol", { class: "results", "aria-label": "Search results" });
      for (const hit of data.results) {
        const thumb = state.thumbs.get(hit.id);
        const name = hit.metadata && hit.metadata.name ? String(hit.metadata.name) : null;
        list.append(
          el("li", { class: "result" },
            thumb ? el("img", { src: thumb, alt: name ? "Gallery image " + name : "Gallery image", class: "thumb" }) : null,
            el("span", { class: "rid" }, name ? name + " " : "", el("code", {}, hit.id)),
            el("span", { class: "score" }, "match " + pct(hit.score) + " · ITC " + Number(hit.itc_score).toFixed(3))),
        );
      }
      nodes.push(list);
    }
    nodes.push(meta([
      ["Gallery size", "gallery", String(data.gallery_size)],
      ["Server latency", "latency", ms(data.latency_ms)],
      ["Round trip", "rtt", ms(rtt)],
    ]));
    return nodes;
  }

  function bind(formId, buttonId, outId, action) {
    $(formId).addEventListener("submit", (ev) => {
      ev.preventDefault();
      run($(buttonId), $(outId), action);
    });
  }

  function init() {
    $("image-file").addEventListener("change", onImage);
    $("model").addEventListener("change", () => {
      $("model-info").textContent = "";
      updateModelInfo();
    });
    $("models-reload").addEventListener("click", loadModels);
    bind("vqa-form", "ask", "vqa-out", ask);
    bind("caption-form", "caption-btn", "caption-out", caption);
    bind("index-form", "index-btn", "index-out", addToGallery);
    bind("search-form", "search-btn", "search-out", search);
    if ($("image-file").files.length) onImage(); // a file the browser kept across a reload
    document.body.dataset.ready = "true";
    loadModels();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
