"""Raw sample schemas, tar reading/writing, and validation with a reason for every rejected sample.

A raw shard is a WebDataset tar: members `<key>.<ext>`, one sample = consecutive members sharing a key.
Kinds (told apart by their members):
- interleaved (MINT-1T / OBELICS style): `<key>.json` = {"texts": [str|null, ...], "images": [name|null, ...]}
  (parallel lists, exactly one non-null per index, in document order); each image name `n` is the member
  `<key>.<n>` (e.g. "0.png" -> `<key>.0.png`).
- caption pair: an image member (`<key>.jpg|png|webp`) + `<key>.txt`.
- VQA / instruction: an image member + `<key>.json` = {"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]} (LLaVA style; a "<image>" placeholder in the text is dropped).
Any json may carry "meta" (free-form, copied into the token sample; the shapes world stores its answer key id).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data_pipeline.sources import ShardReader
from data_pipeline.tar_writer import write_tar  # noqa: F401  (the writer of every project tar)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


class Quarantine(Exception):
    """A raw sample that cannot be used; `reason` is a short code, `detail` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class RawSample:
    key: str
    kind: str  # interleaved | caption | vqa
    images: list[Image.Image] = field(default_factory=list)  # decoded, in document order
    image_members: list[str] = field(default_factory=list)  # the member each image was decoded from (its ext)
    texts: list[str] = field(default_factory=list)  # caption: [caption]; interleaved: text segments
    order: list[tuple[str, int]] = field(default_factory=list)  # interleaved: ("text"|"image", index) in order
    turns: list[tuple[str, str]] = field(default_factory=list)  # vqa: (question, answer) pairs
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ tar I/O

def iter_tar_samples(path: str | Path):
    """Yield (key, {ext: bytes}, error) per sample of a local tar; a truncated/corrupt tar ends the stream with one
    item whose error names the problem (its members are whatever was read before the damage). URLs and transport
    failures: `sources.ShardReader`, which this is, so raw and token shards follow one grouping rule."""
    yield from ShardReader(str(path))


# ------------------------------------------------------------------------------------------------ validation

@dataclass
class ImageLimits:
    max_pixels: int = 4096 * 4096
    max_aspect: float = 20.0


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    if len(data) == 0:
        raise Quarantine("zero_size_image", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError as e:
        raise Quarantine("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for garbage bytes
        raise Quarantine("corrupt_image", f"{type(e).__name__}: {e}") from None
    if w == 0 or h == 0:
        raise Quarantine("zero_size_image", f"{w}x{h}")
    if w * h > limits.max_pixels:
        raise Quarantine("too_many_pixels", f"{w}x{h} > data.max_input_pixels={limits.max_pixels}")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise Quarantine("absurd_aspect", f"{w}x{h} aspect {max(w, h) / min(w, h):.1f} > "
                                          f"data.max_aspect={limits.max_aspect}")
    try:
        img.load()  # header parsed lazily: truncated pixel data only shows here
    except Exception as e:
        raise Quarantine("corrupt_image", f"{type(e).__name__}: {e}") from None
    return img


def _need(d: dict, k: str, typ, where: str):
    if k not in d:
        raise Quarantine("missing_key", f"{where} has no {k!r}")
    if not isinstance(d[k], typ):
        raise Quarantine("wrong_type", f"{where}[{k!r}] is {type(d[k]).__name__}, expected "
                                       f"{getattr(typ, '__name__', typ)}")
    return d[k]


def _text(s, where: str) -> str:
    if not isinstance(s, str):
        raise Quarantine("wrong_type", f"{where} is {type(s).__name__}, expected str")
    if not s.strip():
        raise Quarantine("empty_text", where)
    return s


def parse_sample(key: str, members: dict[str, bytes], limits: ImageLimits) -> RawSample:
    """Validate and decode one raw sample; raises Quarantine with the reason."""
    meta, doc = {}, None
    if "json" in members:
        try:
            doc = json.loads(members["json"].decode("utf-8"))
        except Exception as e:
            raise Quarantine("bad_json", f"{type(e).__name__}: {e}") from None
        if not isinstance(doc, dict):
            raise Quarantine("wrong_type", f"json is {type(doc).__name__}, expected object")
        meta = doc.get("meta", {}) if isinstance(doc.get("meta", {}), dict) else {}
    img_exts = [e for e in members if e.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]

    if doc is not None and ("texts" in doc or "images" in doc):
        texts = _need(doc, "texts", list, "json")
        images = _need(doc, "images", list, "json")
        if len(texts) != len(images):
            raise Quarantine("wrong_type", f"json texts ({len(texts)}) and images ({len(images)}) differ in length")
        s = RawSample(key, "interleaved", meta=meta)
        for i, (t, im) in enumerate(zip(texts, images)):
            if (t is None) == (im is None):
                raise Quarantine("wrong_type", f"json index {i}: exactly one of texts/images must be non-null")
            if t is not None:
                s.order.append(("text", len(s.texts)))
                s.texts.append(_text(t, f"json texts[{i}]"))
            else:
                if not isinstance(im, str):
                    raise Quarantine("wrong_type", f"json images[{i}] is {type(im).__name__}, expected str")
                if im not in members:
                    raise Quarantine("missing_image", f"json images[{i}]={im!r} has no member {key}.{im}")
                s.order.append(("image", len(s.images)))
                s.images.append(decode_image(members[im], limits))
                s.image_members.append(im)
        if not s.texts:
            raise Quarantine("empty_text", "interleaved document has no text")
        return s

    if not img_exts:
        raise Quarantine("missing_image" if members else "missing_key",
                         f"no image member ({'/'.join(IMAGE_EXTS)}) among {sorted(members)}")
    image = decode_image(members[img_exts[0]], limits)

    if doc is not None and "conversations" in doc:
        conv = _need(doc, "conversations", list, "json")
        turns, q = [], None
        for i, t in enumerate(conv):
            if not isinstance(t, dict):
                raise Quarantine("wrong_type", f"conversations[{i}] is {type(t).__name__}, expected object")
            who = _need(t, "from", str, f"conversations[{i}]")
            val = _need(t, "value", str, f"conversations[{i}]")
            if who == "human":
                q = val.replace("<image>", "").strip()
            elif who == "gpt":
                if q is None:
                    raise Quarantine("wrong_type", f"conversations[{i}]: answer before any question")
                turns.append((q, _text(val, f"conversations[{i}].value")))
                q = None
        if not turns:
            raise Quarantine("empty_text", "conversation has no answered question")
        return RawSample(key, "vqa", images=[image], image_members=img_exts[:1], turns=turns, meta=meta)

    if "txt" in members:
        try:
            cap = members["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise Quarantine("wrong_type", f"txt is not UTF-8: {e}") from None
        return RawSample(key, "caption", images=[image], image_members=img_exts[:1], texts=[_text(cap, "txt").strip()],
                         meta=meta)
    raise Quarantine("missing_key", f"image without txt or json conversations/texts; members {sorted(members)}")
