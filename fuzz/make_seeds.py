#!/usr/bin/env python3
"""Writes seed inputs for every fuzz target into fuzz/seeds/<target>/ (not committed:
scripts/fuzz.sh --seed merges them into fuzz/corpus/<target>/ and minimises).

Seeds come from the project's real inputs: the example configs in deploy/, the YAML
written in the Rust tests, DNS replies and HTTP bodies shaped like the ones the tests'
servers send, certificates made with openssl as the tests make them, and responses of
the remote-write receivers the tests run against.
"""

import base64
import gzip
import hashlib
import os
import re
import struct
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "seeds")


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def rust_sources():
    for base in ["agent/src", "aggregator/src", "proto/src", "tests"]:
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".rs"):
                    with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                        yield fh.read()


def raw_strings(text):
    """The string literals of a Rust source: raw ones (r"..." and r#"..."#) as they are,
    plain ones with several lines unescaped."""
    for m in re.finditer(r'r(#*)"(.*?)"\1', text, re.S):
        yield m.group(2)
    for m in re.finditer(r'(?<![r#\w])"((?:[^"\\]|\\.)*\\n(?:[^"\\]|\\.)*)"', text):
        yield re.sub(r'\\(.)', lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)), m.group(1))


# --- configs -----------------------------------------------------------------------
def configs():
    agg = read("deploy/examples/aggregator.yml")
    agent = read("deploy/examples/agent.yml")
    put("aggregator_config", agg)
    put("agent_config", agent)
    snippets = [s for src in rust_sources() for s in raw_strings(src)]
    for s in snippets:
        if "{" in s and "{{" in s:
            s = s.replace("{{", "{").replace("}}", "}")  # format! templates
        if re.search(r"^\s*(global|jobs|remote_write|fleet|modules_file):", s, re.M):
            put("aggregator_config", s)
        if re.search(r"^\s*(agent|aggregators|buffer|probe_endpoint):", s, re.M):
            put("agent_config", s)
        if re.search(r"^modules:", s, re.M):
            put("blackbox_modules", b"\x00" + s.encode())
        if re.search(r"^\s*- targets:", s, re.M):
            put("file_sd", b"\x00" + s.encode())
        st = s.strip()
        if st.startswith("{") and '"prober"' in st:
            put("blackbox_modules", b"\x01" + st.encode())
        if st.startswith("[") and '"targets"' in st:
            put("file_sd", b"\x01" + st.encode())
            put("http_sd", st.encode())
    # Modules as the aggregator sends them to agents (serde_json of Module).
    for m in [
        '{"prober":"http","timeout":"5s","http":{"preferred_ip_protocol":"ip4","valid_status_codes":[200,204],'
        '"fail_if_body_not_matches_regexp":["ok"],"compression":"gzip","body_size_limit":"1MiB"}}',
        '{"prober":"tcp","tcp":{"tls":true,"tls_config":{"insecure_skip_verify":true},'
        '"query_response":[{"expect":"^220"},{"send":"EHLO sonde"},{"expect":"^250"},{"starttls":true}]}}',
        '{"prober":"dns","dns":{"query_name":"example.com","query_type":"SOA","transport_protocol":"tcp",'
        '"valid_rcodes":["NOERROR"],"validate_answer_rrs":{"fail_if_not_matches_regexp":["IN\\tSOA"]}}}',
        '{"prober":"http","http":{"method":"POST","headers":{"X-A":"b"},"body":"{}","basic_auth":'
        '{"username":"u","password":"p"},"fail_if_header_matches":[{"header":"Server","regexp":"nginx"}]}}',
    ]:
        put("blackbox_modules", b"\x01" + m.encode())
    put(
        "blackbox_modules",
        b"\x00" + agg[agg.index("modules:") : agg.index("\njobs:")].encode(),
    )
    # Whole blackbox.yml files as users have them: blackbox_exporter's own example.
    put("blackbox_modules", b"\x00" + read("tests/fixtures/blackbox/example-v0.23.0.yml").encode())
    web = read("deploy/examples/targets/web.yml")
    put("file_sd", b"\x00" + web.encode())
    put(
        "file_sd",
        b'\x01[{"targets":["http://127.0.0.1:8080/","127.0.0.1:22","[::1]:53"],"labels":{"team":"shop"}},{"targets":[]}]',
    )
    put("http_sd", b'[{"targets":["127.0.0.1:22","[::1]:53"],"labels":{"team":"shop"}},{"targets":[]}]')
    put("http_sd", b"null")


# --- protobuf, by hand: the fleet stream -------------------------------------------
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 1:
        return key + payload
    return key + varint(len(payload)) + payload


def s(num, text):
    return field(num, 2, text.encode() if isinstance(text, str) else text)


