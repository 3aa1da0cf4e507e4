"""The transport payload decoder is bounded as a whole, not per section: a payload of many sections,
each within what a section may claim, is refused from its header, before anything is decompressed."""

import json
import lzma
import struct
import subprocess
import sys
import time
import zlib

import pytest

from edgec.ondevice import transport as fmt

MODEL_BYTES = 1024
SECTIONS = fmt.MAX_SECTIONS - 1
SECTION_RAW = 8 * MODEL_BYTES + 65536  # what the old decoder allowed per section


def _hostile_payload(header_size_ok=True):
    zeros = lzma.compress(b"\0" * SECTION_RAW, format=lzma.FORMAT_RAW, filters=fmt.lzma_filters(3, 0, 2, 17))
    header = {"n": MODEL_BYTES, "s": [[len(zeros), SECTION_RAW, 3, 0, 2, 17]] * SECTIONS, "k": 0, "c": [], "t": []}
    h = fmt.HEADER_FILTER
    z_header = lzma.compress(json.dumps(header, separators=(",", ":")).encode(), format=lzma.FORMAT_RAW,
                             filters=fmt.lzma_filters(h["lc"], h["lp"], h["pb"], h["dict_log"]))
    rest = struct.pack("<II", 0, len(z_header)) + z_header + zeros * SECTIONS
    return struct.pack("<4sBI", fmt.MAGIC, fmt.VERSION, zlib.crc32(rest)) + rest


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    path = tmp_path_factory.mktemp("edgt") / "model.tflite.edgt"
    path.write_bytes(_hostile_payload())
    return path


@pytest.mark.parametrize("max_size", [MODEL_BYTES, None])
def test_many_sections_within_the_per_section_limit_are_refused_before_decoding(payload, max_size):
    start = time.perf_counter()
    with pytest.raises(fmt.TransportError, match="more than"):
        fmt.decode(payload.read_bytes(), max_size=max_size)
    assert time.perf_counter() - start < 5


def test_the_decoder_cli_refuses_it_in_one_line_under_a_memory_cap(payload, tmp_path):
    """Under a 1 GiB address-space cap (the old decoder needed ~4.8 GB for this payload)."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from edgec.ondevice.transport import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, str(payload), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "more than" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_header_is_bounded_by_the_file_size(payload):
    with pytest.raises(fmt.TransportError, match="more than"):
        fmt.decode(payload.read_bytes(), max_size=16)
    assert fmt.header_bound(MODEL_BYTES) < len(json.dumps([[1, SECTION_RAW, 3, 0, 2, 17]] * SECTIONS))


def test_tensors_may_not_claim_more_than_the_file():
    model = bytes(range(256)) * 8
    from edgec.pipeline.algorithms.transport_codec import encode_plain
    good = encode_plain(model)
    assert fmt.decode(good, max_size=len(model)) == model
    with pytest.raises(fmt.TransportError, match="tensors fill"):
        fmt._check_layout({"c": [], "t": [{"n": len(model)}, {"n": 1}]}, len(model))
