"""The binary layout of a user's record in Redis (gateway/state.py stores it; this module only
turns a UserState into bytes and back).

    n (uint64: events applied, the optimistic-concurrency version; first, so the write script
    compares it with GETRANGE 0 7), format (uint8), model version, h, c (float16 LSTM state:
    every step's state is rounded so, offline too, seqguard.encoding.carried_state),
    session (float64 session average of the detector, seqguard/detector.py), ctx (UserContext
    bytes), pending (featurised events whose LSTM step is deferred), ring (recent events, sealed:
    RingCipher; the newest `rebuild_steps` carry their feature row so a new model version can
    rebuild h, c).

One binary string rather than a Redis hash, and a binary ring rather than JSON: both cost tens of
bytes per field or event in overhead, on every user.

The one migration a real upgrade needs is a wider featuriser (a new signal appends columns, and
the new model's engine rebuilds h, c from the ring's feature rows): every stored feature row
carries its width, and a narrower row is read zero-padded to this featuriser's width (the
appended columns are detector-only evidence counters, where 0 = no evidence). A record of any
other format version is refused (ValueError).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from seqguard.encoding import STATE_DTYPE
from seqguard.featurizer import N_FEATURES, UserContext

USER_FORMAT = 2                 # the layout above; bumped when it changes


class RingEntry(NamedTuple):
    """One recent event. `feat`: its packed feature row (pack_features; a float32 array until the
    entry is first written) or b"" beyond rebuild_steps."""
    event_id: str
    event_type: str
    ts: int
    feat: bytes = b""
    head: bytes = b""           # its encoded id/type/ts (cached: a ring is re-encoded on every write)


@dataclass
class UserState:
    key: str
    h: np.ndarray
    c: np.ndarray
    ctx: UserContext
    ring: list = field(default_factory=list)        # [RingEntry, ...] oldest first
    pending: list = field(default_factory=list)     # [(type_id, features float32 [F], answer key), ...] not yet
                                                    # stepped; the key names the remembered DEGRADED answer
                                                    # that the real score replaces once the step runs
    model_version: str = ""
    n: int = 0
    version: int = 0                                # n as read: the compare-and-set expectation
    existed: bool = False                           # a key was read: "absent" and "n = 0" are different versions
    session: float = 0.0                            # the detector's session average m (stage 2)
    dirty: bool = False                             # changed by this batch: only these users are written


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        x = b[i]
        i += 1
        n |= (x & 0x7F) << shift
        if x < 0x80:
            return n, i
        shift += 7


def pack_features(row: np.ndarray) -> bytes:
    """Lossless float32 row: its width, bitmask of non-zero values, bitmask of those == 1.0, then the others.

    Most features are 0/1 flags or zero (no amount, no entity), so a row packs to about half its
    raw size, and the unpacked row is bit-identical (the offline replay must match).
    """
    row = np.ascontiguousarray(row, np.float32)
    bits = row.view(np.uint32)
    nz = bits != 0                      # by bits: -0.0 is kept as a value, not dropped as zero
    one = bits == 0x3F800000
    return (_varint(len(row)) + np.packbits(nz, bitorder="little").tobytes()
            + np.packbits(one, bitorder="little").tobytes() + row[nz & ~one].tobytes())


def unpack_features(raw: bytes, n_features: int) -> np.ndarray:
    """The row, `n_features` wide: a row written by a narrower featuriser is zero-padded (module docstring)."""
    width, i = _read_varint(raw, 0)
    if width > n_features:
        raise ValueError(f"feature row of width {width}, wider than this featuriser's {n_features}")
    m = (width + 7) // 8
    nz = np.unpackbits(np.frombuffer(raw[i:i + m], np.uint8), count=width, bitorder="little").astype(bool)
    one = np.unpackbits(np.frombuffer(raw[i + m:i + 2 * m], np.uint8), count=width, bitorder="little").astype(bool)
    row = np.zeros(n_features, np.float32)
    row[:width][one] = 1.0
    row[:width][nz & ~one] = np.frombuffer(raw[i + 2 * m:], np.float32)
    return row


def ring_entry(event_id: str, event_type: str, ts: int, feats: np.ndarray | None = None) -> RingEntry:
    """A new ring entry. Its feature row stays an array until a write packs it (pack_ring), and only
    if it is still among the newest `rebuild_steps` then: most rows are pushed out unpacked."""
    e, t = event_id.encode("utf-8", "surrogatepass"), event_type.encode("utf-8", "surrogatepass")
    head = _varint(len(e)) + e + _varint(len(t)) + t + _varint(ts)
    return RingEntry(event_id, event_type, ts, feats if feats is not None else b"", head)


def pack_ring(ring: list, rebuild_steps: int) -> bytes:
    """[count] then per entry: varint-prefixed id and type, varint ts, varint feature-length, features.

    Only the newest `rebuild_steps` entries keep their feature rows (what a rebuild replays).
    """
    parts = [bytes([len(ring)])]
    keep_from = len(ring) - rebuild_steps
    for k, e in enumerate(ring):
        head = e.head or ring_entry(e.event_id, e.event_type, e.ts).head
        f = e.feat if k >= keep_from else b""
        if isinstance(f, np.ndarray):
            f = pack_features(f)
        parts += (head, _varint(len(f)), f)
    return b"".join(parts)


def unpack_ring(raw: bytes) -> list:
    if not raw:
        return []
    out, i = [], 1
    for _ in range(raw[0]):
        start = i
        n, i = _read_varint(raw, i)
        eid = raw[i:i + n].decode("utf-8", "surrogatepass")
        i += n
        n, i = _read_varint(raw, i)
        et = raw[i:i + n].decode("utf-8", "surrogatepass")
        i += n
        ts, i = _read_varint(raw, i)
        head = raw[start:i]
        n, i = _read_varint(raw, i)
        out.append(RingEntry(eid, et, ts, raw[i:i + n], head))
        i += n
    return out


NO_ANSWER = ""                  # a deferred step whose answer is not remembered (a rebuild step)
_REF_BYTES = 16                 # a deferred step's answer key: the 32 hex digits after "e:", as bytes


def _pack_pending(pending: list) -> bytes:
    """[n, F] int32, n type ids int64, n x F features float32, n answer keys (16 bytes; zeros: none)."""
    if not pending:
        return b""
    types = np.array([p[0] for p in pending], np.int64)
    feats = np.stack([p[1] for p in pending]).astype(np.float32)
    refs = b"".join(bytes.fromhex(p[2]) if p[2] else bytes(_REF_BYTES) for p in pending)
    return (np.int32(len(pending)).tobytes() + np.int32(feats.shape[1]).tobytes() + types.tobytes()
            + feats.tobytes() + refs)


def _unpack_pending(raw: bytes | None) -> list:
    if not raw:
        return []
    n, f = int(np.frombuffer(raw[:4], np.int32)[0]), int(np.frombuffer(raw[4:8], np.int32)[0])
    types = np.frombuffer(raw[8:8 + 8 * n], np.int64)
    end = 8 + 8 * n + 4 * n * f
    feats = np.frombuffer(raw[8 + 8 * n:end], np.float32).reshape(n, f)
    refs = [raw[end + _REF_BYTES * i:end + _REF_BYTES * (i + 1)] for i in range(n)]
    return [(int(types[i]), _to_width(feats[i]), refs[i].hex() if any(refs[i]) else NO_ANSWER) for i in range(n)]


def _to_width(row: np.ndarray, width: int = N_FEATURES) -> np.ndarray:
    """A stored feature row at this featuriser's width (a copy; module docstring: a narrower one is zero-padded)."""
    if len(row) > width:
        raise ValueError(f"feature row of width {len(row)}, wider than this featuriser's {width}")
    out = np.zeros(width, np.float32)
    out[:len(row)] = row
    return out


