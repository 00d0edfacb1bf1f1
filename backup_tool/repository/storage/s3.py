"""S3 repository (AWS S3 and compatible stores: MinIO, R2, test endpoints).

The only module that imports boto3 (the S3 library the project is built on). Endpoint, region
and credentials come from boto3's standard chain (``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``,
instance roles...).

Uploads stream: chunks are cut into multipart parts uploaded by a few threads, so memory
stays at (parts in flight + 1) x part size whatever the object size. Objects smaller than
one part are sent with a single PutObject. Both paths use ``If-None-Match: *`` so an
existing object is never replaced, and send a SHA-256 of every part/object, so the store
rejects bytes damaged on the way (S3 answers BadDigest) instead of keeping them. That
checksum header is signed, so it binds the body to the request signature: part and object
bodies go out as ``UNSIGNED-PAYLOAD`` (what botocore does over HTTPS anyway) instead of being
hashed a second time for SigV4 on plain-HTTP endpoints; every other request keeps botocore's
signing.

Faults: every request is retried with jittered exponential backoff (tenacity, the only
retry layer: botocore's own retries are off so the budget is exactly
``BACKUP_TOOL_S3_ATTEMPTS`` attempts per request) on throttling (SlowDown), 5xx answers,
connection resets, truncated bodies and timeouts. A part is re-sent whole from memory. A
write whose answer was lost but which did reach the store comes back on retry as
"already exists" (412) or, for a multipart completion, "no such upload": it counts as done
only if the stored object's size and SHA-256 (or, where the store reports no checksum,
its MD5-based ETag) prove it holds exactly our bytes; otherwise it is an error. A
download that breaks mid-body resumes with a ranged GET pinned to the same ETag
(``If-Match``) from the last byte received; bytes that fail the store's own checksum are
an :class:`~backup_tool.errors.IntegrityError`. A failed or interrupted upload is aborted
(itself retried), so the key never shows a partial object; a multipart upload whose
creation was retried has its lost twin aborted too.

Tunables (environment): ``BACKUP_TOOL_S3_CONNECT_TIMEOUT`` (seconds, default 10),
``BACKUP_TOOL_S3_READ_TIMEOUT`` (seconds without a byte from the store, default 60),
``BACKUP_TOOL_S3_ATTEMPTS`` (attempts per request, default 6).

Server-side encryption is passed through on every write (PutObject and
CreateMultipartUpload) when ``BACKUP_TOOL_S3_SSE`` asks for it: ``AES256`` (SSE-S3) or
``aws:kms`` (SSE-KMS, with ``BACKUP_TOOL_S3_SSE_KMS_KEY_ID`` naming the key; without it the
account's default ``aws/s3`` key). Reads need nothing: S3 decrypts for anyone allowed to use
the key. It complements client-side encryption (:mod:`.encrypted`): SSE-KMS also keeps the
plaintext metadata (manifests) from readers who may not use the KMS key.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import os
import threading
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_when_event_set,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeoutError

from backup_tool.errors import ConfigError, IntegrityError, StorageError
from backup_tool.repository.storage.base import (
    AtRest,
    HashingCounter,
    ObjectExistsError,
    ObjectInfo,
    ObjectLock,
    ObjectLockedError,
    ObjectMissingError,
    PartialUpload,
    PermissionDeniedError,
    PutResult,
    Storage,
    check_key,
)

T = TypeVar("T")

MIN_PART = 8 << 20
FIRST_PART = 5 << 20
PARTS_IN_FLIGHT = 3
READ_CHUNK = 1 << 20
ATTEMPTS = 6
BACKOFF = wait_random_exponential(multiplier=0.25, max=8)

TRANSIENT_CODES = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
    "RequestTimeTooSkewed", "500", "502", "503", "504", "ThrottlingException",
}
LOST_WRITE_CODES = {"PreconditionFailed", "NoSuchUpload"}
DENIED_CODES = {"AccessDenied", "403"}

IAM_ACTIONS = {
    "put_object": "s3:PutObject", "create_multipart_upload": "s3:PutObject", "upload_part": "s3:PutObject",
    "complete_multipart_upload": "s3:PutObject", "get_object": "s3:GetObject", "head_object": "s3:GetObject",
    "list_objects_v2": "s3:ListBucket", "delete_object": "s3:DeleteObject",
    "abort_multipart_upload": "s3:AbortMultipartUpload", "list_multipart_uploads": "s3:ListBucketMultipartUploads",
    "list_parts": "s3:ListMultipartUploadParts", "list_object_versions": "s3:ListBucketVersions",
    "get_bucket_versioning": "s3:GetBucketVersioning",
    "get_object_lock_configuration": "s3:GetBucketObjectLockConfiguration",
    "get_object_retention": "s3:GetObjectRetention", "get_object_legal_hold": "s3:GetObjectLegalHold",
}
ON_VERSION = {"s3:DeleteObject": "s3:DeleteObjectVersion", "s3:GetObject": "s3:GetObjectVersion"}


def iam_action(operation: str, kwargs: Mapping[str, Any]) -> str:
    """The IAM action a client call needs ("" if unknown): what to name when it is denied."""
    action = IAM_ACTIONS.get(operation, "")
    return ON_VERSION.get(action, action) if kwargs.get("VersionId") else action


def lock_explaining(lock_enabled: bool, retention: ObjectLock | None, legal_hold: bool,
                    now: datetime) -> ObjectLock | None:
    """The Object Lock that explains a refused delete of one object version, or None when
    nothing in the store's lock state does (then the refusal is a missing permission)."""
    if not lock_enabled:
        return None
    if legal_hold:
        until = retention.retain_until if retention else datetime.max.replace(tzinfo=timezone.utc)
        return ObjectLock(retention.mode if retention else "legal hold", until, legal_hold=True)
    if retention is not None and retention.retain_until > now:
        return retention
    return None


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in TRANSIENT_CODES or status >= 500
    return isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ProtocolError,
                            Urllib3ReadTimeoutError, ConnectionError, TimeoutError))


