"""`cilbench data prepare DATASET --from PATH`: what a user downloads -> ``<root>/<folder>/{train,test}/<class>/``.

Sources:
- the PILOT/APER zips and tarballs (``imagenet-r.zip``, ``vtab.zip``, ``objnet.tgz``, ...): checked
  against the md5 the benchmark file records (the published digest, or its published prefix), then
  every image under a ``.../train/<class>/`` or ``.../test/<class>/`` member is extracted, whatever
  folders wrap them (``vtab-cil/vtab/train/...``);
- a local snapshot of a Hugging Face image dataset (OmniBenchmark-1K, ``LMMM2025/OmniBenchmark-1K``):
  parquet shards named ``train-*.parquet`` / ``test-*.parquet`` (or under ``train/`` and ``test/``)
  with an image column (``{bytes, path}``) and an integer label column. Class folders take the label
  names the snapshot records (its ``ClassLabel``), else the label id zero-padded, so that the sorted
  folder order is the label order. Shards are streamed in record batches.

Every file is written to a temporary name and renamed, so a prepare cut short leaves whole files
only; running it again skips the files already there (same size) and finishes the rest. A marker
``.cilbench-prepared.json`` records the source once everything is written. The source is only read.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from torchvision.datasets.folder import IMG_EXTENSIONS

from cilbench import faults
from cilbench.benchmark import DatasetSpec
from cilbench.errors import DataError
from cilbench.ioutil import atomic_write_text

MARKER = ".cilbench-prepared.json"
SPLIT_NAMES = ("train", "test")


def prepare(spec: DatasetSpec, source: Path, data_root: Path, verify: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """Write ``spec``'s train/ and test/ trees under ``data_root`` from ``source``; the dataset folder."""
    source = Path(source).expanduser().resolve()
    dest = Path(data_root).expanduser().resolve() / spec.folder
    if not source.exists():
        raise DataError(f"{source} does not exist", f"pass the downloaded file or folder with --from ({spec.published})")
    if dest == source or source in dest.parents:
        raise DataError(f"the destination {dest} lies inside the source {source}",
                        "choose a data root outside the download (--data-root)")
    marker = dest / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("source") == str(source):
        log(f"{dest} was already prepared from {source}; nothing to do")
        return dest
    if source.is_dir():
        members = _parquet_members(spec, source)
        kind = "parquet snapshot"
    elif source.name.endswith(".zip"):
        members, kind = _zip_members(source), "zip"
    elif source.name.endswith((".tgz", ".tar.gz", ".tar")):
        members, kind = _tar_members(source), "tar"
    else:
        raise DataError(f"cannot tell what {source} is", "pass a .zip, a .tgz/.tar.gz/.tar, or a folder of parquet shards")
    if verify and kind != "parquet snapshot":
        _verify_md5(spec, source, log)
    written = skipped = 0
    counts = {s: 0 for s in SPLIT_NAMES}
    for split, cls, name, size, read in members:
        target = dest / split / cls / name
        counts[split] += 1
        if target.exists() and target.stat().st_size == size:
            skipped += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        with open(tmp, "wb") as f:
            f.write(read())
        os.replace(tmp, target)
        written += 1
        faults.point("prepare")
    if not counts["train"] or not counts["test"]:
        raise DataError(f"{source} holds no images under train/<class>/ and test/<class>/ "
                        f"(found {counts['train']} train, {counts['test']} test)",
                        f"is it the {spec.display} download? ({spec.published})")
    atomic_write_text(marker, json.dumps({"source": str(source), "kind": kind, **counts}, indent=1))
    log(f"{dest}: {counts['train']:,} train and {counts['test']:,} test images "
        f"({written:,} written, {skipped:,} already there); check it with: cilbench data check <bench>")
    return dest


# A member to write: (split, class folder, file name, size in bytes, () -> bytes)
Member = tuple[str, str, str, int, Callable[[], bytes]]


def _split_class_file(name: str) -> tuple[str, str, str] | None:
    """("train"|"test", class, file) for a member ``.../train/<class>/<file>`` of an image, else None."""
    parts = PurePosixPath(name).parts
    if len(parts) < 3 or parts[-3] not in SPLIT_NAMES:
        return None
    if any(p.startswith("__MACOSX") for p in parts) or parts[-1].startswith("."):
        return None
    if PurePosixPath(parts[-1]).suffix.lower() not in IMG_EXTENSIONS:
        return None
    return parts[-3], parts[-2], parts[-1]


