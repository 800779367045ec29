"""Convert public sources whose layout needs reshaping into our JSONL records (+ media), in shards.

    python tools/prepare_data.py docmatix         IN OUT [--tokenizer DIR]   # IN: Docmatix parquet shards
    python tools/prepare_data.py llava_video_178k IN OUT [--tokenizer DIR]   # IN: subset folders, videos extracted
    python tools/prepare_data.py long_text        IN OUT [--tokenizer DIR]   # IN: JSON/JSONL file(s)

Layouts read:
  docmatix          parquet rows ``images`` (list of Image {bytes, path}) + ``texts`` (list of
                    {user, assistant, source}): one multi-image, multi-turn record per row; the
                    images are written under OUT/media/ as they were encoded.
  llava_video_178k  IN/<subset>/*.json (caption / open-ended / multiple-choice arrays of LLaVA
                    records whose ``video`` is relative to the subset folder); ``<image>`` in the
                    text stands for the video. Videos stay where they are (extract the tarballs
                    first); records point at them relative to IN.
  long_text         Alpaca-style {instruction, input, output} (LongAlpaca and kin), LLaVA /
                    ShareGPT ``conversations`` or our ``messages``; text only.

Writes OUT/<group>/<group>-NNNNN.jsonl (``--shard-size`` records each), OUT/mixture.yaml (one
group per output group at ratio 1.0, media_root set) and OUT/summary.json: records written and
not converted (per reason), tiles, and with ``--tokenizer`` the tokens per group (text + vision at
the given tiling), the figure mixture ratios like the paper's Tab. 1 are set from.
Every record is checked the way the training loader checks it (schema, placeholders, media
headers), so what is written loads.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import yaml
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from megatron_longvita.data import BadSampleError, ChatTokenizer, MediaConfig, parse_record
from megatron_longvita.data.sample import plan_media
from megatron_longvita.data.schema import llava_to_record_layout
from megatron_longvita.data.template import tokenize_conversation

IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class NotConverted(Exception):
    """A source record that cannot become one of ours; ``reason`` is its summary bucket."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# A converted record: (group, record in our layout, media root its paths are relative to, location).
Converted = tuple[str, dict, str, str]


def _docmatix_images(cells: Any, media_dir: str, stem: str, location: str) -> list[str]:
    if not isinstance(cells, list) or not cells:
        raise NotConverted("no_images", f"{location}: no images")
    paths = []
    for index, cell in enumerate(cells):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not data:
            raise NotConverted("missing_image_bytes", f"{location}: image {index} carries no bytes")
        try:
            with Image.open(io.BytesIO(data)) as image:
                extension = IMAGE_EXTENSIONS.get(image.format or "", "img")
        except (UnidentifiedImageError, OSError) as error:
            raise NotConverted("undecodable_image", f"{location}: image {index}: {error}") from None
        name = f"{stem}_{index}.{extension}"
        with open(os.path.join(media_dir, name), "wb") as handle:
            handle.write(data)
        paths.append(name)
    return paths


def read_docmatix(source: str, out: str) -> tuple[int, Iterator[Converted | NotConverted]]:
    import pyarrow.parquet as pq

    files = [source]
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
    if not files:
        raise SystemExit(f"{source}: no parquet files")
    total = sum(pq.ParquetFile(path).metadata.num_rows for path in files)

    def records() -> Iterator[Converted | NotConverted]:
        for path in files:
            shard = os.path.splitext(os.path.basename(path))[0]
            media_dir = os.path.join(out, "media", "docmatix", shard)
            os.makedirs(media_dir, exist_ok=True)
            row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=["images", "texts"]):
                for raw in batch.to_pylist():
                    location = f"{path}:{row}"
                    row += 1
                    try:
                        texts = raw.get("texts")
                        if not isinstance(texts, list) or not texts:
                            raise NotConverted("no_turns", f"{location}: no texts")
                        turns = [(turn.get("user"), turn.get("assistant")) for turn in texts if isinstance(turn, dict)]
                        if len(turns) != len(texts) or not all(
                            isinstance(user, str) and isinstance(answer, str) for user, answer in turns
                        ):
                            raise NotConverted("bad_turn", f"{location}: a turn lacks a user or assistant string")
                        images = _docmatix_images(raw.get("images"), media_dir, str(row - 1), location)
                        messages = []
                        for index, (user, answer) in enumerate(turns):
                            prefix = "<image>\n" * len(images) if index == 0 else ""
                            messages += [{"role": "user", "content": prefix + user},
                                         {"role": "assistant", "content": answer}]  # fmt: skip
                        paths = [os.path.join("docmatix", shard, name) for name in images]
                        yield "docmatix", {"messages": messages, "images": paths}, os.path.join(out, "media"), location
                    except NotConverted as error:
                        yield error

    return total, records()


