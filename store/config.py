"""The one configuration object every pochta process loads once and passes down.

A TOML file (``--config`` or ``POCHTA_CONFIG``) overrides embedded defaults. The defaults put
all state under one data folder (``data_dir``) and listen on unprivileged loopback ports, so
``pochta up`` works on a fresh machine. Unknown keys and values of the wrong type are refused
with a ``ConfigError`` naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, get_type_hints


class ConfigError(Exception):
    """A configuration problem, described in one line for the admin."""


@dataclass(frozen=True)
class MTAConfig:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:10025"])
    vrfy: bool = False
    expn: bool = False
    max_message_size: int = 52428800
    max_recipients: int = 100
    max_connections: int = 200
    max_connections_per_ip: int = 50  # as Postfix; local_networks are not limited
    idle_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: at least 5 minutes
    max_errors: int = 10
    min_free_space: int = 104857600  # bytes free in spool_dir before MAIL gets 452 4.3.1
    # Clients that may relay to any domain on port 25 without AUTH (Postfix's mynetworks), and
    # that may ETRN without AUTH. Empty: nobody.
    relay_networks: list[str] = field(default_factory=list)
    etrn_networks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MSAConfig:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:10587"])
    listen_tls: list[str] = field(default_factory=lambda: ["127.0.0.1:10465"])
    vrfy: bool = True
    expn: bool = True
    # The submission listeners' own limits (the [mta] ones govern port 25 only).
    max_message_size: int = 52428800
    max_recipients: int = 100
    max_connections: int = 200
    max_connections_per_ip: int = 50  # clients in checks.local_networks are not limited
    idle_timeout: float = 300.0
    max_errors: int = 10


class ListenerLimits(Protocol):
    """The limits of one kind of listener: ``Config.mta`` (port 25) or ``Config.msa``."""

    @property
    def max_message_size(self) -> int: ...
    @property
    def max_recipients(self) -> int: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def max_connections_per_ip(self) -> int: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def max_errors(self) -> int: ...


@dataclass(frozen=True)
class MDAConfig:
    listen: str = "127.0.0.1:10024"
    mailbox_root: str = ""
    format: str = "maildir"
    mail_owner: str = ""  # started as root: the MDA runs as this user (default: the top-level user)
    max_message_size: int = 52428800
    idle_timeout: float = 300.0


@dataclass(frozen=True)
class TLSConfig:
    cert: str = ""
    key: str = ""


@dataclass(frozen=True)
class DeliveryConfig:
    resolver: str = ""
    smtp_port: int = 25
    smarthost: str = ""
    smarthost_user: str = ""  # AUTH at the smarthost, only ever sent over TLS
    smarthost_password: str = ""
    # TLS to the smarthost: "starttls" (required, certificate verified against ca_file or the
    # system's CAs and the smarthost's name), "implicit" (TLS from the first byte, verified),
    # "starttls-unverified" (STARTTLS when offered, any certificate).
    smarthost_tls: str = "starttls"
    ca_file: str = ""  # CA bundle for verified TLS (default: the system's)
    # Trust the AD bit of `resolver` (which must then be a local validating resolver, such as
    # unbound on 127.0.0.1): DNSSEC-authenticated MX hosts get DANE (RFC 7672).
    dnssec: bool = False
    retry_initial: float = 300.0  # seconds before the first retry; doubles up to retry_max
    retry_max: float = 3600.0
    max_queue_lifetime: float = 432000.0  # 5 days, then the message bounces
    delay_warning: float = 14400.0  # a "delayed" DSN after 4 hours (if NOTIFY allows); 0: never
    lmtp_timeout: float = 120.0
    # Multiplies the SMTP client's per-command time limits (RFC 5321 4.5.3.2: minutes); a
    # test knob: tests shorten them to see a stalled peer given up on in seconds.
    timeout_scale: float = 1.0


@dataclass(frozen=True)
class ChecksConfig:
    """Inbound checks on the MTA (port 25); never on authenticated submission."""

    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    dmarc_enforce: bool = False  # refuse (550 5.7.1) when DMARC fails and the policy is reject
    temperror: str = "accept"  # DNS trouble during the checks: "accept" or "defer" (451)
    dnsbl: list[str] = field(default_factory=list)  # zones, e.g. ["zen.spamhaus.org"]
    greylist: bool = False
    greylist_delay: float = 300.0
    greylist_expiry: float = 2592000.0  # forget a triplet unseen for 30 days
    pregreet: bool = True  # postscreen-style: talking before the banner ends is refused
    pregreet_delay: float = 1.0
    pregreet_remember: float = 86400.0  # a client that passed skips the wait this long
    local_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])


@dataclass(frozen=True)
class LimitsConfig:
    connections_per_ip_per_minute: int = 60  # 0: no limit
    messages_per_user_per_hour: int = 500
    auth_failures_per_ip_per_hour: int = 30
    window_scale: float = 1.0  # multiplies the minute/hour windows above (tests shorten them)


@dataclass(frozen=True)
class DKIMConfig:
    sign: bool = True  # sign submitted mail for domains that have a key (pochta dkim keygen)
    keys_dir: str = ""  # default <data_dir>/dkim


@dataclass(frozen=True)
class AcmeConfig:
    """Certificates from an ACME CA (admin/acme.py); off unless ``email`` is set."""

    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""
    names: list[str] = field(default_factory=list)  # default: [hostname]
    challenge: str = "http-01"
    http_listen: str = "0.0.0.0:80"
    webroot: str = ""  # write the challenges here for a web server already on port 80
    ca_file: str = ""  # extra CA to trust for the directory (tests: pebble's)

    @property
    def enabled(self) -> bool:
        return bool(self.email)


@dataclass(frozen=True)
class OdmrConfig:
    # On-Demand Mail Relay (RFC 2645), served by the MSA process: customers authenticate
    # and take their relay domain's held mail over the same connection (ATRN).
    listen: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MtaStsConfig:
    # Serve our MTA-STS policy over HTTPS for mta-sts.<domain> (RFC 8461 §3.3), in the MSA
    # process, with our certificate.
    listen: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ManageSieveConfig:
    # ManageSieve (RFC 5804), served by the MSA process: users edit their Sieve scripts.
    listen: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ForwardingConfig:
    # Mail forwarded to foreign addresses (aliases, Sieve redirect) leaves with an SRS
    # envelope sender (mta/forwarding.py), so that SPF passes where it arrives.
    srs: bool = True


@dataclass(frozen=True)
class SpamConfig:
    rspamd: str = ""  # "http://127.0.0.1:11333": messages on port 25 are checked; "": off
    fail_open: bool = True  # rspamd down or slow: accept (and count it); false: 451
    timeout: float = 20.0  # seconds to wait for rspamd's verdict
    check_submission: bool = False  # also check authenticated submissions
    junk_folder: str = "Junk"  # where "add header" verdicts are filed ("": leave in INBOX)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # "host:port": the Prometheus endpoint (/metrics) of the whole stack


@dataclass(frozen=True)
class Config:
    hostname: str = "localhost"
    # Started as root, every mail process binds its ports and then runs as this user (the MDA
    # as mda.mail_owner when set): store/privileges.py. "root" keeps root.
    user: str = "pochta"
    data_dir: str = ""
    database_url: str = ""
    spool_dir: str = ""
    log_level: str = "info"
    # "stderr", "syslog" (/dev/log, facility mail), "syslog:/path/to/socket", or a log file's
    # absolute path (reopened on SIGHUP and SIGUSR1, for logrotate).
    log_target: str = "stderr"
    event_loop: str = "asyncio"  # or "uvloop" (pip install uvloop), or "auto": uvloop if installed
    directory_cache_ttl: float = 5.0  # seconds the mail processes remember directory look-ups
    # How a batch of spool files or mailbox copies is made durable: "auto" is one syncfs(2) on
    # ext4, xfs and btrfs (where it flushes every file) and an fsync per file elsewhere;
    # "fsync" is an fsync per file everywhere.
    sync_method: str = "auto"
    mta: MTAConfig = field(default_factory=MTAConfig)
    msa: MSAConfig = field(default_factory=MSAConfig)
    mda: MDAConfig = field(default_factory=MDAConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    odmr: OdmrConfig = field(default_factory=OdmrConfig)
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    managesieve: ManageSieveConfig = field(default_factory=ManageSieveConfig)
    forwarding: ForwardingConfig = field(default_factory=ForwardingConfig)
    spam: SpamConfig = field(default_factory=SpamConfig)
    source: str = "(embedded defaults)"  # where this config came from, for messages


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/pochta, else for root /var/lib/pochta (its processes run as `user`,
    who cannot enter /root), else ~/.local/share/pochta."""
    base = os.environ.get("XDG_DATA_HOME")
    if not base and os.geteuid() == 0:
        return Path("/var/lib/pochta")
    return Path(base or Path.home() / ".local" / "share") / "pochta"


