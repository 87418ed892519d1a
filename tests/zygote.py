"""A fork server for the tests' stage runs (conftest.run): it imports torch, FSDP2 and dynamo once, then forks
one child per `python STAGE.py ARGS` and runs the script there as __main__ with the run's argv, environment,
working directory and files for stdout/stderr. Each run is still its own process, exit status and output, as
under subprocess; it skips the ~2 CPU-s of imports that every stage process pays (torch 1.0 s, FSDP2 0.4 s,
dynamo 0.6 s, which DTensor imports on first use) out of CI's 2 cores. Nothing of this repository is imported
here: the child imports it fresh, with the run's environment (TRITON_INTERPRET included).

Protocol, one JSON line each way on stdin/stdout: {"argv", "env", "cwd", "stdout", "stderr"} ->
{"pid"} at the fork, then {"rc"} when the child ends (negative: killed by that signal)."""

import json
import os
import sys

BASE_PATH = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]

import numpy  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed.checkpoint  # noqa: E402,F401
import torch.distributed.fsdp  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401


def child(req, proto_in, proto_out):
    os.close(proto_in)
    os.close(proto_out)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    if "OMP_NUM_THREADS" in req["env"]:  # what torch would have read on import in a fresh process
        torch.set_num_threads(int(req["env"]["OMP_NUM_THREADS"]))
    script = os.path.abspath(req["argv"][0])
    extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(script), *extra, *BASE_PATH]
    sys.argv = list(req["argv"])
    code = 0
    try:
        import runpy
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # as the interpreter does: None -> 0, an int as is, anything else printed -> 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main():
    proto_in, proto_out = os.dup(0), os.dup(1)
    reader = os.fdopen(proto_in, "r")
    writer = os.fdopen(proto_out, "w")
    for line in reader:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req, proto_in, proto_out)
        writer.write(json.dumps({"pid": pid}) + "\n")
        writer.flush()
        _, status = os.waitpid(pid, 0)
        writer.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        writer.flush()


if __name__ == "__main__":
    main()
