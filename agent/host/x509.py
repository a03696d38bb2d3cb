"""Just enough of X.509 to answer what an operator asks of a certificate: who issued it, which
names it covers, when it expires.

The agent may depend on the standard library only (no `cryptography`), and `ssl` parses a
certificate only after a verified handshake; so this reads the DER itself. It never verifies a
signature: trust is left to OpenSSL (through `ssl`) and to Caddy.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timezone

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*(?P<body>[A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----"
)
# What OpenSSL also reads as a certificate: -trustout's form, and the pre-RFC 7468 label.
_PEM_OTHER_CERTIFICATE = re.compile(
    rb"-----BEGIN (?P<label>TRUSTED CERTIFICATE|X509 CERTIFICATE)-----"
)

# DER tags used below.
_BOOLEAN, _INTEGER, _OCTET_STRING, _OID, _SEQUENCE, _SET = 0x01, 0x02, 0x04, 0x06, 0x30, 0x31
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_VERSION, _EXTENSIONS = 0xA0, 0xA3
_SAN_DNS, _SAN_IP = 0x82, 0x87

_SUBJECT_ALT_NAME = "2.5.29.17"
_BASIC_CONSTRAINTS = "2.5.29.19"
_COMMON_NAME = "2.5.4.3"
_ATTRIBUTE_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "1.2.840.113549.1.9.1": "emailAddress",
    "0.9.2342.19200300.100.1.25": "DC",
}
_STRING_ENCODINGS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString, in practice Latin-1
    0x16: "ascii",  # IA5String
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}


class CertificateError(ValueError):
    """The bytes are not a certificate this module can read."""


@dataclass(frozen=True)
class Certificate:
    subject: str
    issuer: str
    serial: int
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...]
    ip_addresses: tuple[Address, ...]
    common_name: str | None
    is_ca: bool
    der: bytes

    @property
    def names(self) -> tuple[str, ...]:
        """Every name in subjectAltName, DNS names first; what clients match against."""
        return self.dns_names + tuple(str(ip) for ip in self.ip_addresses)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    def covers(self, name: str) -> bool:
        """Would a browser accept this certificate for `name`? (RFC 6125: SANs only, no CN.)"""
        try:
            address = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return any(_dns_matches(pattern, name) for pattern in self.dns_names)
        return address in self.ip_addresses

    def days_left(self, now: datetime) -> int:
        return int((self.not_after - now).total_seconds() // 86400)


def _dns_matches(pattern: str, name: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if pattern == name:
        return True
    # A wildcard stands for exactly one whole leftmost label: *.example.com covers
    # a.example.com, neither example.com nor a.b.example.com.
    if not pattern.startswith("*."):
        return False
    head, _, rest = name.partition(".")
    return bool(head) and rest == pattern[2:] and "*" not in rest


def pem_blocks(data: bytes) -> list[bytes]:
    """The DER bytes of every PEM certificate in `data`, in file order."""
    blocks = []
    for match in _PEM_CERTIFICATE.finditer(data):
        try:
            blocks.append(base64.b64decode(b"".join(match["body"].split()), validate=True))
        except ValueError as error:
            raise CertificateError(f"a PEM certificate block is not base64: {error}") from None
    return blocks


def load_pem(data: bytes) -> list[Certificate]:
    """Every certificate in a PEM file; raises CertificateError if there is none, or if it
    holds a certificate in a form other than a plain CERTIFICATE block."""
    other = _PEM_OTHER_CERTIFICATE.search(data)
    if other:
        label = other["label"].decode()
        # OpenSSL reads these as certificates (load_cert_chain takes one as the leaf) while
        # Caddy and this parser skip them: what is checked would not be what is served.
        raise CertificateError(
            f"it holds a {label} block, which Caddy ignores and OpenSSL does not: give "
            f"plain CERTIFICATE blocks (`openssl x509 -in FILE` prints one)"
        )
    blocks = pem_blocks(data)
    if not blocks:
        raise CertificateError("no PEM certificate (-----BEGIN CERTIFICATE-----) found")
    return [parse_der(block) for block in blocks]


def parse_der(der: bytes) -> Certificate:
    try:
        return _parse(der)
    except (IndexError, ValueError, UnicodeDecodeError) as error:
        if isinstance(error, CertificateError):
            raise
        raise CertificateError(f"not a DER X.509 certificate: {error}") from None


def _parse(der: bytes) -> Certificate:
    tag, certificate, end = _read(der, 0)
    if tag != _SEQUENCE or end != len(der):
        raise CertificateError("not a DER X.509 certificate")
    tag, tbs, _ = _read(certificate, 0)
    if tag != _SEQUENCE:
        raise CertificateError("certificate has no TBSCertificate")
    fields = _children(tbs)
    if fields and fields[0][0] == _VERSION:
        fields = fields[1:]
    if len(fields) < 6:
        raise CertificateError("TBSCertificate is truncated")
    (serial_tag, serial), _, (_, issuer), (_, validity), (_, subject), _ = fields[:6]
    if serial_tag != _INTEGER:
        raise CertificateError("certificate serial number is not an INTEGER")
    times = _children(validity)
    if len(times) != 2:
        raise CertificateError("certificate validity is not two times")
    dns_names: list[str] = []
    ip_addresses: list[Address] = []
    is_ca = False
    for tag, value in fields[6:]:
        if tag != _EXTENSIONS:
            continue
        _, extensions, _ = _read(value, 0)
        for _, extension in _children(extensions):
            parts = _children(extension)
            oid = _oid(parts[0][1])
            payload = parts[-1][1]  # extnValue, after an optional `critical` BOOLEAN
            if oid == _SUBJECT_ALT_NAME:
                _, names, _ = _read(payload, 0)
                for name_tag, name in _children(names):
                    if name_tag == _SAN_DNS:
                        dns_names.append(name.decode("ascii"))
                    elif name_tag == _SAN_IP and len(name) in (4, 16):
                        ip_addresses.append(ipaddress.ip_address(name))
            elif oid == _BASIC_CONSTRAINTS:
                _, constraints, _ = _read(payload, 0)
                members = _children(constraints)
                is_ca = bool(members and members[0][0] == _BOOLEAN and members[0][1] != b"\x00")
    return Certificate(
        subject=_name(subject),
        issuer=_name(issuer),
        serial=int.from_bytes(serial, "big", signed=True),
        not_before=_time(*times[0]),
        not_after=_time(*times[1]),
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ip_addresses),
        common_name=_attribute(subject, _COMMON_NAME),
        is_ca=is_ca,
        der=der,
    )


def _read(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """One DER element at `offset`: (tag, contents, offset after it)."""
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise CertificateError("multi-byte DER tags do not occur in certificates")
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4:
            raise CertificateError("unsupported DER length")
        length = int.from_bytes(data[offset : offset + size], "big")
        offset += size
    end = offset + length
    if end > len(data):
        raise CertificateError("DER element runs past the end of the data")
    return tag, data[offset:end], end


def _children(data: bytes) -> list[tuple[int, bytes]]:
    items = []
    offset = 0
    while offset < len(data):
        tag, value, offset = _read(data, offset)
        items.append((tag, value))
    return items


def _oid(data: bytes) -> str:
    if not data:
        raise CertificateError("empty OBJECT IDENTIFIER")
    first = data[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    value = 0
    for byte in data[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(str(part) for part in parts)


def _attributes(name: bytes) -> list[tuple[str, str]]:
    pairs = []
    for _, rdn in _children(name):
        for _, attribute in _children(rdn):
            (oid_tag, oid), (value_tag, value) = _children(attribute)[:2]
            if oid_tag != _OID:
                raise CertificateError("name attribute without an OBJECT IDENTIFIER")
            encoding = _STRING_ENCODINGS.get(value_tag)
            text = value.decode(encoding, "replace") if encoding else value.hex()
            pairs.append((_oid(oid), text))
    return pairs


def _name(name: bytes) -> str:
    """Attributes in certificate order, as `openssl x509 -nameopt oneline` shows them."""
    return ", ".join(f"{_ATTRIBUTE_NAMES.get(oid, oid)}={text}" for oid, text in _attributes(name))


def _attribute(name: bytes, wanted: str) -> str | None:
    values = [text for oid, text in _attributes(name) if oid == wanted]
    return values[-1] if values else None


def _time(tag: int, value: bytes) -> datetime:
    text = value.decode("ascii")
    if not text.endswith("Z"):
        raise CertificateError(f"certificate time {text!r} is not in UTC")
    if tag == _UTC_TIME and len(text) == 13:
        # RFC 5280: two-digit years 50-99 are 19xx, 00-49 are 20xx.
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME or len(text) != 15:
        raise CertificateError(f"certificate time {text!r} has an unknown format")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
