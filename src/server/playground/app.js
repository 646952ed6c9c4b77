// The lumen playground: a guide image in, its layout shown, images out.
// Plain JavaScript against the public API only (/openapi.json for the
// model's limits and defaults, /layout, /jobs and its event stream); no
// build step and nothing from outside this server.

const $ = (id) => document.getElementById(id);

const state = {
  props: {},        // SynthesizeJson's properties from /openapi.json
  kmax: 1,
  guide: null,      // {b64, mime, name}
  job: null,        // the running job's id
  stream: null,     // its event stream's AbortController
  stopped: false,   // Cancel pressed: a K sweep stops too
  busy: false,
};

const EXAMPLES = [
  ["shapes-guide", "a red triangle and a green circle"],
  ["shapes-guide-2", "a red square and a magenta triangle"],
  ["shapes-guide-3", "a cyan square, a red circle and a magenta triangle"],
];

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ---- talking to the API -------------------------------------------------

function authHeaders(extra = {}) {
  const h = { ...extra };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (res.ok) return res;
  if (res.status === 401) showKeyField();
  let code = `http_${res.status}`;
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code;
      message = body.error.message;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  throw new ApiError(res.status, code, message);
}

async function postJson(path, body) {
  const res = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body),
  });
  return res.json();
}

// ---- messages -----------------------------------------------------------

function say(text) { $("status").textContent = text; }

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = err instanceof ApiError ? `${err.message} (${err.code})` : String(err.message || err);
}

function showKeyField() {
  $("key-field").hidden = false;
}

// ---- start: the server, its document, the controls -----------------------

async function loadServer() {
  try {
    const ready = await (await fetch("/ready")).json();
    $("model").textContent = `${ready.model} on ${ready.device} (${ready.dtype}), lumen ${ready.version}` +
      (ready.status === "ok" ? "" : ` — ${ready.status}`);
    if (ready.status === "loading") { setTimeout(loadServer, 1000); return; }
  } catch (e) {
    $("model").textContent = "the server does not answer";
  }
  try {
    const doc = await (await api("/openapi.json")).json();
    configure(doc);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      say("This server needs an API key: enter it, then pick a guide.");
    } else {
      showError(e);
    }
  }
}

function configure(doc) {
  const schemas = (doc.components || {}).schemas || {};
  const props = (schemas.SynthesizeJson || {}).properties || {};
  state.props = props;
  const needsKey = Object.values(doc.paths || {}).some((item) =>
    Object.values(item).some((op) => Array.isArray(op.security) && op.security.length > 0));
  if (needsKey) showKeyField();

  const k = props.components || {};
  state.kmax = k.maximum || 1;
  const slider = $("k");
  slider.min = k.minimum || 1;
  slider.max = state.kmax;
  slider.value = k["x-lumen-default"] || state.kmax;
  $("k-out").textContent = slider.value;
  $("sweep").textContent = `K sweep 1…${state.kmax}`;

  for (const name of ["steps", "guidance_scale", "control_scale", "num_images", "width", "height", "seed"]) {
    const p = props[name] || {};
    const input = $(name);
    if (p.minimum !== undefined) input.min = p.minimum;
    if (p.maximum !== undefined) input.max = p.maximum;
    if (p.multipleOf !== undefined) input.step = p.multipleOf;
    if (p.default !== undefined && p.default !== null) input.value = p.default;
    input.title = (p.description || "").replace(/\s+/g, " ");
  }
  const sched = props.scheduler || {};
  const choices = ((sched.anyOf || []).find((s) => Array.isArray(s.enum)) || {}).enum || [];
  const select = $("scheduler");
  select.replaceChildren();
  for (const c of choices) {
    const o = document.createElement("option");
    o.value = c;
    o.textContent = c + (c === sched.default ? " (model default)" : "");
    if (c === sched.default) o.selected = true;
    select.append(o);
  }
}

// ---- the guide ------------------------------------------------------------

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function fromBase64(b64, mime) {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return new Blob([bytes], { type: mime });
}

async function setGuide(blob, name) {
  const b64 = toBase64(await blob.arrayBuffer());
  state.guide = { b64, mime: blob.type || "image/png", name };
  const img = $("guide-img");
  img.src = `data:${state.guide.mime};base64,${b64}`;
  img.hidden = false;
  await showLayout();
}

