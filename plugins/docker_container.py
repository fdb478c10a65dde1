"""Running one container: ONE specification (:class:`ContainerSpec`) for the Docker SDK and for a rendered
``docker run``, and the run itself (live log lines, wait, stop, removal on every ending).

The docker backend builds a spec per stage (``DockerBackend.container_spec``) and hands it to
:func:`run_container` or renders it with :meth:`ContainerSpec.cli_args`; a model-server runtime builds one for
its long-running server container (``ContainerSpec.sdk_kwargs`` + ``client.containers.run``). Bind mounts are
structured (:class:`BindMount`): ``--mount`` values are written as CSV fields, the format the Docker CLI parses,
so a comma or quote in a path stays part of the path and never becomes an option.

Only the standard library is imported at module import time; ``docker`` inside the functions that need it.
"""
from __future__ import annotations

import codecs
import csv
import io
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mlflowctl.backends import Cancelled, LogWriter, StageRun
from mlflowctl.errors import MlflowctlError, UnavailableError

POLL_SECONDS = 0.1
LABEL_PROJECT = "mlflowctl.project"
LABEL_STAGE = "mlflowctl.stage"
LABEL_KEY = "mlflowctl.key"


@dataclass(frozen=True)
class BindMount:
    """A host folder (or file) bind-mounted into the container."""

    source: str
    target: str
    read_only: bool = True

    def fields(self) -> list[str]:
        """The ``--mount`` fields, one ``key=value`` each (never joined by hand)."""
        return ["type=bind", f"source={self.source}", f"target={self.target}"] + (["readonly"] if self.read_only else [])

    def cli_value(self) -> str:
        """The fields as one CSV record, as ``docker run --mount`` reads it: a field holding a comma, a quote or a
        line break is quoted, so it stays one field."""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow(self.fields())
        return buffer.getvalue()


