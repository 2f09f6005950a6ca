"""Several hosts, one database: the data folder's marker keeps a process off a folder that is not the
database's (a network mount missing on one host), and `--gpu N` pins a worker's training to one device."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import make_engine, upgrade_to_head
from app.identity import MARKER, DataDirMismatch, check_data_dir
from app.main import create_app
from tests.fixtures_service import StartWorker
from tests.pg import ON_BOTH_DATABASES
from workers.worker import Worker, child_env
from workers.worker import main as worker_main


@ON_BOTH_DATABASES
def test_first_start_writes_the_marker_and_later_starts_agree(svc_settings: Settings) -> None:
    upgrade_to_head(svc_settings)
    engine = make_engine(svc_settings)
    database_id = check_data_dir(svc_settings, engine)
    assert (svc_settings.data_dir / MARKER).read_text().strip() == database_id
    assert check_data_dir(svc_settings, engine) == database_id  # the next start: the same folder, fine


@ON_BOTH_DATABASES
def test_a_worker_on_another_data_folder_refuses_to_start(
    svc_settings: Settings, start_worker: StartWorker, tmp_path: Path
) -> None:
    upgrade_to_head(svc_settings)
    check_data_dir(svc_settings, make_engine(svc_settings))  # the first host claimed data/
    elsewhere = tmp_path / "second-host-data"  # a host where the shared folder was never mounted
    worker = start_worker("--once", GPTOSS_DATA_DIR=str(elsewhere))
    assert worker.wait(timeout=120) != 0
    output = (tmp_path / "worker-0.log").read_text()
    assert f"the data folder {elsewhere.resolve()} has no {MARKER}" in output
    assert str(svc_settings.data_dir.resolve()) in output  # it names the folder the database expects
    assert not (elsewhere / MARKER).exists()


@ON_BOTH_DATABASES
def test_the_api_refuses_a_folder_that_belongs_to_another_database(
    svc_settings: Settings, tmp_path: Path
) -> None:
    upgrade_to_head(svc_settings)
    database_id = check_data_dir(svc_settings, make_engine(svc_settings))
    other = tmp_path / "other-deployment"
    other.mkdir()
    (other / MARKER).write_text("0b5e6a52-another-database\n")
    moved = svc_settings.model_copy(update={"data_dir": other})
    with pytest.raises(DataDirMismatch) as refused, TestClient(create_app(moved)):
        pass
    assert "belongs to database 0b5e6a52-another-database" in str(refused.value)
    assert f"points at database {database_id}" in str(refused.value)


def test_a_pinned_worker_gives_its_training_child_one_gpu(svc_settings: Settings) -> None:
    pinned = svc_settings.model_copy(update={"worker_gpu": 1})
    worker = Worker(pinned)
    assert "-gpu1-" in worker.worker_id
    env = child_env(pinned, worker.worker_id)
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("1", "PCI_BUS_ID")
    # Unpinned, the child sees what the worker sees (every GPU, or what its own environment chose).
    assert child_env(svc_settings, "w").get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpu_must_be_a_device_number() -> None:
    with pytest.raises(SystemExit) as refused:
        worker_main(["--gpu", "-1"])
    assert refused.value.code == 2