async function showLayout() {
  if (!state.guide) return;
  showError(null);
  say("Computing the layout…");
  $("layout-img").hidden = true;
  try {
    const r = await postJson("/layout", { image: state.guide.b64 });
    const img = $("layout-img");
    img.src = `data:image/png;base64,${r.preview_png}`;
    img.hidden = false;
    $("layout-caption").textContent = `Layout: ${r.grid[0]}×${r.grid[1]} patches, K = ${r.components}`;
    say(`Guide ${state.guide.name} ready: choose K and generate.`);
  } catch (e) {
    showError(e);
    say("The guide was refused.");
  }
}

function setupGuideInputs() {
  $("guide-file").addEventListener("change", (ev) => {
    const f = ev.target.files[0];
    if (f) setGuide(f, f.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const f = ev.dataTransfer.files[0];
    if (f) setGuide(f, f.name);
  });
  const box = $("examples");
  for (const [name, caption] of EXAMPLES) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "example";
    b.setAttribute("aria-label", `Example guide: ${caption}`);
    const img = document.createElement("img");
    img.src = `/playground/examples/${name}.png`;
    img.alt = "";
    b.append(img);
    b.addEventListener("click", async () => {
      const res = await fetch(`/playground/examples/${name}.png`);
      $("prompt").value = caption;
      await setGuide(await res.blob(), `${name}.png`);
    });
    box.append(b);
  }
}

// ---- generating -----------------------------------------------------------

function numberField(name) {
  const v = $(name).value.trim();
  return v === "" ? undefined : Number(v);
}

function requestBody() {
  const body = {
    image: state.guide.b64,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    components: Number($("k").value),
    score: $("score").checked,
  };
  for (const name of ["steps", "guidance_scale", "control_scale", "num_images", "width", "height"]) {
    const v = numberField(name);
    if (v !== undefined) body[name] = v;
  }
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  body.seed = $("seed-random").checked ? randomSeed() : numberField("seed");
  return body;
}

function randomSeed() {
  return Math.floor(Math.random() * 2 ** 32);
}

function parseEvent(raw) {
  const ev = { event: "message", data: [] };
  for (const line of raw.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") ev.event = value;
    else if (field === "data") ev.data.push(value);
    else if (field === "id") ev.id = value;
  }
  if (ev.data.length === 0) return null;
  try { ev.data = JSON.parse(ev.data.join("\n")); } catch (_) { ev.data = {}; }
  return ev;
}

// Follow a job's events until its end: {result} or {error, cancelled}.
async function follow(id, steps, label) {
  const every = Math.max(1, Math.round(steps / 8));
  const ctrl = new AbortController();
  state.stream = ctrl;
  const res = await api(`/jobs/${encodeURIComponent(id)}/events?preview=${every}`, {
    headers: { Accept: "text/event-stream" },
    signal: ctrl.signal,
  });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const ev = parseEvent(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
        if (!ev) continue;
        const end = onEvent(ev, label);
        if (end) return end;
      }
    }
  } finally {
    ctrl.abort();
  }
  // The stream ended without a final event: ask for the status.
  const st = await (await api(`/jobs/${encodeURIComponent(id)}`)).json();
  if (st.status === "succeeded") return { result: st.result };
  return { error: st.error, cancelled: st.status === "cancelled" };
}

function onEvent(ev, label) {
  const d = ev.data;
  switch (ev.event) {
    case "queued":
      say(`${label}: queued (${d.position} ahead).`);
      return null;
    case "progress": {
      const p = $("progress");
      p.max = d.steps || 1;
      p.value = d.step || 0;
      const eta = typeof d.eta_s === "number" ? `, about ${d.eta_s.toFixed(1)} s left` : "";
      say(`${label}: step ${d.step} of ${d.steps}${eta}.`);
      return null;
    }
    case "preview": {
      const img = $("preview");
      img.src = `data:image/png;base64,${d.image}`;
      img.hidden = false;
      return null;
    }
    case "succeeded":
      return { result: d };
    case "failed":
      return { error: d.error };
    case "cancelled":
      return { error: d.error, cancelled: true };
    default:
      return null;
  }
}

async function runJob(body, label) {
  const accepted = await postJson("/jobs", body);
  state.job = accepted.id;
  $("cancel").disabled = false;
  try {
    const end = await follow(accepted.id, body.steps || state.props.steps?.default || 20, label);
    if (end.cancelled) {
      say(`${label}: cancelled.`);
      return null;
    }
    if (end.error) throw new ApiError(0, end.error.code, end.error.message);
    return end.result;
  } finally {
    state.job = null;
  }
}

