"""The container files: the image holds what each process reads, and compose runs the
Procfile's own commands.

No Docker engine runs where EventFlow is developed, so the image is checked by laying out
a tree as the Dockerfile's COPY lines would and running a process from it.
"""

from __future__ import annotations

import shlex
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from eventflow.settings import Settings
from tests.processes import ROOT, Process, procfile_command
from tests.smtp_server import free_port
from tests.waiting import wait_for

#: The Procfile's process types, each a compose service of the same name.
PROCESS_TYPES = ("web", "worker", "flower")


def dockerfile_layout(target: Path) -> Path:
    """Copy what ``deploy/Dockerfile``'s COPY lines copy into ``target`` (its WORKDIR)."""
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if not line.upper().startswith("COPY "):
            continue
        words = shlex.split(line, comments=True)
        *sources, destination = [word for word in words[1:] if not word.startswith("--")]
        into_directory = destination.endswith("/") or len(sources) > 1
        for source in map(ROOT.joinpath, sources):
            place = target / destination
            if source.is_dir():
                shutil.copytree(source, place, dirs_exist_ok=True)
            else:
                if into_directory:
                    place = place / source.name
                place.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, place)
    return target


def test_flower_in_the_image_refuses_to_start_without_authentication(tmp_path: Path) -> None:
    # Given the files the image holds, laid out as its COPY lines put them
    app = dockerfile_layout(tmp_path / "app")
    # When Flower is started there, as compose starts it, with no FLOWER_BASIC_AUTH
    command = f"sh {app / 'deploy' / 'procfile-run'} flower"
    flower = Process(command, {"FLOWER_BASIC_AUTH": "", "EVENTFLOW_FLOWER_NO_AUTH": "",
                               "PORT": "0", "REDIS_URL": "redis://127.0.0.1:1/0"},
                     tmp_path / "flower.log")
    try:
        # Then it exits at once, saying why (flowerconfig.py is in the image and is read)
        assert flower.popen.wait(timeout=20) != 0
        assert "refuses to start without authentication" in flower.output()
    finally:
        flower.stop()


def test_every_compose_service_runs_its_procfile_line() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in PROCESS_TYPES:
        procfile_command(name)  # the type exists in the Procfile
        assert compose["services"][name]["command"] == ["sh", "deploy/procfile-run", name]
    image = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'CMD ["sh", "deploy/procfile-run", "web"]' in image


def test_the_sentinel_compose_file_runs_the_shipped_layout_and_points_every_process_at_it(
) -> None:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    sentinel = yaml.safe_load((ROOT / "deploy" / "sentinel" / "compose.yml").read_text())
    services = sentinel["services"]
    # three Redis nodes on the shipped Sentinel configuration, two replicas of the first
    assert {"redis", "redis-2", "redis-3", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(
        services)
    assert "redis" in base["services"]
    for node in ("redis", "redis-2", "redis-3"):
        assert "./deploy/sentinel/redis.conf:/usr/local/etc/redis/redis.conf:ro" in services[
            node]["volumes"]
    assert services["redis-2"]["command"][-3:] == ["--replicaof", "redis", "6379"]
    # Sentinels watching the master by the name every process is given
    shipped = (ROOT / "deploy" / "sentinel" / "sentinel.conf").read_text()
    assert "sentinel monitor eventflow redis-1 6379 2" in shipped
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        assert "s/redis-1 6379/redis 6379/" in services[name]["command"][-1]
    for process in PROCESS_TYPES:
        env = services[process]["environment"]
        assert env["REDIS_URL"].count("sentinel://") == 3
        assert env["EVENTFLOW_SENTINEL_MASTER"] == "eventflow"
        assert env["EVENTFLOW_REDIS_MIN_REPLICAS"] == "1"
        Settings.from_env({**env, "EVENTFLOW_API_KEYS": "producer-key-0123456789abcdef"})


def health_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def test_procfile_run_runs_the_procfiles_line_with_the_environments_values(
    tmp_path: Path,
) -> None:
    # When procfile-run is asked for a process type the Procfile lacks, it says so
    unknown = Process("sh deploy/procfile-run nosuchtype", {}, tmp_path / "unknown.log")
    assert unknown.popen.wait(timeout=10) == 2
    assert "no process type 'nosuchtype'" in unknown.output()
    unknown.stop()
    # And for `web` it runs the Procfile's granian, its ${PORT:-8000} taken from $PORT
    port = free_port()
    web = Process("sh deploy/procfile-run web", {"PORT": str(port), "WEB_CONCURRENCY": "1",
                                                  "REDIS_URL": "redis://127.0.0.1:1/0"},
                  tmp_path / "web.log")
    try:
        web.wait_for_output("Started worker-1", timeout=30)
        # (Redis is unreachable on purpose: /health answers 503, from this port)
        assert wait_for(lambda: health_status(port), timeout=30, message="the web process") == 503
    finally:
        web.stop()
