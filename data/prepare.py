"""Prepare a study dataset from its manual dir and open its splits as random-access data sources."""

from __future__ import annotations

import importlib

import tensorflow_datasets as tfds
from etils import epath

DATASETS = ("fincot", "govreport", "medmcqa", "medreason", "cocohd", "llavacot", "invoiceocr")


def builder_class(name: str):
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is unknown; valid: {', '.join(DATASETS)}")
    module = importlib.import_module(f"data.{name}.builder")
    return module.Builder


def prepare(name: str, manual_dir: str, data_dir: str, **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Builds the dataset once (reused afterwards) and returns its builder."""
    manual = epath.Path(manual_dir) if manual_dir else None
    if manual is None or not manual.is_dir():
        cls = builder_class(name)
        raise FileNotFoundError(
            f"data.manual_dir {manual_dir!r} does not exist. {cls.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
        )
    builder = builder_class(name)(data_dir=data_dir, **builder_kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder


def data_sources(name: str, manual_dir: str, data_dir: str, **builder_kwargs) -> dict:
    """{split: ArrayRecordDataSource} — records are dicts of bytes (text) and lists of bytes (images)."""
    return prepare(name, manual_dir, data_dir, **builder_kwargs).as_data_source()
