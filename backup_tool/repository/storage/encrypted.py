"""Client-side authenticated encryption of repository objects (AES-256-GCM, streamed).

With a key configured (``BACKUP_TOOL_ENCRYPTION_KEY``: base64 of 32 random bytes, or
``BACKUP_TOOL_ENCRYPTION_KEY_FILE``: a file holding that text), every
object the tool writes is encrypted before it leaves the process, except the metadata
records that key-less readers (``list``, ``status``, ``audit``, retention, ``wal status``)
need (:data:`PLAINTEXT_PREFIXES`: manifests, in-progress markers, verification records,
retention and schedule logs, timeline and backup history files, the repository's key-id records,
the catalog index).
Those hold names, counts, checksums, LSNs and
times, never row data; manifests are instead authenticated with an HMAC under the key
(:meth:`EncryptionKey.seal`), history files by the content sha256 in their names.

Object format (version 1)::

    header   "BTENC" | 0x01 | frame size (u32 BE) | key id (8 bytes) | salt (16) | nonce prefix (7)
    frame i  AES-256-GCM(subkey, nonce = prefix | i (u32 BE) | final (u8), plaintext[i], aad)
    subkey   HKDF-SHA256(key, salt, "backup-tool object v1")
    aad      header | the object's key in the repository

Guarantees (each tested in ``tests/test_encryption.py``):

- Confidentiality and integrity of content: a changed, removed, inserted, reordered or
  swapped byte, frame or object fails authentication (:class:`IntegrityError`, exit 3)
  before any of the affected plaintext is returned. Truncation at a frame boundary fails
  because the last frame read was not sealed as final; appended data fails because the
  final frame is then read as non-final. Binding the object key means an object copied
  under another name does not decrypt.
- Never a reused nonce: every object gets its own key from a random 128-bit salt, so the
  counter-based nonces are unique per key.
- The sha256 and size recorded for an object are those of the stored (encrypted) bytes,
  so ``verify`` checks integrity without the key.
- A missing or different key is named, not guessed at: the header carries the key id
  (first 16 hex digits of sha256 of the key, which reveals nothing usable about it).
- Memory is bounded by two frames per stream, whatever the object size.
- Objects without the header (written before a key was configured) read as they are.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from backup_tool.errors import BackupToolError, ConfigError, IntegrityError
from backup_tool.repository.storage.base import ObjectInfo, ObjectLock, PutResult, Storage

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_ENV = "BACKUP_TOOL_ENCRYPTION_KEY"
KEY_FILE_ENV = "BACKUP_TOOL_ENCRYPTION_KEY_FILE"
PREVIOUS_KEYS_ENV = "BACKUP_TOOL_PREVIOUS_KEYS_FILE"
ALGORITHM = "AES-256-GCM"
MAGIC = b"BTENC"
VERSION = 1
FRAME_SIZE = 1 << 20
TAG_SIZE = 16
KEY_SIZE = 32
SALT_SIZE = 16
PREFIX_SIZE = 7
_HEADER = struct.Struct(f">{len(MAGIC)}sBI8s{SALT_SIZE}s{PREFIX_SIZE}s")
HEADER_SIZE = _HEADER.size
MAX_FRAMES = 1 << 32
PLAINTEXT_PREFIXES = ("manifests/", "running/", "verifications/", "retention-log/", "schedule-log/",
                      "wal/history/", "wal/archive.info", "encryption/", "catalog/")
ALLOW_UNAUTHENTICATED_ENV = "BACKUP_TOOL_ALLOW_UNAUTHENTICATED"
KEY_HINT = (f"set {KEY_ENV} (base64 of the 32-byte key) or {KEY_FILE_ENV} (a file holding it) "
            "to the key with that id")


@dataclass(frozen=True)
class EncryptionKey:
    """The repository key. ``key_id`` identifies it publicly; the bytes never leave the process."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_SIZE:
            raise ConfigError(f"the encryption key must be {KEY_SIZE} bytes, not {len(self.secret)}",
                              "generate one with: head -c 32 /dev/urandom | base64")

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()[:16]

    def derive(self, salt: bytes, info: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(self.secret)

    def seal(self, digest: str) -> str:
        """The manifest MAC: HMAC-SHA256 of a manifest's canonical sha256 under a derived key."""
        mac_key = self.derive(b"", b"backup-tool manifest mac v1")
        return hmac.new(mac_key, digest.encode(), hashlib.sha256).hexdigest()

    def check_seal(self, digest: str, mac: str) -> bool:
        return hmac.compare_digest(self.seal(digest), mac)

    def describe(self) -> dict[str, str]:
        """What a manifest records about the key: the algorithm and the key id, never the key."""
        return {"algorithm": ALGORITHM, "key_id": self.key_id}


def parse_key(text: bytes, where: str) -> EncryptionKey:
    """A key from its base64 text (surrounding whitespace and newlines ignored)."""
    try:
        raw = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_SIZE:
        raise ConfigError(f"{where} does not hold an encryption key (base64 of {KEY_SIZE} bytes)",
                          "generate one with: head -c 32 /dev/urandom | base64")
    return EncryptionKey(raw)


def key_from_environment(environ: Mapping[str, str] | None = None) -> EncryptionKey | None:
    """The key configured by ``BACKUP_TOOL_ENCRYPTION_KEY`` and/or ``..._KEY_FILE``, or None.

    Both may be set (a wrapper may name the file while the operator exported the key) only
    if they hold the same key: writing with one of two keys by accident is refused.
    """
    env = os.environ if environ is None else environ
    value, path = env.get(KEY_ENV, ""), env.get(KEY_FILE_ENV, "")
    from_value = parse_key(value.encode(), KEY_ENV) if value else None
    from_file = None
    if path:
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the encryption key file {path} ({exc.strerror})",
                              f"check {KEY_FILE_ENV} and the file's permissions") from None
        from_file = parse_key(data, f"key file {path}")
    if from_value and from_file and from_value != from_file:
        raise ConfigError(f"{KEY_ENV} (key id {from_value.key_id}) and {KEY_FILE_ENV} (key id "
                          f"{from_file.key_id}) hold different keys", "set only one of them")
    return from_value or from_file


