"""`pochta systemd-units [--prefix DIR]`: the service units of a pochta installation.

One unit per server process (``pochta-mda``, ``pochta-mta`` with its queue runner as a child,
``pochta-msa``) under ``pochta.target``, rather than one unit around ``pochta up``: systemd
then restarts, logs and reports each process on its own, and nothing needs to stay root to
restart a binder (each unit starts as root, binds its port and drops to its user for good, as
``store/privileges.py`` does under ``pochta up``). ``Type=notify``: a unit is started once its
process has bound its listeners and dropped its privileges (admin/sdnotify.py).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer

from admin.context import UserError, context
from store.config import Config
from store.fsio import atomic_write, ensure_dir

DESCRIPTIONS = {
    "mda": "pochta MDA (LMTP into the mailboxes)",
    "mta": "pochta MTA (SMTP on port 25) and its queue runner",
    "msa": "pochta MSA (submission on 587 and 465)",
}

# What binding a low port and becoming the service user need, and giving the state folders
# to that user at start; nothing else survives into the process.
CAPABILITIES = "CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE"


def pochta_command() -> str:
    beside = Path(sys.executable).parent / "pochta"
    if beside.exists():
        return str(beside)
    found = shutil.which("pochta")
    if found is None:
        raise UserError("cannot find the pochta command to start (install pochta first)")
    return os.path.abspath(found)


def writable_paths(cfg: Config, role: str) -> list[str]:
    """The state a role writes: what ProtectSystem=strict must leave writable."""
    paths = {cfg.data_dir, cfg.spool_dir}
    if role == "mda":
        paths.add(cfg.mda.mailbox_root)
    if cfg.database_url.startswith("sqlite:///"):
        paths.add(os.path.dirname(cfg.database_url.removeprefix("sqlite:///")) or "/")
    if cfg.log_target.startswith("/"):
        paths.add(os.path.dirname(cfg.log_target))
    if role == "mta" and cfg.acme.enabled and cfg.acme.webroot:
        paths.add(cfg.acme.webroot)
    return sorted(p for p in paths if p)


def unit(cfg: Config, role: str, command: str, config_path: str) -> str:
    after = "network-online.target" + (" pochta-mda.service" if role != "mda" else "")
    rw = " ".join(writable_paths(cfg, role))
    # A checkout or a config under a home folder must stay readable.
    protect_home = "read-only" if any(p.startswith(("/home/", "/root/"))
                                      for p in (command, config_path)) else "yes"
    return f"""# Written by `pochta systemd-units`; write it again after changing the paths in the config.
[Unit]
Description={DESCRIPTIONS[role]}
PartOf=pochta.target
Wants=network-online.target
After={after}

[Service]
Type=notify
NotifyAccess=main
ExecStart={command} --config {config_path} serve {role}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
TimeoutStartSec=180
TimeoutStopSec=60
LimitNOFILE=65536
CapabilityBoundingSet={CAPABILITIES}
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={rw}
ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
LockPersonality=yes

[Install]
WantedBy=pochta.target
"""


TARGET = """# Written by `pochta systemd-units`: `systemctl enable --now pochta.target`.
[Unit]
Description=pochta mail server (MTA, MSA, MDA)
Wants=pochta-mda.service pochta-mta.service pochta-msa.service
After=network-online.target

[Install]
WantedBy=multi-user.target
"""


def systemd_units(
    ctx: typer.Context,
    prefix: str = typer.Option("/etc/systemd/system", "--prefix",
                               help="Folder to write the units into."),
) -> None:
    """Write systemd units for the MDA, MTA and MSA, and pochta.target grouping them."""
    c = context(ctx)
    if not c.config_path:
        raise UserError("the units need a config file: pochta --config /etc/pochta/pochta.toml "
                        "systemd-units")
    cfg = c.config
    config_path = os.path.abspath(c.config_path)
    for p in writable_paths(cfg, "mda") + writable_paths(cfg, "mta"):
        if p == "/tmp" or p.startswith("/tmp/"):
            raise UserError(f"state under /tmp ({p}) does not survive PrivateTmp nor a reboot: "
                            "set data_dir (and spool_dir, mailbox_root) elsewhere")
    command = pochta_command()
    folder = ensure_dir(prefix, 0o755)
    written = []
    for role in ("mda", "mta", "msa"):
        path = folder / f"pochta-{role}.service"
        atomic_write(path, unit(cfg, role, command, config_path).encode(), mode=0o644)
        written.append(path)
    atomic_write(folder / "pochta.target", TARGET.encode(), mode=0o644)
    written.append(folder / "pochta.target")
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo("then: systemctl daemon-reload && systemctl enable --now pochta.target")
