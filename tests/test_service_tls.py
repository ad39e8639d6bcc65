"""samf serve over TLS, with a throwaway CA made here: HTTPS gives 20 concurrent clients the reports plain HTTP
gives; DICOM TLS on the SCP (a sender must show a certificate from the CA) and on the SCU (the SR and PDF go to a
PACS that speaks only TLS)."""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import ipaddress
import ssl
import time

import httpx
import pytest
from dicom_writer import PATIENT, write_series
from service_runner import Pacs, Server, free_port, send_series


def _cert(subject: str, issuer_key, issuer_name, key, ca: bool = False, server: bool = True):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA and two leaf certificates it signed (for 127.0.0.1 and localhost), as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("samf test CA", None, None, ca_key, ca=True)
    out = {"ca": str(root / "ca.pem")}
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("samf", "peer"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, ca_key, ca.subject, key)
        (root / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (root / f"{who}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        out[who] = (str(root / f"{who}.pem"), str(root / f"{who}.key"))
    return out


def _twenty(server: Server, scans: list) -> tuple:
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(20) as pool:
        posted = list(pool.map(server.submit, scans))
    assert [r.status_code for r in posted] == [202] * 20
    ids = [r.json()["id"] for r in posted]
    jobs = server.wait_all(ids)
    return [jobs[i]["report"] for i in ids], time.monotonic() - t0


def test_https_twenty_clients_get_the_reports_plain_http_gives(quick, scans, pki, tmp_path):
    verify = ssl.create_default_context(cafile=pki["ca"])
    tls = Server(quick.bundle, str(tmp_path / "tls"), "--tls-cert", pki["samf"][0], "--tls-key", pki["samf"][1],
                 verify=verify, https=True).wait_ready()
    try:
        over_tls, tls_s = _twenty(tls, scans)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA is refused
            httpx.get(tls.url + "/healthz", timeout=10)
        assert tls.http().get(tls.url + "/healthz").status_code == 200  # a client keeps its connection open
    finally:
        # ... and the server still stops at once (it waited 30 s for that idle client's TLS close_notify).
        tls.stop(timeout=15)
    plain = Server(quick.bundle, str(tmp_path / "plain")).wait_ready()
    try:
        over_plain, plain_s = _twenty(plain, scans)
    finally:
        plain.stop()
    assert over_tls == over_plain and all(over_tls)
    print(f"20 concurrent jobs: TLS {tls_s:.2f} s, plain {plain_s:.2f} s")


def test_dicom_tls_on_the_scp_and_the_scu(quick, pki, tmp_path):
    from samf.runtime.service.dicom_net import tls_contexts
    from samf.runtime.tools.phantom import make_phantom

    phantom = make_phantom(44, shape=(24, 40, 40), spacing=(8.0, 9.0, 9.0))
    folder = str(tmp_path / "series")
    write_series(folder, phantom.volume, phantom.spacing, patient=PATIENT)
    pacs_server_ctx, _ = tls_contexts(*pki["peer"], pki["ca"])   # the PACS asks for our certificate too
    _, peer_client_ctx = tls_contexts(*pki["peer"], pki["ca"])
    pacs, dport = Pacs(ssl_context=pacs_server_ctx), free_port()
    server = Server(quick.bundle, str(tmp_path / "work"), "--dicom-port", str(dport), "--dicom-dest",
                    f"PACS@127.0.0.1:{pacs.port}", "--series-settle", "0.5", "--dicom-tls-cert", pki["samf"][0],
                    "--dicom-tls-key", pki["samf"][1], "--dicom-tls-ca", pki["ca"]).wait_ready()
    try:
        assert set(send_series(folder, dport, tls=(peer_client_ctx, "localhost"))) == {0x0000}
        sr, pdf = sorted(pacs.wait(2), key=lambda ds: ds.Modality != "SR")
        assert sr.Modality == "SR" and pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
        # A sender without TLS, or with TLS but no certificate from the CA, gets no association.
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title="PLAIN")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 5
        assert not ae.associate("127.0.0.1", dport, ae_title="SAMF").is_established
        anonymous = ssl.create_default_context(cafile=pki["ca"])
        assert not ae.associate("127.0.0.1", dport, ae_title="SAMF", tls_args=(anonymous, "localhost")).is_established
        assert "Traceback" not in open(server.log).read()
    finally:
        server.stop()
        pacs.server.shutdown()