def _zip_members(path: Path) -> Iterator[Member]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            where = None if info.is_dir() else _split_class_file(info.filename)
            if where:
                yield (*where, info.file_size, lambda info=info: zf.read(info))


def _tar_members(path: Path) -> Iterator[Member]:
    with tarfile.open(path, "r|*") as tf:   # a stream: a .tgz is never read twice
        for info in tf:
            where = _split_class_file(info.name) if info.isfile() else None
            if where:
                data = tf.extractfile(info).read()
                yield (*where, info.size, lambda data=data: data)


def _parquet_members(spec: DatasetSpec, folder: Path) -> Iterator[Member]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading parquet shards needs pyarrow", "pip install 'cilbench[data]' (or pyarrow)") from e
    shards = sorted(folder.rglob("*.parquet"))
    by_split = {s: [p for p in shards if _shard_split(p.relative_to(folder)) == s] for s in SPLIT_NAMES}
    if not by_split["train"] or not by_split["test"]:
        raise DataError(f"{folder} holds {len(shards)} parquet shards, none named for "
                        f"{' and '.join(s for s in SPLIT_NAMES if not by_split[s])}",
                        "pass the snapshot folder whose shards are named train-*.parquet and test-*.parquet")
    width = len(str(spec.n_classes - 1))
    return _parquet_rows(pq, by_split, width)


def _parquet_rows(pq, by_split: dict[str, list[Path]], width: int) -> Iterator[Member]:
    for split, paths in by_split.items():
        used: set[tuple[str, str]] = set()
        for shard in paths:
            pf = pq.ParquetFile(shard)
            image_col, label_col = _columns(pf.schema_arrow, shard)
            names = _label_names(pf.schema_arrow.metadata or {}, label_col)
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=[image_col, label_col]):
                images, labels = batch.column(image_col).to_pylist(), batch.column(label_col).to_pylist()
                for image, label in zip(images, labels):
                    cls = names[label] if names else (label if isinstance(label, str) else f"{label:0{width}d}")
                    data = image["bytes"]
                    name = PurePosixPath(image.get("path") or "").name or f"{shard.stem}-{row:06d}{_extension(data)}"
                    if (cls, name) in used:   # two images of a class with one file name: keep both
                        name = f"{PurePosixPath(name).stem}-{shard.stem}-{row:06d}{PurePosixPath(name).suffix}"
                    used.add((cls, name))
                    row += 1
                    yield split, cls, name, len(data), lambda data=data: data


def _shard_split(relative: Path) -> str | None:
    for part in reversed(relative.parts):
        for split in SPLIT_NAMES:
            if part == split or part.startswith(f"{split}-") or part.startswith(f"{split}_"):
                return split
    return None


def _columns(schema, shard: Path) -> tuple[str, str]:
    import pyarrow as pa

    image = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0]
    label = [f.name for f in schema if f.name in ("label", "labels", "class", "target")]
    if not image or not label:
        raise DataError(f"{shard}: no image column ({{bytes, path}}) and label column in {schema.names}",
                        "pass a Hugging Face image-dataset snapshot (columns image and label)")
    return image[0], label[0]


def _label_names(metadata: dict, label_col: str) -> list[str] | None:
    """The ClassLabel names Hugging Face ``datasets`` stores in the schema metadata, if any."""
    raw = metadata.get(b"huggingface")
    if not raw:
        return None
    features = json.loads(raw).get("info", {}).get("features", {})
    return features.get(label_col, {}).get("names")


def _extension(data: bytes) -> str:
    return ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"


def _verify_md5(spec: DatasetSpec, source: Path, log) -> None:
    if not spec.archive_md5:
        log(f"no published md5 recorded for {spec.display}: {source.name} is not verified")
        return
    h = hashlib.md5()
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if not digest.startswith(spec.archive_md5):
        raise DataError(f"{source.name} has md5 {digest}; the published {spec.archive or 'archive'} has "
                        f"{spec.archive_md5}{'...' if len(spec.archive_md5) < 32 else ''}",
                        "download it again (a truncated or different file), or pass --no-verify to use it anyway")
    log(f"{source.name}: md5 {digest} matches the published {spec.archive_md5}")
