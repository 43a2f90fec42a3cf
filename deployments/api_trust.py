"""A certificate file for Prefect clients of an API served over plain HTTP.

Every Prefect client builds a TLS context with the whole CA bundle (``certifi``: 117
certificates, 25-75 ms on the 2-core VM) even for an ``http://`` API, and a flow run
creates about 15 clients, its worker 3 more: about half a second of each run. The
service's API, the local server's and the embedded one are plain HTTP on loopback, so the
processes that use them get ``PREFECT_API_SSL_CERT_FILE`` = a certificate made here for
nothing else (its key is thrown away): it loads in about 2 ms. Were the API ever served
over TLS, its clients would refuse it (no server holds that key) until the variable names
the right CA.
"""

from __future__ import annotations

import datetime
from collections.abc import MutableMapping
from pathlib import Path

VARIABLE = "PREFECT_API_SSL_CERT_FILE"
FILE_NAME = "api-no-tls.pem"


def trust_plain_http(env: MutableMapping[str, str], folder: Path) -> None:
    """Set ``PREFECT_API_SSL_CERT_FILE`` in ``env`` to the unused certificate in ``folder``
    (see :func:`unused_ca`) unless ``env`` names a file already; return None."""
    if VARIABLE not in env:
        folder.mkdir(parents=True, exist_ok=True)
        env[VARIABLE] = str(unused_ca(folder / FILE_NAME))


def unused_ca(path: Path) -> Path:
    """Return ``path``, writing there first, if it is missing, a self-signed CA
    certificate whose private key is discarded."""
    if path.exists():
        return path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atomforge: no TLS server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)
    return path