def read_llava_video(source: str, out: str) -> tuple[int, Iterator[Converted | NotConverted]]:
    subsets = sorted(name for name in os.listdir(source) if os.path.isdir(os.path.join(source, name)))
    files = [(subset, path) for subset in subsets for path in sorted(glob.glob(os.path.join(source, subset, "*.json")))]
    if not files:
        raise SystemExit(f"{source}: no <subset>/*.json annotation files")

    def load(path: str) -> list:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, list):
            raise SystemExit(f"{path}: expected a JSON array of records")
        return data

    arrays = [(subset, path, load(path)) for subset, path in files]

    def records() -> Iterator[Converted | NotConverted]:
        for subset, path, array in arrays:
            has_archives = bool(glob.glob(os.path.join(source, subset, "*.tar*")))
            for index, raw in enumerate(array):
                location = f"{path}[{index}]"
                try:
                    layout = llava_to_record_layout(raw, location)
                except BadSampleError as error:
                    yield NotConverted(error.reason.value, str(error))
                    continue
                media = layout["images"] + layout["videos"]
                missing = [p for p in media if not os.path.exists(os.path.join(source, subset, p))]
                if missing:
                    hint = " (extract the subset's tarballs first)" if has_archives else ""
                    yield NotConverted("missing_video", f"{location}: {missing[0]} not found{hint}")
                    continue
                for key in ("images", "videos"):
                    layout[key] = [os.path.join(subset, p) for p in layout[key]]
                yield subset, layout, source, location

    return sum(len(array) for _, _, array in arrays), records()


def _long_text_layout(raw: Any, location: str) -> dict:
    if isinstance(raw, dict) and "messages" in raw:
        return raw
    if isinstance(raw, dict) and "conversations" in raw:
        return llava_to_record_layout(raw, location)
    if isinstance(raw, dict) and isinstance(raw.get("instruction"), str) and isinstance(raw.get("output"), str):
        question = raw["instruction"] if not raw.get("input") else f"{raw['instruction']}\n{raw['input']}"
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": raw["output"]}]}
    keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
    raise NotConverted("unknown_layout", f"{location}: neither messages, conversations nor instruction/output: {keys}")


def read_long_text(source: str, out: str) -> tuple[int, Iterator[Converted | NotConverted]]:
    files = [source]
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.json*"), recursive=True))
    samples: list[tuple[str, Any]] = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".jsonl"):
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            samples.append((f"{path}:{number}", json.loads(line)))
                        except json.JSONDecodeError:
                            samples.append((f"{path}:{number}", None))
            else:
                samples += [(f"{path}[{index}]", raw) for index, raw in enumerate(json.load(handle))]

    def records() -> Iterator[Converted | NotConverted]:
        for location, raw in samples:
            if raw is None:
                yield NotConverted("malformed_json", f"{location}: not JSON")
                continue
            try:
                layout = _long_text_layout(raw, location)
            except BadSampleError as error:
                yield NotConverted(error.reason.value, str(error))
                continue
            except NotConverted as error:
                yield error
                continue
            if layout.get("images") or layout.get("videos"):
                yield NotConverted("has_media", f"{location}: a long-text record with media")
                continue
            yield "long_text", {"messages": layout["messages"]}, out, location

    return len(samples), records()