def _check_value(key: str, value: Any, expected: Any) -> Any:
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"config key {key!r}: expected a non-negative integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"config key {key!r}: expected a non-negative number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    if expected == list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key!r}: expected a list of strings, got {value!r}")
        return list(value)
    raise ConfigError(f"config key {key!r}: unsupported type")  # pragma: no cover


def _build(cls: type, table: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}")
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r}: expected a table [{full}]")
            kwargs[key] = _build(expected, value, f"{full}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _check_value(full, value, expected)
    return cls(**kwargs)


def parse_address(value: str, key: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:25") and check the port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(f"config key {key!r}: expected \"host:port\", got {value!r}")
    return host.strip("[]"), int(port)


def parse_host_port(value: str, default_port: int = 25) -> tuple[str, int]:
    """"host", "host:port", "[v6]" or "[v6]:port" (a relay domain's --to); ValueError if not."""
    value = value.strip()
    closed = True
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        closed = bool(sep)
        port = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    if not host or not closed or (":" in host and not value.startswith("[")):
        raise ValueError(f"expected HOST[:PORT], got {value!r}")
    if port and (not port.isdigit() or not 0 < int(port) <= 65535):
        raise ValueError(f"expected HOST[:PORT], got {value!r}")
    return host, int(port) if port else default_port


def _validate(cfg: Config) -> None:
    for i, addr in enumerate(cfg.mta.listen):
        parse_address(addr, f"mta.listen[{i}]")
    for i, addr in enumerate(cfg.msa.listen):
        parse_address(addr, f"msa.listen[{i}]")
    for i, addr in enumerate(cfg.msa.listen_tls):
        parse_address(addr, f"msa.listen_tls[{i}]")
    for i, addr in enumerate(cfg.odmr.listen):
        parse_address(addr, f"odmr.listen[{i}]")
    for i, addr in enumerate(cfg.mta_sts.listen):
        parse_address(addr, f"mta_sts.listen[{i}]")
    for i, addr in enumerate(cfg.managesieve.listen):
        parse_address(addr, f"managesieve.listen[{i}]")
    if cfg.spam.rspamd and not cfg.spam.rspamd.startswith(("http://", "https://")):
        raise ConfigError(f"config key 'spam.rspamd': expected \"http://host:port\", got "
                          f"{cfg.spam.rspamd!r}")
    if not cfg.mda.listen.startswith("unix:"):
        parse_address(cfg.mda.listen, "mda.listen")
    if cfg.mda.format not in ("maildir", "mbox"):
        raise ConfigError(f"config key 'mda.format': expected \"maildir\" or \"mbox\", "
                          f"got {cfg.mda.format!r}")
    if cfg.mda.mail_owner:
        import pwd

        try:
            pwd.getpwnam(cfg.mda.mail_owner)
        except KeyError:
            raise ConfigError(f"config key 'mda.mail_owner': no user {cfg.mda.mail_owner!r}") from None
    if cfg.delivery.resolver:
        parse_address(cfg.delivery.resolver, "delivery.resolver")
    if cfg.metrics.listen:
        parse_address(cfg.metrics.listen, "metrics.listen")
    if cfg.acme.enabled:
        a = cfg.acme
        if "@" not in a.email or any(c.isspace() for c in a.email):
            raise ConfigError(f"config key 'acme.email': expected an address, got {a.email!r}")
        if a.challenge != "http-01":
            raise ConfigError(f"config key 'acme.challenge': only \"http-01\" is supported, "
                              f"got {a.challenge!r}")
        if not a.directory.startswith("https://"):
            raise ConfigError(f"config key 'acme.directory': expected an https:// URL, "
                              f"got {a.directory!r}")
        if a.webroot:
            if not os.path.isdir(a.webroot):
                raise ConfigError(f"config key 'acme.webroot': no folder {a.webroot!r}")
        else:
            parse_address(a.http_listen, "acme.http_listen")
        if a.ca_file and not os.path.isfile(a.ca_file):
            raise ConfigError(f"config key 'acme.ca_file': no file {a.ca_file!r}")
    if cfg.delivery.smarthost:
        parse_address(cfg.delivery.smarthost, "delivery.smarthost")
    if cfg.delivery.smarthost_tls not in ("starttls", "implicit", "starttls-unverified"):
        raise ConfigError("config key 'delivery.smarthost_tls': expected \"starttls\", "
                          f"\"implicit\" or \"starttls-unverified\", got {cfg.delivery.smarthost_tls!r}")
    if cfg.delivery.ca_file and not os.path.isfile(cfg.delivery.ca_file):
        raise ConfigError(f"config key 'delivery.ca_file': no file {cfg.delivery.ca_file!r}")
    if bool(cfg.delivery.smarthost_user) != bool(cfg.delivery.smarthost_password):
        raise ConfigError("config keys 'delivery.smarthost_user' and 'delivery.smarthost_password' "
                          "must be set together")
    if cfg.event_loop not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"config key 'event_loop': expected auto, uvloop or asyncio, "
                          f"got {cfg.event_loop!r}")
    if cfg.sync_method not in ("auto", "fsync"):
        raise ConfigError(f"config key 'sync_method': expected \"auto\" or \"fsync\", "
                          f"got {cfg.sync_method!r}")
    if cfg.checks.temperror not in ("accept", "defer"):
        raise ConfigError(f"config key 'checks.temperror': expected \"accept\" or \"defer\", "
                          f"got {cfg.checks.temperror!r}")
    for key, nets in (("checks.local_networks", cfg.checks.local_networks),
                      ("mta.etrn_networks", cfg.mta.etrn_networks)):
        for i, net in enumerate(nets):
            _network(f"{key}[{i}]", net)
    for i, net in enumerate(cfg.mta.relay_networks):
        parsed = _network(f"mta.relay_networks[{i}]", net)
        if parsed.prefixlen < (8 if parsed.version == 4 else 32):
            raise ConfigError(f"config key 'mta.relay_networks[{i}]': {net!r} is wider than /"
                              f"{8 if parsed.version == 4 else 32}: that is an open relay")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"config key 'log_level': expected debug, info, warning or error, "
                          f"got {cfg.log_level!r}")
    target = cfg.log_target
    if target.startswith("syslog:") and not target[len("syslog:"):].startswith("/"):
        raise ConfigError(f"config key 'log_target': expected \"syslog:/path/to/socket\", "
                          f"got {target!r}")
    if target not in ("stderr", "syslog") and not target.startswith("syslog:"):
        if not target.startswith("/"):
            raise ConfigError(f"config key 'log_target': expected \"stderr\", \"syslog\" or "
                              f"a file's absolute path, got {target!r}")
        if not os.path.isdir(os.path.dirname(target)):
            raise ConfigError(f"config key 'log_target': no folder {os.path.dirname(target)!r}")
    if not cfg.hostname or any(c.isspace() for c in cfg.hostname):
        raise ConfigError(f"config key 'hostname': expected a host name, got {cfg.hostname!r}")