_BLOB_HEAD = struct.Struct("<QB")           # n (compare-and-set version, first 8 bytes), format


class RingCipher:
    """Keeps raw event ids (and the recent events' types and times) out of Redis.

    The ring is the only part of a user's record that holds caller identifiers in the clear (its
    event ids name the events behind a reason). Its bytes are XORed with SHAKE-256(ring key ||
    user key || nonce), a keyed extendable-output stream, with a fresh random nonce per write, so
    equal rings never look equal and nothing is readable without the deployment's pseudonymisation
    key. One hash call per user and write, not one per entry. Integrity is not
    its job: whoever can write Redis can already write any state.
    """

    NONCE_BYTES = 8

    def __init__(self, key: bytes):
        self._key = hmac.new(key, b"seqguard ring cipher v1", hashlib.sha256).digest()

    def seal(self, user_key: str, plain: bytes) -> bytes:
        if not plain:
            return b""
        nonce = os.urandom(self.NONCE_BYTES)
        return nonce + _xor(plain, self._stream(user_key, nonce, len(plain)))

    def open(self, user_key: str, sealed: bytes) -> bytes:
        if not sealed:
            return b""
        nonce, body = sealed[:self.NONCE_BYTES], sealed[self.NONCE_BYTES:]
        return _xor(body, self._stream(user_key, nonce, len(body)))

    def _stream(self, user_key: str, nonce: bytes, n: int) -> bytes:
        return hashlib.shake_256(self._key + user_key.encode() + nonce).digest(n)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def pack_user(st: UserState, ring_size: int, rebuild_steps: int, cipher: RingCipher | None = None) -> bytes:
    """The user's record. With `cipher` (always, in the gateway) the ring section is sealed; the
    same cipher must open it (unpack_user)."""
    mv = st.model_version.encode()
    h = np.asarray(st.h, STATE_DTYPE).tobytes()
    c = np.asarray(st.c, STATE_DTYPE).tobytes()
    ctx = st.ctx.to_bytes()
    pend = _pack_pending(st.pending)
    ring = pack_ring(st.ring[-ring_size:], rebuild_steps)
    if cipher is not None:
        ring = cipher.seal(st.key, ring)
    return b"".join((_BLOB_HEAD.pack(st.n, USER_FORMAT), bytes([len(mv)]), mv,
                     struct.pack("<H", len(st.h)), h, c, struct.pack("<d", st.session),
                     struct.pack("<H", len(ctx)), ctx,
                     struct.pack("<I", len(pend)), pend, ring))


