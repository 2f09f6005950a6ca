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
from starlette.routing import compile_path

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
BASE_URL = "http://127.0.0.1:8000"


# --- the settings table -------------------------------------------------------------------------------


def _default(field: FieldInfo) -> str:
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
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
        text = (field.description or "").rstrip()
        text = (text if text.endswith(".") else text + ".") + _choices(field)
        # Markdown: a pipe would end the cell, and <data_dir> would be swallowed as an HTML tag.
        text = text.replace("|", "\\|").replace("<", "&lt;")
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


@dataclass
class Route:
    method: str
    template: str
    regex: re.Pattern[str]
    body_schema: str | None  # the name of the JSON body's schema, from the OpenAPI document


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> list[Route]:
    """Every route of the real app, read from its OpenAPI document, plus the GET routes left out of it
    (the console's pages and the docs)."""
    from app.main import create_app

    data = tmp_path_factory.mktemp("readme") / "data"
    app = create_app(Settings(data_dir=data, auth="none", load_model_on_start=False))
    found = [
        Route("GET", route.path, compile_path(route.path)[0], None)
        for route in _flat_routes(app.routes)
        if isinstance(route, APIRoute) and not route.include_in_schema and "GET" in route.methods
    ]
    for template, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            ref = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            name = ref.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1] or None
            found.append(Route(method.upper(), template, compile_path(template)[0], name))
    return found