def previous_keys_from_environment(environ: Mapping[str, str] | None = None) -> tuple[EncryptionKey, ...]:
    """Keys retired by a rotation (``BACKUP_TOOL_PREVIOUS_KEYS_FILE``: one base64 key per line,
    blank lines and ``#`` comments ignored). They decrypt and authenticate what was written
    with them; nothing new is written with them."""
    env = os.environ if environ is None else environ
    path = env.get(PREVIOUS_KEYS_ENV, "")
    if not path:
        return ()
    try:
        lines = Path(path).expanduser().read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the previous keys file {path} ({exc.strerror})",
                          f"check {PREVIOUS_KEYS_ENV} and the file's permissions") from None
    return tuple(parse_key(line, f"line {n} of the previous keys file {path}")
                 for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith(b"#"))


def secret_texts(environ: Mapping[str, str] | None = None) -> list[str]:
    """The configured keys as the texts that could be printed by mistake (for redaction)."""
    env = os.environ if environ is None else environ
    found = [env.get(KEY_ENV, "").strip()]
    keys: list[EncryptionKey] = []
    for read in (key_from_environment, previous_keys_from_environment):
        try:
            got = read(env)
        except BackupToolError:
            continue
        keys += [got] if isinstance(got, EncryptionKey) else list(got or ())
    for key in keys:
        found += [base64.b64encode(key.secret).decode(), key.secret.hex()]
    return [s for s in found if s]


# --------------------------------------------------------------------------- the stream format


@dataclass(frozen=True)
class Header:
    frame_size: int
    key_id: str
    salt: bytes
    prefix: bytes
    raw: bytes


def read_header(data: bytes, object_key: str) -> Header | None:
    """The header at the start of ``data``; None if the object is not encrypted."""
    if not data.startswith(MAGIC):
        return None
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"object {object_key} is truncated inside its encryption header",
                             "restore from another backup and run 'backup-tool verify all'")
    magic, version, frame_size, key_id, salt, prefix = _HEADER.unpack_from(data)
    if version != VERSION:
        raise BackupToolError(f"object {object_key} uses encryption format {version}; this backup-tool "
                              f"reads format {VERSION}", "upgrade backup-tool to read this repository")
    if not 0 < frame_size <= 64 << 20:
        raise IntegrityError(f"object {object_key} has a damaged encryption header (frame size {frame_size})",
                             "restore from another backup and run 'backup-tool verify all'")
    return Header(frame_size, key_id.hex(), salt, prefix, data[:HEADER_SIZE])


def _nonce(header: Header, index: int, final: bool) -> bytes:
    if index >= MAX_FRAMES:
        raise BackupToolError("object too large for one encrypted stream (2^32 frames)")
    return header.prefix + struct.pack(">IB", index, 1 if final else 0)


