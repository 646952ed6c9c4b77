"""The playground at `/` and Swagger UI at `/docs`, in headless Chromium.

Screenshots go to $SCREENSHOTS (default target/web-screenshots); the
README's are copies of these."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import httpx
import pytest

from conftest import API_KEY, GUIDE

# Every step the progress bar is set to (one mutation record per progress
# event, however many arrive in one chunk).
RECORD_STEPS = """
window.__steps = [];
document.addEventListener('DOMContentLoaded', () => {
  new MutationObserver((records) => {
    for (const r of records) window.__steps.push(Number(r.target.dataset.step));
  }).observe(document.getElementById('progress'), {attributes: true, attributeFilter: ['data-step']});
});
"""


def open_playground(page, url):
    page.add_init_script(RECORD_STEPS)
    page.goto(f"{url}/")
    # The controls are configured from /openapi.json once it has loaded.
    page.wait_for_function("() => document.getElementById('k').max !== '1'")


def png_text(png: bytes) -> dict[str, str]:
    """The tEXt/iTXt chunks of a PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = {}, 8
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        if kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            compressed, _method = rest[0], rest[1]
            _lang, _tkey, text = rest[2:].split(b"\0", 2)
            out[key.decode()] = (zlib.decompress(text) if compressed else text).decode()
        elif kind == b"tEXt":
            key, text = body.split(b"\0", 1)
            out[key.decode()] = text.decode("latin-1")
        pos += 12 + n
    return out


def test_generate_matches_the_api(page, server, screenshots):
    open_playground(page, server.url)
    kmax = json.loads(httpx.get(f"{server.url}/openapi.json").text)["components"]["schemas"][
        "SynthesizeJson"
    ]["properties"]["components"]["maximum"]
    assert page.get_by_label("Components K").get_attribute("max") == str(kmax)
    assert page.locator("#key-field").is_hidden()

    page.set_input_files("#guide-file", str(GUIDE))
    page.wait_for_selector("#layout-img:not([hidden])")
    assert "16×16 patches" in page.inner_text("#layout-caption")

    page.get_by_label("Components K").fill("3")
    page.get_by_label("Prompt", exact=True).fill("a red triangle and a green circle")
    page.get_by_label("Random seed").uncheck()
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_label("Steps").fill("12")
    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST") as req:
        page.get_by_role("button", name="Generate").click()
    body = req.value.post_data_json
    page.wait_for_selector("#gallery .card img")
    steps = page.evaluate("window.__steps")
    assert steps == list(range(13)), f"a progress event per step: {steps}"
    assert page.inner_text("#progress-text").startswith("Step 12 of 12")
    assert page.locator("#preview").is_visible()
    page.screenshot(path=str(screenshots / "playground.png"), full_page=True)

    # The same body straight to the API: the same bytes.
    assert body["seed"] == 7 and body["components"] == 3 and body["steps"] == 12
    api = httpx.post(f"{server.url}/synthesize", json=body, timeout=120).json()
    src = page.locator("#gallery .card img").first.get_attribute("src")
    assert src == f"data:image/png;base64,{api['images'][0]['data']}"
    caption = page.locator("#gallery .card figcaption").first.inner_text()
    assert "seed 7" in caption and "K 3" in caption and "score" in caption

    # The download is the PNG with its parameters.
    with page.expect_download() as dl:
        page.get_by_role("link", name="Download the image with seed 7").click()
    assert dl.value.suggested_filename == "lumen-seed7-k3.png"
    png = open(dl.value.path(), "rb").read()
    assert png == base64.b64decode(api["images"][0]["data"])
    params = json.loads(png_text(png)["parameters"])
    assert params["seed"] == 7 and params["components"] == 3

    # Use as guide: the result becomes the guide, its layout is shown.
    page.get_by_role("button", name="Use the image with seed 7 as the guide").click()
    page.wait_for_function("(src) => document.getElementById('guide-img').src === src", arg=src)
    page.wait_for_selector("#layout-img:not([hidden])")


def test_k_sweep(page, server, screenshots):
    open_playground(page, server.url)
    page.get_by_role("button", name="Example guide: a red square and a magenta triangle").click()
    page.wait_for_selector("#layout-img:not([hidden])")
    page.get_by_label("Random seed").uncheck()
    page.get_by_label("Seed", exact=True).fill("3")
    page.get_by_label("Steps").fill("8")
    kmax = int(page.get_by_label("Components K").get_attribute("max"))
    page.get_by_role("button", name="K sweep").click()
    page.wait_for_function(
        "(n) => document.querySelectorAll('#sweep-row .card').length === n", arg=kmax, timeout=120_000
    )
    page.wait_for_function("() => !document.getElementById('generate').disabled")
    captions = page.locator("#sweep-row .card figcaption").all_inner_texts()
    assert [c.splitlines()[0] for c in captions] == [f"K = {k}" for k in range(1, kmax + 1)]
    assert all("seed" not in c.splitlines()[0] for c in captions)
    srcs = page.locator("#sweep-row .card img").evaluate_all("els => els.map(e => e.src)")
    assert len(set(srcs)) == kmax, "each K gives its own image"
    page.locator("#results-section").screenshot(path=str(screenshots / "playground-sweep.png"))


