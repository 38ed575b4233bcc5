import pytest

from store.config import ConfigError, load


def write(tmp_path, text):
    p = tmp_path / "pochta.toml"
    p.write_text(text)
    return p


def test_defaults_live_under_one_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("POCHTA_CONFIG", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    cfg = load()
    data = tmp_path / "pochta"
    assert cfg.data_dir == str(data)
    assert cfg.database_url == f"sqlite:///{data / 'pochta.db'}"
    assert cfg.spool_dir == str(data / "spool")
    assert cfg.mda.mailbox_root == str(data / "mail")
    assert all(a.startswith("127.0.0.1:") for a in cfg.mta.listen + cfg.msa.listen)


def test_file_overrides(tmp_path):
    cfg = load(write(tmp_path, f"""
hostname = "mx.example.test"
data_dir = "{tmp_path}"
[mta]
listen = ["127.0.0.1:2525", "[::1]:2525"]
vrfy = true
[mda]
format = "mbox"
listen = "unix:/tmp/x.sock"
"""))
    assert cfg.hostname == "mx.example.test"
    assert cfg.mta.vrfy is True and cfg.mta.expn is False
    assert cfg.mda.format == "mbox"
    assert cfg.spool_dir == str(tmp_path / "spool")


@pytest.mark.parametrize("text,needle", [
    ("hostnme = 'x'", "'hostnme'"),
    ("[mta]\nvrfy = 'yes'", "'mta.vrfy'"),
    ("[mta]\nmax_recipients = -1", "'mta.max_recipients'"),
    ("[mta]\nlisten = ['nonsense']", "'mta.listen[0]'"),
    ("[mda]\nformat = 'mh'", "'mda.format'"),
    ("[tls]\ncert = '/x.pem'", "'tls.cert'"),
    ("[bogus]\nx = 1", "'bogus'"),
    ("sync_method = 'never'", "'sync_method'"),
    ("[delivery]\nsmarthost_tls = 'none'", "'delivery.smarthost_tls'"),
    ("[delivery]\nca_file = '/no/such/ca.pem'", "'delivery.ca_file'"),
    ("hostname = ", "pochta.toml"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_reload_takes_live_keys_and_keeps_the_rest_for_a_restart():
    import dataclasses

    from store.config import Config, reloaded

    old = Config()
    new = dataclasses.replace(old, hostname="mx.other.test", log_level="debug",
                              mta=dataclasses.replace(old.mta, listen=["127.0.0.1:2525"],
                                                      max_recipients=7),
                              delivery=dataclasses.replace(old.delivery, smarthost="a.test:25"))
    running, later = reloaded(old, new)
    assert later == ["hostname", "mta.listen"]
    assert running.hostname == old.hostname and running.mta.listen == old.mta.listen
    assert running.mta.max_recipients == 7 and running.log_level == "debug"
    assert running.delivery.smarthost == "a.test:25"


@pytest.mark.parametrize("target, ok", [
    ("stderr", True), ("syslog", True), ("syslog:/dev/log", True), ("/tmp/pochta.log", True),
    ("pochta.log", False), ("syslog:dev/log", False), ("/no/such/folder/pochta.log", False),
])
def test_log_target(tmp_path, target, ok):
    path = tmp_path / "p.toml"
    path.write_text(f'log_target = "{target}"\ndata_dir = "{tmp_path}"\n')
    if ok:
        assert load(path).log_target == target
    else:
        with pytest.raises(ConfigError, match="log_target"):
            load(path)