def sample(name, labels, value):
    packed = b"".join(varint(i) for i in labels)
    out = field(1, 0, name) + field(3, 1, struct.pack("<d", value))
    if labels:
        out += s(2, packed)
    return out


def result(seq, job, instance, ts, success, samples):
    out = field(1, 0, seq) + s(2, job) + s(3, instance) + field(4, 0, ts)
    out += field(5, 0, 1 if success else 0) + field(6, 1, struct.pack("<d", 0.012))
    for smp in samples:
        out += s(7, smp)
    out += field(8, 0, 1)
    if not success:
        out += s(9, "connect: connection refused")
    return out


def batch(symbols, results):
    return b"".join(s(1, x) for x in symbols) + b"".join(s(2, r) for r in results)


def agent_message(kind, payload):
    msg = s(kind, payload)
    return varint(len(msg)) + msg


def fleet():
    t0 = 1_700_000_001_000
    hello = (
        field(1, 0, 1)
        + s(2, "eu-1")
        + s(3, s(1, "region") + s(2, "eu"))
        + s(4, "0.1.0")
        + s(5, "local_ssh")
    )
    symbols = ["probe_success", "probe_duration_seconds", "phase", "connect", "probe_http_status_code",
               "probe_failure_info", "reason", "dns"]
    b1 = batch(
        symbols,
        [
            result(1, "web", "http://127.0.0.1:80", t0, True,
                   [sample(0, [], 1.0), sample(1, [2, 3], 0.001), sample(4, [], 200.0)]),
            result(2, "tcp", "127.0.0.1:81", t0 + 10, False,
                   [sample(0, [], 0.0), sample(5, [6, 7], 1.0)]),
        ],
    )
    b2 = batch([], [result(3, "tcp", "127.0.0.1:82", t0 + 1000, True, [sample(0, [], 1.0)]),
                    result(4, "local_ssh", "127.0.0.1:22", t0 + 1000, True, [sample(0, [], 1.0)])])
    heartbeat = field(1, 0, t0)
    put("fleet_batch", agent_message(2, b1))
    put("fleet_batch", agent_message(2, b1) + agent_message(3, heartbeat) + agent_message(2, b2))
    put("fleet_batch", agent_message(1, hello) + agent_message(2, b1) + agent_message(2, b2))
    # A replay (seq not increasing) and an out-of-table symbol.
    put("fleet_batch", agent_message(2, b1) + agent_message(2, b1))
    put("fleet_batch", agent_message(2, batch(["up"], [result(1, "web", "x", t0, True, [sample(9, [], 1)])])))
    # Regression: a local job's results far apart in time (their spacing overflowed).
    local = field(1, 0, 1) + s(2, "eu-1") + s(5, "local_ssh")
    far = batch([], [result(1, "local_ssh", "127.0.0.1:22", -10 & (2**64 - 1), True, []),
                     result(2, "local_ssh", "127.0.0.1:22", 2**63 - 1, True, [])])
    put("fleet_batch", agent_message(1, local) + agent_message(2, far))


# --- failure traces ----------------------------------------------------------------
def trace_message(steps, path=None):
    out = b"".join(s(1, st) for st in steps)
    if path is not None:
        out += s(2, path)
    return out


def traces():
    dns = s(1, s(1, "shop.example") + s(2, "192.0.2.1") + s(2, "2001:db8::1"))
    nxdomain = s(1, s(1, "gone.example") + s(3, "resolve gone.example: no address"))
    refused = s(2, s(1, "192.0.2.1:443") + s(3, "connection refused") + field(4, 1, struct.pack("<d", 0.002)))
    ok = s(2, s(1, "[2001:db8::1]:443") + field(2, 0, 1) + field(4, 1, struct.pack("<d", 0.01)))
    tls = s(3, "invalid peer certificate: UnknownIssuer")
    status = s(4, "HTTP/1.1 500 Internal Server Error")
    body = s(5, s(1, "<html>maintenance\\n") + s(2, "ok"))
    timeout = s(6, "connect")
    hop = lambda ttl, addr, icmp: field(1, 0, ttl) + s(2, addr) + field(3, 1, struct.pack("<d", 0.001)) + s(4, icmp)
    path = s(1, "10.99.2.2") + s(2, hop(1, "10.99.1.1", "time exceeded")) + s(2, hop(2, "10.99.1.1", "net unreachable")) \
        + field(4, 0, 1_700_000_000_000)
    put("failure_trace", trace_message([dns, refused]))
    put("failure_trace", trace_message([nxdomain]))
    put("failure_trace", trace_message([dns, ok, tls]))
    put("failure_trace", trace_message([dns, ok, status, body]))
    put("failure_trace", trace_message([refused, timeout], path))
    put("failure_trace", trace_message([], s(1, "10.99.2.2") + s(2, hop(0, "", ""))))
    # The same in a result of a batch, for the fleet decoder.
    failed = field(1, 0, 1) + s(2, "web") + s(3, "https://shop.example/") + field(4, 0, 1_700_000_001_000) \
        + field(8, 0, 1) + s(9, "connect: connection refused") + s(10, trace_message([dns, refused], path))
    put("fleet_batch", agent_message(2, batch([], [failed])))