def _flat_routes(routes: list[Any]) -> Iterator[Any]:
    """The app's routes, with included routers opened (FastAPI keeps them as one entry each; the
    routers here are included without a prefix, and their routes' paths carry their own)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from _flat_routes(inner.routes) if inner is not None else [route]


def _route_for(routes: list[Route], method: str | None, path: str) -> Route | None:
    return next((r for r in routes if r.regex.match(path) and method in (None, r.method)), None)


def _body_model(name: str) -> type[BaseModel]:
    from app import schemas
    from app.inference import schemas as inference_schemas

    model = getattr(schemas, name, None) or getattr(inference_schemas, name)
    assert issubclass(model, BaseModel)
    return model


def test_curl_examples_name_real_routes_with_valid_bodies(routes: list[Route]) -> None:
    curls = [c for block in _bash_blocks() for c in _curls(block)]
    assert {c.path for c in curls} >= {"/files", "/jobs", "/jobs/$JOB_ID", "/generate"}
    for curl in curls:
        route = _route_for(routes, curl.method, _without_shell_vars(curl.path))
        assert route is not None, f"README: no route for {curl.method} {curl.path}"
        if curl.body is not None:
            _check_body(route, json.loads(_without_shell_vars(curl.body)))


def _check_body(route: Route, body: dict[str, Any]) -> None:
    assert route.body_schema, f"README sends a JSON body to {route.template}, which takes none"
    _body_model(route.body_schema).model_validate(body)
    if "hyperparameters" in body:  # JobCreate.hyperparameters: the client's part of TrainConfig
        from app.ml.train_config import Hyperparameters

        Hyperparameters.model_validate(body["hyperparameters"])


def test_generate_example_uses_an_adapter_and_reasoning_effort() -> None:
    generate = [c for block in _bash_blocks() for c in _curls(block) if c.path == "/generate"]
    body = json.loads(_without_shell_vars(generate[0].body or "{}"))
    assert body["adapter"] and body["reasoning_effort"] in ("low", "medium", "high")


def test_every_url_in_the_readme_is_a_route(routes: list[Route]) -> None:
    paths = set(re.findall(re.escape(BASE_URL) + r"(/[^\s'\"`)|]*)", README.read_text()))
    assert len(paths) >= 6
    for path in paths:
        concrete = _without_shell_vars(path.rstrip(".,;:"))  # prose punctuation is not part of it
        assert _route_for(routes, None, concrete), f"README: no route {path}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_blocks_parse() -> None:
    for block in _bash_blocks():
        result = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
        assert result.returncode == 0, f"README shell block does not parse:\n{block}\n{result.stderr}"


def test_files_the_readme_names_exist() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([^)#:]+)\)", text)  # relative Markdown links
    named = re.findall(r"\b((?:scripts|configs|app|docs)/[\w./-]+\.(?:py|sh|yaml|md|jsonl))\b", text)
    assert links and named
    missing = sorted({p for p in links + named if not (ROOT / p).exists()})
    assert not missing, f"README names files that do not exist: {missing}"


def _expand_braces(name: str) -> list[str]:
    match = re.search(r"\{([\w,]+)\}", name)
    if not match:
        return [name]
    return [
        n for part in match.group(1).split(",") for n in _expand_braces(name.replace(match.group(0), part, 1))
    ]


def test_metric_names_in_the_readme_are_exported() -> None:
    source = (ROOT / "app/api/metrics.py").read_text()
    listed = re.findall(r"`(gptoss_[\w{},]+?)(?:\{[a-z_,]+\})?`", README.read_text())
    names = [n for name in listed for n in _expand_braces(name)]
    assert len(names) >= 10
    for name in names:
        assert f'"{name.removesuffix("_total")}"' in source, (
            f"README lists {name}; app/api/metrics.py has none"
        )


def test_script_commands_use_real_flags() -> None:
    commands = [line for block in _bash_blocks() for line in block.splitlines() if "python scripts/" in line]
    assert {re.search(r"scripts/(\w+)\.py", c).group(1) for c in commands} >= {"train", "infer", "export"}  # type: ignore[union-attr]
    for command in commands:
        script = re.search(r"(scripts/\w+\.py)(.*)", command)
        assert script is not None
        source = (ROOT / script.group(1)).read_text()
        for flag in re.findall(r"(--[\w-]+)", script.group(2)):
            assert f'"{flag}"' in source, f"README: {script.group(1)} has no {flag} option"


# --- the two commands ----------------------------------------------------------------------------------


def test_quick_start_commands_exist_and_ci_runs_the_test_command() -> None:
    blocks = _bash_blocks()
    assert blocks[0].strip() == "scripts/serve.sh"
    assert blocks[1].strip() == "scripts/test.sh"
    for script in ("scripts/serve.sh", "scripts/test.sh", "scripts/install.sh", ".ci/run"):
        path = ROOT / script
        assert path.is_file() and path.stat().st_mode & 0o111, f"{script} must exist and be executable"
    ci_commands = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci_commands[-1] == "exec scripts/test.sh"


def _fake_checkout(tmp_path: Path, pytest_exit: int, ruff_exit: int = 0) -> Path:
    """A copy of scripts/test.sh and .ci/run over stand-in tools that exit as told and log their call.

    Stand-ins, not the real tools: this checks the scripts' exit-code handling in a second, where the
    real install and suite take minutes (the real ones run in CI, through these very scripts)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / ".ci").mkdir()
    (root / "bin").mkdir()
    (root / ".venv/bin").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/test.sh", root / "scripts/test.sh")
    shutil.copy(ROOT / ".ci/run", root / ".ci/run")
    (root / "scripts/install.sh").write_text("#!/usr/bin/env bash\necho install >> calls.log\n")
    (root / "scripts/install-system.sh").write_text("#!/usr/bin/env bash\necho install-system >> calls.log\n")
    (root / ".venv/bin/activate").write_text(f'export PATH="{root}/bin:$PATH"\n')
    for tool, code in (("ruff", ruff_exit), ("mypy", 0), ("pytest", pytest_exit)):
        (root / "bin" / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> calls.log\nexit {code}\n')
    for path in [
        *root.glob("bin/*"),
        root / "scripts/test.sh",
        root / "scripts/install.sh",
        root / "scripts/install-system.sh",
        root / ".ci/run",
    ]:
        path.chmod(0o755)
    return root


@pytest.mark.parametrize(
    ("pytest_exit", "ruff_exit", "expected"), [(0, 0, 0), (1, 0, 1), (5, 0, 5), (0, 1, 1)]
)
def test_ci_passes_only_when_every_check_passes(
    tmp_path: Path, pytest_exit: int, ruff_exit: int, expected: int
) -> None:
    root = _fake_checkout(tmp_path, pytest_exit, ruff_exit)

    result = subprocess.run(["bash", ".ci/run"], cwd=root, capture_output=True, text=True, timeout=60)

    assert result.returncode == expected, result.stderr
    calls = (root / "calls.log").read_text().splitlines()
    # Every check runs, also after one has failed.
    assert calls == [
        "install",
        "install-system",
        "ruff check .",
        "ruff format --check .",
        "mypy app workers scripts bench",
        "pytest -n 2 --dist loadfile",
    ]
    if pytest_exit == 5:
        assert "no tests" in result.stderr  # said, not hidden


def test_install_pins_torch_before_the_project() -> None:
    script = (ROOT / "scripts/install.sh").read_text()
    assert script.index("'torch==2.13.0'") < script.index("-e '.[dev]'")


if __name__ == "__main__":
    write_table()
    print(f"wrote the settings table into {README}")
