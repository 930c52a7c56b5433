"""Child processes of an isolated sweep (bench.measure.sweep drives them).

`python -m bench.measure.worker` measures one request read from stdin and prints its row.
`python -m bench.measure.worker --serve` is a fork server: it imports torch, the models and the
measurement code once, then for each request (one JSON line on stdin) forks a child that
measures it and exits, and answers one JSON line on its stdout (the first line, {"ready":
seconds of imports}, says it is ready). A forked child is a fresh
process for everything a measurement touches (CUDA context, caching allocator, cuDNN and
Triton caches, lazily built model caches): the server itself never initialises CUDA, as
PyTorch requires of a process that forks CUDA users. What the fork saves is the interpreter
start and the imports, ~3-5 s per config (issue 15).

A request is {"config": RunConfig.to_json(), "counted": params/FLOPs columns or null, "sent":
the parent's time.time()}. Both kinds of worker die with their parent (Linux: the kernel sends
SIGKILL, prctl PR_SET_PDEATHSIG; elsewhere a thread polls the parent pid), so a killed sweep
leaves nothing measuring on its device.
"""
import time

_T0 = time.time()  # interpreter up: phase_s["start"] ends here (the imports come later)

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

ROW_MARKER = "BENCH_ROW "
PARENT_ENV = "BENCH_PARENT_PID"  # the pid the worker must outlive no longer than


def die_with_parent(expected_parent: int | None = None) -> None:
    """SIGKILL this process as soon as its parent dies; exit at once if it is already gone."""
    parent = expected_parent or os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # it died before the prctl took effect
                os._exit(1)
            return
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _expected_parent() -> int | None:
    value = os.environ.get(PARENT_ENV)
    return int(value) if value and value.isdigit() else None


def measure_request(request: dict, *, started: float, imported: float) -> dict:
    """The row of one request, with the worker's share of `phase_s`: `start` (from the parent
    sending it to this process running), `import`."""
    from bench.measure.config import RunConfig
    from bench.measure.row import measure_config

    cfg = RunConfig.from_json(request["config"])
    row = measure_config(cfg, request.get("counted"))
    sent = request.get("sent")
    row.setdefault("phase_s", {}).update(
        start=max(0.0, started - sent) if sent else None, **{"import": imported})
    return row


def _import_measurement() -> float:
    """Import what a measurement needs (torch, the models); returns the seconds it took."""
    t0 = time.time()
    import bench.measure.row  # noqa: F401

    return time.time() - t0


def _single() -> None:
    imported = _import_measurement()
    request = json.loads(sys.stdin.read())
    if "config" not in request:  # a bare RunConfig (the format before fork servers)
        request = {"config": request}
    row = measure_request(request, started=_T0, imported=imported)
    sys.stdout.write(ROW_MARKER + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()


def _warm_caches() -> None:
    """What every child would otherwise do again, done once before forking; nothing here may
    initialise CUDA. The git state and GPU driver version every row records; torch._dynamo,
    which the first call of a torch.library custom op (Serpent's selective scan) imports:
    ~2 s of every config otherwise."""
    from bench import environment

    environment.git_state()
    environment.driver_version()
    import torch._dynamo  # noqa: F401


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"worker killed by signal {os.WTERMSIG(status)}"
    return f"worker exited with code {os.waitstatus_to_exitcode(status)}"


def _serve() -> None:
    reply_to = os.fdopen(os.dup(1), "w")  # the protocol channel...
    os.dup2(2, 1)  # ...and whatever a model prints goes to stderr, never into it
    imported = _import_measurement()
    _warm_caches()
    reply_to.write(json.dumps({"ready": imported}) + "\n")  # requests may come now
    reply_to.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, hand the row back, exit without cleanup
            code = 1
            try:
                os.close(read_end)
                die_with_parent()
                row = measure_request(request, started=time.time(), imported=0.0)
                with os.fdopen(write_end, "wb") as f:
                    f.write((json.dumps(row, default=str) + "\n").encode())
                code = 0
            except BaseException:  # noqa: BLE001 - the server reports the exit, stderr says why
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            data = f.read()  # until the child exits (rows can exceed a pipe's buffer)
        _, status = os.waitpid(pid, 0)
        if data.endswith(b"\n"):
            reply = {"row": json.loads(data)}
        else:
            reply = {"failed": _exit_text(status)}
        reply_to.write(json.dumps(reply, default=str) + "\n")
        reply_to.flush()


def main() -> None:
    die_with_parent(_expected_parent())  # before the imports: they take seconds
    if "--serve" in sys.argv[1:]:
        _serve()
    else:
        _single()


if __name__ == "__main__":
    main()