# --- DNS replies ---------------------------------------------------------------------
def name(n):
    out = b""
    for label in n.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def rr(owner, rtype, ttl, rdata, cls=1):
    return owner + struct.pack(">HHIH", rtype, cls, ttl, len(rdata)) + rdata


def dns_message(qname, qtype, answers=(), authority=(), additional=(), rcode=0, qid=0x1234):
    flags = 0x8180 | rcode  # response, RD, RA
    head = struct.pack(">HHHHHH", qid, flags, 1, len(answers), len(authority), len(additional))
    q = name(qname) + struct.pack(">HH", qtype, 1)
    return head + q + b"".join(answers) + b"".join(authority) + b"".join(additional)


def dns():
    ptr = b"\xc0\x0c"  # the question's name
    a1 = rr(ptr, 1, 300, bytes([192, 0, 2, 1]))
    a2 = rr(ptr, 1, 300, bytes([192, 0, 2, 2]))
    aaaa = rr(ptr, 28, 300, bytes.fromhex("20010db8000000000000000000000001"))
    soa = rr(ptr, 6, 3600, name("ns1.example.com") + name("hostmaster.example.com")
             + struct.pack(">IIIII", 2024010101, 7200, 3600, 1209600, 300))
    txt = rr(ptr, 16, 60, b"\x0bv=spf1 -all" + b'\x0asay "hi"\x01\xff')
    cname = rr(ptr, 5, 60, name("www.example.net"))
    mx = rr(ptr, 15, 60, b"\x00\x0a" + name("mail.example.com"))
    ns = rr(ptr, 2, 60, name("ns1.example.com"))
    glue = rr(name("ns1.example.com"), 1, 60, bytes([192, 0, 2, 53]))
    opt = rr(b"\x00", 41, 0, b"", cls=1232)
    caa = rr(ptr, 257, 60, b"\x00\x05issue" + b"letsencrypt.org")
    srv = rr(ptr, 33, 60, struct.pack(">HHH", 10, 5, 5060) + name("sip.example.com"))
    for pick, qtype, ans, auth, add, rcode in [
        (0, 1, [a1, a2], [], [], 0),
        (0, 1, [a1], [ns], [glue, opt], 0),
        (1, 6, [soa], [], [], 0),
        (1, 6, [], [soa], [], 3),
        (2, 255, [a1, aaaa, txt, cname, mx, caa, srv], [ns], [glue, opt], 0),
        (3, 16, [txt], [], [], 0),
        (0, 28, [aaaa], [], [], 2),
    ]:
        put("dns_answer", bytes([pick]) + dns_message("example.com", qtype, ans, auth, add, rcode))


# --- ICMP packets ------------------------------------------------------------------------
def icmp():
    data = b"Prometheus Blackbox Exporter"

    def echo(kind, ident=0x1234, seq=7, payload=data):
        return struct.pack(">BBHHH", kind, 0, 0, ident, seq) + payload

    ttl = struct.pack("=QiiiI", 20, 0, 2, 64, 0)  # cmsghdr{len, IPPROTO_IP, IP_TTL} + 64
    hops = struct.pack("=QiiiI", 20, 41, 52, 33, 0)  # IPPROTO_IPV6, IPV6_HOPLIMIT
    ip_header = bytes([0x45]) + bytes(19)
    for pick, control, packet in [
        (0, ttl, echo(0)),  # datagram, IPv4 reply
        (0, ttl, echo(8)),  # our own request
        (2, ttl, ip_header + echo(0)),  # raw IPv4
        (2, ttl, ip_header + echo(0, ident=1)),  # another prober's reply
        (5, hops, echo(129)),  # raw IPv6
        (1, hops, echo(129, seq=8)),  # datagram IPv6, another sequence
        (0, b"", echo(3) + ip_header + echo(8)),  # destination unreachable
    ]:
        put("icmp_reply", bytes([pick, len(control)]) + control + packet)


