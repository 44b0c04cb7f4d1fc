"""The service's import graph runs one way (config -> db -> jobs, catalog_refresh -> workers ->
service -> flask_app) and serving never loads the training module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from service_support import DEMO_DATA, REPO_ROOT


def run_python(code: str) -> Any:
    """Run ``code`` in a fresh interpreter at the repository root; the JSON it prints last."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_creating_the_app_and_answering_never_imports_train(checkpoint: Path) -> None:
    code = f"""
import json, sys
from pathlib import Path
from config import Settings
from flask_app import create_app

settings = Settings(model_path=Path({str(checkpoint)!r}), catalog_dir=Path({str(DEMO_DATA)!r}),
                    database_url="postgresql://nobody@127.0.0.1:1/none", db_connect_timeout=1)
app = create_app(settings)
songs = [int(line.split(",")[2]) for line in
         open({str(DEMO_DATA / "playlist_songs.csv")!r}).read().splitlines()[1:6]]
response = app.test_client().post("/recommendations", json={{"song_ids": songs, "k": 5}})
training = ("train", "evaluation", "torch.utils.tensorboard")
print(json.dumps({{"status": response.status_code, "body": response.json,
                  "loaded": sorted(name for name in sys.modules if name in training)}}))
"""
    answer = run_python(code)
    assert answer["status"] == 200, answer["body"]
    assert len(answer["body"]["recommendations"]) == 5
    assert all(item["song"] for item in answer["body"]["recommendations"])
    assert answer["loaded"] == [], "serving imported training modules"


@pytest.mark.parametrize(("module", "never"), [
    ("config", ["db", "jobs", "workers", "service", "flask_app", "flask", "psycopg2"]),
    ("db", ["jobs", "workers", "service", "flask_app", "flask", "torch"]),
    ("jobs", ["workers", "service", "flask_app", "api_models", "flask", "torch"]),
    ("catalog_names", ["db", "workers", "service", "flask_app", "flask", "torch"]),
    ("catalog_refresh", ["workers", "service", "flask_app", "api_models", "flask", "torch",
                         "cold_start"]),
    ("workers", ["service", "flask_app", "api_models", "flask", "torch"]),
    ("service", ["flask_app", "api_models", "flask", "torch", "train"]),
    ("api_models", ["service", "jobs", "workers", "flask_app", "torch"]),
])
def test_service_modules_import_only_downstream(module: str, never: list[str]) -> None:
    code = f"""
import json, sys
import {module}
print(json.dumps(sorted(name for name in {never!r} if name in sys.modules)))
"""
    assert run_python(code) == [], f"{module} imports a later layer"