def _fill_paths(cfg: Config) -> Config:
    """Derive every unset path from data_dir, so the defaults live in one folder."""
    data = Path(cfg.data_dir).expanduser() if cfg.data_dir else default_data_dir()
    data = data.absolute()
    mda = cfg.mda
    if not mda.mailbox_root:
        mda = dataclasses.replace(mda, mailbox_root=str(data / "mail"))
    tls = cfg.tls
    if cfg.acme.enabled:
        if tls.cert or tls.key:
            raise ConfigError("config keys 'tls.cert'/'tls.key': leave them empty when "
                              "[acme] email is set (ACME provides the certificate)")
        tls = TLSConfig(cert=str(data / "acme" / "cert.pem"), key=str(data / "acme" / "key.pem"))
    elif not tls.cert and not tls.key:
        tls = TLSConfig(cert=str(data / "tls" / "cert.pem"), key=str(data / "tls" / "key.pem"))
    elif not (tls.cert and tls.key):
        raise ConfigError("config keys 'tls.cert' and 'tls.key' must be set together")
    return dataclasses.replace(
        cfg,
        data_dir=str(data),
        database_url=cfg.database_url or f"sqlite:///{data / 'pochta.db'}",
        spool_dir=cfg.spool_dir or str(data / "spool"),
        mda=mda,
        tls=tls,
        dkim=dataclasses.replace(cfg.dkim, keys_dir=cfg.dkim.keys_dir or str(data / "dkim")),
    )


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config from ``path``, else ``$POCHTA_CONFIG``, else the embedded defaults."""
    path = path or os.environ.get("POCHTA_CONFIG") or None
    if path is None:
        cfg = Config()
    else:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} not found") from None
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r}: {e}") from None
        cfg = _build(Config, table, "")
        cfg = dataclasses.replace(cfg, source=str(path))
    cfg = _fill_paths(cfg)
    _validate(cfg)
    return cfg


def _network(key: str, value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"config key {key!r}: not a network: {value!r}") from None


# -- reload ---------------------------------------------------------------------------------

# Keys a running process takes on at `pochta reload` (SIGHUP); a change to any other key
# (listeners, paths, the database, the user, the host name...) needs a restart.
LIVE_KEYS = (
    "log_level", "directory_cache_ttl",
    "mta.vrfy", "mta.expn", "mta.max_message_size", "mta.max_recipients",
    "mta.max_connections", "mta.max_connections_per_ip", "mta.idle_timeout", "mta.max_errors",
    "mta.min_free_space", "mta.relay_networks", "mta.etrn_networks",
    "msa.vrfy", "msa.expn", "msa.max_message_size", "msa.max_recipients",
    "msa.max_connections", "msa.max_connections_per_ip", "msa.idle_timeout", "msa.max_errors",
    "mda.idle_timeout", "mda.max_message_size",
    "delivery.", "checks.", "limits.", "dkim.sign",
)


def flatten(cfg: Config) -> dict[str, Any]:
    """{"mta.listen": [...], "hostname": ..., ...}: every key by its dotted name."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        elif f.name != "source":
            out[f.name] = value
    return out


def is_live(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in LIVE_KEYS)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))


def reloaded(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The config a process runs with after a reload: ``new``'s live keys, ``old``'s others;
    and the changed keys that wait for a restart."""
    later = [k for k in changed_keys(flatten(old), flatten(new)) if not is_live(k)]
    cfg = new
    for key in later:
        section, _, name = key.rpartition(".")
        old_value = getattr(getattr(old, section), name) if section else getattr(old, name)
        if section:
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(
                getattr(cfg, section), **{name: old_value})})
        else:
            cfg = dataclasses.replace(cfg, **{name: old_value})
    return cfg, later


class LiveConfig:
    """A process's current config, and what to tell when a reload changes it."""

    def __init__(self, cfg: Config) -> None:
        self.current = cfg
        self._subscribers: list[Callable[[Config], None]] = []

    def subscribe(self, apply: Callable[[Config], None]) -> None:
        self._subscribers.append(apply)

    def publish(self, cfg: Config) -> None:
        self.current = cfg
        for apply in self._subscribers:
            apply(cfg)
