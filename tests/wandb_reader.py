"""Reads W&B's offline ``run-*.wandb`` files with wandb's own protobuf records.

wandb no longer ships a reader for these files. Their framing is the LevelDB log format: a 7-byte
file header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte
header (CRC32C, little-endian length, type: 1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, "not a W&B transaction log"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the block's tail is zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding / preallocated end
            pos += room
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            raise ValueError(f"unknown record type {kind} at {pos}")
        rec = pb.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def history(recs: list[pb.Record]) -> list[dict[str, str]]:
    """Each logged step as {key: json value}."""
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item})
    return rows


def summary(recs: list[pb.Record]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            for i in r.summary.update:
                out["/".join(i.nested_key) or i.key] = i.value_json
    return out


def config(recs: list[pb.Record]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in recs:
        kind = r.WhichOneof("record_type")
        items = r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        for i in items:
            out["/".join(i.nested_key) or i.key] = i.value_json
    return out


def run_info(recs: list[pb.Record]) -> pb.RunRecord:
    """The run's own record: name, group, job type."""
    return next(r.run for r in recs if r.WhichOneof("record_type") == "run")
