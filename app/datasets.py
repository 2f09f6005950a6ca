"""Datasets: the one owner of what a job trains on and of the uploads table.

A job stores a *reference*: an uploaded file's id (`file_...`), `sample:<name>` (a bundled sample) or
`hf:<owner/name>` (the hub). `reference` checks one when the job is submitted; `source` turns it into
what app.ml.data.load_rows reads (an upload's stored path) only when the data is read: by `check_job`
before queueing and by the training child at load time. So no server path is ever stored on a job or
shown to a client, and a reference can never name a file outside the uploads and the bundled samples.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import queue
from app.config import Settings
from app.exceptions import Conflict, DatasetInvalid, InvalidInput, NotFound
from app.ml.data import DatasetError, encode_examples, load_rows, sample_names, validate_rows
from app.models import FileRecord
from app.owners import may_see, where_owned
from app.pagination import PageRows, paginate

FILE_PREFIX = "file_"
SAMPLE_PREFIX = "sample:"
HF_PREFIX = "hf:"
HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
EVAL_FIELD = "hyperparameters.eval_dataset"


# --- references -------------------------------------------------------------------------------------


def reference(session: Session, dataset: str, *, field: str = "dataset", owner: str | None = None) -> str:
    """The reference a job stores for what the client named (a bare sample name becomes sample:<name>).

    An upload must exist (NotFound); a sample must be one of the bundled names, never a path; a hub
    id must look like owner/name. The messages depend only on the reference, not on the server's disk.
    `owner` (app.owners): an upload of another API key is as missing as one that never existed.
    """
    if dataset.startswith(FILE_PREFIX):
        return get_file(session, dataset, field=field, owner=owner).id
    if dataset.startswith(SAMPLE_PREFIX) or dataset in sample_names():
        name = dataset.removeprefix(SAMPLE_PREFIX)
        if name not in sample_names():
            names = ", ".join(sample_names())
            raise InvalidInput(field, f"sample:<name> must name a bundled sample, one of: {names}")
        return SAMPLE_PREFIX + name
    if dataset.startswith(HF_PREFIX):
        if not HF_ID.fullmatch(dataset.removeprefix(HF_PREFIX)):
            raise InvalidInput(field, "hf:<dataset id> needs an id like owner/name")
        return dataset
    raise InvalidInput(field, "must be an uploaded file id (file_...), sample:<name> or hf:<dataset id>")


def file_id(ref: str) -> str | None:
    """The upload a reference names, if it names one."""
    return ref if ref.startswith(FILE_PREFIX) else None


def source(session: Session, dataset: str, *, field: str = "dataset") -> str:
    """What app.ml.data.load_rows reads for a reference: an upload's stored path, else the reference."""
    ref = reference(session, dataset, field=field)
    return get_file(session, ref, field=field).path if file_id(ref) else ref


def resolve_sources(session: Session, config: dict[str, Any]) -> dict[str, str | None]:
    """A job config's `dataset` and `eval_dataset` references as sources (the training child's view)."""
    eval_ref = config.get("eval_dataset")
    return {
        "dataset": source(session, config["dataset"]),
        "eval_dataset": source(session, eval_ref, field=EVAL_FIELD) if eval_ref else None,
    }


# --- validation -------------------------------------------------------------------------------------


def check_job(session: Session, config: dict[str, Any], settings: Settings) -> None:
    """Before queueing: load, validate and encode (harmony-render) the job's dataset and eval_dataset,
    so a row longer than max_seq_length fails now, naming the row, rather than in the worker.
    hf: datasets need the network, which only the worker may have; it checks them."""
    for field, ref in (("dataset", config["dataset"]), (EVAL_FIELD, config.get("eval_dataset"))):
        if ref and not ref.startswith(HF_PREFIX):
            examples = load(source(session, ref, field=field), settings, field=field)
            _check_encodes(examples, config, settings, field)


def _check_encodes(examples: list[Any], config: dict[str, Any], settings: Settings, field: str) -> None:
    from app.ml.tokenizer import ensure_harmony_assets

    ensure_harmony_assets(settings.models_path)  # the offline o200k_harmony files the renderer reads
    try:
        encode_examples(
            examples,
            max_seq_length=config["max_seq_length"],
            default_effort=config["reasoning_effort"],
            train_on_reasoning=config["train_on_reasoning"],
        )
    except DatasetError as err:
        raise DatasetInvalid(field, str(err), row=err.row or None) from None


def load(source: str, settings: Settings, *, field: str = "dataset") -> list[Any]:
    """Read and validate a whole dataset within the server's limits; DatasetInvalid names the bad row."""
    try:
        rows = load_rows(
            source,
            data_dir=settings.data_dir,
            max_rows=settings.max_dataset_rows,
            max_bytes=settings.max_upload_bytes,
        )
        return list(validate_rows(rows, max_rows=settings.max_dataset_rows))
    except DatasetError as err:
        # Whole-file problems (row 0) read better without the "field 'dataset'" preamble.
        raise DatasetInvalid(field, str(err) if err.row else err.reason, row=err.row or None) from None


# --- the uploads table --------------------------------------------------------------------------------


def add_upload(
    session: Session,
    settings: Settings,
    received: Path,
    *,
    digest: str,
    size: int,
    filename: str,
    purpose: str,
    api_key_id: str | None,
) -> FileRecord:
    """Validate a received upload, store it as uploads_dir/<sha256>.jsonl and record it."""
    rows = len(load(str(received), settings, field="file"))
    final = settings.uploads_dir / f"{digest}.jsonl"
    os.replace(received, final)  # same bytes under the same name: a re-upload just replaces it
    record = FileRecord(
        filename=filename,
        purpose=purpose,
        bytes=size,
        rows=rows,
        sha256=digest,
        path=str(final.resolve()),
        api_key_id=api_key_id,
    )
    session.add(record)
    session.commit()
    return record


def get_file(
    session: Session, file_id: str, *, field: str = "file_id", owner: str | None = None
) -> FileRecord:
    record = session.get(FileRecord, file_id)
    if record is None or not may_see(record.api_key_id, owner):
        raise NotFound(f"file {file_id!r} does not exist; upload it with POST /files", field=field)
    return record


def list_files(session: Session, *, after: str | None, limit: int, owner: str | None = None) -> PageRows:
    """Newest first; `after` is the last id of the previous page."""
    query = select(FileRecord).where(where_owned(FileRecord.api_key_id, owner))
    return paginate(session, query, FileRecord.id, after=after, limit=limit)


def delete_file(session: Session, file_id: str, *, owner: str | None = None) -> None:
    """Refused while a queued or running job uses the file (as dataset or eval_dataset); the message
    names only the jobs `owner` may see."""
    record = get_file(session, file_id, owner=owner)
    if users := queue.jobs_using_file(session, file_id):
        own = [job_id for job_id, job_owner in users if may_see(job_owner, owner)]
        named = f" {', '.join(own)}" if own else ""
        raise Conflict(
            f"file {file_id} is used by {len(users)} active job(s){named}; cancel them first", field="file_id"
        )
    session.delete(record)
    session.commit()
    # Uploads are stored by content hash; keep the bytes while another record shares them.
    shared = session.scalar(
        select(func.count()).select_from(FileRecord).where(FileRecord.sha256 == record.sha256)
    )
    if not shared:
        Path(record.path).unlink(missing_ok=True)