LAYOUTS = {"docmatix": read_docmatix, "llava_video_178k": read_llava_video, "long_text": read_long_text}


class ShardWriter:
    """OUT/<group>/<group>-NNNNN.jsonl, ``shard_size`` records per file."""

    def __init__(self, out: str, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size
        self.counts: Counter[str] = Counter()
        self.paths: dict[str, list[str]] = defaultdict(list)
        self._handles: dict[str, Any] = {}

    def write(self, group: str, record: dict) -> None:
        if self.counts[group] % self.shard_size == 0:
            if group in self._handles:
                self._handles[group].close()
            os.makedirs(os.path.join(self.out, group), exist_ok=True)
            path = os.path.join(group, f"{group}-{len(self.paths[group]):05d}.jsonl")
            self.paths[group].append(path)
            self._handles[group] = open(os.path.join(self.out, path), "w", encoding="utf-8")
        self._handles[group].write(json.dumps(record, ensure_ascii=False) + "\n")
        self.counts[group] += 1

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", choices=sorted(LAYOUTS))
    parser.add_argument("source", help="the downloaded dataset (folder or file)")
    parser.add_argument("out", help="output folder (JSONL shards, media, mixture.yaml, summary.json)")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--tokenizer", help="tokenizer dir: adds tokens per group (text + vision) to the summary")
    parser.add_argument("--image-size", type=int, default=448, help="tile side (patch 14, pixel shuffle 0.5)")
    parser.add_argument("--max-tiles", type=int, default=12)
    parser.add_argument("--max-num-frames", type=int, default=128, help="frames per video counted (stage 1-2: 128)")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    total, records = LAYOUTS[args.layout](os.path.abspath(args.source), out)
    media_config = MediaConfig(image_size=args.image_size, max_tiles=args.max_tiles, max_num_frames=args.max_num_frames)
    tokenizer = ChatTokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    writer = ShardWriter(out, args.shard_size)
    not_converted: Counter[str] = Counter()
    examples: dict[str, str] = {}
    tiles: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    media_roots: dict[str, str] = {}
    for item in tqdm(records, total=total, desc=f"prepare {args.layout}", unit="rec"):
        if isinstance(item, NotConverted):
            not_converted[item.reason] += 1
            examples.setdefault(item.reason, str(item))
            continue
        group, layout, media_root, location = item
        try:  # the checks the training loader makes, so that every written record loads
            record = parse_record(layout, location)
            images, videos = plan_media(record, media_root, media_config)
            if tokenizer is not None:
                ids = tokenize_conversation(record.messages, images, videos, tokenizer, media_config).ids
                tokens[group] += len(ids) - 1  # as packed: the last id is never an input
        except BadSampleError as error:
            not_converted[error.reason.value] += 1
            examples.setdefault(error.reason.value, str(error))
            continue
        tiles[group] += sum(media.num_tiles for media in images + videos)
        media_roots[group] = media_root
        writer.write(group, layout)
    writer.close()

    mixture = {"dataset": {group: {"ratio": 1.0, "data_paths": paths, "media_root": media_roots[group]}
                           for group, paths in writer.paths.items()}}  # fmt: skip
    with open(os.path.join(out, "mixture.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(mixture, handle, sort_keys=False)
    summary = {
        "layout": args.layout,
        "records_read": total,
        "written": dict(writer.counts),
        "not_converted": dict(not_converted),
        "not_converted_examples": examples,
        "tiles": dict(tiles),
        "tokens": dict(tokens) if tokenizer is not None else None,
        "shards": dict(writer.paths),
    }
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    print(json.dumps({key: summary[key] for key in ("layout", "records_read", "written", "not_converted", "tokens")}))
    return summary


if __name__ == "__main__":
    main()
