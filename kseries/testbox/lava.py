"""A LAVA lab as a test box: its settings in configs/testboxes.toml, and LAVA's REST API.

A box with `kind = "lava"` is not reached over SSH: kseries renders a LAVA job
(templates/lava/), submits it to the server's REST API (v0.2), follows it and reads back its
results and log (kseries/testbox/lavajob.py). This module holds what that needs to know about
the lab: where the server is, which devices may run the job, the token, and where the lab reads
the job's artifacts from.

The token is read from the environment variable `token_env` or from `token_file`, a file
outside the project (a token in the repository would be committed). It is sent only in the
Authorization header and never appears in a message, a log line or a saved file.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kseries.config import INTEGER, STRING, STRINGS, Keys, Where
from kseries.errors import ToolkitError
from kseries.paths import PROJECT

CONTEXT = Keys({"memory": INTEGER, "extra_options": STRINGS})
ARTIFACTS = Keys({"url": STRING, "dir": STRING})
LAVA = Keys(
    {
        "url": STRING,
        "device_type": STRING,
        "tags": STRINGS,
        "token_env": STRING,
        "token_file": STRING,
        "artifacts": ARTIFACTS,
        "context": CONTEXT,
        "tsc_khz": INTEGER,
        "priority": STRING,
        "poll": INTEGER,
    }
)
PRIORITIES = ("high", "medium", "low")


class LavaError(ToolkitError):
    """The lab refused or failed something; `verdict` is what the run's column says."""

    verdict = "error"


class ServerUnreachable(LavaError):
    verdict = "unreachable"


class TokenRefused(LavaError):
    pass


class NoDevice(LavaError):
    pass


@dataclass(frozen=True)
class LavaSettings:
    """A [box.NAME] of kind lava: the [box.NAME.lava] table, checked."""

    url: str  # the server, e.g. "http://127.0.0.1:8000"
    device_type: str
    tags: tuple[str, ...] = ()
    token_env: str = ""
    token_file: Path | None = None
    artifact_url: str = ""  # file:///DIR for a worker on this machine, or http(s)://ROOT
    artifact_dir: Path | None = None  # where kseries puts the files that URL serves
    context: dict[str, Any] = field(default_factory=dict)  # the job's context (qemu options)
    tsc_khz: int = -1  # under TCG: tsc_early_khz= for the guest; -1: this machine's, 0: none
    priority: str = "medium"
    poll: int = 1  # seconds between two looks at the job's state

    def token(self) -> str:
        """The API token: the environment variable wins over the file."""
        if self.token_env and os.environ.get(self.token_env):
            return os.environ[self.token_env].strip()
        if self.token_file is not None:
            try:
                return self.token_file.read_text().strip()
            except OSError as e:
                raise TokenRefused(
                    f"cannot read the LAVA token file {self.token_file}: {e.strerror}",
                    f"write the token there (mode 600) or set ${self.token_env or 'TOKEN_ENV'}",
                ) from None
        raise TokenRefused(
            f"no LAVA token: ${self.token_env} is not set and no token_file is configured",
            "export the variable, or set token_file to a file outside the repository",
        )


def parse(table: dict[str, Any], directory: Path, where: Where) -> LavaSettings:
    """The [box.NAME.lava] table; paths relative to the configs directory."""
    where.check(LAVA, table)
    for key in ("url", "device_type"):
        if not table.get(key):
            raise where.error(key, f"a lava box needs {key}", f'set {key} = "..."')
    url = table["url"].rstrip("/")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise where.error("url", f"url {url!r} is not http(s)", 'write it as "http://HOST:PORT"')
    token_file = None
    if table.get("token_file"):
        token_file = (directory / Path(table["token_file"]).expanduser()).resolve()
        if token_file.is_relative_to(PROJECT):
            raise where.error(
                "token_file",
                f"token_file {token_file} is inside the project, where it would be committed",
                "keep it outside the repository, e.g. ~/.config/kseries/lava-token",
            )
    if not table.get("token_env") and token_file is None:
        raise where.error(None, "a lava box needs token_env or token_file", 'set token_env = "..."')
    artifacts = table.get("artifacts", {})
    where.table("artifacts").check(ARTIFACTS, artifacts)
    artifact_url = artifacts.get("url", "").rstrip("/")
    scheme = urllib.parse.urlsplit(artifact_url).scheme
    if scheme == "file":
        artifact_dir = Path(urllib.parse.urlsplit(artifact_url).path)
        if artifacts.get("dir"):
            raise where.table("artifacts").error(
                "dir", "a file:// url is its own directory", "drop dir, or serve it over http"
            )
    elif scheme in ("http", "https"):
        if not artifacts.get("dir"):
            raise where.table("artifacts").error(
                "dir", "an http(s) url needs dir, the local directory it serves", 'set dir = "..."'
            )
        artifact_dir = (directory / Path(artifacts["dir"]).expanduser()).resolve()
    else:
        raise where.table("artifacts").error(
            "url",
            f"url {artifact_url!r} is neither file:// nor http(s)://",
            'a worker on this machine: url = "file:///var/tmp/kseries-lava-artifacts"',
        )
    priority = table.get("priority", "medium")
    if priority not in PRIORITIES:
        raise where.error("priority", f"priority {priority!r}", "high, medium or low")
    return LavaSettings(
        url=url,
        device_type=table["device_type"],
        tags=tuple(table.get("tags", ())),
        token_env=table.get("token_env", ""),
        token_file=token_file,
        artifact_url=artifact_url,
        artifact_dir=artifact_dir,
        context=dict(table.get("context", {})),
        tsc_khz=table.get("tsc_khz", -1),
        priority=priority,
        poll=max(1, table.get("poll", 1)),
    )