# --- HTTP bodies ---------------------------------------------------------------------
def http():
    bodies = [
        b"hello sonde",
        b'{"status":"ok","checks":[{"name":"db","ok":true}]}\n',
        b"<!doctype html><html><body><h1>It works</h1></body></html>\n",
        b"hello compressed sonde " * 50,
    ]
    brotli_hello = bytes([0x0B, 0x02, 0x80, 0x68, 0x65, 0x6C, 0x6C, 0x6F, 0x03])
    # module index = limit * 4 + compression; compression 0 none, 1 gzip, 2 deflate, 3 br
    for limit in range(4):
        for body in bodies:
            put("http_body", bytes([limit * 4 + 0, 4]) + body)
            put("http_body", bytes([limit * 4 + 1, 1]) + gzip.compress(body))
            put("http_body", bytes([limit * 4 + 2, 2]) + zlib.compress(body))
            raw = zlib.compressobj(wbits=-15)
            put("http_body", bytes([limit * 4 + 2, 3]) + raw.compress(body) + raw.flush())
        put("http_body", bytes([limit * 4 + 3, 1]) + brotli_hello)
    # Two gzip members, as a server concatenating them sends.
    put("http_body", bytes([1, 255]) + gzip.compress(b"part one ") + gzip.compress(b"part two"))
    put("http_body", bytes([5, 8]) + gzip.compress(b"\x00" * 65536))
    for date in ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                 "Sun Nov  6 08:49:37 1994"]:
        put("http_body", bytes([0, 1]) + date.encode())


# --- certificates ----------------------------------------------------------------------
def x509():
    with tempfile.TemporaryDirectory() as d:
        def sh(*args):
            subprocess.run(args, cwd=d, check=True, capture_output=True)

        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
           "-subj", "/C=US/O=sonde test/CN=sonde test CA")
        sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/O=Acme+, Inc./CN=localhost")
        with open(os.path.join(d, "ext"), "w") as f:
            f.write("subjectAltName=DNS:localhost,DNS:*.example.com,IP:127.0.0.1,email:a@b\n")
        sh("openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
           "-CAcreateserial", "-out", "leaf.pem", "-days", "90", "-extfile", "ext")
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rsa.key",
           "-out", "rsa.pem", "-days", "1", "-subj", "/CN=rsa.example/emailAddress=x@y.z/L=Berlin")

        def der(pem):
            sh("openssl", "x509", "-in", pem, "-outform", "der", "-out", pem + ".der")
            with open(os.path.join(d, pem + ".der"), "rb") as f:
                return f.read()

        ca, leaf, rsa = der("ca.pem"), der("leaf.pem"), der("rsa.pem")
    put("x509", b"\x01" + leaf + ca)
    put("x509", b"\x02" + leaf + ca)
    put("x509", b"\x01" + rsa)
    # Real public roots, as `ca_file` bundles hold them.
    certs_dir = "/etc/ssl/certs"
    if os.path.isdir(certs_dir):
        for f in [f for f in sorted(os.listdir(certs_dir)) if f.endswith(".pem")][:8]:
            if True:
                text = open(os.path.join(certs_dir, f)).read()
                m = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END", text, re.S)
                if m:
                    put("x509", b"\x01" + base64.b64decode(m.group(1)))


# --- remote-write responses ------------------------------------------------------------
def remote_write():
    def resp(status, headers, body=b""):
        lines = "".join(f"{k}: {v}\n" for k, v in headers)
        return struct.pack(">H", status) + lines.encode() + b"\n" + body

    put("remote_write_response", resp(204, []))
    put("remote_write_response", resp(204, [
        ("X-Prometheus-Remote-Write-Samples-Written", "2000"),
        ("X-Prometheus-Remote-Write-Histograms-Written", "0"),
        ("X-Prometheus-Remote-Write-Exemplars-Written", "0")]))
    put("remote_write_response", resp(200, [("Content-Type", "text/plain")], b"OK"))
    put("remote_write_response", resp(400, [("Content-Type", "text/plain; charset=utf-8")],
        b"out of order sample\n"))
    put("remote_write_response", resp(400, [], b'{"status":"error","error":"err-mimir-sample-duplicate-timestamp"}'))
    put("remote_write_response", resp(415, [], b"unsupported Content-Type \"application/x-protobuf;proto=io.prometheus.write.v2.Request\""))
    put("remote_write_response", resp(429, [("Retry-After", "30")], b"too many requests"))
    put("remote_write_response", resp(503, [("Retry-After", "  5 ")], b"<html>\r\n<body>Service Unavailable</body></html>"))
    put("remote_write_response", resp(302, [("Location", "https://mimir.example.com/api/v1/push")]))
    put("remote_write_response", resp(500, [], "interne Fehler: \u00fcberlastet".encode()))


def main():
    if os.path.isdir(OUT):
        for dirpath, _, files in os.walk(OUT):
            for f in files:
                os.remove(os.path.join(dirpath, f))
    configs()
    fleet()
    traces()
    dns()
    icmp()
    http()
    x509()
    remote_write()
    for t in sorted(os.listdir(OUT)):
        print(f"{t}: {len(os.listdir(os.path.join(OUT, t)))} seeds", file=sys.stderr)


if __name__ == "__main__":
    main()
