"""Dataset uploads: JSONL, size-limited, validated row by row on upload, stored under their sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, UploadFile, status
from fastapi.responses import FileResponse

from app import datasets
from app.api.deps import ReadKey, SessionDep, SettingsDep, TrainKey, WriteSessionDep, key_id, owner_of
from app.config import Settings
from app.exceptions import LimitExceeded, ServiceError
from app.models import FileRecord
from app.schemas import Deleted, FilePublic, Page

router = APIRouter(prefix="/files", tags=["files"])
CHUNK = 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # multipart headers and boundaries around the file itself


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FilePublic)
def upload_file(
    file: UploadFile,
    request: Request,
    session: WriteSessionDep,
    settings: SettingsDep,
    _key: TrainKey,
    purpose: Annotated[str, Form(max_length=32)] = "fine-tune",
) -> FileRecord:
    """Upload a JSONL dataset (one chat per line). A bad row is refused now, with its number and why."""
    _check_declared_size(request, settings)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    tmp, digest, size = _receive(file, settings)
    try:
        name = Path(file.filename or "upload.jsonl").name[:255]
        return datasets.add_upload(
            session,
            settings,
            tmp,
            digest=digest,
            size=size,
            filename=name,
            purpose=purpose,
            api_key_id=key_id(_key),
        )
    finally:
        tmp.unlink(missing_ok=True)


def _check_declared_size(request: Request, settings: Settings) -> None:
    """Refuse on the declared length, before reading; _receive still counts, as the header can lie."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.max_upload_bytes + MULTIPART_SLACK:
        raise _too_large(settings)


def _too_large(settings: Settings) -> LimitExceeded:
    return LimitExceeded(
        f"file: must be at most {settings.max_upload_bytes} bytes; split the dataset", field="file"
    )


def _receive(upload: UploadFile, settings: Settings) -> tuple[Path, str, int]:
    """Stream the upload to a temp file, hashing as it goes; stop as soon as it passes the size limit."""
    digest, size = hashlib.sha256(), 0
    fd, name = tempfile.mkstemp(dir=settings.uploads_dir, prefix=".upload-", suffix=".jsonl")
    tmp = Path(name)
    with os.fdopen(fd, "wb") as out:
        while chunk := upload.file.read(CHUNK):
            size += len(chunk)
            if size > settings.max_upload_bytes:
                out.close()
                tmp.unlink(missing_ok=True)
                raise _too_large(settings)
            digest.update(chunk)
            out.write(chunk)
    return tmp, digest.hexdigest(), size


@router.get("", response_model=Page[FilePublic])
def list_files(
    session: SessionDep,
    _key: ReadKey,
    after: Annotated[
        str | None, Query(pattern=r"^file_[0-9a-f]+$", description="Last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """Uploaded files, newest first."""
    return datasets.list_files(session, after=after, limit=limit, owner=owner_of(_key)).as_page()


@router.get("/{file_id}", response_model=FilePublic)
def get_file(file_id: str, session: SessionDep, _key: ReadKey) -> FileRecord:
    """One uploaded file's record."""
    return datasets.get_file(session, file_id, owner=owner_of(_key))


# The bytes as uploaded (JSONL); the route declares its 200 as a file, not the JSON of the others.
CONTENT_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "The file's bytes, as uploaded.", "content": {"application/octet-stream": {}}}
}


@router.get("/{file_id}/content", response_class=FileResponse, responses=CONTENT_RESPONSE)
def get_file_content(file_id: str, session: SessionDep, _key: ReadKey) -> FileResponse:
    """One uploaded file's bytes (what `openai`'s `client.files.content(id)` reads)."""
    return content_response(datasets.get_file(session, file_id, owner=owner_of(_key)))


def content_response(record: FileRecord) -> FileResponse:
    if not Path(record.path).is_file():  # the row without its bytes: the data folder lost them
        raise ServiceError(f"the bytes of file {record.id} are missing from the data folder ({record.path})")
    return FileResponse(record.path, media_type="application/octet-stream", filename=record.filename)


@router.delete("/{file_id}", response_model=Deleted)
def delete_file(file_id: str, session: WriteSessionDep, _key: TrainKey) -> Deleted:
    """Delete a file; refused while a queued or running job uses it (as dataset or eval_dataset)."""
    datasets.delete_file(session, file_id, owner=owner_of(_key))
    return Deleted(id=file_id, object="file")
