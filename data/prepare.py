"""Prepare a study dataset from its manual dir and open its splits as random-access data sources.

A prepared dataset remembers what it was built from (`source_manifest.json` beside tfds' files:
every file under the manual dir with its size and modification time, the builder's version and
options). When the manual dir or the options no longer match, the dataset is rebuilt and the
change is logged by file name, so changed or broken upstream files are never silently ignored.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os

import tensorflow_datasets as tfds
from etils import epath

from data.datasets import DATASETS
from data.records import DataError, MissingDataError

MANIFEST = "source_manifest.json"


def builder_class(name: str):
    if name not in DATASETS:
        raise DataError(f"data.name={name!r} is unknown; valid: {', '.join(DATASETS)}")
    module = importlib.import_module(f"data.{name}.builder")
    return module.Builder


def check_manual_dir(name: str, manual_dir) -> epath.Path:
    manual = epath.Path(manual_dir) if manual_dir else None
    if manual is None or not manual.is_dir():
        raise MissingDataError(
            f"{name} needs its upstream files in data.manual_dir (see MANUAL_DOWNLOAD_INSTRUCTIONS in "
            f"data/{name}/builder.py); no such directory: {manual_dir}"
        )
    return manual


def _file_state(path: epath.Path) -> list[int]:
    if "://" not in str(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    st = path.stat()
    return [st.length, int(st.mtime)]


def source_manifest(name: str, manual_dir, **builder_kwargs) -> dict:
    """What a prepared dataset is built from: the builder, its options, and every file of the manual dir."""
    manual = check_manual_dir(name, manual_dir)
    cls = builder_class(name)
    files = {}
    for root, _, names in manual.walk():
        for n in names:
            files[str((root / n).relative_to(manual))] = _file_state(root / n)
    files = dict(sorted(files.items()))
    return {"builder": name, "version": str(cls.VERSION), "options": builder_kwargs, "files": files}


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def describe_change(old: dict, new: dict) -> str:
    """The first difference between two manifests, by file name where a file changed."""
    for key in ("builder", "version", "options"):
        if old.get(key) != new.get(key):
            return f"builder {key} changed ({old.get(key)!r} -> {new.get(key)!r})"
    before, after = old.get("files", {}), new.get("files", {})
    for f in sorted(set(before) | set(after)):
        if f not in after:
            return f"{f} was removed"
        if f not in before:
            return f"{f} was added"
        if before[f] != after[f]:
            return f"{f} changed (size, mtime {before[f]} -> {after[f]})"
    return "no change"


def prepare(name: str, manual_dir: str, data_dir: str, **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Builds the dataset, or reuses it when it was built from exactly these files and options."""
    manifest = source_manifest(name, manual_dir, **builder_kwargs)
    cls = builder_class(name)
    builder = cls(data_dir=data_dir, **builder_kwargs)
    root = epath.Path(builder.data_dir)
    if (root / "dataset_info.json").exists():
        old = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).exists() else {}
        if old == manifest:
            return builder
        logging.warning("%s: rebuilding %s from %s: %s", root, name, manual_dir, describe_change(old, manifest))
        root.rmtree()
        builder = cls(data_dir=data_dir, **builder_kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.rename(root / MANIFEST)
    return builder


def open_sources(name: str, data_dir: str, **builder_kwargs) -> dict:
    """{split: ArrayRecordDataSource} of a prepared dataset (records: dicts of bytes, lists of bytes)."""
    return builder_class(name)(data_dir=data_dir, **builder_kwargs).as_data_source()


def data_sources(name: str, manual_dir: str, data_dir: str, **builder_kwargs) -> dict:
    """Prepares (or reuses) the dataset and opens its splits."""
    return prepare(name, manual_dir, data_dir, **builder_kwargs).as_data_source()
