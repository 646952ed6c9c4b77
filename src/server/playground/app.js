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
  configured: false, // the controls hold the document's defaults already
  key: "",          // the key the document was last loaded with
  guideSeq: 0,      // the latest guide pick (older /layout answers are dropped)
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

  const first = !state.configured;
  state.configured = true;
  const k = props.components || {};
  state.kmax = k.maximum || 1;
  const slider = $("k");
  slider.min = k.minimum || 1;
  slider.max = state.kmax;
  if (first) slider.value = k["x-lumen-default"] || state.kmax;
  $("k-out").textContent = slider.value;
  $("sweep").textContent = `K sweep 1…${state.kmax}`;

  for (const name of ["steps", "guidance_scale", "control_scale", "num_images", "width", "height", "seed"]) {
    const p = props[name] || {};
    const input = $(name);
    if (p.minimum !== undefined) input.min = p.minimum;
    if (p.maximum !== undefined) input.max = p.maximum;
    if (p.multipleOf !== undefined) input.step = p.multipleOf;
    if (first && p.default !== undefined && p.default !== null) input.value = p.default;
    input.title = (p.description || "").replace(/\s+/g, " ");
  }
  const sched = props.scheduler || {};
  const choices = ((sched.anyOf || []).find((s) => Array.isArray(s.enum)) || {}).enum || [];
  const select = $("scheduler");
  if (!first) return;
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

// A new guide: shown at once, kept for Generate only once /layout takes it.
// Of several quick picks, the last one wins.
async function setGuide(blob, name) {
  const seq = ++state.guideSeq;
  const b64 = toBase64(await blob.arrayBuffer());
  const guide = { b64, mime: blob.type || "image/png", name };
  const img = $("guide-img");
  img.src = `data:${guide.mime};base64,${b64}`;
  img.hidden = false;
  state.guide = null;
  showError(null);
  say("Computing the layout…");
  $("layout-img").hidden = true;
  try {
    const r = await postJson("/layout", { image: guide.b64 });
    if (seq !== state.guideSeq) return;
    state.guide = guide;
    const lay = $("layout-img");
    lay.src = `data:image/png;base64,${r.preview_png}`;
    lay.hidden = false;
    $("layout-caption").textContent = `Layout: ${r.grid[0]}×${r.grid[1]} patches, K = ${r.components}`;
    say(`Guide ${guide.name} ready: choose K and generate.`);
  } catch (e) {
    if (seq !== state.guideSeq) return;
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
      try {
        const res = await fetch(`/playground/examples/${name}.png`);
        if (!res.ok) throw new Error(`the example ${name} is missing (${res.status})`);
        const blob = await res.blob();
        $("prompt").value = caption;
        await setGuide(blob, `${name}.png`);
      } catch (e) {
        showError(e);
      }
    });
    box.append(b);
  }
}

// ---- generating -----------------------------------------------------------

function numberField(name) {
  const v = $(name).value.trim();
  return v === "" ? undefined : Number(v);
}

const MAX_SEED = 2 ** 53 - 1;

function requestBody() {
  const seedText = $("seed").value.trim();
  if (!$("seed-random").checked && !(/^\d+$/.test(seedText) && BigInt(seedText) <= BigInt(MAX_SEED))) {
    throw new Error(`The seed must be a whole number from 0 to ${MAX_SEED} (or tick "Random seed").`);
  }
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
  body.seed = $("seed-random").checked ? randomSeed() : Number(seedText);
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
  // The stream ended without a final event (a proxy, a restart): follow
  // the job's status until it is final.
  for (;;) {
    const st = await (await api(`/jobs/${encodeURIComponent(id)}`)).json();
    if (st.status === "succeeded") return { result: st.result };
    if (st.status === "failed" || st.status === "cancelled") {
      return { error: st.error, cancelled: st.status === "cancelled" };
    }
    onEvent({ event: "progress", data: { step: st.step, steps: st.steps, eta_s: st.eta_s } }, label);
    await new Promise((r) => setTimeout(r, 500));
  }
}

function onEvent(ev, label) {
  const d = ev.data;
  switch (ev.event) {
    case "queued":
      say(`${label}: queued (${d.position} ahead).`);
      return null;
    case "progress": {
      const p = $("progress");
      if (d.step === 0) say(`${label}: running.`);
      p.max = d.steps || 1;
      p.value = d.step || 0;
      p.dataset.step = String(d.step);
      // Steps go to the progress bar and this line, not to the live region
      // (a screen reader would read every one).
      const eta = typeof d.eta_s === "number" ? `, about ${d.eta_s.toFixed(1)} s left` : "";
      $("progress-text").textContent = `Step ${d.step} of ${d.steps}${eta}.`;
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
  $("preview").hidden = true;
  $("progress-text").textContent = "";
  const accepted = await postJson("/jobs", body);
  state.job = accepted.id;
  if (state.stopped) {
    // Cancel was pressed while the job was being created.
    await api(`/jobs/${encodeURIComponent(accepted.id)}`, { method: "DELETE" }).catch(() => {});
  }
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
  use.setAttribute("aria-label", `Use the image with seed ${img.seed} as the guide`);
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
  // Keep keyboard focus on a button that stays enabled.
  const focused = document.activeElement;
  $("generate").disabled = busy;
  $("sweep").disabled = busy;
  $("cancel").disabled = !busy;
  if (busy && (focused === $("generate") || focused === $("sweep"))) $("cancel").focus();
  if (!busy && focused === $("cancel")) $("generate").focus();
  if (!busy) {
    $("progress").value = 0;
  }
}

// The start of a run: the request body from the controls, the page busy;
// null (with the error shown) when the controls do not make a request.
function beginRun() {
  showError(null);
  if (!state.guide) { showError(new Error("Pick a guide image first.")); return null; }
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(e);
    return null;
  }
  state.stopped = false;
  setBusy(true);
  return body;
}

async function generate() {
  const body = beginRun();
  if (!body) return;
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
  const base = beginRun();
  if (!base) return;
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
    const key = $("api-key").value.trim();
    if (key === state.key) return;
    state.key = key;
    sessionStorage.setItem("lumen-key", key);
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
  if (saved) $("api-key").value = state.key = saved;
  $("seed").disabled = $("seed-random").checked;
  loadServer();
}

setup();
