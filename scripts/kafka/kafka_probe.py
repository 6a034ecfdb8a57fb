#!/usr/bin/env python3
"""Small helpers for scripts/kafka/broker.sh (standard library only).

  kafka_probe.py free-ports N        print N free TCP ports on 127.0.0.1, one a line
  kafka_probe.py cluster-id          print a random KRaft cluster id (base64url UUID)
  kafka_probe.py ready HOST:PORT     ask the broker for its metadata; exit 0 and print
                                     a summary if it lists at least one broker and an
                                     active controller, exit 1 otherwise

`ready` speaks the Kafka wire protocol directly (ApiVersions v0, then a Metadata
request of a non-flexible version the broker supports), so polling for readiness
does not start a JVM each time.

With KAFKA_PROBE_SASL_USERNAME and KAFKA_PROBE_SASL_PASSWORD set (in the
environment, so the password is not on a command line), `ready` first
authenticates with SASL/SCRAM-SHA-512 (SaslHandshake, then SaslAuthenticate
carrying the RFC 5802 exchange), as a SASL_PLAINTEXT listener requires. The
broker is then only called ready once it accepts those credentials, i.e. once
the SCRAM credentials from its metadata log are loaded.
"""

import base64
import hashlib
import hmac
import os
import socket
import struct
import sys

API_METADATA = 3
API_SASL_HANDSHAKE = 17
API_VERSIONS = 18
API_SASL_AUTHENTICATE = 36
SCRAM_MECHANISM = "SCRAM-SHA-512"
CLIENT_ID = b"saga-rs-broker-probe"


def free_ports(n):
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)  # keep bound so the N ports are distinct
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def cluster_id():
    while True:
        raw = os.urandom(16)
        # Uuid.ZERO_UUID and Uuid.METADATA_TOPIC_ID (0...01) are reserved.
        if int.from_bytes(raw, "big") <= 1:
            continue
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        # An id starting with '-' is read as an option by the storage tool's
        # argument parser (`format -t -xyz...` fails), once in 64 starts.
        if not text.startswith("-"):
            return text


class Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def bytes_(self):
        n = self.take(">i")
        if n < 0:
            return None
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def string(self, nullable=False):
        n = self.take(">h")
        if n < 0:
            if nullable:
                return None
            raise ValueError("null string")
        s = self.buf[self.pos : self.pos + n].decode()
        self.pos += n
        return s


def recv_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        out += chunk
    return out


def request(sock, api_key, version, corr, body):
    # Request header v1: api_key, api_version, correlation_id, client_id.
    header = struct.pack(">hhih", api_key, version, corr, len(CLIENT_ID)) + CLIENT_ID
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    r = Reader(recv_exact(sock, size))
    if r.take(">i") != corr:
        raise ValueError("correlation id mismatch")
    return r


def kstring(s):
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def kbytes(b):
    return struct.pack(">i", len(b)) + b


def pick_version(ranges, api, lo_want, hi_want):
    lo, hi = ranges.get(api, (0, -1))
    version = min(hi, hi_want)
    if version < max(lo, lo_want):
        raise ValueError("no usable version of API %d in %d..%d" % (api, lo, hi))
    return version


def scram_escape(name):
    return name.replace("=", "=3D").replace(",", "=2C")