def _object_cipher(key: EncryptionKey, salt: bytes) -> AESGCM:
    """The AEAD of one object. cryptography is imported here, on first use, not with the
    module: every repository is opened through :class:`EncryptedStorage`, and a command
    reading an unencrypted one (a ``restore tables`` counts its fixed cost in tens of
    milliseconds) never needs it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key.derive(salt, b"backup-tool object v1"))


def _invalid_tag() -> type[Exception]:
    """cryptography's authentication failure, imported only when a decryption raised."""
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def _aad(header: Header, object_key: str) -> bytes:
    return header.raw + object_key.encode()


def encrypt_stream(key: EncryptionKey, object_key: str, chunks: Iterable[bytes],
                   frame_size: int = FRAME_SIZE) -> Iterator[bytes]:
    """Encrypt a chunk stream into the object format; holds at most two frames of plaintext."""
    salt, prefix = secrets.token_bytes(SALT_SIZE), secrets.token_bytes(PREFIX_SIZE)
    raw = _HEADER.pack(MAGIC, VERSION, frame_size, bytes.fromhex(key.key_id), salt, prefix)
    header = Header(frame_size, key.key_id, salt, prefix, raw)
    aead = _object_cipher(key, salt)
    aad = _aad(header, object_key)
    yield raw
    buf = bytearray()
    index = 0
    for chunk in chunks:
        buf += chunk
        while len(buf) > frame_size:
            yield aead.encrypt(_nonce(header, index, False), bytes(buf[:frame_size]), aad)
            del buf[:frame_size]
            index += 1
    yield aead.encrypt(_nonce(header, index, True), bytes(buf), aad)


def decrypt_stream(key: EncryptionKey | None, object_key: str, stored: Iterable[bytes],
                   previous: Iterable[EncryptionKey] = ()) -> Iterator[bytes]:
    """The plaintext of a stored object; unencrypted objects pass through unchanged.
    An object written with one of the ``previous`` keys is read with it.

    Each frame's plaintext is released only once its tag has verified, and the stream ends
    only after a frame sealed as final, so no truncated or altered content is ever returned.
    """
    it = iter(stored)
    buf = bytearray()
    for chunk in it:
        buf += chunk
        if len(buf) >= HEADER_SIZE or not MAGIC.startswith(bytes(buf[:len(MAGIC)])):
            break
    header = read_header(bytes(buf[:HEADER_SIZE]), object_key)
    if header is None:
        if buf:
            yield bytes(buf)
        yield from it
        return
    key = next((k for k in previous if k.key_id == header.key_id), key)
    if key is None:
        raise ConfigError(f"object {object_key} is encrypted with key id {header.key_id} and no encryption "
                          "key is configured", KEY_HINT)
    if key.key_id != header.key_id:
        raise ConfigError(f"object {object_key} is encrypted with key id {header.key_id}, but the configured "
                          f"key has id {key.key_id}", KEY_HINT)
    aead = _object_cipher(key, header.salt)
    aad = _aad(header, object_key)
    sealed = header.frame_size + TAG_SIZE
    rest = bytes(buf[HEADER_SIZE:])
    buf = bytearray()
    index = 0

    def open_frame(data: bytes, final: bool) -> bytes:
        try:
            return aead.decrypt(_nonce(header, index, final), data, aad)
        except _invalid_tag():
            raise IntegrityError(f"object {object_key} fails authentication at frame {index}: it was altered, "
                                 "truncated or damaged", "restore from another backup and run "
                                 "'backup-tool verify all'") from None

    for chunk in itertools.chain([rest], it):
        buf += chunk
        while len(buf) > sealed:
            yield open_frame(bytes(buf[:sealed]), False)
            del buf[:sealed]
            index += 1
    if len(buf) < TAG_SIZE:
        raise IntegrityError(f"object {object_key} is truncated (its final frame is missing)",
                             "restore from another backup and run 'backup-tool verify all'")
    yield open_frame(bytes(buf), True)


# --------------------------------------------------------------------------- the storage wrapper


def encrypts(object_key: str) -> bool:
    """Whether an object written under this key is encrypted (everything but key-less metadata)."""
    return not object_key.startswith(PLAINTEXT_PREFIXES)