def test_cancel_a_long_job(page, server):
    open_playground(page, server.url)
    page.set_input_files("#guide-file", str(GUIDE))
    page.wait_for_selector("#layout-img:not([hidden])")
    steps_max = page.get_by_label("Steps").get_attribute("max")
    page.get_by_label("Steps").fill(steps_max)
    page.get_by_label("Images").fill("2")
    with page.expect_request(lambda r: r.url.endswith("/jobs") and r.method == "POST"):
        page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => /Step [1-9]/.test(document.getElementById('progress-text').textContent)")
    with page.expect_response(lambda r: r.request.method == "DELETE") as resp:
        page.get_by_role("button", name="Cancel").click()
    job = resp.value.json()
    assert job["status"] == "cancelled"
    page.wait_for_function("() => document.getElementById('status').textContent.includes('cancelled')")
    assert httpx.get(f"{server.url}/jobs/{job['id']}").json()["status"] == "cancelled"
    assert page.locator("#gallery .card").count() == 0
    assert page.get_by_role("button", name="Generate").is_enabled()


def test_a_bad_file_shows_the_api_message(page, server, tmp_path, screenshots):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    api = httpx.post(
        f"{server.url}/layout", files={"image": ("notes.png", bad.read_bytes(), "image/png")}
    ).json()
    open_playground(page, server.url)
    page.set_input_files("#guide-file", str(bad))
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert alert.inner_text() == f"{api['error']['message']} ({api['error']['code']})"
    # A parameter error names its field, as the API says it.
    page.set_input_files("#guide-file", str(GUIDE))
    page.wait_for_selector("#layout-img:not([hidden])")
    page.get_by_label("Steps").fill("0")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.getElementById('error').textContent.includes('steps')")
    assert "invalid_parameter" in alert.inner_text()
    page.screenshot(path=str(screenshots / "playground-error.png"))


def test_the_key_field(page, keyed_server):
    open_playground(page, keyed_server.url)
    key = page.get_by_label("API key")
    assert key.is_visible()
    page.set_input_files("#guide-file", str(GUIDE))
    page.get_by_role("alert").wait_for()
    assert "unauthorized" in page.get_by_role("alert").inner_text()
    key.fill(API_KEY)
    key.press("Enter")
    page.locator(".example").first.click()
    page.wait_for_selector("#layout-img:not([hidden])")
    assert page.get_by_role("alert").is_hidden()
    page.get_by_label("Steps").fill("4")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#gallery .card img")
    # The key went in the Authorization header only: never in a URL or the log.
    log = keyed_server.log_path.read_text()
    assert API_KEY not in log
    # One info line per request, refusals included; the loading-time /ready
    # 503 is not an error, and nothing else was.
    lines = keyed_server.log()
    requests = [r for r in lines if r["fields"].get("message") == "request"]
    assert all(r["level"] == "INFO" for r in requests)
    seen = {(r["span"]["method"], r["span"]["path"], r["fields"]["status"]) for r in requests}
    assert ("POST", "/layout", 401) in seen and ("POST", "/layout", 200) in seen, seen
    assert ("POST", "/jobs", 202) in seen and ("GET", "/", 200) in seen, seen
    assert all({"id", "method", "path"} <= r["span"].keys() for r in requests)
    assert all({"status", "ms"} <= r["fields"].keys() for r in requests)
    # Bytes when the size is known (an event stream's is not).
    assert all("bytes" in r["fields"] for r in requests if not r["span"]["path"].endswith("/events"))
    assert not [r for r in lines if r["level"] == "ERROR"]


def test_keyboard_and_phone_width(browser, server, screenshots):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    try:
        open_playground(page, server.url)
        # Every control has a label.
        for label in [
            "Components K",
            "Prompt",
            "Negative prompt",
            "Seed",
            "Steps",
            "Guidance scale",
            "Control scale",
            "Images",
            "Scheduler",
            "Width",
            "Height",
        ]:
            assert page.get_by_label(label, exact=True).count() == 1, label
        # Keyboard only: focus the first example, Enter picks it.
        page.locator(".example").first.focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#layout-img:not([hidden])")
        page.get_by_label("Steps").focus()
        page.keyboard.press("Control+A")
        page.keyboard.type("4")
        page.get_by_role("button", name="Generate").focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#gallery .card img")
        # Nothing wider than the phone.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(screenshots / "playground-phone.png"), full_page=True)
    finally:
        ctx.close()


@pytest.mark.parametrize(
    "op_id, status",
    [("lumen/layout", "200"), ("lumen/synthesize", "200"), ("jobs/create", "202")],
)
def test_swagger_try_it_out(page, server, screenshots, op_id, status):
    """Swagger UI's first "Try it out" → Execute, with its pre-filled example."""
    page.goto(f"{server.url}/docs/")
    block = page.locator(f"#operations-{op_id.replace('/', '-')}")
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    cell = block.locator(".live-responses-table tbody .response-col_status").first
    cell.wait_for(timeout=60_000)
    assert cell.inner_text().strip() == status, block.locator(".live-responses-table").inner_text()
    if op_id == "lumen/synthesize":
        block.screenshot(path=str(screenshots / "swagger-synthesize.png"))