def sasl_scram(sock, ranges, username, password, corr):
    """SASL/SCRAM-SHA-512 (RFC 5802, RFC 7677 with SHA-512) over Kafka's
    SaslHandshake v1 + SaslAuthenticate v0/v1. Raises on any failure."""
    r = request(sock, API_SASL_HANDSHAKE, pick_version(ranges, API_SASL_HANDSHAKE, 1, 1),
                corr, kstring(SCRAM_MECHANISM))
    err = r.take(">h")
    enabled = [r.string() for _ in range(r.take(">i"))]
    if err != 0:
        raise ValueError("SaslHandshake error code %d (enabled mechanisms: %s)" % (err, enabled))

    auth_version = pick_version(ranges, API_SASL_AUTHENTICATE, 0, 1)

    def authenticate(payload, corr):
        r = request(sock, API_SASL_AUTHENTICATE, auth_version, corr, kbytes(payload))
        err = r.take(">h")
        message = r.string(nullable=True)
        data = r.bytes_() or b""
        if err != 0:
            raise ValueError("SASL authentication failed (error code %d): %s" % (err, message))
        return data.decode()

    nonce = base64.b64encode(os.urandom(24)).decode()
    client_first_bare = "n=%s,r=%s" % (scram_escape(username), nonce)
    server_first = authenticate(("n,," + client_first_bare).encode(), corr + 1)
    fields = dict(f.split("=", 1) for f in server_first.split(","))
    server_nonce, salt, iterations = fields["r"], base64.b64decode(fields["s"]), int(fields["i"])
    if not server_nonce.startswith(nonce):
        raise ValueError("SCRAM: the server nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha512).digest()
    stored_key = hashlib.sha512(client_key).digest()
    without_proof = "c=biws,r=%s" % server_nonce
    auth_message = ",".join([client_first_bare, server_first, without_proof]).encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha512).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_final = authenticate(
        ("%s,p=%s" % (without_proof, base64.b64encode(proof).decode())).encode(), corr + 2)
    server_key = hmac.new(salted, b"Server Key", hashlib.sha512).digest()
    expected = hmac.new(server_key, auth_message, hashlib.sha512).digest()
    fields = dict(f.split("=", 1) for f in server_final.split(","))
    if "e" in fields:
        raise ValueError("SCRAM: server error %s" % fields["e"])
    if not hmac.compare_digest(base64.b64decode(fields.get("v", "")), expected):
        raise ValueError("SCRAM: the server's signature does not match")


def ready(addr, timeout=5.0):
    host, _, port = addr.rpartition(":")
    username = os.environ.get("KAFKA_PROBE_SASL_USERNAME")
    password = os.environ.get("KAFKA_PROBE_SASL_PASSWORD")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.settimeout(timeout)
        # ApiVersions v0 is answered by every broker version (and, on a SASL
        # listener, before authentication).
        r = request(sock, API_VERSIONS, 0, 1, b"")
        err = r.take(">h")
        if err != 0:
            raise ValueError("ApiVersions error code %d" % err)
        ranges = {}
        for _ in range(r.take(">i")):
            key, lo, hi = r.take(">h"), r.take(">h"), r.take(">h")
            ranges[key] = (lo, hi)
        sasl = ""
        if username:
            sasl_scram(sock, ranges, username, password or "", 10)
            sasl = " sasl=%s user=%s" % (SCRAM_MECHANISM, username)
        lo, hi = ranges.get(API_METADATA, (0, -1))
        # Versions 4..8 share the non-flexible layout handled here.
        version = min(hi, 8)
        if version < max(lo, 4):
            raise ValueError("no usable Metadata version in %d..%d" % (lo, hi))
        body = struct.pack(">i?", -1, False)  # all topics, no auto-creation
        if version >= 8:
            body += struct.pack(">??", False, False)
        r = request(sock, API_METADATA, version, 20, body)
        r.take(">i")  # throttle_time_ms
        brokers = []
        for _ in range(r.take(">i")):
            node, bhost, bport = r.take(">i"), r.string(), r.take(">i")
            r.string(nullable=True)  # rack
            brokers.append("%d@%s:%d" % (node, bhost, bport))
        cluster = r.string(nullable=True)
        controller = r.take(">i")
        if not brokers or controller < 0:
            raise ValueError("not ready: brokers=%s controller=%d" % (brokers, controller))
        return "cluster=%s controller=%d brokers=%s metadata_v%d%s" % (
            cluster,
            controller,
            ",".join(brokers),
            version,
            sasl,
        )


def main(argv):
    if len(argv) == 3 and argv[1] == "free-ports":
        print("\n".join(str(p) for p in free_ports(int(argv[2]))))
        return 0
    if len(argv) == 2 and argv[1] == "cluster-id":
        print(cluster_id())
        return 0
    if len(argv) == 3 and argv[1] == "ready":
        try:
            print(ready(argv[2]))
            return 0
        except (OSError, ValueError, KeyError, struct.error) as e:
            print("not ready: %s" % e, file=sys.stderr)
            return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
