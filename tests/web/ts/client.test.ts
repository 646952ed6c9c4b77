// The generated TypeScript client, unmodified: types from openapi-typescript
// (gen/lumen.d.ts, made from the running server's /openapi.json by
// `npm run generate`) and openapi-fetch's client over them. Type-checked by
// `tsc` (so a request the document does not describe fails to build), then
// run against the server at LUMEN_URL with the guide image at GUIDE.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import createClient from "openapi-fetch";
import type { paths } from "./gen/lumen.js";

const base = process.env.LUMEN_URL;
const guidePath = process.env.GUIDE;
if (!base || !guidePath) throw new Error("set LUMEN_URL and GUIDE");
const guide = readFileSync(guidePath);
const guideB64 = guide.toString("base64");
// JSON answers are typed as JSON (the document also lists binary types,
// which `parseAs` asks for where they are wanted).
const client = createClient<paths, "application/json">({ baseUrl: base });

// A multipart body: the typed fields as text parts, the guide as a file part.
function form(body: Record<string, unknown>): FormData {
  const fd = new FormData();
  for (const [k, v] of Object.entries(body)) {
    if (v === undefined || v === null) continue;
    if (v instanceof Blob) fd.append(k, v, "guide.png");
    else fd.append(k, String(v));
  }
  return fd;
}
const guideBlob = new Blob([guide], { type: "image/png" });

async function bytes(b: Blob): Promise<Buffer> {
  return Buffer.from(await b.arrayBuffer());
}

// /synthesize answers 200 with images, or 202 with a job under
// `Prefer: respond-async`: the generated type is both; narrow it.
function synthesis<T extends object>(d: T | undefined): Extract<T, { images: unknown }> {
  assert.ok(d && "images" in d, `not a synthesis answer: ${JSON.stringify(d)}`);
  return d as Extract<T, { images: unknown }>;
}

function check(name: string) {
  console.log(`ok - ${name}`);
}

// /layout, JSON.
const layout = await client.POST("/layout", { body: { image: guideB64 } });
assert.equal(layout.response.status, 200, JSON.stringify(layout.error));
assert.ok(layout.data);
const kmax = layout.data.components;
assert.ok(layout.data.layout_id.length > 0);
check(`POST /layout JSON: layout ${layout.data.layout_id}, K ${kmax}, grid ${layout.data.grid}`);

// /layout, multipart: the same guide gives the same layout.
const layoutForm = await client.POST("/layout", {
  body: { image: guideBlob as unknown as string },
  bodySerializer: form,
});
assert.equal(layoutForm.response.status, 200, JSON.stringify(layoutForm.error));
assert.equal(layoutForm.data?.layout_id, layout.data.layout_id);
assert.equal(layoutForm.data?.data, layout.data.data);
check("POST /layout multipart: the same layout");

// /layout's binary answers: the preview PNG and the safetensors file.
const preview = await client.POST("/layout", {
  body: { image: guideB64 },
  headers: { Accept: "image/png" },
  parseAs: "blob",
});
assert.equal(preview.response.headers.get("content-type"), "image/png");
assert.ok(preview.data instanceof Blob);
assert.deepEqual((await bytes(preview.data)).toString("base64"), layout.data.preview_png);
const tensor = await client.POST("/layout", {
  body: { image: guideB64 },
  headers: { Accept: "application/octet-stream" },
  parseAs: "arrayBuffer",
});
assert.equal(tensor.response.status, 200);
const st = Buffer.from(tensor.data as ArrayBuffer);
const headerLen = Number(st.readBigUInt64LE(0));
const header = JSON.parse(st.subarray(8, 8 + headerLen).toString("utf8"));
assert.deepEqual(header.layout.shape, [kmax, ...layout.data.grid]);
check("POST /layout image/png and application/octet-stream answers");

// /synthesize with a JSON image.
const params = { prompt: "a red triangle and a green circle", seed: 11, steps: 4, components: kmax };
const byImage = await client.POST("/synthesize", { body: { ...params, image: guideB64 } });
assert.equal(byImage.response.status, 200, JSON.stringify(byImage.error));
const s1 = synthesis(byImage.data);
const first = s1.images[0];
assert.ok(first);
assert.equal(first.seed, 11);
check(`POST /synthesize JSON image: seed ${first.seed}, ${s1.parameters.width}x${s1.parameters.height}`);