function card(result, index, title) {
  const img = result.images[index];
  const p = result.parameters;
  const mime = `image/${p.format}`;
  const url = `data:${mime};base64,${img.data}`;
  const fig = document.createElement("figure");
  fig.className = "card";
  const pic = document.createElement("img");
  pic.src = url;
  pic.alt = `Generated image, seed ${img.seed}, K ${p.components}`;
  pic.dataset.seed = String(img.seed);
  fig.append(pic);
  const cap = document.createElement("figcaption");
  const lines = [
    title || `seed ${img.seed}`,
    `K ${p.components} · ${p.steps} steps · guidance ${p.guidance_scale} · control ${p.control_scale}`,
    `${p.width}×${p.height} · ${p.scheduler}`,
  ];
  if (typeof img.score === "number") lines.push(`score ${img.score.toFixed(3)}`);
  for (const l of lines) {
    const s = document.createElement("span");
    s.textContent = l;
    cap.append(s);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  const a = document.createElement("a");
  a.href = url;
  a.download = `lumen-seed${img.seed}-k${p.components}.${p.format === "jpeg" ? "jpg" : p.format}`;
  a.textContent = "Download";
  a.setAttribute("aria-label", `Download the image with seed ${img.seed}`);
  const use = document.createElement("button");
  use.type = "button";
  use.textContent = "Use as guide";
  use.addEventListener("click", async () => {
    await setGuide(fromBase64(img.data, mime), `seed ${img.seed}`);
    window.scrollTo({ top: 0, behavior: "smooth" });
  });
  actions.append(a, use);
  cap.append(actions);
  fig.append(cap);
  return fig;
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("sweep").disabled = busy;
  $("cancel").disabled = !busy;
  if (!busy) {
    $("progress").value = 0;
  }
}

async function generate() {
  if (!state.guide) { showError(new Error("Pick a guide image first.")); return; }
  showError(null);
  state.stopped = false;
  setBusy(true);
  const body = requestBody();
  try {
    const result = await runJob(body, "Generating");
    if (result) {
      const gallery = $("gallery");
      for (let i = result.images.length - 1; i >= 0; i--) gallery.prepend(card(result, i));
      say(`Done: ${result.images.length} image(s) in ${(result.timings.total_ms / 1000).toFixed(1)} s.`);
    }
  } catch (e) {
    showError(e);
    say("Generation failed.");
  } finally {
    setBusy(false);
  }
}

async function sweep() {
  if (!state.guide) { showError(new Error("Pick a guide image first.")); return; }
  showError(null);
  state.stopped = false;
  setBusy(true);
  const base = requestBody();
  base.num_images = 1;
  if (base.seed === undefined) base.seed = randomSeed();
  const row = $("sweep-row");
  row.replaceChildren();
  row.hidden = false;
  const head = document.createElement("h3");
  head.textContent = `K sweep, seed ${base.seed}: the same noise, more and more of the layout`;
  row.append(head);
  const strip = document.createElement("div");
  strip.className = "strip";
  row.append(strip);
  try {
    for (let k = 1; k <= state.kmax && !state.stopped; k++) {
      const result = await runJob({ ...base, components: k }, `K = ${k} of ${state.kmax}`);
      if (!result) break;
      strip.append(card(result, 0, `K = ${k}`));
    }
    say(state.stopped ? "Sweep stopped." : "Sweep done.");
  } catch (e) {
    showError(e);
    say("The sweep failed.");
  } finally {
    setBusy(false);
  }
}

async function cancel() {
  state.stopped = true;
  const id = state.job;
  if (!id) return;
  say("Cancelling…");
  try {
    await api(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (e) {
    showError(e);
  }
}

// ---- wiring ---------------------------------------------------------------

function setup() {
  setupGuideInputs();
  $("k").addEventListener("input", () => { $("k-out").textContent = $("k").value; });
  $("seed-random").addEventListener("change", () => { $("seed").disabled = $("seed-random").checked; });
  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); generate(); });
  $("sweep").addEventListener("click", sweep);
  $("cancel").addEventListener("click", cancel);
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("lumen-key", $("api-key").value);
    loadServer();
  });
  $("api-key").addEventListener("keydown", (ev) => {
    // Enter takes the key; it does not submit the form.
    if (ev.key === "Enter") {
      ev.preventDefault();
      $("api-key").dispatchEvent(new Event("change"));
    }
  });
  const saved = sessionStorage.getItem("lumen-key");
  if (saved) $("api-key").value = saved;
  loadServer();
}

setup();
