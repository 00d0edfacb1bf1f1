"""S3 repository (AWS S3 and compatible stores: MinIO, R2, test endpoints).

The only module that imports boto3. Endpoint, region and credentials come from boto3's
standard chain (``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``, instance roles...).

Uploads stream: chunks are cut into multipart parts uploaded by a few threads, so memory
stays at (parts in flight + 1) x part size whatever the object size. Objects smaller than
one part are sent with a single PutObject. Both paths use ``If-None-Match: *`` so an
existing object is never replaced. Every request is retried with backoff (tenacity) on
transient faults; a part is re-sent whole from memory, and a download that breaks mid-body
resumes with a ranged GET from the last byte received. A failed upload is aborted, so the
key never shows a partial object.

Server-side encryption is passed through on every write (PutObject and
CreateMultipartUpload) when ``BACKUP_TOOL_S3_SSE`` asks for it: ``AES256`` (SSE-S3) or
``aws:kms`` (SSE-KMS, with ``BACKUP_TOOL_S3_SSE_KMS_KEY_ID`` naming the key; without it the
account's default ``aws/s3`` key). Reads need nothing: S3 decrypts for anyone allowed to use
the key. It complements client-side encryption (:mod:`.encrypted`): SSE-KMS also keeps the
plaintext metadata (manifests) from readers who may not use the KMS key.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from urllib3.exceptions import ProtocolError

from backup_tool.errors import ConfigError, StorageError
from backup_tool.storage.base import (
    HashingCounter,
    ObjectExistsError,
    ObjectInfo,
    ObjectLock,
    ObjectLockedError,
    ObjectMissingError,
    PartialUpload,
    PutResult,
    Storage,
    check_key,
)

T = TypeVar("T")

MIN_PART = 8 << 20
PARTS_IN_FLIGHT = 3
READ_CHUNK = 1 << 20
ATTEMPTS = 6

TRANSIENT_CODES = {
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
    "RequestTimeTooSkewed", "500", "502", "503", "504", "ThrottlingException",
}


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in TRANSIENT_CODES or status >= 500
    return isinstance(exc, (BotoConnectionError, ReadTimeoutError, ResponseStreamingError,
                            ProtocolError, ConnectionError, TimeoutError))


_retry = retry(
    retry=retry_if_exception(_transient),
    stop=stop_after_attempt(ATTEMPTS),
    wait=wait_random_exponential(multiplier=0.2, max=8),
    reraise=True,
)


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


def part_size_for(part_number: int) -> int:
    """Part size grows with the object so 10,000 parts reach ~5 TB while small ones stay cheap."""
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
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_s3_url(url)
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
        )
        self._client = boto3.session.Session().client("s3", config=config)
        self._local = threading.local()
        self.sse = sse_args()

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """Run one S3 request with retries, turning failures into one-line StorageErrors."""
        try:
            return _retry(fn)(**kwargs)
        except NoCredentialsError:
            raise StorageError("no AWS credentials found for " + self.url,
                               "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE") from None
        except ClientError as exc:
            raise self._client_error(exc, what) from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 request failed while {what} in {self.url}: {exc}",
                               "check AWS_ENDPOINT_URL_S3 and the network") from exc

    def _client_error(self, exc: ClientError, what: str) -> StorageError:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StorageError(f"bucket {self.bucket!r} does not exist",
                                "create it or correct --repo / BACKUP_TOOL_REPO")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"access denied to {self.url} while {what}",
                                "check the credentials and the bucket policy")
        if code in ("NoSuchKey", "404"):
            return ObjectMissingError(f"object {what} is missing from {self.url}")
        if code == "PreconditionFailed":
            return ObjectExistsError(f"object already exists ({what}) in {self.url}")
        return StorageError(f"S3 error {code or '?'} while {what} in {self.url}")

    def _write_args(self) -> dict[str, Any]:
        """Per-object write parameters: Object Lock retention and server-side encryption."""
        if self.object_lock is None:
            return dict(self.sse)
        return {"ObjectLockMode": self.object_lock.mode.upper(),
                "ObjectLockRetainUntilDate": self.object_lock.retain_until, **self.sse}

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        full = self._key(key)
        counter = HashingCounter()
        buf = bytearray()
        it = iter(chunks)
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        futures: list[cf.Future[dict[str, Any]]] = []
        pool: cf.ThreadPoolExecutor | None = None
        try:
            for chunk in it:
                counter.update(chunk)
                buf += chunk
                while len(buf) >= part_size_for(len(futures) + 1):
                    size = part_size_for(len(futures) + 1)
                    if upload_id is None:
                        upload_id = self._call(f"starting upload of {key}",
                                               self._client.create_multipart_upload,
                                               Bucket=self.bucket, Key=full,
                                               **self._write_args())["UploadId"]
                        pool = cf.ThreadPoolExecutor(PARTS_IN_FLIGHT, "s3-part")
                    assert pool is not None
                    body = bytes(buf[:size])
                    del buf[:size]
                    futures.append(pool.submit(self._upload_part, full, upload_id,
                                               len(futures) + 1, body))
                    self._bound_in_flight(futures)
            if upload_id is None:
                self._call(f"writing {key}", self._client.put_object, Bucket=self.bucket,
                           Key=full, Body=bytes(buf), IfNoneMatch="*", **self._write_args())
            else:
                assert pool is not None
                if buf:
                    futures.append(pool.submit(self._upload_part, full, upload_id,
                                               len(futures) + 1, bytes(buf)))
                buf = bytearray()
                parts = [f.result() for f in futures]
                self._call(f"completing {key}", self._client.complete_multipart_upload,
                           Bucket=self.bucket, Key=full, UploadId=upload_id,
                           MultipartUpload={"Parts": parts}, IfNoneMatch="*")
                upload_id = None
        except BaseException:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if upload_id is not None:
                try:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                        UploadId=upload_id)
                except Exception:
                    pass
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return PutResult(key, counter.size, counter.hexdigest())

    @staticmethod
    def _bound_in_flight(futures: list[cf.Future[dict[str, Any]]]) -> None:
        pending = [f for f in futures if not f.done()]
        if len(pending) >= PARTS_IN_FLIGHT:
            cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def _upload_part(self, full: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        resp = self._call(f"uploading part {number} of {full}", self._client.upload_part,
                          Bucket=self.bucket, Key=full, UploadId=upload_id,
                          PartNumber=number, Body=body)
        return {"ETag": resp["ETag"], "PartNumber": number}

    def get(self, key: str) -> Iterator[bytes]:
        full = self._key(key)
        offset = 0
        attempts = 0
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
            if offset:
                kwargs["Range"] = f"bytes={offset}-"
            body = self._call(key, self._client.get_object, **kwargs)["Body"]
            try:
                for chunk in body.iter_chunks(READ_CHUNK):
                    offset += len(chunk)
                    yield chunk
                return
            except Exception as exc:
                attempts += 1
                if not _transient(exc) or attempts >= ATTEMPTS:
                    raise StorageError(f"download of {key} from {self.url} kept failing: {exc}",
                                       "check the network and retry") from exc
            finally:
                body.close()

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
        until = head.get("ObjectLockRetainUntilDate")
        mode = head.get("ObjectLockMode")
        if not until or not mode:
            return None
        return ObjectLock(str(mode).lower(), until.astimezone(timezone.utc))

    def object_lock_enabled(self) -> bool | None:
        try:
            conf = _retry(self._client.get_object_lock_configuration)(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ObjectLockConfigurationNotFoundError":
                return False
            raise self._client_error(exc, "reading the Object Lock configuration") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 request failed while reading the Object Lock configuration of "
                               f"{self.url}: {exc}") from exc
        return conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"

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
        marker: dict[str, str] = {}
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
                _retry(self._client.delete_object)(Bucket=self.bucket, Key=full, VersionId=version)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("AccessDenied", "403", "InvalidRequest"):
                    raise ObjectLockedError(f"{key} is protected by Object Lock in {self.url}",
                                            "it can be deleted once its retain-until date has passed") from exc
                raise self._client_error(exc, f"deleting {key}") from exc

    def list_partials(self, prefix: str = "") -> Iterator[PartialUpload]:
        """Multipart uploads never completed or aborted; ``modified`` is the last part's time."""
        marker: dict[str, str] = {}
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

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        except ObjectMissingError:
            return False
        return True