def _error_code(exc: BaseException | None) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


@dataclass(frozen=True)
class S3Tuning:
    """Timeouts and the retry budget, from the environment (see the module docstring)."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    attempts: int = ATTEMPTS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Tuning:
        env = os.environ if environ is None else environ
        return cls(
            connect_timeout=_positive(env, "BACKUP_TOOL_S3_CONNECT_TIMEOUT", cls.connect_timeout, float),
            read_timeout=_positive(env, "BACKUP_TOOL_S3_READ_TIMEOUT", cls.read_timeout, float),
            attempts=int(_positive(env, "BACKUP_TOOL_S3_ATTEMPTS", cls.attempts, int)),
        )


def _positive(env: Mapping[str, str], name: str, default: float, kind: type) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} is not a positive {'integer' if kind is int else 'number'}",
                          f"unset it or give e.g. {name}={kind(default)}")
    return value


SSE_ENV = "BACKUP_TOOL_S3_SSE"
SSE_KMS_KEY_ENV = "BACKUP_TOOL_S3_SSE_KMS_KEY_ID"
SSE_MODES = ("AES256", "aws:kms", "aws:kms:dsse")


def sse_args(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server-side encryption parameters of PutObject/CreateMultipartUpload, from the environment."""
    env = os.environ if environ is None else environ
    mode, kms_key = env.get(SSE_ENV, "").strip(), env.get(SSE_KMS_KEY_ENV, "").strip()
    if not mode:
        if kms_key:
            raise ConfigError(f"{SSE_KMS_KEY_ENV} is set but {SSE_ENV} is not", f"set {SSE_ENV}=aws:kms")
        return {}
    if mode not in SSE_MODES:
        raise ConfigError(f"{SSE_ENV}={mode!r} is not a server-side encryption mode",
                          f"use one of: {', '.join(SSE_MODES)}")
    if kms_key and not mode.startswith("aws:kms"):
        raise ConfigError(f"{SSE_KMS_KEY_ENV} needs {SSE_ENV}=aws:kms, not {mode}", f"set {SSE_ENV}=aws:kms")
    args = {"ServerSideEncryption": mode}
    if kms_key:
        args["SSEKMSKeyId"] = kms_key
    return args