class Client:
    """LAVA's REST API v0.2, with the token in the Authorization header only."""

    def __init__(self, settings: LavaSettings, timeout: float = 30) -> None:
        self.settings = settings
        self.url = settings.url
        self.timeout = timeout
        self._token: str | None = None

    def job_url(self, job_id: int) -> str:
        return f"{self.url}/scheduler/job/{job_id}"

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        if self._token is None:
            self._token = self.settings.token()
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}/api/v0.2/{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Token {self._token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            detail = _detail(e.read())
            if e.code in (401, 403):
                raise TokenRefused(
                    f"the LAVA server {self.url} refused the token ({e.code}: {detail})",
                    "check the token (lava-server manage tokens list --user USER) and "
                    f"${self.settings.token_env or 'the token file'}",
                ) from None
            raise LavaError(
                f"LAVA {method} /api/v0.2/{path}: {e.code} {detail}", "see the server's log"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerUnreachable(
                f"the LAVA server {self.url} is unreachable: {reason}",
                "is it running? (bash ci/lava-setup.sh start for the local lab)",
            ) from None

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def text(self, path: str) -> str:
        return self._request("GET", path).decode("utf-8", "replace")

    def whoami(self) -> str:
        """The user the token belongs to: proves the server answers and takes the token."""
        user = self.get("system/whoami/").get("user")
        if not user:
            raise TokenRefused(
                f"the LAVA server {self.url} took no user from the token", "check the token"
            )
        return str(user)

    def devices(self) -> list[dict[str, Any]]:
        """The devices of the box's type (and tags) that can take a job now or soon."""
        query = urllib.parse.urlencode({"device_type": self.settings.device_type, "limit": 100})
        found = self.get(f"devices/?{query}")["results"]
        wanted = set(self.settings.tags)
        return [d for d in found if wanted <= set(d.get("tags", []))]

    def worker_online(self, name: str) -> bool:
        return self.get(f"workers/{urllib.parse.quote(name)}/").get("state") == "Online"

    def check_online(self) -> str:
        """Refuse unless some device of the type (and tags) is healthy on an online worker;
        return what was found, for the log."""
        devices = self.devices()
        usable, seen = [], []
        for device in devices:
            worker = device.get("worker_host") or ""
            online = bool(worker) and self.worker_online(worker)
            state = f"{device['hostname']} ({device['health']}, worker {worker or '-'} "
            seen.append(state + ("online)" if online else "offline)"))
            if online and device.get("health") in ("Good", "Unknown"):
                usable.append(device["hostname"])
        if not usable:
            what = self.settings.device_type + (
                f" with tags {', '.join(self.settings.tags)}" if self.settings.tags else ""
            )
            raise NoDevice(
                f"no {what} device online on {self.url}: "
                + ("; ".join(seen) if seen else "the lab has none"),
                "bring a device's worker online and its health to Good",
            )
        return ", ".join(usable)

    def submit(self, definition: str) -> int:
        done = json.loads(self._request("POST", "jobs/", {"definition": definition}))
        ids = done.get("job_ids") or []
        if not ids:
            raise LavaError(f"LAVA took no job: {done.get('message', done)}", "see job.yaml")
        return int(ids[0])

    def job(self, job_id: int) -> dict[str, Any]:
        return self.get(f"jobs/{job_id}/")

    def log(self, job_id: int) -> str:
        return self.text(f"jobs/{job_id}/logs/")

    def results(self, job_id: int) -> list[dict[str, Any]]:
        """Every test case LAVA recorded for the job (its own "lava" suite included)."""
        out: list[dict[str, Any]] = []
        path: str | None = f"jobs/{job_id}/tests/?limit=500"
        while path:
            page = self.get(path)
            out += page["results"]
            following = page.get("next")
            path = following.split("/api/v0.2/", 1)[1] if following else None
        return out

    def cancel(self, job_id: int) -> None:
        self._request("GET", f"jobs/{job_id}/cancel/")


def _detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:200]
    if isinstance(data, dict):
        return str(data.get("detail") or data.get("message") or data)[:300]
    return str(data)[:300]