@dataclass
class ContainerSpec:
    """What one container is: built once, used by the SDK (:meth:`sdk_kwargs`) and the CLI (:meth:`cli_args`)."""

    image: str
    command: list[str]
    name: str
    environment: dict[str, str] = field(default_factory=dict)
    user: str = ""
    network: str = "host"
    mounts: list[BindMount] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    init: bool = True
    cpus: float = 0.0
    memory: str = ""
    gpus: int = 0
    remove: bool = True  # for the CLI: --rm (the SDK path removes it itself, see run_container)

    def sdk_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``client.containers.create`` / ``run`` (docker SDK)."""
        from docker.types import DeviceRequest, Mount

        kwargs: dict[str, Any] = dict(
            image=self.image, command=list(self.command), name=self.name, detach=True,
            environment=dict(self.environment), network_mode=self.network,
            mounts=[Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only) for m in self.mounts],
            labels=dict(self.labels), init=self.init, stdin_open=False, tty=False,
        )
        if self.user:
            kwargs["user"] = self.user
        if self.cpus:
            kwargs["nano_cpus"] = int(float(self.cpus) * 1e9)
        if self.memory:
            kwargs["mem_limit"] = self.memory
        if self.gpus:
            kwargs["device_requests"] = [DeviceRequest(count=int(self.gpus), capabilities=[["gpu"]])]
        return kwargs

    def cli_args(self, base_url: str = "", image: str | None = None) -> list[str]:
        """The equivalent ``docker run`` argument list (``image``: a tag to name instead of the id)."""
        args = ["docker"] + (["--host", base_url] if base_url else []) + ["run"]
        if self.remove:
            args.append("--rm")
        args += ["--name", self.name]
        if self.init:
            args.append("--init")
        if self.user:
            args += ["--user", self.user]
        args += ["--network", self.network]
        if self.cpus:
            args += ["--cpus", f"{float(self.cpus):g}"]
        if self.memory:
            args += ["--memory", self.memory]
        if self.gpus:
            args += ["--gpus", str(int(self.gpus))]
        for key, value in sorted(self.labels.items()):
            args += ["--label", f"{key}={value}"]
        for key, value in sorted(self.environment.items()):
            args += ["--env", f"{key}={value}"]
        for mount in self.mounts:
            args += ["--mount", mount.cli_value()]
        return args + [image or self.image, *self.command]


def run_container(client: Any, spec: ContainerSpec, run: StageRun, *, shown_image: str = "",
                  stop_timeout: float = 3.0, keep: bool = False, memory_note: str = "") -> int:
    """Run ``spec`` to its end for ``run``: log lines live, cancel/timeout/Ctrl-C stop it; the container is
    removed on every ending (unless ``keep``). Returns the exit code."""
    import docker.errors

    started = time.monotonic()
    container = None
    status: dict[str, Any] = {}
    exit_code = -1
    try:
        with LogWriter(run) as log:
            try:
                container = client.containers.create(**spec.sdk_kwargs())
                _track(container)
                container.start()
            except docker.errors.APIError as exc:
                raise MlflowctlError(f"stage {run.stage}: cannot start container {spec.name} from "
                                     f"{shown_image or spec.image}: {_api_reason(exc)}",
                                     hint="check backends.docker in mlflowctl.yaml") from None
            pump = _LogPump(container, log)
            reader = threading.Thread(target=pump.follow, daemon=True, name=f"logs-{spec.name}")
            reader.start()
            done = threading.Event()
            waiter = threading.Thread(target=_wait_exit, args=(container, status, done), daemon=True,
                                      name=f"wait-{spec.name}")
            waiter.start()
            try:
                while not done.wait(POLL_SECONDS):
                    run.raise_if_stopped(started)
            except KeyboardInterrupt:
                stop_container(container, stop_timeout)
                reader.join(timeout=2)
                raise Cancelled(f"stage {run.stage} interrupted") from None
            except BaseException:
                stop_container(container, stop_timeout)
                reader.join(timeout=2)
                raise
            reader.join(timeout=10)
            if not reader.is_alive():
                pump.finish()
            if "error" in status:
                raise UnavailableError(f"stage {run.stage}: lost the container {spec.name}: {status['error']}")
            exit_code = int(status.get("StatusCode", -1))
            if exit_code != 0:
                try:
                    container.reload()
                    if container.attrs.get("State", {}).get("OOMKilled"):
                        log.line(f"container {spec.name} was killed: out of memory ({memory_note or 'no limit'})")
                except docker.errors.APIError:
                    pass
    finally:
        if container is None:  # interrupted between create and its return: find it by name
            container = _find_container(client, spec.name)
        if container is not None:
            dispose_container(container, run, keep)
            _untrack(container)
    return exit_code


def stop_container(container: Any, timeout: float) -> None:
    """SIGTERM (through the init process), SIGKILL after ``timeout``; tolerate a vanished container."""
    import docker.errors

    try:
        container.stop(timeout=max(0, int(round(float(timeout)))))
    except KeyboardInterrupt:
        _quiet(container.kill)
    except (docker.errors.APIError, docker.errors.NotFound):
        pass


def dispose_container(container: Any, run: StageRun, keep: bool = False) -> None:
    if keep:
        run.emit(f"kept container {container.name} (docker logs {container.name}; docker rm {container.name})")
        return
    for _ in range(3):  # a second Ctrl-C must not leave the container behind
        try:
            _quiet(lambda: container.remove(force=True))
            return
        except KeyboardInterrupt:
            continue


# Containers started and not yet disposed of, for the exit hook: doit's parallel runner (-n) runs stages
# in daemon threads, which die with the interpreter on Ctrl-C before they can clean up after themselves.
_LIVE: dict[str, Any] = {}
_LIVE_LOCK = threading.Lock()
_EXIT_HOOK: list[bool] = []


def _track(container: Any) -> None:
    with _LIVE_LOCK:
        _LIVE[container.id] = container
        if not _EXIT_HOOK:
            import atexit

            atexit.register(_remove_live_containers)
            _EXIT_HOOK.append(True)


def _untrack(container: Any) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(container.id, None)


def _remove_live_containers() -> None:
    """At interpreter exit: force-remove the stage containers whose run did not get to clean up."""
    with _LIVE_LOCK:
        left = list(_LIVE.values())
        _LIVE.clear()
    for container in left:
        _quiet(lambda c=container: c.remove(force=True))


def remove_leftover_containers(client: Any = None, project: str | None = None, running: bool = False) -> list[str]:
    """Remove stage containers labelled ``mlflowctl.project`` (of ``project``, or of every project).

    Running containers (a pipeline in progress) are left alone unless ``running``.
    """
    import docker
    import docker.errors

    client = client or docker.from_env()
    label = f"{LABEL_PROJECT}={project}" if project else LABEL_PROJECT
    removed = []
    for container in client.containers.list(all=True, filters={"label": label}, ignore_removed=True):
        if container.status in ("running", "restarting") and not running:
            continue
        try:
            container.remove(force=True)
            removed.append(container.name)
        except docker.errors.APIError:
            pass
    return removed


class _LogPump:
    """Follow the container's stdout+stderr and hand complete lines to the log writer.

    The daemon's follow stream can end before the last bytes a container wrote
    (typically a final line without a newline) are delivered; :meth:`finish`
    compares with the complete log and passes on what the stream missed.
    """

    def __init__(self, container: Any, log: LogWriter) -> None:
        self.container = container
        self.log = log
        self.seen = 0
        self.pending = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        self.pending += self.decoder.decode(chunk)
        *complete, self.pending = self.pending.split("\n")
        for line in complete:
            self.log.line(line.rstrip("\r"))

    def follow(self) -> None:
        try:
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                self.feed(chunk)
        except Exception:  # the container was removed under us (cancel) or the stream broke
            pass

    def finish(self) -> None:
        """After the container exited and :meth:`follow` returned: what the stream missed, then the last line."""
        try:
            full = self.container.logs(stdout=True, stderr=True, stream=False)
        except Exception:  # noqa: BLE001 - the log is as complete as it can be
            full = b""
        if len(full) > self.seen:
            self.feed(full[self.seen:])
        self.pending += self.decoder.decode(b"", final=True)
        if self.pending:
            self.log.line(self.pending.rstrip("\r"))
            self.pending = ""


def _wait_exit(container: Any, status: dict[str, Any], done: threading.Event) -> None:
    try:
        status.update(container.wait())
    except Exception as exc:  # pragma: no cover - daemon died or container removed
        status["error"] = _reason(exc)
    finally:
        done.set()


def _find_container(client: Any, name: str) -> Any:
    try:
        found = client.containers.list(all=True, filters={"name": f"^/?{name}$"}, ignore_removed=True)
    except Exception:  # noqa: BLE001 - nothing more we can do
        return None
    return found[0] if found else None


def _quiet(fn: Callable[[], Any]) -> None:
    import docker.errors

    try:
        fn()
    except (docker.errors.APIError, docker.errors.NotFound):
        pass
    except Exception:  # connection trouble while cleaning up: nothing better to do
        pass


def _api_reason(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc).strip().splitlines()[0][:300]


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for a connection failure (the innermost OS error if there is one)."""
    seen, cur, inner = set(), exc, None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            inner = cur.strerror
        for arg in getattr(cur, "args", ()):
            if isinstance(arg, BaseException) and id(arg) not in seen:
                reason = getattr(arg, "reason", None)
                if isinstance(reason, BaseException):
                    cur_arg = reason
                else:
                    cur_arg = arg
                if isinstance(cur_arg, OSError) and cur_arg.strerror:
                    inner = cur_arg.strerror
        cur = cur.__cause__ or cur.__context__
    if inner:
        return inner
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    match = re.search(r"(\[Errno -?\d+\] [^'\")]+|Connection refused|No such file or directory|timed out)", text)
    return (match.group(1) if match else text)[:300]
