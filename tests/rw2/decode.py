#!/usr/bin/env python3
"""Decodes one remote write 2.0 request body with an implementation independent of sonde's.

Usage: python3 tests/rw2/decode.py FILE

FILE holds a request body as sent on the wire: snappy block format around a protobuf
io.prometheus.write.v2.Request. The .proto beside this script (the spec's messages) is
compiled with grpcio-tools' bundled protoc, the body parsed by the `protobuf` package and
inflated by `cramjam`'s raw snappy. Prints JSON on stdout:

  {"symbols": [...],
   "timeseries": [{"labels": [[name, value], ...],
                   "samples": [[timestamp_ms, value_as_ieee754_bits], ...],
                   "metadata": {"type": "METRIC_TYPE_GAUGE", "help": "...", "unit": ""}}]}

Values are given as their 64-bit patterns so that NaN payloads (the staleness marker)
compare exactly. Exits 3, naming the pip packages, when a package is missing; 2 when the
body breaks the spec (bad references, symbols[0] not empty).
"""

import json
import os
import struct
import sys
import tempfile

PACKAGES = "grpcio-tools protobuf cramjam"

try:
    import cramjam
    import google.protobuf  # noqa: F401  (the runtime the generated code needs)
    from grpc_tools import protoc
except ImportError as e:
    print(
        f"decode.py: the Python package providing {e.name!r} is missing: "
        f"python3 -m pip install {PACKAGES}",
        file=sys.stderr,
    )
    sys.exit(3)


def fail(message):
    print(f"decode.py: {message}", file=sys.stderr)
    sys.exit(2)


def load_messages(out_dir):
    here = os.path.dirname(os.path.abspath(__file__))
    rc = protoc.main(
        ["protoc", f"-I{here}", f"--python_out={out_dir}", os.path.join(here, "types.proto")]
    )
    if rc != 0:
        fail(f"protoc failed on types.proto (exit {rc})")
    sys.path.insert(0, out_dir)
    import types_pb2  # generated just now

    return types_pb2


def main():
    if len(sys.argv) != 2:
        fail("usage: decode.py FILE")
    with open(sys.argv[1], "rb") as f:
        body = f.read()
    raw = bytes(cramjam.snappy.decompress_raw(body))
    with tempfile.TemporaryDirectory() as out_dir:
        pb = load_messages(out_dir)
        request = pb.Request()
        request.ParseFromString(raw)
        symbols = list(request.symbols)
        if not symbols or symbols[0] != "":
            fail(f"symbols[0] must be the empty string, got {symbols[:1]!r}")

        def sym(i):
            if i >= len(symbols):
                fail(f"reference {i} outside the {len(symbols)} symbols")
            return symbols[i]

        series = []
        for ts in request.timeseries:
            refs = list(ts.labels_refs)
            if len(refs) % 2:
                fail("labels_refs has an odd length")
            labels = [[sym(refs[i]), sym(refs[i + 1])] for i in range(0, len(refs), 2)]
            samples = [
                [s.timestamp, struct.unpack("<Q", struct.pack("<d", s.value))[0]]
                for s in ts.samples
            ]
            entry = {"labels": labels, "samples": samples}
            if ts.HasField("metadata"):
                entry["metadata"] = {
                    "type": pb.Metadata.MetricType.Name(ts.metadata.type),
                    "help": sym(ts.metadata.help_ref),
                    "unit": sym(ts.metadata.unit_ref),
                }
            series.append(entry)
        json.dump({"symbols": symbols, "timeseries": series}, sys.stdout)
        print()


if __name__ == "__main__":
    main()
