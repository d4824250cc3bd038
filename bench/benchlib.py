"""What the bench scripts share: an rsync daemon on 127.0.0.1 and `syncbus status`."""
import json
import os
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(work: str, dst: str, nodelay: bool = False):
    """An `rsync --daemon` serving `dst` as module `m`, its config in `work`; returns
    the process and the module's URL. `nodelay` adds `socket options = TCP_NODELAY`."""
    port = free_port()
    conf = os.path.join(work, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"port = {port}\naddress = 127.0.0.1\nuse chroot = no\n"
                f"uid = {os.getuid()}\ngid = {os.getgid()}\n"
                + ("socket options = TCP_NODELAY\n" if nodelay else "")
                + f"[m]\npath = {dst}\nread only = false\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", "--config", conf])
    return daemon, f"rsync://127.0.0.1:{port}/m"


def status(syncbus: str, config: str) -> dict:
    """`syncbus status --json`, or {} when it printed nothing readable."""
    out = subprocess.run([syncbus, "status", "--json", "--config", config],
                         capture_output=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {}