def unpack_user(key: str, raw: bytes, cipher: RingCipher | None = None) -> UserState:
    n, fmt = _BLOB_HEAD.unpack_from(raw, 0)
    if fmt != USER_FORMAT:
        raise ValueError(f"user state format {fmt} is not {USER_FORMAT}")
    i = _BLOB_HEAD.size
    m = raw[i]
    mv = raw[i + 1:i + 1 + m].decode()
    i += 1 + m
    (H,) = struct.unpack_from("<H", raw, i)
    i += 2
    h = np.frombuffer(raw, STATE_DTYPE, H, i).astype(np.float32)
    c = np.frombuffer(raw, STATE_DTYPE, H, i + 2 * H).astype(np.float32)
    i += 4 * H
    (session,) = struct.unpack_from("<d", raw, i)
    i += 8
    (lc,) = struct.unpack_from("<H", raw, i)
    ctx = UserContext.from_bytes(raw[i + 2:i + 2 + lc])
    i += 2 + lc
    (lp,) = struct.unpack_from("<I", raw, i)
    pend = _unpack_pending(raw[i + 4:i + 4 + lp])
    i += 4 + lp
    ring = unpack_ring(cipher.open(key, raw[i:]) if cipher is not None else raw[i:])
    return UserState(key, h, c, ctx, ring, pend, mv, n, n, True, session)


def version_head(n: int) -> bytes:
    """The first 8 bytes of a record of version n: what the write script compares (compare-and-set)."""
    return _BLOB_HEAD.pack(n, USER_FORMAT)[:8]

