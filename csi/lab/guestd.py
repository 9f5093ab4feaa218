"""Control daemon of a lab node: runs inside the User-Mode Linux guest, standard library only.

guest-init.sh execs it as PID 1. PID 1 forks: the parent only reaps orphans (iscsid, udevd and whatever the
tests start get re-parented to it) and powers the node off if the server dies; the child serves.

Protocol: one TCP connection per request, one JSON line each way. A request is {"op": ..., ...}; a reply is
{"ok": true, ...} or {"ok": false, "error": "..."}. Commands are argv lists, never shell strings.
  ping                                   -> name, uptime
  run     argv, timeout, env?, input?, cwd?  -> rc, stdout, stderr   (timeout: error "timeout", group killed)
  spawn   name, argv, env?, cwd?         -> pid     (output appended to <logdir>/<name>.log)
  signal  name, signal, group?           -> (nothing)
  status  name                           -> pid, running, rc
  poweroff                               -> (nothing; the node halts right after replying)
"""

import argparse
import ctypes
import json
import os
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time

RB_POWER_OFF = 0x4321FEDC
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
    # The host's tree is read-only here; do not even try to write __pycache__ into it.
    "PYTHONDONTWRITEBYTECODE": "1",
}


class GuestError(Exception):
    pass


def power_off():
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_POWER_OFF)
    os._exit(1)  # only reached when reboot(2) failed


def _env(req):
    env = dict(BASE_ENV)
    env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
    return env


def _argv(req):
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise GuestError("argv must be a non-empty list of strings")
    return argv


def _name(req):
    name = req.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise GuestError(f"bad process name {name!r}")
    return name


class Guest:
    def __init__(self, node, logdir):
        self.node = node
        self.logdir = logdir
        self.procs = {}
        self.lock = threading.Lock()

    def op_ping(self, req):
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return {"name": self.node, "uptime": uptime}

    def op_run(self, req):
        argv = _argv(req)
        timeout = float(req.get("timeout", 60))
        data = req.get("input")
        proc = subprocess.Popen(
            argv, env=_env(req), cwd=req.get("cwd"), start_new_session=True,
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(data.encode() if data is not None else None, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return {"ok": False, "error": f"timeout after {timeout}s", "timeout": True,
                    "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}
        return {"rc": proc.returncode, "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace")}

    def op_spawn(self, req):
        name, argv = _name(req), _argv(req)
        with self.lock:
            old = self.procs.get(name)
            if old is not None and old.poll() is None:
                raise GuestError(f"process {name!r} is already running (pid {old.pid})")
            with open(os.path.join(self.logdir, f"{name}.log"), "ab") as log:
                log.write(f"=== {time.strftime('%H:%M:%S')} spawn {argv!r}\n".encode())
                log.flush()
                proc = subprocess.Popen(argv, env=_env(req), cwd=req.get("cwd"), start_new_session=True,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.procs[name] = proc
        return {"pid": proc.pid}

    def _proc(self, req):
        name = _name(req)
        with self.lock:
            proc = self.procs.get(name)
        if proc is None:
            raise GuestError(f"no process named {name!r}")
        return proc

    def op_signal(self, req):
        proc = self._proc(req)
        sig = int(req["signal"])
        if proc.poll() is None:
            if req.get("group"):
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        return {}

    def op_status(self, req):
        proc = self._proc(req)
        rc = proc.poll()
        return {"pid": proc.pid, "running": rc is None, "rc": rc}

    def op_poweroff(self, req):
        threading.Timer(0.2, power_off).start()
        return {}


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        guest = self.server.guest
        try:
            req = json.loads(self.rfile.readline())
            op = getattr(guest, "op_" + str(req.get("op")), None)
            if op is None:
                raise GuestError(f"unknown op {req.get('op')!r}")
            reply = {"ok": True}
            reply.update(op(req))
        except Exception as e:  # every failure goes back to the host, which raises LabError
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def reap_forever(child):
    """PID 1's job: wait for every process that ends up as our child; halt when the server is gone."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(1)
            continue
        if pid == child:
            print(f"csilab: guestd exited ({status}); powering off", flush=True)
            power_off()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--logdir", required=True)
    args = p.parse_args()
    if os.getpid() == 1:
        child = os.fork()
        if child:
            reap_forever(child)
    server = Server((args.ip, args.port), Handler)
    server.guest = Guest(args.name, args.logdir)
    print(f"CSILAB-READY {args.name}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
