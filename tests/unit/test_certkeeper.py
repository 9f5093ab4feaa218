"""csi/certkeeper.py: a process's certificate obtained at start and renewed at 2/3 of its lifetime, in the
background, with the files a server (server.TlsFiles) follows; failures keep the current files and are retried."""

from __future__ import annotations

import datetime
import time

import pytest
from cryptography import x509

from csi import certkeeper, peers, pki
from csi.certkeeper import CertKeeper, from_ca, read_bundle
from csi.server import TlsFiles
from csi.tls import TestPki

CONTROLLER = peers.Peer(peers.CONTROLLER)


@pytest.fixture
def ca(tmp_path):
    return TestPki(tmp_path / "pki")


def serial(tls_dir) -> int:
    return x509.load_pem_x509_certificate((tls_dir / "tls.crt").read_bytes()).serial_number


def test_renewed_at_two_thirds_of_its_lifetime_in_the_background(ca, tmp_path):
    keeper = CertKeeper(tmp_path / "tls", CONTROLLER,
                        from_ca(ca.ca_dir, peers.CONTROLLER, lifetime=datetime.timedelta(seconds=3)),
                        read_bundle(ca.ca_dir / "ca.crt"))
    started = time.time()
    first = keeper.first()
    # certificates count whole seconds: 2/3 of what is left of this one's lifetime
    due = started + 2 / 3 * (first.not_valid_after_utc.timestamp() - started)
    assert abs(keeper.due - due) < 0.5 and keeper.due < first.not_valid_after_utc.timestamp()
    keeper.start()
    try:
        deadline = time.monotonic() + 10
        while serial(tmp_path / "tls") == first.serial_number:
            assert time.monotonic() < deadline, "not renewed"
            time.sleep(0.05)
        renewed = time.time()
        assert due - 0.2 <= renewed <= due + 3, (renewed - started, due - started)
        assert TlsFiles(tmp_path / "tls").read()   # a whole, matching pair
    finally:
        keeper.stop()


def test_a_failed_renewal_keeps_the_current_files_and_is_tried_again(ca, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(certkeeper, "RETRY_MIN", 0.05)
    issue = from_ca(ca.ca_dir, peers.CONTROLLER, lifetime=datetime.timedelta(seconds=4))
    failures = []

    def flaky(key):
        if len(failures) < 2 and keeper.certificate is not None:
            failures.append(1)
            raise OSError("the API server is restarting")
        return issue(key)

    keeper = CertKeeper(tmp_path / "tls", CONTROLLER, flaky, read_bundle(ca.ca_dir / "ca.crt"))
    first = keeper.first()
    keeper.start()
    try:
        deadline = time.monotonic() + 10
        while serial(tmp_path / "tls") == first.serial_number:
            assert time.monotonic() < deadline, "not renewed after the failures"
            time.sleep(0.05)
    finally:
        keeper.stop()
    assert len(failures) == 2
    assert "renewing the certificate of controller failed (the API server is restarting" in caplog.text


def test_the_first_certificate_is_waited_for_and_a_refusal_is_not(ca, tmp_path, monkeypatch):
    monkeypatch.setattr(certkeeper, "RETRY_MIN", 0.01)
    issue = from_ca(ca.ca_dir, peers.CONTROLLER)
    attempts = []

    def not_yet(key):
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionRefusedError("no signer yet")
        return issue(key)

    CertKeeper(tmp_path / "a", CONTROLLER, not_yet, read_bundle(ca.ca_dir / "ca.crt")).first()
    assert len(attempts) == 3

    def refused(key):
        attempts.append(1)
        raise certkeeper.Refused("denied: not the driver's pod")

    attempts.clear()
    with pytest.raises(certkeeper.Refused):
        CertKeeper(tmp_path / "b", CONTROLLER, refused, read_bundle(ca.ca_dir / "ca.crt")).first()
    assert len(attempts) == 1
    with pytest.raises(ConnectionRefusedError):
        CertKeeper(tmp_path / "c", CONTROLLER, lambda key: (_ for _ in ()).throw(ConnectionRefusedError()),
                   read_bundle(ca.ca_dir / "ca.crt")).first(patience=0.05)


@pytest.mark.parametrize("wrong,message", [
    (lambda ca, key: pki.issue(ca.ca_key, ca.ca, key.public_key(), peers.AGENT, "storage-1"), "not of controller"),
    (lambda ca, key: pki.issue(ca.ca_key, ca.ca, pki.new_key().public_key(), peers.CONTROLLER), "another key"),
])
def test_a_certificate_that_is_not_the_one_asked_for_is_not_written(ca, tmp_path, wrong, message):
    keeper = CertKeeper(tmp_path / "tls", CONTROLLER, lambda key: pki.cert_pem(wrong(ca, key)),
                        read_bundle(ca.ca_dir / "ca.crt"))
    with pytest.raises(ValueError, match=message):
        keeper.renew()
    assert not (tmp_path / "tls").exists()


def test_the_bundle_must_hold_a_certificate(tmp_path):
    (tmp_path / "empty.crt").write_text("")
    with pytest.raises(ValueError, match="no PEM certificate"):
        read_bundle(tmp_path / "empty.crt")()
    with pytest.raises(ValueError, match="No such file"):
        read_bundle(tmp_path / "missing.crt")()


def test_the_controller_issues_its_own_certificate_from_its_ca_at_start(ca, tmp_path):
    from csi import cli
    from csi.config import ConfigError

    def start(*flags):
        a = cli.parser().parse_args(["controller", "--tls-dir", str(tmp_path / "tls"), *flags])
        cli._controller_certificates(a, tmp_path / "tls")

    start("--ca-dir", str(ca.ca_dir), "--certificate-hours", "1")
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "tls.crt").read_bytes())
    assert pki.identity(cert) == CONTROLLER
    assert (tmp_path / "tls" / "ca.crt").read_bytes() == (ca.ca_dir / "ca.crt").read_bytes()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc - pki.CLOCK_SKEW <= datetime.timedelta(hours=1)
    other = TestPki(tmp_path / "other")
    with pytest.raises(ConfigError, match="not in the CA bundle"):
        start("--ca-dir", str(ca.ca_dir), "--ca-file", str(other.ca_dir / "ca.crt"))
    with pytest.raises(ConfigError, match="needs --ca-dir"):
        start("--csr-signer", "x/identity")
    with pytest.raises(ConfigError, match="--signer-namespace, --agent-service-account"):
        start("--ca-dir", str(ca.ca_dir), "--csr-signer", "x/identity", "--node-daemonset", "n")
    with pytest.raises(ConfigError, match="not a CA certificate|No such file"):
        start("--ca-dir", str(tmp_path / "tls"))


def test_agents_and_node_plugins_take_the_signer_and_the_bundle():
    from csi import cli
    from csi.config import ConfigError
    a = cli.parser().parse_args(["agent", "--node-name", "s1", "--config", "x", "--tls-dir", "/t",
                                 "--csr-signer", "lvm-iscsi.csi.dev/identity", "--ca-file", "/etc/ca.crt"])
    assert (a.csr_signer, a.ca_file, a.tls_dir) == ("lvm-iscsi.csi.dev/identity", "/etc/ca.crt", "/t")
    n = cli.parser().parse_args(["node", "--node-name", "w1", "--csr-signer", "s/identity"])
    with pytest.raises(ConfigError, match="needs --tls-dir"):
        cli._pod_certificate(n, peers.NODE, "w1", n.tls_dir)
    assert cli._pod_certificate(cli.parser().parse_args(["node", "--node-name", "w1"]), peers.NODE, "w1", "") is None
