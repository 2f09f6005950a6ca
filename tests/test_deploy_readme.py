"""The README stays true: its settings table is app/config.py's, its curl examples hit real routes
with bodies the routes accept, its shell blocks parse, and CI runs exactly its test command.

`python -m tests.test_deploy_readme` rewrites the settings table from Settings.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from starlette.routing import Match

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
BASE_URL = "http://127.0.0.1:8000"


# --- the settings table -------------------------------------------------------------------------------


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None:
        return "*(derived)*"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | dict):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _choices(field: FieldInfo) -> str:
    args = get_args(field.annotation) if "Literal" in str(get_origin(field.annotation)) else ()
    return f" One of: {', '.join(f'`{a}`' for a in args)}." if args else ""


def settings_table() -> str:
    """The Markdown table of every Settings field: name, env var, default, description."""
    lines = ["| Setting | Environment variable | Default | Description |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        text = ((field.description or "").replace("|", "\\|") + _choices(field)).strip()
        lines.append(f"| `{name}` | `GPTOSS_{name.upper()}` | {_default(field)} | {text} |")
    return "\n".join(lines)


def _readme_table(text: str) -> str:
    return text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()


def write_table() -> None:
    text = README.read_text()
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    README.write_text(f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{tail}")


def test_settings_table_matches_config() -> None:
    assert _readme_table(README.read_text()) == settings_table(), (
        "README's configuration table is out of date: run `python -m tests.test_deploy_readme`"
    )


def test_every_setting_is_documented() -> None:
    undocumented = [name for name, field in Settings.model_fields.items() if not field.description]
    assert not undocumented, f"give these Settings fields a description: {undocumented}"


# --- shell blocks and curl examples -------------------------------------------------------------------


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


@dataclass
class Curl:
    method: str
    path: str
    body: str | None


def _curls(block: str) -> Iterator[Curl]:
    """Each curl command of a block: its method, URL path and heredoc body (for `-d @-`)."""
    lines = block.replace("\\\n", " ").splitlines()
    for index, line in enumerate(lines):
        match = re.search(r"curl .*?" + re.escape(BASE_URL) + r"(/[^\s'\"|)]*)", line)
        if not match:
            continue
        body = None
        if "-d @-" in line:
            end = lines.index("EOF", index)
            body = "\n".join(lines[index + 1 : end])
        sends = any(flag in line for flag in (" -d ", " -F ", " --json ", "-X POST"))
        yield Curl("POST" if sends else "GET", match.group(1), body)


def _without_shell_vars(text: str) -> str:
    return re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: f"x_{m.group(1).lower()}", text)


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> list[APIRoute]:
    from app.main import create_app

    data = tmp_path_factory.mktemp("readme") / "data"
    app = create_app(Settings(data_dir=data, auth="none", load_model_on_start=False))
    return [r for r in app.routes if isinstance(r, APIRoute)]


def _route_for(routes: list[APIRoute], method: str, path: str) -> APIRoute | None:
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    return next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    params = route.dependant.body_params
    if len(params) != 1:
        return None
    annotation = params[0].field_info.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def test_curl_examples_name_real_routes_with_valid_bodies(routes: list[APIRoute]) -> None:
    curls = [c for block in _bash_blocks() for c in _curls(block)]
    assert {c.path for c in curls} >= {"/files", "/jobs", "/jobs/$JOB_ID", "/generate"}
    for curl in curls:
        route = _route_for(routes, curl.method, _without_shell_vars(curl.path))
        assert route is not None, f"README: no route for {curl.method} {curl.path}"
        if curl.body is not None:
            _check_body(route, json.loads(_without_shell_vars(curl.body)))


def _check_body(route: APIRoute, body: dict[str, Any]) -> None:
    model = _body_model(route)
    assert model is not None, f"README sends a JSON body to {route.path}, which takes none"
    model.model_validate(body)
    if "hyperparameters" in body:  # the jobs route validates these against TrainConfig
        from app.ml.trainer import TrainConfig

        TrainConfig.model_validate(body["hyperparameters"])


def test_generate_example_uses_an_adapter_and_reasoning_effort() -> None:
    generate = [c for block in _bash_blocks() for c in _curls(block) if c.path == "/generate"]
    body = json.loads(_without_shell_vars(generate[0].body or "{}"))
    assert body["adapter"] and body["reasoning_effort"] in ("low", "medium", "high")


def test_every_url_in_the_readme_is_a_route(routes: list[APIRoute]) -> None:
    paths = set(re.findall(re.escape(BASE_URL) + r"(/[^\s'\"`)|]*)", README.read_text()))
    for path in paths:
        concrete = _without_shell_vars(path)
        assert any(r.matches({"type": "http", "method": m, "path": concrete, "root_path": ""})[0] == Match.FULL
                   for r in routes for m in r.methods) or concrete in ("/docs",), f"README: no route {path}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_blocks_parse() -> None:
    for block in _bash_blocks():
        result = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
        assert result.returncode == 0, f"README shell block does not parse:\n{block}\n{result.stderr}"


# --- the two commands ----------------------------------------------------------------------------------


def test_quick_start_commands_exist_and_ci_runs_the_test_command() -> None:
    blocks = _bash_blocks()
    assert blocks[0].strip() == "scripts/serve.sh"
    assert blocks[1].strip() == "scripts/test.sh"
    for script in ("scripts/serve.sh", "scripts/test.sh", "scripts/install.sh", ".ci/run"):
        path = ROOT / script
        assert path.is_file() and path.stat().st_mode & 0o111, f"{script} must exist and be executable"
    ci_commands = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip()
                   and not line.lstrip().startswith("#")]
    assert ci_commands[-1] == "exec scripts/test.sh"


def test_test_command_runs_every_check_and_fails_on_no_tests() -> None:
    script = (ROOT / "scripts/test.sh").read_text()
    for check in ("ruff check .", "ruff format --check .", "mypy app workers", "pytest"):
        assert check in script
    assert "set -euo pipefail" in script
    assert "torch==2.13.0" in (ROOT / "scripts/install.sh").read_text()


if __name__ == "__main__":
    write_table()
    print(f"wrote the settings table into {README}")
