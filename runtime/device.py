"""Run the standalone trainer on a real device over ssh (`bnnc run OUT/ --device user@host[:dir]`).

Input: a device spec `user@host[:dir]` (dir defaults to `bnnc-<model>` in the remote home), the
target the program was built for, and local files. Output: the files copied with scp, the program
run with ssh (its JSON lines streamed back as they come), result files fetched back.

Prerequisites on the device: an sshd reachable with key-based login (`ssh-copy-id`), `uname`, a
POSIX shell. No Python, compiler or library: the trainer is a static binary.

Invariants: ssh and scp run with BatchMode=yes (never a password prompt that would hang a run) and
argv lists (no local shell); the one remote command line is built from fixed file names and numbers
with shlex quoting, so nothing from a model file or a path reaches the remote shell unquoted. The
device's `uname -m` must equal the target's `arch` (the host target: this machine's), checked
before anything is copied.
"""

from __future__ import annotations

import platform
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..compiler.target import Target
from ..compiler.errors import TargetError
from .programs import RunResult, stream

_SPEC = re.compile(r"^(?P<dest>(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._:\[\]-]+?)(?::(?P<dir>[^\n\r\0]*))?$")


@dataclass(frozen=True)
class DeviceSpec:
    dest: str          # user@host
    remote_dir: str    # relative to the remote home, or absolute


def parse_device(spec: str, default_dir: str) -> DeviceSpec:
    """'pi@raspberrypi.local:runs/mlp' -> DeviceSpec('pi@raspberrypi.local', 'runs/mlp')."""
    m = _SPEC.match(spec.strip())
    if not m or spec.startswith("-"):
        raise TargetError(f"--device {spec!r} is not user@host[:dir]",
                          hint="example: --device pi@raspberrypi.local:bnnc-mlp")
    return DeviceSpec(m.group("dest"), m.group("dir") or default_dir)


class SshRunner:
    """One device reached over ssh; `put`, `run`, `get` operate in `spec.remote_dir`."""

    def __init__(self, spec: DeviceSpec, target: Target, *, port: int | None = None,
                 identity: Path | None = None, connect_timeout: int = 10,
                 options: Sequence[str] = ()):
        for tool in ("ssh", "scp"):
            if shutil.which(tool) is None:
                raise TargetError(f"{tool!r} is not installed",
                                  hint="apt-get install --no-install-recommends openssh-client")
        self.spec, self.target = spec, target
        self.opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                     "-o", f"ConnectTimeout={connect_timeout}", "-o", "LogLevel=ERROR"]
        if identity is not None:
            self.opts += ["-i", str(identity)]
        for opt in options:          # e.g. UserKnownHostsFile=..., ProxyJump=...
            self.opts += ["-o", opt]
        self.port = port

    def describe(self) -> str:
        return f"ssh {self.spec.dest}:{self.spec.remote_dir}"

    def _ssh(self, command: str, **kw) -> subprocess.CompletedProcess:
        argv = ["ssh", *self.opts, *(["-p", str(self.port)] if self.port else []),
                self.spec.dest, command]
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)

    def _fail(self, what: str, res: subprocess.CompletedProcess):
        raise TargetError(f"{what} on {self.spec.dest} failed (exit {res.returncode}): "
                          f"{res.stderr.strip()[-1500:] or res.stdout.strip()[-500:]}",
                          hint="check `ssh " + self.spec.dest + "` logs in without a password "
                               "(ssh-copy-id) and the host is reachable")

    def check(self) -> str:
        """The device's `uname -m`; TargetError when unreachable or of another architecture."""
        res = self._ssh("uname -m", timeout=60)
        if res.returncode != 0:
            self._fail("ssh", res)
        arch = res.stdout.strip()
        want = self.target.arch or platform.machine()
        if arch != want:
            raise TargetError(f"device {self.spec.dest} is {arch!r}, target {self.target.name!r} "
                              f"builds for {want!r}",
                              hint="compile for the device's target (rpi4/rpi3 are aarch64: "
                                   "64-bit Raspberry Pi OS)")
        return arch

    def _remote(self, name: str) -> str:
        return f"{self.spec.remote_dir.rstrip('/')}/{name}"

    def put(self, files: Sequence[tuple[Path, str]]) -> None:
        """Copy (local path, remote file name) pairs into the remote directory."""
        res = self._ssh(f"mkdir -p {shlex.quote(self.spec.remote_dir)}", timeout=60)
        if res.returncode != 0:
            self._fail("mkdir", res)
        for local, name in files:
            argv = ["scp", "-q", *self.opts, *(["-P", str(self.port)] if self.port else []),
                    str(local), f"{self.spec.dest}:{self._remote(name)}"]
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if res.returncode != 0:
                self._fail(f"scp {local}", res)

    def get(self, name: str, local: Path) -> bool:
        """Fetch a remote file; False when it does not exist."""
        argv = ["scp", "-q", *self.opts, *(["-P", str(self.port)] if self.port else []),
                f"{self.spec.dest}:{self._remote(name)}", str(local)]
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        return res.returncode == 0

    def run(self, exe_name: str, args: Sequence[str], *, on_event=None,
            timeout: float | None = None) -> RunResult:
        command = (f"cd {shlex.quote(self.spec.remote_dir)} && chmod +x {shlex.quote(exe_name)} && "
                   f"./{shlex.join([exe_name, *map(str, args)])}")
        argv = ["ssh", *self.opts, *(["-p", str(self.port)] if self.port else []),
                self.spec.dest, command]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        events, stderr, rc = stream(proc, on_event, timeout)
        if rc is None:
            raise TargetError(f"the run on {self.spec.dest} did not finish in {timeout} s")
        if rc == 255 and not events:
            raise TargetError(f"ssh to {self.spec.dest} failed: {stderr.strip()[-1500:]}")
        return RunResult(rc, events, stderr)