// With the layout_id: the same image.
const byId = await client.POST("/synthesize", {
  body: { ...params, layout_id: layout.data.layout_id },
});
assert.equal(byId.response.status, 200, JSON.stringify(byId.error));
assert.equal(synthesis(byId.data).images[0]?.data, first.data);
check("POST /synthesize JSON layout_id: the same image");

// Multipart, with a score.
const byForm = await client.POST("/synthesize", {
  body: { ...params, image: guideBlob as unknown as string, score: true },
  bodySerializer: form,
});
assert.equal(byForm.response.status, 200, JSON.stringify(byForm.error));
const s3 = synthesis(byForm.data);
assert.equal(s3.images[0]?.data, first.data);
assert.equal(typeof s3.images[0]?.score, "number");
check(`POST /synthesize multipart: the same image, score ${s3.images[0]?.score}`);

// The raw image answer.
const raw = await client.POST("/synthesize", {
  body: { ...params, image: guideB64 },
  headers: { Accept: "image/png" },
  parseAs: "blob",
});
assert.equal(raw.response.status, 200);
assert.equal(raw.response.headers.get("x-lumen-seed"), "11");
assert.equal((await bytes(raw.data as Blob)).toString("base64"), first.data);
// Two images cannot be one raw answer: JSON, as the q-values allow.
const two = await client.POST("/synthesize", {
  body: { ...params, image: guideB64, num_images: 2 },
  headers: { Accept: "image/png, application/json;q=0.5" },
});
assert.equal(two.response.headers.get("content-type"), "application/json");
assert.deepEqual(synthesis(two.data).images.map((i) => i.seed), [11, 12]);
check("POST /synthesize image/png answer, and JSON for two images");

// Jobs: create, follow, fetch the image, read the events.
const job = await client.POST("/jobs", { body: { ...params, image: guideB64 } });
assert.equal(job.response.status, 202, JSON.stringify(job.error));
const id = job.data!.id;
let status = job.data!.status;
for (let i = 0; i < 600 && status !== "succeeded"; i++) {
  const got = await client.GET("/jobs/{id}", { params: { path: { id } } });
  assert.equal(got.response.status, 200);
  status = got.data!.status;
  assert.ok(!["failed", "cancelled"].includes(status), JSON.stringify(got.data));
  if (status !== "succeeded") await new Promise((r) => setTimeout(r, 100));
}
assert.equal(status, "succeeded");
const img = await client.GET("/jobs/{id}/images/{index}", {
  params: { path: { id, index: 0 } },
  parseAs: "blob",
});
assert.equal(img.response.status, 200);
assert.equal((await bytes(img.data as Blob)).toString("base64"), first.data);
const events = await client.GET("/jobs/{id}/events", { params: { path: { id } }, parseAs: "text" });
// The stream as a whole has no JSON type (each event has): text.
assert.match(String(events.data), /event: ?succeeded/);
const missing = await client.GET("/jobs/{id}/images/{index}", { params: { path: { id, index: 5 } } });
assert.equal(missing.response.status, 404);
assert.equal(missing.error?.error.code, "unknown_image");
check(`jobs: ${id} succeeded, its image equals /synthesize's, events end with succeeded`);

// Cancel a long job.
const long = await client.POST("/jobs", {
  body: { ...params, image: guideB64, steps: 400, num_images: 2 },
});
assert.equal(long.response.status, 202, JSON.stringify(long.error));
const cancelled = await client.DELETE("/jobs/{id}", { params: { path: { id: long.data!.id } } });
assert.equal(cancelled.response.status, 200);
assert.equal(cancelled.data?.status, "cancelled");
check("DELETE /jobs/{id}: cancelled");

// A typed error.
const bad = await client.POST("/synthesize", { body: { image: guideB64, steps: 0 } });
assert.equal(bad.response.status, 400);
assert.equal(bad.error?.error.code, "invalid_parameter");
check(`errors: ${bad.error?.error.message}`);
