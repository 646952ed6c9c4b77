"""schemathesis hooks for lumen's API contract run (scripts/contract_test.sh).

The OpenAPI document states that a guide image is PNG, JPEG or WebP (the
multipart part's `encoding.contentType`, the JSON field's base64 `format:
byte`). JSON Schema cannot say what bytes make a decodable image, so these
hooks teach schemathesis to draw real ones, and to check that image and
safetensors answers are what their media type says.
"""

import base64
import io
import json
import struct

import jsonschema_rs
import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


@st.composite
def images(draw, media_type=None):
    """A small decodable image of a random size and mode, encoded as `media_type`."""
    media_type = media_type or draw(st.sampled_from(sorted(FORMATS)))
    width = draw(st.integers(1, 96))
    height = draw(st.integers(1, 96))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA"] if media_type != "image/jpeg" else ["RGB", "L"]))
    colour = draw(st.tuples(*[st.integers(0, 255)] * len(mode)))
    img = Image.new(mode, (width, height), colour if len(mode) > 1 else colour[0])
    # A few rectangles so that layouts are not constant.
    for _ in range(draw(st.integers(0, 3))):
        x0, y0 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
        x1, y1 = draw(st.integers(x0, width)), draw(st.integers(y0, height))
        fill = draw(st.tuples(*[st.integers(0, 255)] * len(mode)))
        img.paste(fill if len(mode) > 1 else fill[0], (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    out = io.BytesIO()
    img.save(out, FORMATS[media_type])
    return out.getvalue()


for media_type in FORMATS:
    schemathesis.openapi.media_type(media_type, images(media_type))

# The JSON `image` field: base64 (OpenAPI's `byte`) of a guide image.
schemathesis.openapi.format("byte", images().map(lambda b: base64.b64encode(b).decode("ascii")))


def _image(expected):
    def check(ctx, response):
        data = response.content
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            if img.format != expected:
                raise ValueError(f"an {img.format} image answered as {expected}")
        return base64.b64encode(data).decode("ascii")

    return check


for media_type, fmt in FORMATS.items():
    schemathesis.deserializer(media_type)(_image(fmt))


@schemathesis.deserializer("application/octet-stream")
def safetensors_layout(ctx, response):
    """`POST /layout` as safetensors: one f32 tensor `layout` [K, h, w]."""
    data = response.content
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    layout = header["layout"]
    if layout["dtype"] != "F32" or len(layout["shape"]) != 3:
        raise ValueError(f"tensor `layout` is {layout}, expected F32 [K, h, w]")
    k, h, w = layout["shape"]
    start, end = layout["data_offsets"]
    if end - start != 4 * k * h * w or 8 + n + end > len(data):
        raise ValueError("tensor `layout` has the wrong number of bytes")
    return base64.b64encode(data).decode("ascii")


def _wire_text(value):
    """A multipart text part as schemathesis writes it (JSON spelling for non-strings)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, dict, list)) or value is None:
        return json.dumps(value)
    return str(value)


def _read_back(text, prop):
    """A text part as the server types it: by the field's schema type."""
    types = prop.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "integer" in types or "number" in types:
        try:
            number = json.loads(text.strip())
        except ValueError:
            return text
        if isinstance(number, float) and number.is_integer() and "integer" in types:
            return int(number)
        return number if isinstance(number, (int, float)) and not isinstance(number, bool) else text
    return text


@schemathesis.hook
def filter_case(ctx, case):
    """Drop negative multipart cases that are valid requests on the wire.

    A multipart text part has no JSON type: the integer 5 for the string field
    `prompt` is the text "5", a valid prompt; a list of one item is one part,
    the same bytes as the item; an empty list is no part at all. The server
    reads parts by the schema's types, so such a case is, byte for byte, a
    valid request: not a negative case. Every other negative case is kept.
    """
    meta = case.meta
    if (
        meta is None
        or not meta.generation.mode.is_negative
        or case.media_type != "multipart/form-data"
        or not isinstance(case.body, dict)
    ):
        return True
    body = case.operation.get_body_for_media_type(case.media_type)
    schema = body.resolved_schema if body is not None else None
    if not isinstance(schema, dict):
        return True
    props = schema.get("properties", {})
    wire = {}
    for name, value in case.body.items():
        parts = value if isinstance(value, list) else [value]
        if not parts:
            continue  # no part: the field is absent on the wire
        if len(parts) > 1 or name not in props:
            return True  # repeated or unknown parts: refused on the wire too
        if name == "image":
            wire[name] = "file"
            continue
        wire[name] = _read_back(_wire_text(parts[0]), props[name])
    return not jsonschema_rs.validator_for(schema).is_valid(wire)