@dataclass(frozen=True)
class _Expected:
    """What the bucket holds under a key if our conditional write went through."""

    size: int
    sha256_b64: str
    etag: str | Callable[[], str]


@dataclass(frozen=True)
class _Part:
    number: int
    etag: str
    sha256: bytes
    size: int


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def part_size_for(part_number: int) -> int:
    """Part size grows with the object so 10,000 parts reach ~5 TB while small ones stay cheap.
    The first part is S3's smallest (:data:`FIRST_PART`): the upload of a stream starts, and
    its first part travels while the rest is produced, as early as S3 allows."""
    if part_number == 1:
        return FIRST_PART
    if part_number <= 2000:
        return MIN_PART
    if part_number <= 8000:
        return MIN_PART * 4
    return MIN_PART * 32


def parse_s3_url(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"repository URL {url!r} names no bucket", "use s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


class S3Storage(Storage):
    def __init__(self, url: str, tuning: S3Tuning | None = None) -> None:
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        self.tuning = tuning or S3Tuning.from_env()
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=self.tuning.connect_timeout,
            read_timeout=self.tuning.read_timeout,
            max_pool_connections=32,
        )
        self._session = boto3.session.Session()
        self._client = self._session.client("s3", config=config)
        self._config = config
        self._bodies_client: Any = None
        self._bodies_lock = threading.Lock()
        self.sse = sse_args()

    @property
    def _bodies(self) -> Any:
        """The client that sends part and object bodies as ``UNSIGNED-PAYLOAD`` (see the module
        docstring), made on the first write: a command that only reads never builds it."""
        with self._bodies_lock:
            if self._bodies_client is None:
                self._bodies_client = self._session.client(
                    "s3", config=self._config.merge(Config(s3={"payload_signing_enabled": False})))
            return self._bodies_client

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _retrying(self, stop_event: threading.Event | None = None) -> Retrying:
        """The one retry policy: transient failures, ``tuning.attempts`` attempts in all,
        jittered exponential backoff; the last failure is re-raised as it was."""
        stop: stop_base = stop_after_attempt(self.tuning.attempts)
        if stop_event is not None:
            stop = stop | stop_when_event_set(stop_event)
        return Retrying(retry=retry_if_exception(_transient), stop=stop, wait=BACKOFF, reraise=True)

    def _call(self, what: str, fn: Callable[..., T], stop_event: threading.Event | None = None,
              **kwargs: Any) -> T:
        """Run one S3 request with retries, turning failures into one-line StorageErrors."""
        try:
            return self._retrying(stop_event)(fn, **kwargs)
        except NoCredentialsError:
            raise StorageError("no AWS credentials found for " + self.url,
                               "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        except ClientError as exc:
            raise self._client_error(exc, what, iam_action(getattr(fn, "__name__", ""), kwargs)) from exc
        except BotoCoreError as exc:
            raise self._transport_error(exc, what) from exc

    def _transport_error(self, exc: BotoCoreError, what: str) -> StorageError:
        return StorageError(f"S3 request failed while {what} in {self.url} "
                            f"(gave up after {self.tuning.attempts} attempts): {exc}",
                            "check AWS_ENDPOINT_URL_S3 and the network, then run the command again")

    def _client_error(self, exc: ClientError, what: str, action: str = "") -> StorageError:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StorageError(f"bucket {self.bucket!r} does not exist",
                                "create it or correct --repo / BACKUP_TOOL_REPO")
        if code in DENIED_CODES and action:
            return PermissionDeniedError(
                f"access denied to {self.url} while {what}: the credentials lack {action}",
                f"grant {action} on arn:aws:s3:::{self.bucket}/{self.prefix}* to this identity "
                "(IAM or bucket policy), then run the command again", action=action)
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"access denied to {self.url} while {what}",
                                "check the credentials and the bucket policy")
        if code in ("NoSuchKey", "404"):
            return ObjectMissingError(f"object {what} is missing from {self.url}")
        if code == "PreconditionFailed":
            return ObjectExistsError(f"object already exists ({what}) in {self.url}")
        if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
            return StorageError(f"the store rejected damaged bytes while {what} in {self.url} ({code})",
                                "check the network path to the store (proxies, NICs), then run the command again")
        if _transient(exc):
            return StorageError(f"S3 kept answering {code or 'an error'} while {what} in {self.url} "
                                f"(gave up after {self.tuning.attempts} attempts)",
                                "the store is overloaded or failing; run the command again later")
        return StorageError(f"S3 error {code or '?'} while {what} in {self.url}")

    def _lock_args(self) -> dict[str, Any]:
        """Per-object write parameters: Object Lock retention and server-side encryption."""
        if self.object_lock is None:
            return dict(self.sse)
        return {"ObjectLockMode": self.object_lock.mode.upper(),
                "ObjectLockRetainUntilDate": self.object_lock.retain_until, **self.sse}

    # -- writing ---------------------------------------------------------------------------

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        """Chunks are held (:class:`_Held`) and joined once per request body: each byte is
        copied at most once on its way out. An object of at most :data:`MIN_PART` bytes (a WAL
        segment, a manifest, most tables' objects), handed over whole or streamed, is one PUT
        sent once it has all arrived: one request instead of a multipart upload's four (start,
        two parts, complete), the start's round trip no longer paid while the producer waits.
        A stream that grows beyond :data:`MIN_PART` goes multipart then, its first part
        (:data:`FIRST_PART`) sent while the rest is made; at most :data:`MIN_PART` bytes are
        held before an upload starts."""
        full = self._key(key)
        counter = HashingCounter()
        held = _Held()
        upload: _MultipartUpload | None = None
        try:
            for chunk in chunks:
                counter.update(chunk)
                held.add(chunk)
                while (held.size >= part_size_for(upload.parts + 1 if upload else 1)
                       and (upload is not None or held.size > MIN_PART)):
                    size = part_size_for(upload.parts + 1 if upload else 1)
                    if upload is None:
                        upload = _MultipartUpload.start(self, key, full)
                    upload.submit(held.take(size))
            if upload is None:
                self._put_single(key, full, held.take(held.size), bytes.fromhex(counter.hexdigest()))
            else:
                if held.size:
                    upload.submit(held.take(held.size))
                upload.complete()
                upload = None
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return PutResult(key, counter.size, counter.hexdigest())

    def _put_single(self, key: str, full: str, body: bytes, sha: bytes) -> None:
        """``sha``: the body's sha256 (the caller hashed it already). Its MD5 is computed only
        if a lost answer makes the ETag the proof of what the store holds."""
        expected = _Expected(len(body), _b64(sha), lambda: hashlib.md5(body, usedforsecurity=False).hexdigest())
        self._conditional_write(f"writing {key}", full, expected, self._bodies.put_object,
                                Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*",
                                ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(sha), **self._lock_args())

    def _conditional_write(self, what: str, full: str, expected: _Expected, fn: Callable[..., Any],
                           **kwargs: Any) -> None:
        """A write guarded by ``If-None-Match: *``. When an attempt's answer was lost and the
        retry finds the key taken (or the upload already completed), the write succeeded only
        if what is stored is provably our bytes."""
        attempts = 0

        def attempt(**kw: Any) -> Any:
            nonlocal attempts
            attempts += 1
            return fn(**kw)

        attempt.__name__ = getattr(fn, "__name__", "attempt")
        try:
            self._call(what, attempt, **kwargs)
        except StorageError as exc:
            if attempts > 1 and _error_code(exc.__cause__) in LOST_WRITE_CODES and self._holds(full, expected):
                return
            raise

    def _holds(self, full: str, expected: _Expected) -> bool:
        """True if the object under ``full`` has exactly the size and checksum we wrote."""
        try:
            head = self._call(f"checking {full}", self._client.head_object, Bucket=self.bucket, Key=full,
                              ChecksumMode="ENABLED")
        except ObjectMissingError:
            return False
        if head.get("ContentLength") != expected.size:
            return False
        stored = head.get("ChecksumSHA256")
        if stored:
            return str(stored).split("-")[0] == expected.sha256_b64.split("-")[0]
        if head.get("ServerSideEncryption") in ("aws:kms", "aws:kms:dsse") or head.get("SSECustomerAlgorithm"):
            return False
        etag = expected.etag() if callable(expected.etag) else expected.etag
        return str(head.get("ETag", "")).strip('"') == etag

    def _upload_part(self, full: str, upload_id: str, number: int, body: bytes,
                     stop: threading.Event) -> _Part:
        sha = hashlib.sha256(body).digest()
        resp = self._call(f"uploading part {number} of {full[len(self.prefix):]}", self._bodies.upload_part, stop_event=stop,
                          Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body,
                          ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(sha))
        return _Part(number, str(resp["ETag"]), sha, len(body))

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: str) -> Iterator[bytes]:
        """The object's bytes; a read interrupted mid-stream resumes where it stopped (a Range
        request pinned to the first answer's ETag), under the same retry policy as requests."""
        full = self._key(key)
        offset = 0
        reads = 0
        etag: str | None = None
        try:
            for attempt in self._retrying():
                with attempt:
                    reads += 1
                    kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
                    if offset:
                        kwargs["Range"] = f"bytes={offset}-"
                    if etag:
                        kwargs["IfMatch"] = etag
                    try:
                        resp = self._call(key, self._client.get_object, **kwargs)
                    except ObjectExistsError:
                        raise StorageError(f"object {key} in {self.url} changed while it was being read",
                                           "objects are never rewritten by backup-tool: check who writes to "
                                           "the bucket") from None
                    etag = etag or resp.get("ETag")
                    body = resp["Body"]
                    try:
                        for chunk in body.iter_chunks(READ_CHUNK):
                            offset += len(chunk)
                            yield chunk
                    except FlexibleChecksumError as exc:
                        raise IntegrityError(f"object {key} in {self.url} failed the store's checksum on download "
                                             f"(damaged in storage or on the way): {exc}",
                                             "run the command again; if it repeats, run 'backup-tool verify all'"
                                             ) from None
                    finally:
                        body.close()
        except Exception as exc:
            if not _transient(exc):
                raise
            raise StorageError(f"download of {key} from {self.url} kept failing "
                               f"({reads} interrupted reads): {exc}",
                               "check the network and run the command again") from exc

    def get_range(self, key: str, start: int, end: int, stored_size: int) -> bytes:
        """One ranged GET (retried as a whole under the request retry policy)."""
        if end <= start:
            return b""
        full = self._key(key)

        def fetch() -> bytes:
            resp = self._call(key, self._client.get_object, Bucket=self.bucket, Key=full,
                              Range=f"bytes={start}-{end - 1}")
            body = resp["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        try:
            data = self._retrying()(fetch)
        except Exception as exc:
            if not _transient(exc):
                raise
            raise StorageError(f"ranged download of {key} from {self.url} kept failing: {exc}",
                               "check the network and run the command again") from exc
        if len(data) != end - start:
            raise IntegrityError(f"object {key} in {self.url} is shorter than the bytes {start}-{end - 1} "
                                 "its backup recorded", "run 'backup-tool verify all'")
        return data

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("listing", self._client.list_objects_v2, **kwargs)
            for obj in resp.get("Contents", []):
                modified: datetime = obj["LastModified"]
                yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"], modified)
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    def delete(self, key: str) -> None:
        self._call(f"deleting {key}", self._client.delete_object, Bucket=self.bucket,
                   Key=self._key(key))

    def lock_of(self, key: str) -> ObjectLock | None:
        head = self._call(key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        return _head_lock(head)

    def object_lock_enabled(self) -> bool | None:
        try:
            conf = self._call("reading the bucket's Object Lock configuration",
                              self._client.get_object_lock_configuration, Bucket=self.bucket)
        except StorageError as exc:
            if _error_code(exc.__cause__) == "ObjectLockConfigurationNotFoundError":
                return False
            raise
        return conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

    def _retention(self, key: str, full: str, version: str) -> ObjectLock | None:
        """The version's retention (GetObjectRetention; from its HEAD on stores that lack that call)."""
        try:
            resp = self._client.get_object_retention(Bucket=self.bucket, Key=full, VersionId=version)
        except (ClientError, BotoCoreError) as exc:
            code = _error_code(exc)
            if code in DENIED_CODES and isinstance(exc, ClientError):
                raise self._client_error(exc, f"reading the retention of {key}", "s3:GetObjectRetention") from exc
            if code == "NoSuchObjectLockConfiguration":
                return None
            head = self._call(f"reading the retention of {key}", self._client.head_object, Bucket=self.bucket,
                              Key=full, VersionId=version)
            mode, until = head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")
        else:
            retention = resp.get("Retention") or {}
            mode, until = retention.get("Mode"), retention.get("RetainUntilDate")
        return ObjectLock(str(mode).lower(), until.astimezone(timezone.utc)) if mode and until else None

    def _legal_hold(self, key: str, full: str, version: str) -> bool:
        try:
            resp = self._call(f"reading the legal hold of {key}", self._client.get_object_legal_hold,
                              Bucket=self.bucket, Key=full, VersionId=version)
        except StorageError as exc:
            if _error_code(exc.__cause__) == "NoSuchObjectLockConfiguration":
                return False
            raise
        return (resp.get("LegalHold") or {}).get("Status") == "ON"

    def _denied_delete(self, key: str, full: str, version: str) -> StorageError:
        """Why deleting one version of ``key`` was refused, from the store's own lock state
        (the bucket's lock configuration, the version's retention and legal hold): S3 answers
        AccessDenied both for a lock and for a missing permission."""
        needed = "s3:DeleteObjectVersion"
        try:
            enabled = bool(self.object_lock_enabled())
            retention = self._retention(key, full, version) if enabled else None
            hold = self._legal_hold(key, full, version) if enabled else False
        except PermissionDeniedError as exc:
            return PermissionDeniedError(
                f"deleting {key} from {self.url} was refused and {exc.action or 'reading its lock state'} is "
                f"denied too: cannot tell an Object Lock from a missing {needed} permission",
                f"grant {exc.action or 's3:GetObjectRetention'} (and {needed}) on "
                f"arn:aws:s3:::{self.bucket}/{self.prefix}*, then run the command again", action=exc.action)
        lock = lock_explaining(enabled, retention, hold, datetime.now(timezone.utc))
        if lock is not None:
            what = "a legal hold" if lock.legal_hold else f"Object Lock ({lock.mode}) until {lock.retain_until:%Y-%m-%dT%H:%M:%SZ}"
            return ObjectLockedError(f"{key} is protected by {what} in {self.url}",
                                     "a legal hold must be removed first" if lock.legal_hold else
                                     "it can be deleted once its retain-until date has passed")
        why = "the bucket has no Object Lock" if not enabled else "the object has neither a retention nor a legal hold"
        return PermissionDeniedError(
            f"deleting {key} from {self.url} was denied: the credentials lack {needed} ({why})",
            f"grant {needed} on arn:aws:s3:::{self.bucket}/{self.prefix}* to this identity, "
            "then run the command again", action=needed)

    def _versioned(self) -> bool:
        cached = getattr(self, "_versioning", None)
        if cached is None:
            resp = self._call("reading bucket versioning", self._client.get_bucket_versioning,
                              Bucket=self.bucket)
            cached = resp.get("Status") in ("Enabled", "Suspended")
            self._versioning = cached
        return cached

    def purge(self, key: str) -> None:
        """Delete every version of the key (a plain delete in a versioned bucket only hides it)."""
        full = self._key(key)
        if not self._versioned():
            self.delete(key)
            return
        versions: list[str] = []
        marker: dict[str, Any] = {}
        while True:
            resp = self._call(f"listing versions of {key}", self._client.list_object_versions,
                              Bucket=self.bucket, Prefix=full, **marker)
            for item in resp.get("Versions", []) + resp.get("DeleteMarkers", []):
                if item["Key"] == full:
                    versions.append(item["VersionId"])
            if not resp.get("IsTruncated"):
                break
            marker = {"KeyMarker": resp["NextKeyMarker"], "VersionIdMarker": resp["NextVersionIdMarker"]}
        for version in versions:
            try:
                self._retrying()(self._client.delete_object, Bucket=self.bucket, Key=full, VersionId=version)
            except ClientError as exc:
                if _error_code(exc) in DENIED_CODES:
                    raise self._denied_delete(key, full, version) from exc
                raise self._client_error(exc, f"deleting {key}", "s3:DeleteObjectVersion") from exc
            except BotoCoreError as exc:
                raise self._transport_error(exc, f"deleting {key}") from exc

    def list_partials(self, prefix: str = "") -> Iterator[PartialUpload]:
        """Multipart uploads never completed or aborted; ``modified`` is the last part's time."""
        marker: dict[str, Any] = {}
        while True:
            resp = self._call("listing multipart uploads", self._client.list_multipart_uploads,
                              Bucket=self.bucket, Prefix=self.prefix + prefix, **marker)
            for up in resp.get("Uploads", []):
                last: datetime = up["Initiated"]
                size = 0
                parts = self._call("listing parts", self._client.list_parts, Bucket=self.bucket,
                                   Key=up["Key"], UploadId=up["UploadId"])
                for part in parts.get("Parts", []):
                    size += part.get("Size", 0)
                    if part.get("LastModified") and part["LastModified"] > last:
                        last = part["LastModified"]
                yield PartialUpload(up["Key"][len(self.prefix):], size, last.astimezone(timezone.utc),
                                    up["UploadId"])
            if not resp.get("IsTruncated"):
                return
            marker = {"KeyMarker": resp["NextKeyMarker"], "UploadIdMarker": resp["NextUploadIdMarker"]}

    def delete_partial(self, partial: PartialUpload) -> None:
        try:
            self._call(f"aborting the upload of {partial.key}", self._client.abort_multipart_upload,
                       Bucket=self.bucket, Key=self._key(partial.key), UploadId=partial.upload_id)
        except ObjectMissingError:
            pass

    def at_rest(self, key: str) -> AtRest:
        head = self._call(key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        sse, kms = head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")
        return AtRest(str(sse) if sse else None, str(kms) if kms else None, _head_lock(head))

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        except ObjectMissingError:
            return False
        return True


def _head_lock(head: Mapping[str, Any]) -> ObjectLock | None:
    """The retention and legal hold a HeadObject answer shows (None: neither)."""
    until, mode = head.get("ObjectLockRetainUntilDate"), head.get("ObjectLockMode")
    hold = head.get("ObjectLockLegalHoldStatus") == "ON"
    if hold:
        return ObjectLock(str(mode).lower() if mode else "legal hold",
                          until.astimezone(timezone.utc) if until else datetime.max.replace(tzinfo=timezone.utc),
                          legal_hold=True)
    if not until or not mode:
        return None
    return ObjectLock(str(mode).lower(), until.astimezone(timezone.utc))


class _Held:
    """The chunks of an object not yet sent: each part is joined from them once (a single
    copy, none when one immutable chunk is exactly the part). ``bytes`` chunks are held as
    given; other buffers are copied on arrival, since their producer may reuse them."""

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self.size = 0

    def add(self, chunk: bytes | bytearray | memoryview) -> None:
        self._chunks.append(chunk if type(chunk) is bytes else bytes(chunk))
        self.size += len(chunk)

    def take(self, n: int) -> bytes:
        """The next ``n`` held bytes (``n`` at most :attr:`size`)."""
        out: list[bytes | memoryview] = []
        got = 0
        while got < n:
            head = self._chunks[0]
            if len(head) <= n - got:
                out.append(self._chunks.popleft())
                got += len(head)
            else:
                view = memoryview(head)
                out.append(view[:n - got])
                self._chunks[0] = view[n - got:]
                got = n
        self.size -= n
        first = out[0] if out else b""
        return first if len(out) <= 1 and type(first) is bytes else b"".join(out)


class _MultipartUpload:
    """One multipart upload in flight: parts go out on a few threads, at most
    ``PARTS_IN_FLIGHT`` at a time; :meth:`complete` or :meth:`abort` ends it."""

    def __init__(self, storage: S3Storage, key: str, full: str, upload_id: str) -> None:
        self.storage = storage
        self.key = key
        self.full = full
        self.upload_id = upload_id
        self.stop = threading.Event()
        self._pool = cf.ThreadPoolExecutor(PARTS_IN_FLIGHT, "s3-part")
        self._futures: list[cf.Future[_Part]] = []

    @classmethod
    def start(cls, storage: S3Storage, key: str, full: str) -> _MultipartUpload:
        attempts = 0
        client = storage._client

        def create(**kw: Any) -> Any:
            nonlocal attempts
            attempts += 1
            return client.create_multipart_upload(**kw)

        upload_id = str(storage._call(f"starting upload of {key}", create, Bucket=storage.bucket, Key=full,
                                      ChecksumAlgorithm="SHA256", **storage._lock_args())["UploadId"])
        upload = cls(storage, key, full, upload_id)
        if attempts > 1:
            upload._abort_lost_twins()
        return upload

    @property
    def parts(self) -> int:
        return len(self._futures)

    def submit(self, body: bytes) -> None:
        number = len(self._futures) + 1
        self._futures.append(self._pool.submit(self.storage._upload_part, self.full, self.upload_id,
                                               number, body, self.stop))
        pending = [f for f in self._futures if not f.done()]
        if len(pending) >= PARTS_IN_FLIGHT:
            cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]  # not None: checked just above

    def complete(self) -> None:
        parts = [f.result() for f in self._futures]
        self._pool.shutdown(wait=True)
        n = len(parts)
        expected = _Expected(
            size=sum(p.size for p in parts),
            sha256_b64=f"{_b64(hashlib.sha256(b''.join(p.sha256 for p in parts)).digest())}-{n}",
            etag=hashlib.md5(b"".join(bytes.fromhex(p.etag.strip('"')) for p in parts),
                             usedforsecurity=False).hexdigest() + f"-{n}"
            if all(len(p.etag.strip('"')) == 32 for p in parts) else "",
        )
        self.storage._conditional_write(
            f"completing {self.key}", self.full, expected, self.storage._client.complete_multipart_upload,
            Bucket=self.storage.bucket, Key=self.full, UploadId=self.upload_id, IfNoneMatch="*",
            MultipartUpload={"Parts": [{"ETag": p.etag, "PartNumber": p.number, "ChecksumSHA256": _b64(p.sha256)}
                                       for p in parts]})

    def abort(self) -> None:
        """Stop the part threads and abort the upload so no partial object is left behind."""
        self.stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._abort(self.upload_id)

    def _abort(self, upload_id: str) -> None:
        try:
            self.storage._call(f"aborting the upload of {self.key}", self.storage._client.abort_multipart_upload,
                               Bucket=self.storage.bucket, Key=self.full, UploadId=upload_id)
        except StorageError:
            pass

    def _abort_lost_twins(self) -> None:
        """A retried CreateMultipartUpload may have created an upload whose answer was lost:
        abort every other upload of this exact key (keys are unique to one writer: backup
        ids are random, WAL keys name their content)."""
        try:
            resp = self.storage._call(f"listing uploads of {self.key}", self.storage._client.list_multipart_uploads,
                                      Bucket=self.storage.bucket, Prefix=self.full)
        except StorageError:
            return
        for up in resp.get("Uploads", []):
            if up["Key"] == self.full and up["UploadId"] != self.upload_id:
                self._abort(str(up["UploadId"]))