class EncryptedStorage(Storage):
    """A backend whose objects are encrypted with ``key`` on the way in and decrypted on the way out.

    With ``key=None`` it writes plaintext and reads plaintext, and names the missing key when
    it meets an encrypted object. Only content passes through the cipher: listing, deletion,
    Object Lock and partial-upload handling are delegated unchanged to ``inner`` (every
    public method of :class:`Storage` not defined here is forwarded), so sizes and checksums
    seen by the rest of the tool are those of the stored bytes.
    """

    def __init__(self, inner: Storage, key: EncryptionKey | None,
                 previous: tuple[EncryptionKey, ...] = ()) -> None:
        self.inner = inner
        self.key = key
        self.previous = previous
        self.url = inner.url
        self._headers: dict[str, Header | None] = {}

    @property
    def object_lock(self) -> ObjectLock | None:  # type: ignore[override]  # the base declares a plain attribute; a wrapper must delegate
        return self.inner.object_lock

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        if self.key is None or not encrypts(key):
            return self.inner.put(key, chunks)
        return self.inner.put(key, encrypt_stream(self.key, key, chunks))

    def get_stored(self, key: str) -> Iterator[bytes]:
        return self.inner.get_stored(key)

    def decode(self, key: str, stored: Iterable[bytes]) -> Iterator[bytes]:
        return decrypt_stream(self.key, key, stored, self.previous)

    def get(self, key: str) -> Iterator[bytes]:
        return self.decode(key, self.inner.get_stored(key))

    def get_range(self, key: str, start: int, end: int, stored_size: int) -> bytes:
        """Plaintext bytes ``[start, end)``: only the frames that hold them are read, each
        authenticated (its index and finality are in its nonce, so frames cannot be moved)."""
        if key not in self._headers:
            self._headers[key] = read_header(self.inner.get_range(key, 0, min(HEADER_SIZE, stored_size),
                                                                 stored_size), key)
        header = self._headers[key]
        if header is None:
            return self.inner.get_range(key, start, end, stored_size)
        if end <= start:
            return b""
        k = next((k for k in self.previous if k.key_id == header.key_id), self.key)
        if k is None or k.key_id != header.key_id:
            raise ConfigError(f"object {key} is encrypted with key id {header.key_id} and the configured "
                              "key does not match", KEY_HINT)
        aead = _object_cipher(k, header.salt)
        aad = _aad(header, key)
        sealed = header.frame_size + TAG_SIZE
        frames = max(1, -(-(stored_size - HEADER_SIZE) // sealed))
        first, last = start // header.frame_size, (end - 1) // header.frame_size
        if last >= frames:
            raise IntegrityError(f"object {key} is shorter than the bytes {start}-{end - 1} its backup recorded",
                                 "run 'backup-tool verify all'")
        lo = HEADER_SIZE + first * sealed
        data = self.inner.get_range(key, lo, min(HEADER_SIZE + (last + 1) * sealed, stored_size), stored_size)
        plain = bytearray()
        for index in range(first, last + 1):
            piece = data[(index - first) * sealed:(index - first + 1) * sealed]
            try:
                plain += aead.decrypt(_nonce(header, index, index == frames - 1), piece, aad)
            except _invalid_tag():
                raise IntegrityError(f"object {key} fails authentication at frame {index}: it was altered, "
                                     "truncated or damaged", "restore from another backup and run "
                                     "'backup-tool verify all'") from None
        skip = start - first * header.frame_size
        return bytes(plain[skip:skip + end - start])

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


CONTENT_METHODS = frozenset({"put", "get", "get_range", "get_stored", "decode", "put_bytes", "get_bytes", "check_writable"})


def _forward(name: str) -> Callable[..., Any]:
    def method(self: EncryptedStorage, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"Forwarded to the wrapped backend: ``{name}`` touches no object content."
    return method


for _name, _member in vars(Storage).items():
    if callable(_member) and not _name.startswith("_") and _name not in CONTENT_METHODS \
            and _name not in vars(EncryptedStorage):
        setattr(EncryptedStorage, _name, _forward(_name))


def encryption_of(storage: Storage) -> EncryptionKey | None:
    """The key a storage encrypts with (None: plaintext repository access)."""
    return storage.key if isinstance(storage, EncryptedStorage) else None


def keyring_of(storage: Storage) -> dict[str, EncryptionKey]:
    """Every key a storage reads with (the current one and the previous ones), by key id."""
    if not isinstance(storage, EncryptedStorage):
        return {}
    keys = [*storage.previous, *([storage.key] if storage.key else [])]
    return {k.key_id: k for k in keys}


def unauthenticated_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the operator chose to trust manifests that carry no tag under the configured key
    (``BACKUP_TOOL_ALLOW_UNAUTHENTICATED=1``); a tag that fails is never trusted."""
    env = os.environ if environ is None else environ
    return env.get(ALLOW_UNAUTHENTICATED_ENV, "") == "1"


def manifest_encryption(options: Mapping[str, object]) -> dict[str, str] | None:
    """The encryption a manifest's options record (None: the backup is not encrypted)."""
    enc = options.get("encryption")
    return enc if isinstance(enc, dict) and enc.get("key_id") else None
