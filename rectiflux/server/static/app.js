// The page of `rectiflux serve`: a form for the native API (/api/...), a progress view fed by the job's
// server-sent events, and the history. Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const TOKEN_KEY = "rectiflux.token";
  const FINAL = new Set(["done", "failed", "cancelled", "interrupted"]);
  const PAGE = 50;
  // What each mode needs from the form. `imageField` is the settings key the uploaded image goes to.
  const MODES = {
    generate: { image: false, mask: false, strength: false },
    img2img: { image: true, mask: false, strength: true, imageField: "image", label: "Input image" },
    inpaint: { image: true, mask: true, strength: true, imageField: "image", label: "Input image" },
    fill: { image: true, mask: true, strength: true, imageField: "image", label: "Input image" },
    edit: { image: true, mask: false, strength: false, imageField: "image", label: "Reference image" },
    control: { image: true, mask: false, strength: false, imageField: "control_image", label: "Control image" },
  };
  const PAINT = [255, 70, 100]; // the mask as shown; exported as white
  const PAINT_CSS = `rgb(${PAINT.join(",")})`;

  const state = {
    info: null,
    ready: false,
    token: readToken(),
    mode: "generate",
    source: null, // the uploaded input image: {id, width, height}
    current: null, // the id of the job the progress view follows
    seen: new Map(), // job id -> last state seen, to refresh the history when one changes
    latest: new Map(), // job id -> the newest job object seen (answers and events may arrive out of order)
    cancelling: new Set(), // job ids whose cancel was asked for
    watching: new Set(), // job ids whose events are being read
    history: new Map(), // job id -> job, as listed by GET /api/jobs
    historyEnd: false,
    imageUrls: new Map(), // "token url" -> Promise of an object URL (only with a token)
    tool: "brush",
    painting: false,
    last: null,
  };

  class UserError extends Error {}

  class ApiError extends Error {
    constructor(status, message, retryAfter) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  function readToken() {
    try {
      return localStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // messages

  function showError(err) {
    if (err && err.name === "AbortError") return;
    const text = oneLine(err instanceof Error ? err.message : String(err));
    console.error(err);
    $("error-text").textContent = text;
    $("error").title = text;
    $("error").classList.remove("expanded");
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  let noticeTimer = 0;
  function notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  function oneLine(text) {
    return String(text).replace(/\s+/g, " ").trim() || "unknown error";
  }

  // Runs an async handler and shows whatever it throws: no error is dropped silently.
  function guard(fn) {
    return (...args) => {
      Promise.resolve().then(() => fn(...args)).catch(showError);
    };
  }

  // ---------------------------------------------------------------------------------------------------------
  // the API

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    return headers;
  }

  function describeDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      // FastAPI's validation errors: [{loc, msg, type}, ...]
      return detail.map((d) => {
        if (!d || typeof d !== "object") return String(d);
        const loc = Array.isArray(d.loc) ? d.loc.filter((x) => x !== "body").join(".") : "";
        return loc ? `${loc}: ${d.msg}` : String(d.msg);
      }).join("; ");
    }
    return detail == null ? "" : JSON.stringify(detail);
  }

  async function errorOf(res, method, path) {
    let detail = "";
    try {
      const text = await res.text();
      try {
        detail = describeDetail(JSON.parse(text).detail);
      } catch {
        detail = text.trim().slice(0, 300);
      }
    } catch {
      // the body could not be read: the status says enough
    }
    detail = detail || res.statusText || "request failed";
    const retry = res.headers.get("Retry-After");
    let message = `${res.status}: ${detail}`;
    if (res.status === 401) {
      askToken();
      message += state.token ? " (the saved token was refused; enter the right one above)"
        : " (this server needs a token; enter it above)";
    } else if (res.status === 429) {
      message = `${res.status}: ${detail}${retry ? ` (try again in ${retry} s)` : ""}`;
    }
    return new ApiError(res.status, `${message} [${method} ${path}]`, retry);
  }

  // fetch() with the token; returns the parsed JSON, or the response itself with raw: true.
  async function api(path, { method = "GET", json, form, raw = false, headers } = {}) {
    const h = authHeaders(headers);
    let body;
    if (json !== undefined) {
      h.set("Content-Type", "application/json");
      body = toJSON(json);
    } else if (form) {
      body = form;
    }
    let res;
    try {
      res = await fetch(path, { method, headers: h, body, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, `cannot reach the server (${err.message}) [${method} ${path}]`);
    }
    if (!res.ok) throw await errorOf(res, method, path);
    if (raw) return res;
    if (res.status === 204) return null;
    const text = await res.text();
    try {
      return parseJSON(text);
    } catch {
      throw new ApiError(res.status, `the server's answer is not JSON: ${text.slice(0, 120)} [${method} ${path}]`);
    }
  }

  // JSON with seeds beyond 2^53 kept exact: read as digit strings (where the browser gives the reviver the
  // source text), written from BigInt.
  function parseJSON(text) {
    return JSON.parse(text, (key, value, context) => {
      if (key === "seed" && typeof value === "number" && !Number.isSafeInteger(value)
          && context && /^\d+$/.test(context.source)) return context.source;
      return value;
    });
  }

  function toJSON(value) {
    return JSON.stringify(value, (key, v) => (typeof v === "bigint" ? `\u0000big${v}` : v))
      .replace(/"seed":"\\u0000big(\d+)"/g, '"seed":$1');
  }

  function fileForm(blob, name) {
    const form = new FormData();
    form.append("file", blob, name);
    return form;
  }

  // An <img> source for a URL of the API: the URL itself, or with a token an object URL of the image fetched
  // with the header (an <img> cannot send one).
  function imageSrc(url) {
    if (!state.token || url.startsWith("data:") || url.startsWith("blob:")) return Promise.resolve(url);
    const key = `${state.token} ${url}`;
    let p = state.imageUrls.get(key);
    if (!p) {
      p = api(url, { raw: true }).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
      p.catch(() => state.imageUrls.delete(key));
      state.imageUrls.set(key, p);
    }
    return p;
  }

  function loadImage(img, src) {
    return new Promise((resolve, reject) => {
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error(`the image ${src.startsWith("blob:") ? "" : src} did not load`));
      img.src = src;
    });
  }

  // ---------------------------------------------------------------------------------------------------------
  // the token

  function askToken() {
    $("auth").hidden = false;
    const input = $("token");
    if (!input.value) input.value = state.token;
    input.focus();
  }

  function saveToken(event) {
    event.preventDefault();
    state.token = $("token").value.trim();
    try {
      if (state.token) localStorage.setItem(TOKEN_KEY, state.token);
      else localStorage.removeItem(TOKEN_KEY);
    } catch {
      // private mode: the token lives as long as the page
    }
    $("auth").hidden = true;
    clearError();
    start();
  }

  // ---------------------------------------------------------------------------------------------------------
  // /api/info and the form's defaults

  async function loadInfo() {
    const info = await api("/api/info");
    state.info = info;
    const bits = [info.name, info.kind].filter(Boolean);
    $("model-name").textContent = bits.join(" · ") + (info.version ? ` · rectiflux ${info.version}` : "");
    if (info.auth && !state.token) askToken();

    const modes = Array.isArray(info.modes) && info.modes.length ? info.modes : ["generate"];
    for (const tab of document.querySelectorAll("#mode [data-mode]")) {
      tab.hidden = !modes.includes(tab.dataset.mode) || !MODES[tab.dataset.mode];
    }
    $("mode").hidden = modes.filter((m) => MODES[m]).length < 2;

    const limits = info.limits || {};
    if (limits.max_side) {
      $("width").max = limits.max_side;
      $("height").max = limits.max_side;
    }
    if (limits.max_images) $("num-images").max = limits.max_images;

    buildSizePresets();
    buildLoras();
  }

  function defaults() {
    return (state.info && state.info.defaults) || {};
  }

  function availableModes() {
    const modes = state.info && Array.isArray(state.info.modes) ? state.info.modes : ["generate"];
    return modes.filter((m) => MODES[m]);
  }

  function applyDefaults() {
    const d = defaults();
    const modes = availableModes();
    setMode(modes.includes(state.mode) ? state.mode : (modes.includes("generate") ? "generate" : modes[0]));
    $("negative-prompt").value = "";
    $("true-cfg").value = 1;
    setValue("steps", d.steps);
    setValue("guidance", d.guidance);
    setValue("strength", d.strength ?? 0.6);
    setValue("max-sequence-length", d.max_sequence_length);
    $("cache").value = "";
    $("seed").value = "";
    $("num-images").value = 1;
    selectSize(state.source && MODES[state.mode].image ? "source" : "default");
    for (const row of document.querySelectorAll("#lora-list .lora")) {
      row.querySelector(".lora-on").checked = row.dataset.active === "1";
      row.querySelector(".lora-scale").value = row.dataset.scale;
    }
    showStrength();
  }

  function setValue(id, value) {
    $(id).value = value == null ? "" : value;
  }

  function buildSizePresets() {
    const select = $("size-preset");
    const d = defaults();
    select.textContent = "";
    const dw = d.width;
    const dh = d.height;
    const presets = (state.info.presets || []).filter((p) => Array.isArray(p) && p.length === 2);
    const hasDefault = dw && dh && presets.some(([w, h]) => w === dw && h === dh);
    if (dw && dh && !hasDefault) presets.unshift([dw, dh]);
    for (const [w, h] of presets) {
      const isDefault = w === dw && h === dh;
      const option = new Option(`${w} × ${h}${isDefault ? " (default)" : ""}`, `${w},${h}`);
      if (isDefault) option.dataset.default = "1";
      select.add(option);
    }
    select.add(new Option("Input image size", "source"));
    select.add(new Option("Custom", "custom"));
  }

  // "default", "source", "custom" or "W,H"
  function selectSize(which) {
    const select = $("size-preset");
    if (which === "default") {
      const option = select.querySelector("option[data-default]");
      which = option ? option.value : "custom";
    }
    if (which === "source" && !MODES[state.mode].image) which = "default";
    select.value = which;
    sizeChanged();
  }

  function sizeChanged() {
    const value = $("size-preset").value;
    const fromSource = value === "source";
    $("width").disabled = fromSource;
    $("height").disabled = fromSource;
    if (fromSource) {
      setValue("width", state.source ? state.source.width : "");
      setValue("height", state.source ? state.source.height : "");
    } else if (value !== "custom") {
      const [w, h] = value.split(",").map(Number);
      $("width").value = w;
      $("height").value = h;
    }
  }

  // Width or height typed: the preset that matches, else "custom".
  function sizeTyped() {
    setSize($("width").value, $("height").value, false);
  }

  function setSize(w, h, write = true) {
    if (write) {
      $("width").value = w;
      $("height").value = h;
    }
    const value = `${Number(w)},${Number(h)}`;
    const select = $("size-preset");
    const match = [...select.options].some((o) => o.value === value);
    select.value = match ? value : "custom";
    $("width").disabled = false;
    $("height").disabled = false;
  }

  function buildLoras() {
    const list = $("lora-list");
    list.textContent = "";
    const loras = state.info.loras || [];
    $("loras").hidden = loras.length === 0;
    loras.forEach((lora, i) => {
      const row = document.createElement("div");
      row.className = "lora";
      row.dataset.name = lora.name;
      row.dataset.scale = lora.scale ?? 1;
      row.dataset.active = lora.active ? "1" : "0";
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.className = "lora-on";
      box.id = `lora-${i}`;
      box.checked = Boolean(lora.active);
      const name = document.createElement("span");
      name.className = "lora-name";
      name.textContent = lora.name;
      name.title = lora.name;
      label.append(box, name);
      const scale = document.createElement("input");
      scale.type = "number";
      scale.step = "0.05";
      scale.className = "lora-scale";
      scale.id = `lora-scale-${i}`;
      scale.value = lora.scale ?? 1;
      scale.setAttribute("aria-label", `scale of ${lora.name}`);
      row.append(label, scale);
      list.append(row);
    });
  }

  // ---------------------------------------------------------------------------------------------------------
  // modes and the input image

  function setMode(mode) {
    if (!MODES[mode]) return;
    state.mode = mode;
    const needs = MODES[mode];
    for (const tab of document.querySelectorAll("#mode [data-mode]")) {
      const on = tab.dataset.mode === mode;
      tab.classList.toggle("active", on);
      tab.setAttribute("aria-selected", on ? "true" : "false");
    }
    $("image-section").hidden = !needs.image;
    $("image-label").textContent = needs.label || "Input image";
    $("canvas-wrap").hidden = !(needs.image && state.source);
    $("mask-canvas").hidden = !needs.mask;
    $("mask-tools").hidden = !(needs.mask && state.source);
    $("mask-hint").hidden = !(needs.mask && state.source);
    showStrength();
    const select = $("size-preset");
    const sourceOption = select.querySelector("option[value=source]");
    if (sourceOption) sourceOption.hidden = !needs.image;
    if (!needs.image && select.value === "source") selectSize("default");
    else if (needs.image && state.source && select.querySelector("option[data-default]")
             && select.value === select.querySelector("option[data-default]").value) selectSize("source");
  }

  function showStrength() {
    $("strength-field").hidden = !MODES[state.mode].strength;
    $("strength-value").textContent = Number($("strength").value).toFixed(2);
  }

  async function uploadSource(file, fromInput = false) {
    if (file.type && !file.type.startsWith("image/")) throw new UserError(`${file.name} is not an image`);
    $("image-info").textContent = `Uploading ${file.name || "the image"}…`;
    let up;
    try {
      up = await api("/api/uploads", { method: "POST", form: fileForm(file, file.name || "image.png") });
    } catch (err) {
      $("image-info").textContent = "Choose or drop an image.";
      throw err;
    }
    if (!fromInput) $("image-input").value = ""; // it would name another file
    await showSource({ ...up, label: file.name });
    if (!MODES[state.mode].image) {
      const modes = availableModes();
      const target = ["img2img", "edit", "inpaint", "fill", "control"].find((m) => modes.includes(m));
      if (target) setMode(target);
    }
    selectSize("source");
  }

  // Shows an upload ({id, width?, height?, url?}) as the input image; the mask starts empty.
  async function showSource(up) {
    const img = $("source-image");
    const url = up.url || `/api/uploads/${encodeURIComponent(up.id)}`;
    await loadImage(img, await imageSrc(url));
    const width = up.width || img.naturalWidth;
    const height = up.height || img.naturalHeight;
    state.source = { id: up.id, width, height };
    const canvas = $("mask-canvas");
    canvas.width = width;
    canvas.height = height;
    maskContext().clearRect(0, 0, width, height);
    $("image-info").textContent = `${width} × ${height}${up.label ? ` · ${up.label}` : ""}`;
    setMode(state.mode);
    if ($("size-preset").value === "source") sizeChanged();
  }

  // ---------------------------------------------------------------------------------------------------------
  // the mask: painted in PAINT on a transparent canvas of the image's size, shown half transparent over it

  function maskContext() {
    return $("mask-canvas").getContext("2d", { willReadFrequently: true });
  }

  function canvasPoint(event) {
    const canvas = $("mask-canvas");
    const rect = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * canvas.height) / rect.height,
    };
  }

  function brushWidth() {
    // the size is in screen pixels, whatever the image's size
    const canvas = $("mask-canvas");
    const rect = canvas.getBoundingClientRect();
    return (Number($("brush-size").value) * canvas.width) / Math.max(rect.width, 1);
  }

  function paint(a, b) {
    const ctx = maskContext();
    ctx.save();
    ctx.globalCompositeOperation = state.tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = PAINT_CSS;
    ctx.fillStyle = PAINT_CSS;
    ctx.lineWidth = brushWidth();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    if (a.x === b.x && a.y === b.y) {
      ctx.arc(a.x, a.y, ctx.lineWidth / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
      ctx.stroke();
    }
    ctx.restore();
  }

  function moveCursor(event) {
    const cursor = $("brush-cursor");
    const wrap = $("canvas-wrap").getBoundingClientRect();
    const size = Number($("brush-size").value);
    cursor.style.width = `${size}px`;
    cursor.style.height = `${size}px`;
    cursor.style.left = `${event.clientX - wrap.left - size / 2}px`;
    cursor.style.top = `${event.clientY - wrap.top - size / 2}px`;
    cursor.classList.toggle("erasing", state.tool === "eraser");
    cursor.hidden = false;
  }

  function setupMask() {
    const canvas = $("mask-canvas");
    canvas.addEventListener("pointerdown", (event) => {
      if (event.button !== 0 || !state.source) return;
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      state.painting = true;
      state.last = canvasPoint(event);
      paint(state.last, state.last);
    });
    canvas.addEventListener("pointermove", (event) => {
      moveCursor(event);
      if (!state.painting) return;
      const point = canvasPoint(event);
      paint(state.last, point);
      state.last = point;
    });
    const stop = () => { state.painting = false; };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
    canvas.addEventListener("pointerleave", () => { $("brush-cursor").hidden = true; });

    const pick = (tool) => {
      state.tool = tool;
      $("brush").setAttribute("aria-pressed", tool === "brush" ? "true" : "false");
      $("eraser").setAttribute("aria-pressed", tool === "eraser" ? "true" : "false");
    };
    $("brush").addEventListener("click", () => pick("brush"));
    $("eraser").addEventListener("click", () => pick("eraser"));
    $("brush-size").addEventListener("input", () => {
      $("brush-size-value").textContent = $("brush-size").value;
    });
    $("clear-mask").addEventListener("click", () => {
      maskContext().clearRect(0, 0, canvas.width, canvas.height);
    });
    $("invert-mask").addEventListener("click", () => {
      const ctx = maskContext();
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
      const px = data.data;
      for (let i = 0; i < px.length; i += 4) {
        const on = px[i + 3] < 128;
        px[i] = PAINT[0];
        px[i + 1] = PAINT[1];
        px[i + 2] = PAINT[2];
        px[i + 3] = on ? 255 : 0;
      }
      ctx.putImageData(data, 0, 0);
    });
  }

  function maskIsEmpty() {
    const canvas = $("mask-canvas");
    const px = maskContext().getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i] >= 128) return false;
    return true;
  }

  // The mask as the API takes it: a PNG of the image's size, white where to repaint, black elsewhere.
  function maskBlob() {
    const canvas = $("mask-canvas");
    const { width, height } = canvas;
    const src = maskContext().getImageData(0, 0, width, height).data;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const octx = out.getContext("2d");
    const image = octx.createImageData(width, height);
    const px = image.data;
    for (let i = 0; i < px.length; i += 4) {
      const v = src[i + 3] >= 128 ? 255 : 0;
      px[i] = v;
      px[i + 1] = v;
      px[i + 2] = v;
      px[i + 3] = 255;
    }
    octx.putImageData(image, 0, 0);
    return new Promise((resolve, reject) => {
      out.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the mask could not be encoded"))), "image/png");
    });
  }

  // A mask upload (white = repaint) painted back onto the canvas.
  async function showMask(id) {
    const canvas = $("mask-canvas");
    const img = await loadImage(new Image(), await imageSrc(`/api/uploads/${encodeURIComponent(id)}`));
    const tmp = document.createElement("canvas");
    tmp.width = canvas.width;
    tmp.height = canvas.height;
    const tctx = tmp.getContext("2d", { willReadFrequently: true });
    tctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    const data = tctx.getImageData(0, 0, canvas.width, canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const lum = 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
      const on = lum >= 128 && px[i + 3] >= 128;
      px[i] = PAINT[0];
      px[i + 1] = PAINT[1];
      px[i + 2] = PAINT[2];
      px[i + 3] = on ? 255 : 0;
    }
    maskContext().putImageData(data, 0, 0);
  }

  // ---------------------------------------------------------------------------------------------------------
  // the settings: form -> JSON -> form

  function numberField(id, label, { integer = false, min } = {}) {
    const text = $(id).value.trim();
    if (text === "") return undefined;
    const n = Number(text);
    if (!Number.isFinite(n)) throw new UserError(`${label}: "${text}" is not a number`);
    if (integer && !Number.isInteger(n)) throw new UserError(`${label}: ${text} is not a whole number`);
    if (min !== undefined && n < min) throw new UserError(`${label} must be at least ${min}`);
    return n;
  }

  async function buildSettings() {
    const needs = MODES[state.mode];
    const prompt = $("prompt").value.trim();
    if (!prompt) throw new UserError("write a prompt first");
    const s = { mode: state.mode, prompt };
    const negative = $("negative-prompt").value.trim();
    if (negative) s.negative_prompt = negative;
    const cfg = numberField("true-cfg", "True CFG");
    if (cfg !== undefined) s.true_cfg = cfg;

    const seedText = $("seed").value.trim();
    if (seedText === "") {
      s.seed = null;
    } else {
      if (!/^\d+$/.test(seedText)) {
        throw new UserError(`seed: "${seedText}" is not a whole number (leave it empty for a random one)`);
      }
      const seed = BigInt(seedText);
      if (seed >= 2n ** 64n) throw new UserError(`seed: ${seedText} is larger than the largest seed, 2^64 - 1`);
      s.seed = seed <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(seed) : seed;
    }
    const optional = [
      ["steps", "steps", "Steps", { integer: true, min: 1 }],
      ["guidance", "guidance", "Guidance", {}],
      ["num_images", "num-images", "Images", { integer: true, min: 1 }],
      ["max_sequence_length", "max-sequence-length", "Max T5 tokens", { integer: true, min: 1 }],
      ["cache", "cache", "Step cache", { min: 0 }],
    ];
    for (const [key, id, label, opts] of optional) {
      const v = numberField(id, label, opts);
      if (v !== undefined) s[key] = v;
    }
    if ($("size-preset").value !== "source") {
      const w = numberField("width", "Width", { integer: true, min: 1 });
      const h = numberField("height", "Height", { integer: true, min: 1 });
      if (w !== undefined) s.width = w;
      if (h !== undefined) s.height = h;
    }
    if (needs.strength) s.strength = Number($("strength").value);
    if (state.info && (state.info.loras || []).length) {
      s.loras = [];
      for (const row of document.querySelectorAll("#lora-list .lora")) {
        if (!row.querySelector(".lora-on").checked) continue;
        const scaleText = row.querySelector(".lora-scale").value.trim();
        const scale = scaleText === "" ? Number(row.dataset.scale) : Number(scaleText);
        if (!Number.isFinite(scale)) throw new UserError(`LoRA ${row.dataset.name}: the scale is not a number`);
        s.loras.push({ name: row.dataset.name, scale });
      }
    }
    if (needs.image) {
      if (!state.source) throw new UserError(`${state.mode} needs an image: upload one first`);
      s[needs.imageField] = state.source.id;
    }
    if (needs.mask) {
      if (maskIsEmpty()) throw new UserError("paint the mask first: the parts to repaint");
      const up = await api("/api/uploads", { method: "POST", form: fileForm(await maskBlob(), "mask.png") });
      s.mask = up.id;
    }
    return s;
  }

  // Fills the form from settings (a job's, or a PNG's recipe); what is left out takes the model's default.
  async function applySettings(s) {
    if (!s || typeof s !== "object") throw new UserError("these settings are empty");
    const problems = [];
    const mode = s.mode || "generate";
    if (availableModes().includes(mode)) state.mode = mode;
    else problems.push(`this model cannot run mode "${mode}"`);
    applyDefaults();
    $("prompt").value = s.prompt ?? "";
    $("negative-prompt").value = s.negative_prompt ?? "";
    if (s.negative_prompt || (s.true_cfg && s.true_cfg > 1)) $("negative-box").open = true;
    if (s.true_cfg != null) $("true-cfg").value = s.true_cfg;
    $("seed").value = s.seed == null ? "" : String(s.seed);
    for (const [key, id] of [["steps", "steps"], ["guidance", "guidance"], ["num_images", "num-images"],
      ["max_sequence_length", "max-sequence-length"], ["cache", "cache"], ["strength", "strength"]]) {
      if (s[key] != null) $(id).value = s[key];
    }
    if (s.max_sequence_length != null || s.cache != null) $("advanced").open = true;
    showStrength();
    if (Array.isArray(s.loras)) {
      const rows = [...document.querySelectorAll("#lora-list .lora")];
      for (const row of rows) row.querySelector(".lora-on").checked = false;
      for (const lora of s.loras) {
        const row = rows.find((r) => r.dataset.name === lora.name);
        if (!row) {
          problems.push(`LoRA "${lora.name}" is not on this server`);
          continue;
        }
        row.querySelector(".lora-on").checked = true;
        if (lora.scale != null) row.querySelector(".lora-scale").value = lora.scale;
      }
    }
    const needs = MODES[state.mode];
    const imageId = needs.image ? s[needs.imageField] : null;
    if (imageId) {
      try {
        $("image-input").value = "";
        await showSource({ id: imageId });
        if (needs.mask && s.mask) await showMask(s.mask);
      } catch (err) {
        problems.push(`the input image ${imageId} could not be shown: ${err.message}`);
      }
    }
    if (s.width != null && s.height != null) setSize(s.width, s.height);
    else selectSize(needs.image && state.source ? "source" : "default");
    if (problems.length) showError(problems.join("; "));
  }

  // ---------------------------------------------------------------------------------------------------------
  // jobs: submit, follow through the server-sent events, cancel

  async function generate(event) {
    if (event) event.preventDefault();
    clearError();
    const button = $("generate");
    button.disabled = true;
    let job;
    try {
      const settings = await buildSettings();
      job = await api("/api/jobs", { method: "POST", json: settings });
    } finally {
      button.disabled = false;
    }
    follow(job);
    scheduleHistory();
  }

  function follow(job) {
    state.current = job.id;
    const preview = $("preview");
    preview.hidden = true;
    preview.removeAttribute("src");
    $("results").textContent = "";
    $("progress").value = 0;
    onJob(state.latest.get(job.id) || job);
    if (!state.watching.has(job.id)) {
      state.watching.add(job.id);
      watch(job.id).catch(showError).finally(() => state.watching.delete(job.id));
    }
  }

  // Reads the job's events with fetch (EventSource cannot send the token), then makes sure of the last state.
  async function watch(id) {
    let last = null;
    try {
      const res = await api(`/api/jobs/${encodeURIComponent(id)}/events`,
        { raw: true, headers: { Accept: "text/event-stream" } });
      await readEvents(res, (type, data) => {
        if (type === "job") {
          last = parseJSON(data);
          onJob(last);
        } else if (type === "preview") {
          onPreview(id, parseJSON(data));
        }
      });
    } catch (err) {
      if (err instanceof ApiError && err.status >= 400 && err.status !== 404) throw err;
      console.warn("the events of job", id, "stopped:", err);
    }
    // the stream ended (or broke) before the job's end: ask until it has one
    let failures = 0;
    while (!last || !FINAL.has(last.state)) {
      await sleep(last ? 500 : 0);
      try {
        last = await api(`/api/jobs/${encodeURIComponent(id)}`);
        failures = 0;
        onJob(last);
      } catch (err) {
        if ((err instanceof ApiError && err.status >= 400) || ++failures > 10) throw err;
        await sleep(1000);
      }
    }
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // A text/event-stream parser: `event:` and `data:` lines, a blank line ends an event.
  async function readEvents(res, handle) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let type = "message";
    let data = [];
    const dispatch = () => {
      if (data.length) {
        try {
          handle(type, data.join("\n"));
        } catch (err) {
          showError(err);
        }
      }
      type = "message";
      data = [];
    };
    const line = (text) => {
      if (text === "") return dispatch();
      if (text.startsWith(":")) return undefined; // a comment (keep-alive)
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
      return undefined;
    };
    const drain = (final) => {
      for (;;) {
        const i = buffer.search(/[\r\n]/);
        if (i < 0) break;
        if (buffer[i] === "\r" && i === buffer.length - 1 && !final) break; // maybe half of \r\n
        const skip = buffer[i] === "\r" && buffer[i + 1] === "\n" ? 2 : 1;
        line(buffer.slice(0, i));
        buffer = buffer.slice(i + skip);
      }
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      drain(false);
    }
    buffer += decoder.decode();
    drain(true);
    if (buffer) line(buffer);
    dispatch();
  }

  const RANK = { queued: 0, running: 1 };
  function rank(job) {
    return RANK[job.state] ?? 2;
  }

  function onJob(job) {
    const prev = state.latest.get(job.id);
    if (prev) {
      const older = rank(job) < rank(prev)
        || (rank(job) === rank(prev) && rank(job) < 2 && (job.step || 0) < (prev.step || 0));
      if (older) return; // an answer older than one already shown
    }
    state.latest.set(job.id, job);
    if (job.id === state.current) renderStage(job);
    if (state.seen.get(job.id) !== job.state) {
      const before = state.seen.get(job.id);
      state.seen.set(job.id, job.state);
      if (before !== undefined || FINAL.has(job.state)) scheduleHistory();
      if (job.state === "failed" && before !== undefined) {
        showError(`job ${job.id} failed: ${job.error || "no reason given"}`);
      }
    }
  }

  function onPreview(id, data) {
    if (id !== state.current || !data || !data.image) return;
    if (FINAL.has(state.seen.get(id))) return;
    const results = $("results");
    if (results.children.length) { // an image of the history was being looked at
      results.textContent = "";
      results.dataset.job = "";
    }
    const preview = $("preview");
    preview.src = data.image;
    preview.hidden = false;
    $("viewer-empty").hidden = true;
    if (data.step != null) preview.title = `preview at step ${data.step}`;
  }

  function renderStage(job) {
    const progress = job.progress != null ? job.progress : (job.steps ? job.step / job.steps : 0);
    $("progress").value = Math.max(0, Math.min(1, progress || 0));
    $("cancel").disabled = FINAL.has(job.state) || state.cancelling.has(job.id);
    $("status").textContent = statusText(job) + (state.cancelling.has(job.id) && !FINAL.has(job.state)
      ? " · cancelling…" : "");
    $("status").dataset.state = job.state;
    const warnings = job.warnings || [];
    $("warnings").hidden = warnings.length === 0;
    $("warnings").textContent = warnings.map((w) => `Warning: ${w}`).join(" · ");
    $("warnings").title = warnings.join("\n");
    if (job.state === "done") {
      $("preview").hidden = true;
      showResults(job);
    } else if (FINAL.has(job.state)) {
      $("preview").hidden = true;
      $("viewer-empty").hidden = $("results").children.length > 0;
      if (!$("results").children.length) $("viewer-empty").textContent = `No image: the job was ${job.state}.`;
    } else if ($("preview").hidden) {
      $("viewer-empty").hidden = false;
      $("viewer-empty").textContent = job.state === "queued" ? "Waiting in the queue…" : "Starting…";
    }
  }

  function statusText(job) {
    const steps = job.steps ? ` · step ${job.step || 0} of ${job.steps}` : "";
    switch (job.state) {
      case "queued":
        return `Queued${job.position ? `, position ${job.position}` : ""}`;
      case "running":
        return `Running${steps} · ${Math.round((job.progress || 0) * 100)}%`;
      case "done": {
        const n = (job.images || []).length;
        const secs = job.started && job.finished ? ` in ${(job.finished - job.started).toFixed(1)} s` : "";
        return `Done: ${n} image${n === 1 ? "" : "s"}${secs}`;
      }
      case "failed":
        return `Failed: ${job.error || "no reason given"}`;
      case "cancelled":
        return `Cancelled${steps}`;
      case "interrupted":
        return "Interrupted (the server stopped while the job was waiting or running)";
      default:
        return job.state;
    }
  }

  function showResults(job, only) {
    const box = $("results");
    if (box.dataset.job === job.id && box.dataset.only === String(only ?? "") && box.children.length) return;
    box.textContent = "";
    box.dataset.job = job.id;
    box.dataset.only = String(only ?? "");
    const images = job.images || [];
    images.forEach((image, k) => {
      if (only != null && k !== only) return;
      box.append(imageFigure(job, image, k, "result"));
    });
    const n = box.children.length;
    const cols = Math.min(n, n === 4 ? 2 : 4) || 1;
    box.style.setProperty("--cols", cols);
    box.style.setProperty("--rows", Math.ceil(n / cols) || 1);
    $("viewer-empty").hidden = box.children.length > 0;
  }

  function seedOf(job, k) {
    const seed = job.settings && job.settings.seed;
    if (typeof seed === "number" && Number.isSafeInteger(seed + k)) return seed + k;
    if (typeof seed === "number" || (typeof seed === "string" && /^\d+$/.test(seed))) {
      return String(BigInt(seed) + BigInt(k));
    }
    return null;
  }

  // An image of a job with its download link; `kind` is "result" (the viewer) or "thumb" (the history).
  function imageFigure(job, image, k, kind) {
    const figure = document.createElement("figure");
    figure.className = kind;
    const img = document.createElement("img");
    img.alt = (job.settings && job.settings.prompt) || image.name;
    img.dataset.name = image.name;
    img.decoding = "async";
    const seed = seedOf(job, k);
    img.title = seed != null ? `seed ${seed}` : image.name;
    img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < 256));
    const link = document.createElement("a");
    link.className = "download";
    link.download = image.name;
    link.textContent = "Download";
    link.href = image.url;
    imageSrc(image.url).then((src) => {
      img.src = src;
      link.href = src;
    }).catch(showError);
    const caption = document.createElement("figcaption");
    const label = document.createElement("span");
    label.className = "seed";
    label.textContent = seed != null ? `seed ${seed}` : image.name;
    caption.append(label, link);
    if (kind === "thumb") {
      img.tabIndex = 0;
      const show = () => {
        showResults(job, k);
        $("preview").hidden = true;
        $("status").textContent = `${image.name} (${statusText(job)})`;
      };
      img.addEventListener("click", show);
      img.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          show();
        }
      });
      const use = document.createElement("button");
      use.type = "button";
      use.className = "use-input link-button";
      use.textContent = "As input";
      use.title = "use this image as the input image";
      use.addEventListener("click", guard(async () => {
        const res = await api(image.url, { raw: true });
        const blob = await res.blob();
        await uploadSource(new File([blob], image.name, { type: blob.type || "image/png" }));
        notice(`${image.name} is the input image`);
      }));
      caption.append(use);
    }
    figure.append(img, caption);
    return figure;
  }

  async function cancel() {
    const id = state.current;
    if (!id) return;
    state.cancelling.add(id);
    $("cancel").disabled = true;
    try {
      const job = await api(`/api/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      onJob(job);
    } catch (err) {
      state.cancelling.delete(id);
      if (id === state.current && state.latest.has(id)) renderStage(state.latest.get(id));
      throw err;
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // the history

  let historyTimer = 0;
  let historyBusy = null;
  function scheduleHistory() {
    clearTimeout(historyTimer);
    historyTimer = setTimeout(() => refreshHistory().catch(showError), 100);
  }

  async function refreshHistory(older = false) {
    if (historyBusy) await historyBusy.catch(() => {});
    historyBusy = (async () => {
      const offset = older ? state.history.size : 0;
      const data = await api(`/api/jobs?limit=${PAGE}&offset=${offset}`);
      const jobs = (data && data.jobs) || [];
      for (const job of jobs) {
        state.history.set(job.id, job);
        if (!state.seen.has(job.id)) state.seen.set(job.id, job.state);
      }
      if (older || state.history.size <= PAGE) state.historyEnd = jobs.length < PAGE;
      renderHistory();
    })();
    try {
      await historyBusy;
    } finally {
      historyBusy = null;
    }
  }

  function renderHistory() {
    const gallery = $("gallery");
    const jobs = [...state.history.values()].sort((a, b) => (b.created || 0) - (a.created || 0)
      || String(b.id).localeCompare(String(a.id)));
    const old = new Map([...gallery.children].map((card) => [card.dataset.job, card]));
    const cards = jobs.map((job) => {
      const signature = `${job.state}|${(job.images || []).length}|${job.error || ""}`;
      const card = old.get(job.id);
      if (card && card.dataset.signature === signature) return card;
      const fresh = jobCard(job);
      fresh.dataset.signature = signature;
      return fresh;
    });
    gallery.replaceChildren(...cards);
    if (!jobs.length) {
      const empty = document.createElement("p");
      empty.className = "empty";
      empty.textContent = "No jobs yet.";
      gallery.append(empty);
    }
    $("more").hidden = state.historyEnd;
  }

  function recipeLine(s, job) {
    const bits = [];
    bits.push(s.mode || "generate");
    if (s.width && s.height) bits.push(`${s.width}×${s.height}`);
    else if (s.image) bits.push("input size");
    if (s.steps != null) bits.push(`${s.steps} steps`);
    if (s.guidance != null) bits.push(`guidance ${s.guidance}`);
    if (s.seed != null) bits.push(`seed ${s.seed}`);
    if (s.strength != null && MODES[s.mode] && MODES[s.mode].strength) bits.push(`strength ${s.strength}`);
    if (s.true_cfg != null && s.true_cfg > 1) bits.push(`true CFG ${s.true_cfg}`);
    if (s.num_images > 1) bits.push(`${s.num_images} images`);
    if (Array.isArray(s.loras) && s.loras.length) {
      bits.push(`LoRA ${s.loras.map((l) => `${l.name}:${l.scale}`).join(", ")}`);
    }
    if (job.origin && job.origin !== "api") bits.push(`via ${job.origin}`);
    return bits.join(" · ");
  }

  function jobCard(job) {
    const s = job.settings || {};
    const card = document.createElement("article");
    card.className = `job state-${job.state}`;
    card.dataset.job = job.id;

    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    (job.images || []).forEach((image, k) => thumbs.append(imageFigure(job, image, k, "thumb")));
    if (!(job.images || []).length) {
      const none = document.createElement("div");
      none.className = "no-image";
      none.textContent = job.state;
      thumbs.append(none);
    }

    const body = document.createElement("div");
    body.className = "job-body";
    const prompt = document.createElement("p");
    prompt.className = "recipe-prompt";
    prompt.textContent = s.prompt || "(no prompt)";
    prompt.title = s.prompt || "";
    const meta = document.createElement("p");
    meta.className = "recipe";
    meta.textContent = recipeLine(s, job);
    body.append(prompt, meta);
    if (s.negative_prompt) {
      const neg = document.createElement("p");
      neg.className = "recipe";
      neg.textContent = `not: ${s.negative_prompt}`;
      body.append(neg);
    }
    if ((job.warnings || []).length) {
      const warn = document.createElement("p");
      warn.className = "badge badge-warning";
      const n = job.warnings.length;
      warn.textContent = `${n} warning${n === 1 ? "" : "s"}: ${job.warnings.join(" · ")}`;
      warn.title = job.warnings.join("\n");
      body.append(warn);
    }
    if (job.state !== "done") {
      const badge = document.createElement("p");
      badge.className = `badge badge-${job.state}`;
      badge.textContent = job.error ? `${job.state}: ${job.error}` : job.state;
      badge.title = badge.textContent;
      body.append(badge);
    }
    const details = document.createElement("details");
    details.className = "recipe-json";
    const summary = document.createElement("summary");
    summary.textContent = "All settings";
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(s, null, 1);
    details.append(summary, pre);

    const actions = document.createElement("div");
    actions.className = "job-actions";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "reuse";
    reuse.textContent = "Use these settings again";
    reuse.addEventListener("click", guard(async () => {
      clearError();
      await applySettings(s);
      notice("The form holds this job's settings.");
      $("prompt").focus({ preventScroll: true });
      if (window.matchMedia("(max-width: 899px)").matches) $("form").scrollIntoView({ behavior: "smooth" });
    }));
    actions.append(reuse);
    if (!FINAL.has(job.state)) {
      const watchButton = document.createElement("button");
      watchButton.type = "button";
      watchButton.textContent = "Follow";
      watchButton.addEventListener("click", () => follow(job));
      actions.append(watchButton);
    }
    body.append(details, actions);
    card.append(thumbs, body);
    return card;
  }

  // ---------------------------------------------------------------------------------------------------------
  // drag and drop: a PNG dropped anywhere restores its recipe; onto the input image, it becomes the input

  async function restoreFromPng(file) {
    const name = file.name || "the file";
    if ((file.type && file.type !== "image/png") || (!file.type && !/\.png$/i.test(name))) {
      throw new UserError(`${name} is not a PNG: only a rectiflux PNG carries its settings`);
    }
    const data = await api("/api/png-info", { method: "POST", form: fileForm(file, file.name || "image.png") });
    if (!data || !data.settings) throw new UserError(`${name} carries no settings`);
    clearError();
    await applySettings(data.settings);
    notice(`Settings restored from ${name}.`);
  }

  function setupDrop() {
    const overlay = $("drop-overlay");
    let depth = 0;
    const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
    const onImageZone = (event) => !$("image-section").hidden
      && event.target instanceof Element && Boolean(event.target.closest("#image-section"));
    document.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      depth += 1;
      overlay.hidden = false;
    });
    document.addEventListener("dragleave", (event) => {
      if (!hasFiles(event)) return;
      depth = Math.max(0, depth - 1);
      if (!depth) overlay.hidden = true;
    });
    document.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      overlay.querySelector("span").textContent = onImageZone(event)
        ? "Drop the image to use it as the input" : "Drop a rectiflux PNG to restore its settings";
    });
    document.addEventListener("drop", (event) => {
      depth = 0;
      overlay.hidden = true;
      const files = event.dataTransfer ? event.dataTransfer.files : null;
      if (!files || !files.length) return;
      event.preventDefault();
      const file = files[0];
      if (onImageZone(event)) guard(uploadSource)(file);
      else guard(restoreFromPng)(file);
    });
  }

  // ---------------------------------------------------------------------------------------------------------
  // start

  function setup() {
    $("form").addEventListener("submit", guard(generate));
    $("form").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        guard(generate)();
      }
    });
    $("auth").addEventListener("submit", saveToken);
    $("error-close").addEventListener("click", clearError);
    // one line; a click shows all of it (a phone has no hover to show the title)
    $("error-text").addEventListener("click", () => $("error").classList.toggle("expanded"));
    $("cancel").addEventListener("click", guard(cancel));
    $("dice").addEventListener("click", () => {
      const buf = new Uint32Array(1);
      crypto.getRandomValues(buf);
      $("seed").value = String(buf[0]);
    });
    for (const tab of document.querySelectorAll("#mode [data-mode]")) {
      tab.addEventListener("click", () => setMode(tab.dataset.mode));
    }
    $("size-preset").addEventListener("change", sizeChanged);
    $("width").addEventListener("input", sizeTyped);
    $("height").addEventListener("input", sizeTyped);
    $("strength").addEventListener("input", showStrength);
    $("image-input").addEventListener("change", guard(async () => {
      const file = $("image-input").files[0];
      if (file) await uploadSource(file, true);
    }));
    $("reset").addEventListener("click", () => {
      applyDefaults();
      notice("The form holds the model's defaults.");
    });
    $("open-png").addEventListener("click", () => $("png-input").click());
    $("png-input").addEventListener("change", guard(async () => {
      const file = $("png-input").files[0];
      $("png-input").value = "";
      if (file) await restoreFromPng(file);
    }));
    $("refresh").addEventListener("click", guard(() => refreshHistory()));
    $("more").addEventListener("click", guard(() => refreshHistory(true)));
    window.addEventListener("unhandledrejection", (event) => showError(event.reason));
    setupMask();
    setupDrop();
  }

  async function start() {
    try {
      await loadInfo();
    } catch (err) {
      showError(err);
      return;
    }
    if (!state.ready) {
      applyDefaults();
      state.ready = true;
    }
    await refreshHistory().catch(showError);
    if (!state.current) {
      // a job still queued or running (the page was reloaded): follow the newest one
      const live = [...state.history.values()].filter((job) => !FINAL.has(job.state))
        .sort((a, b) => (b.created || 0) - (a.created || 0))[0];
      if (live) follow(live);
    }
    document.body.dataset.ready = "1";
  }

  setup();
  start();
})();
