"""A config whose values are only found wrong when used (endpoints, files, the spool directory, a
port in use): ``mailrelay check-config`` and ``twistd -n mailrelay`` print one line per error,
naming the file, the key and the reason, all of them at once, and exit 1 (real subprocesses)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailrelay import config
from mailrelay.errors import ConfigError
from mailrelay.service import MailRelayService
from tests.support.delivery.certs import CertificateAuthority

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return run("mailrelay", "check-config", str(path), cwd=path.parent)


def twistd(path: Path) -> subprocess.CompletedProcess[str]:
    return run("twistd", "-n", "--pidfile=", "mailrelay", "--config", str(path), cwd=path.parent)


def error_keys(result: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    """The key of each stderr line, checking each is ``mailrelay: <file>: <key>: <reason>``."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr + result.stdout
    assert "Usage" not in result.stderr + result.stdout  # twistd's usage text
    keys = []
    for line in result.stderr.splitlines():
        prefix = f"mailrelay: {path}: "
        assert line.startswith(prefix), line
        key, _, reason = line[len(prefix) :].partition(": ")
        assert reason, line
        keys.append(key)
    return keys


def test_every_error_of_a_file_one_line_each_from_check_config_and_twistd(tmp_path):
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "not-pem.txt").write_text("hello\n")
    path = tmp_path / "mailrelay.toml"
    path.write_text(f"""
[server]
hostname = "relay.example.test"
listen = ["tcpp:2525"]
max_recipients = 0
idle_timeout = "soon"
tls_certificate = "{tmp_path}/missing-cert.pem"
tls_key = "{tmp_path}/not-pem.txt"
auth_password_file = "{tmp_path}/missing-passwords"
[spool]
path = "{tmp_path}/a-file/spool"
[delivery]
tls_ca_file = "{tmp_path}/not-pem.txt"
[metrics]
listen = "http:9125"
[[routes]]
type = "static"
domains = ["*"]
hosts = ["127.0.0.1:99999"]
[[routes]]
type = "no-such-router"
""")
    expected = [
        "server.max_recipients",
        "server.idle_timeout",
        "server.listen[0]",
        "metrics.listen",
        "server.tls_certificate",
        "server.tls_key",
        "server.auth_password_file",
        "delivery.tls_ca_file",
        "spool.path",
        "routes[0].hosts[0]",
        "routes[1].type",
    ]
    checked = check_config(path)
    assert sorted(error_keys(checked, path)) == sorted(expected)
    assert checked.stdout == ""
    started = twistd(path)
    assert sorted(error_keys(started, path)) == sorted(expected)
    assert "'tcpp:2525' is not an endpoint" in checked.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "mailrelay.toml", "not-pem.txt"]


def test_a_key_that_does_not_go_with_its_certificate_is_an_error_of_the_file(tmp_path):
    ca = CertificateAuthority()
    _, cert = ca.server("a.example.test")
    other_key, _ = ca.server("b.example.test")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(other_key)
    path = tmp_path / "mailrelay.toml"
    path.write_text(
        f'[server]\nhostname = "relay.example.test"\ntls_certificate = "{tmp_path}/cert.pem"\n'
        f'tls_key = "{tmp_path}/key.pem"\n[spool]\npath = "{tmp_path}/spool"\n'
    )
    result = check_config(path)
    assert error_keys(result, path) == ["server.tls_key"]
    assert "does not go with" in result.stderr


def test_a_port_in_use_names_the_key_the_endpoint_and_the_reason_under_twistd(tmp_path):
    taken = [socket.socket(), socket.socket()]
    try:
        for s in taken:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        smtp, metrics = (s.getsockname()[1] for s in taken)
        path = tmp_path / "mailrelay.toml"
        path.write_text(
            f'[server]\nhostname = "relay.example.test"\nlisten = '
            f'["tcp:{smtp}:interface=127.0.0.1"]\n[spool]\npath = '
            f'"{tmp_path}/spool"\n[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n'
        )
        assert check_config(path).returncode == 0  # the running instance's own port is no error
        result = twistd(path)
        assert error_keys(result, path) == ["server.listen[0]", "metrics.listen"]
        assert (
            f"'tcp:{smtp}:interface=127.0.0.1': cannot listen: Address already in use"
            in result.stderr
        )
    finally:
        for s in taken:
            s.close()


def test_a_dsn_that_does_not_parse_is_an_error_of_the_file_a_database_down_is_not(tmp_path):
    from mailrelay.preflight import problems

    text = '[spool]\nbackend = "postgresql"\ndsn = "{}"\n'
    bad = config.loads(text.format("host=127.0.0.1 port"), "pg.toml")
    assert [str(e) for e in problems(bad)] == [
        'pg.toml: spool.dsn: not a PostgreSQL connection string: missing "=" after "port" in '
        "connection info string"
    ]
    assert problems(config.loads(text.format("host=127.0.0.1 port=1 dbname=down"), "pg.toml")) == []


def test_a_proxy_protocol_listener_is_refused_until_the_session_can_see_the_client():
    """Twisted's ``haproxy:`` wrapper starts the session before the PROXY header is read, so the
    session's client was the proxy: on loopback (trusted by default) everyone behind it relayed."""
    from mailrelay.preflight import problems

    cfg = config.loads(
        '[server]\nlisten = ["tcp:2525", "haproxy:tcp:2526:interface=127.0.0.1"]\n'
        '[metrics]\nlisten = "tcp:9125"\n',
        "lb.toml",
    )
    assert [str(e) for e in problems(cfg)] == [
        "lb.toml: server.listen[1]: 'haproxy:tcp:2526:interface=127.0.0.1': the PROXY protocol is "
        "not supported: the session would see the proxy's address, not the client's (and trust it "
        "where trusted_networks do)"
    ]


def test_an_embedder_gets_config_errors_not_the_loaders_exceptions(tmp_path):
    cfg = config.loads(
        f'[server]\nlisten = ["tcpp:2525", "tcp:x"]\n[spool]\npath = "{tmp_path}/spool"\n',
        "embedded.toml",
    )
    with pytest.raises(ConfigError) as e:
        MailRelayService(cfg)
    assert str(e.value).splitlines() == [
        "embedded.toml: server.listen[0]: 'tcpp:2525' is not an endpoint: Unknown endpoint type: "
        "'tcpp'",
        "embedded.toml: server.listen[1]: 'tcp:x' is not an endpoint: invalid literal for int() "
        "with base 10: 'x'",
    ]


def test_check_config_builds_an_ldap_route_as_the_relay_does(tmp_path):
    path = tmp_path / "mailrelay.toml"
    path.write_text(
        f'[spool]\npath = "{tmp_path}/spool"\n[[routes]]\ntype = "ldap"\nuri = '
        f'"ldap://127.0.0.1:1"\n'
        'base = "dc=example,dc=test"\n'
    )
    result = check_config(path)
    assert result.returncode == 0, result.stderr
