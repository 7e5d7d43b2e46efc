"""The ``s3://BUCKET[/PREFIX]`` cache backend: a binary cache in an S3 bucket (Amazon S3, or a
store that speaks its API: MinIO, Ceph, Garage, ...), as Nix's S3 binary cache store.

    s3://BUCKET?region=eu-west-1
    s3://BUCKET/PREFIX?endpoint=minio.internal:9000&scheme=http&profile=ci

- Where: without ``endpoint``, Amazon S3 at ``https://BUCKET.s3.REGION.amazonaws.com/``
  (``region`` defaults to ``us-east-1``); with ``endpoint=HOST[:PORT]``, path-style requests to
  ``SCHEME://HOST:PORT/BUCKET/`` (``scheme`` https unless ``http``), as S3-compatible stores want.
- Who: the credentials of ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (with
  ``AWS_SESSION_TOKEN`` when set), else those of the profile (``profile=``, else
  ``AWS_PROFILE``, else ``default``) in the shared credentials file (``AWS_SHARED_CREDENTIALS_FILE``,
  else ``~/.aws/credentials``); with none at all, requests go unsigned (a public bucket).
- How: every request to the bucket is signed with AWS Signature Version 4
  (:func:`.s3_auth.sign_v4`); bodies are sent as ``UNSIGNED-PAYLOAD`` (a NAR is checked against its
  narinfo by whoever reads it, and the narinfo against its signatures).  Everything else (the
  pooled connections, retries, resumed downloads, redirects) is the HTTP backend's.
- Big files: a file over 5 GiB (S3's limit for one PUT), or over ``buffer-size`` bytes (default
  5 MiB) with ``multipart-upload=true`` (Nix's URL parameters), is uploaded in parts
  (:meth:`S3Backend.put_file`): :data:`PARALLEL_PARTS` at a time, each with its ``Content-MD5``
  (S3 refuses a part whose bytes changed on the way), each retried on its own; an upload that
  fails or is interrupted is aborted, so that no stored parts are left behind to pay for.
- Stored compressed: with Nix's ``narinfo-compression``, ``ls-compression`` and
  ``log-compression`` (``br``, ``gzip``, ``xz``, ``bzip2``, ``zstd``), those files are
  uploaded compressed with the method as their ``Content-Encoding``, which every reader (Nix,
  pure: :mod:`.content_encoding`) undoes.
- Errors: S3 answers 403 for a missing key when the credentials may not list the bucket, so a
  403 whose error code is ``AccessDenied`` counts as "not there"; any other S3 error (a wrong
  key or signature, an expired token, a bucket that does not exist) is reported with S3's code
  and message.

Reading the URL is :mod:`.s3_url`'s job, the credentials and request signing :mod:`.s3_auth`'s;
this module is the backend itself: requests and S3's answers, listing and deleting for
``pure cache prune``, and multipart uploads.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import logging
import os
import re
import urllib.parse
from xml.sax.saxutils import escape

import trio

from ..errors import CacheError
from ._nursery import open_nursery
from .backend import _unlink
from .content_encoding import encode
from .http_backend import REDIRECT_STATUS, TRANSIENT_STATUS, HttpBackend
from .http_response import _status_line, whole_limit
from .s3_auth import Credentials, load_credentials, sign_v4
from .s3_url import _kind, http_url, stored_encodings, upload_options
from .url import CacheURL

log = logging.getLogger("purestore.cache")

MAX_PARTS = 10_000  # S3's most parts of one upload
SINGLE_PUT_MAX = 5 << 30  # S3's biggest object of one PUT
PARALLEL_PARTS = 4  # parts of one file uploaded at a time
ABORT_TIMEOUT = 10  # seconds an abort of a failed multipart upload may take


def part_size(size: int, wanted: int) -> int:
    """The size of the parts a file of ``size`` bytes is uploaded in: ``wanted``, or more (in
    whole MiB) when the file would otherwise need more than :data:`MAX_PARTS` parts."""
    least = -(-size // MAX_PARTS)
    if wanted >= least:
        return wanted
    return -(-least // (1 << 20)) << 20


def _read_part(fd: int, offset: int, n: int) -> tuple[bytes, str]:
    """``n`` bytes of the file ``fd`` from ``offset``, and their base64 MD5 (``Content-MD5``)."""
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise OSError(0, f"file ended at {offset + len(data)} bytes, {n - len(data)} bytes early")
    return data, base64.b64encode(hashlib.md5(data).digest()).decode()


def _s3_error(data: bytes | None) -> tuple[str, str] | None:
    """(Code, Message) of an S3 XML error body (its root element is ``Error``; a
    DeleteObjects result that lists errors of single keys is not one), if it is one."""
    head = (data or b"")[:512].lstrip()
    if head.startswith(b"<?xml"):
        head = head[head.find(b"?>") + 2:].lstrip()
    if not head.startswith(b"<Error"):
        return None
    text = data[:8192].decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]*)</Code>", text)
    msg = re.search(r"<Message>([^<]*)</Message>", text)
    if not code:
        return None
    return code.group(1), (msg.group(1) if msg else "")


def _missing(r, data: bytes | None) -> bool:
    """The answer says the key is not there: NoSuchKey, or AccessDenied (what S3 answers for a
    missing key when the credentials may not list the bucket), or a bare 404."""
    err = _s3_error(data)
    if err is None:
        return r.status == 404
    return err[0] in ("NoSuchKey", "AccessDenied")


class S3Backend(HttpBackend):
    """An S3 bucket as a cache (see the module docstring): the HTTP backend, each request to the
    bucket signed with :func:`sign_v4`."""

    _nar_query = False  # a '?' in a key is part of the key (see HttpBackend._target)

    bucket = True
    list_page = 1000  # keys asked for per ListObjectsV2 request (S3's most)

    single_put_max = SINGLE_PUT_MAX  # files over this are uploaded in parts whatever the URL says

    def __init__(self, cu: CacheURL, *, creds: Credentials | None, region: str, bucket: str, **kw):
        self.s3_url = cu
        self.creds = creds
        self.region = region
        self.bucket = bucket
        self.multipart, self.buffer_size = upload_options(cu)
        self.encodings = stored_encodings(cu)
        # Last-Modified and Content-Encoding of the files :meth:`exists` found
        self._modified: dict[str, tuple[float, str]] = {}
        base, _, _ = http_url(cu)
        http_cu = CacheURL(cu.url, base.split(":", 1)[0], base, cu.params)
        super().__init__(http_cu, token=None, **kw)

    def _auth(self, method: str, headers: dict[str, str] | None = None, target: str = "/") -> dict[str, str]:
        if self.creds is None:
            return dict(headers or {})
        return sign_v4(method, self.client.host_header, target, dict(headers or {}), self.creds, self.region)

    def _redirect(self, r, method: str, what: str, name: str, hops: int, url: str):
        # S3 answers a request to the wrong region with 301 PermanentRedirect and no Location,
        # naming the bucket's region in a header
        if r.status in REDIRECT_STATUS and not r.headers.get("location", "").strip():
            region = r.headers.get("x-amz-bucket-region", "").strip()
            raise CacheError(f"cache {self.url!r}: cannot {what} {name!r}: {_status_line(r)}: the bucket "
                             f"{self.bucket!r} is " + (f"in the region {region!r}" if region else "in another region"),
                             hint=f"add region={region} to the cache URL" if region else
                             "give the bucket's region with ?region=REGION")
        return super()._redirect(r, method, what, name, hops, url)

    def _s3_status(self, what: str, name: str, r, data: bytes | None) -> CacheError:
        err = _s3_error(data)
        if err is None:
            e = self._status(what, name, r)
            if r.status == 403 and self.creds is None:
                e.hint = "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile"
            return e
        code, msg = err
        hint = None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            hint = (f"the credentials come from {self.creds.source}" if self.creds else
                    "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile")
        elif code == "NoSuchBucket":
            hint = f"create the bucket {self.bucket!r} first (pure does not create buckets)"
        elif code == "AuthorizationHeaderMalformed" or code == "PermanentRedirect":
            hint = "give the bucket's region with ?region=REGION"
        return CacheError(f"cache {self.url!r}: cannot {what} {name!r}: {_status_line(r)}: S3 {code}: {msg}",
                          hint=hint)

    async def exists(self, name: str) -> bool:
        r, _ = await self._request("query", name, "HEAD")
        if r.status in (200, 404):  # 404: no such key (the bucket was found when the cache was opened)
            if r.status == 200:
                self._modified[name] = (_http_date(r.headers.get("last-modified")),
                                        r.headers.get("content-encoding", ""))
            return r.status == 200
        if r.status != 403:
            raise self._status("query", name, r)
        # 403 to a HEAD has no body to say why: a missing key the credentials may not list, or a
        # refused signature; one byte of the object tells them apart
        r, data = await self._request("query", name, "GET", headers={"Range": "bytes=0-0"})
        if r.status in (200, 206):
            return True
        if r.status in (403, 404) and _missing(r, data):
            return False
        raise self._s3_status("query", name, r, data)

    async def get(self, name: str, limit: int | None = None, *, retry_unanswered: bool = True) -> bytes | None:
        r, data = await self._request("get", name, "GET", limit=whole_limit(name) if limit is None else limit,
                                      retry_unanswered=retry_unanswered)
        if r.status == 200:
            return self._decoded(name, r, data)
        if r.status in (403, 404) and _missing(r, data):
            return None
        raise self._s3_status("get", name, r, data)

    def _bucket_root(self) -> tuple[str, str]:
        """(the path of the bucket's root as requests name it, the URL's key prefix)."""
        u = urllib.parse.urlsplit(self.cache_url.base)
        if self.s3_url.param("endpoint"):  # path-style: /BUCKET/PREFIX
            root = f"/{self.bucket}/"
            return root, urllib.parse.unquote(u.path[len(root):])
        return "/", urllib.parse.unquote(u.path.lstrip("/"))

    async def _bucket_request(self, what: str, method: str, query: dict[str, str | None], *,
                              body: bytes | None = None, headers: dict[str, str] | None = None):
        """A request to the bucket itself (listing, deleting); returns (response, body) with a
        200 answer, else raises the S3 error."""
        root, _ = self._bucket_root()
        target = root + "?" + "&".join(k if v is None else f"{k}={urllib.parse.quote(v, safe='-_.~')}"
                                       for k, v in sorted(query.items()))

        async def once():
            try:
                r, data = await self.client.request(
                    method, target, headers=self._headers(self.client, method, headers, target), body=body)
            except self._http.HttpError as e:
                raise self._err(what, "the bucket", e) from e
            if r.status in TRANSIENT_STATUS:
                raise self._status(what, "the bucket", r)
            return r, data
        r, data = await self._retrying(once)
        if r.status != 200 or (method == "POST" and _s3_error(data) is not None):
            raise self._s3_status(what, "the bucket", r, data)
        return r, data

    def _xml(self, what: str, data: bytes):
        import xml.etree.ElementTree as ET
        try:
            root = ET.fromstring(data)
        except ET.ParseError as e:
            raise CacheError(f"cache {self.url!r}: cannot {what} the bucket: the answer is not XML ({e})") from None
        ns = root.tag.partition("}")[0] + "}" if root.tag.startswith("{") else ""
        return root, ns

    async def list_files(self, *, top_only: bool = False) -> dict[str, tuple[int, float]]:
        """The files under the URL's prefix (names relative to it) → (size, time of last
        write), with ListObjectsV2 (:attr:`list_page` keys a request; needs ``s3:ListBucket``);
        ``top_only``: not those in "subdirectories" (``nar/``, ``log/``, ...)."""
        _, key_prefix = self._bucket_root()
        files: dict[str, tuple[int, float]] = {}
        token = None
        while True:
            q = {"list-type": "2", "prefix": key_prefix, "max-keys": str(self.list_page)}
            if top_only:
                q["delimiter"] = "/"
            if token:
                q["continuation-token"] = token
            _r, data = await self._bucket_request("list", "GET", q)
            root, ns = self._xml("list", data)
            for c in root.iter(f"{ns}Contents"):
                key = c.findtext(f"{ns}Key") or ""
                if not key.startswith(key_prefix) or key == key_prefix:
                    continue
                files[key[len(key_prefix):]] = (_number(c.findtext(f"{ns}Size")),
                                                _timestamp(c.findtext(f"{ns}LastModified")))
            token = root.findtext(f"{ns}NextContinuationToken")
            if root.findtext(f"{ns}IsTruncated") != "true" or not token:
                return files

    async def list_narinfos(self) -> list[str] | None:
        """The narinfos under the URL's prefix (see :meth:`list_files`)."""
        return sorted(n for n in await self.list_files(top_only=True) if n.endswith(".narinfo") and "/" not in n)

    async def delete_files(self, names: list[str]) -> list[str]:
        """Delete the files (names under the URL's prefix) with DeleteObjects, up to 1000 a
        request, in the order given; returns the problems (a file already gone is no problem)."""
        _, key_prefix = self._bucket_root()
        problems: list[str] = []
        for i in range(0, len(names), 1000):
            batch = names[i:i + 1000]
            xml = ("<Delete><Quiet>true</Quiet>" +
                   "".join(f"<Object><Key>{escape(key_prefix + n)}</Key></Object>" for n in batch) +
                   "</Delete>").encode()
            headers = {"Content-Type": "application/xml", "Content-Length": str(len(xml)),
                       "Content-MD5": base64.b64encode(hashlib.md5(xml).digest()).decode()}
            _r, data = await self._bucket_request("delete files of", "POST", {"delete": None}, body=xml,
                                                  headers=headers)
            root, ns = self._xml("delete files of", data)
            for err in root.iter(f"{ns}Error"):
                code = err.findtext(f"{ns}Code") or "?"
                if code != "NoSuchKey":
                    problems.append(f"cannot remove {(err.findtext(f'{ns}Key') or '')[len(key_prefix):]!r} "
                                    f"from {self.url!r}: S3 {code}: {err.findtext(f'{ns}Message') or ''}")
        return problems

    async def list_uploads(self) -> list[tuple[str, str, float]]:
        """The unfinished multipart uploads under the URL's prefix: (name, UploadId, started)."""
        _, key_prefix = self._bucket_root()
        out: list[tuple[str, str, float]] = []
        marker: dict[str, str] = {}
        while True:
            _r, data = await self._bucket_request("list the uploads of", "GET",
                                                  {"uploads": None, "prefix": key_prefix, **marker})
            root, ns = self._xml("list the uploads of", data)
            for up in root.iter(f"{ns}Upload"):
                key = up.findtext(f"{ns}Key") or ""
                if key.startswith(key_prefix):
                    out.append((key[len(key_prefix):], up.findtext(f"{ns}UploadId") or "",
                                _timestamp(up.findtext(f"{ns}Initiated"))))
            if root.findtext(f"{ns}IsTruncated") != "true":
                return out
            marker = {"key-marker": root.findtext(f"{ns}NextKeyMarker") or "",
                      "upload-id-marker": root.findtext(f"{ns}NextUploadIdMarker") or ""}

    async def mark_used(self, names: list[str]) -> None:
        """Note that a push found these narinfos present (``cache prune`` keeps what was written
        or used within its age): those whose Last-Modified (seen by :meth:`exists`) is older
        than :data:`.prune.MARK_AFTER` are copied onto themselves, which renews it."""
        from .prune import MARK_AFTER
        now = datetime.datetime.now(datetime.timezone.utc).timestamp()
        stale = [n for n in names if now - self._modified.get(n, (now, ""))[0] > MARK_AFTER]
        _, key_prefix = self._bucket_root()
        limit = trio.CapacityLimiter(8)

        async def touch(name: str) -> None:
            source = urllib.parse.quote(f"/{self.bucket}/{key_prefix}{name}", safe="/-_.~")
            headers = {"x-amz-copy-source": source, "x-amz-metadata-directive": "REPLACE",
                       "Content-Type": "text/x-nix-narinfo", "Content-Length": "0"}
            encoding = self._modified[name][1]
            if encoding:  # the new metadata replaces all of the old: keep what readers decode by
                headers["Content-Encoding"] = encoding
            async with limit:
                r, data = await self._request("mark as used", name, "PUT", headers=headers)
            if r.status != 200 or _s3_error(data) is not None:
                log.warning("warning: %s", self._s3_status("mark as used", name, r, data))
        async with open_nursery() as n:
            for name in stale:
                n.start_soon(touch, name)

    async def abort_upload(self, name: str, upload_id: str) -> str | None:
        """Abort an unfinished multipart upload; returns the problem, if it could not be."""
        return await self._abort_request(name, urllib.parse.quote(upload_id, safe=""))

    def _upload_refused(self, name: str, r, data: bytes) -> CacheError:
        return self._s3_status("upload", name, r, data)

    async def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        method = self.encodings.get(_kind(name) or "")
        if method is None:
            return await super().put(name, data, content_type)
        body = encode(method, data)
        await self._put(name, lambda: body, content_type, len(body), {"Content-Encoding": method})

    async def put_file(self, name: str, local: str, content_type: str = "application/octet-stream",
                       *, move: bool = False) -> None:
        size = os.path.getsize(local)
        if size > self.single_put_max or (self.multipart and size > self.buffer_size):
            await self.put_parts(name, local, size, content_type)
            if move:
                _unlink(local)
        else:
            await super().put_file(name, local, content_type, move=move)

    async def put_parts(self, name: str, local: str, size: int, content_type: str) -> int:
        """Upload the file ``local`` of ``size`` bytes as ``name`` with a multipart upload (see
        the module docstring); returns the number of parts.  Aborts the upload when anything
        fails, the caller's cancellation included."""
        psize = part_size(size, self.buffer_size)
        count = max(1, -(-size // psize))
        r, data = await self._request("upload", name, "POST", query="uploads",
                                      headers={"Content-Type": content_type, "Content-Length": "0"})
        if r.status != 200:
            raise self._upload_refused(name, r, data)
        m = re.search(rb"<UploadId>([^<]+)</UploadId>", data or b"")
        if m is None:
            raise CacheError(f"cache {self.url!r}: cannot upload {name!r}: S3 started a multipart upload "
                             "without an UploadId")
        upload_id = m.group(1).decode()
        uid = urllib.parse.quote(upload_id, safe="")
        etags: dict[int, str] = {}
        try:
            try:
                fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise CacheError(f"cannot read {local!r} to upload it: {e.strerror}") from None
            try:
                numbers = iter(range(1, count + 1))

                async def uploader() -> None:
                    for n in numbers:
                        offset = (n - 1) * psize
                        try:
                            body, md5 = await trio.to_thread.run_sync(_read_part, fd, offset,
                                                                      min(psize, size - offset))
                        except OSError as e:
                            raise CacheError(f"cannot read {local!r} to upload it: "
                                             f"{e.strerror or e}") from None
                        try:
                            r, data = await self._request(
                                "upload", name, "PUT", query=f"partNumber={n}&uploadId={uid}",
                                headers={"Content-Length": str(len(body)), "Content-MD5": md5}, body=body)
                            if r.status != 200:
                                raise self._upload_refused(name, r, data)
                        except CacheError as e:
                            raise CacheError(f"{e} (part {n} of {count})", hint=e.hint) from None
                        etag = r.headers.get("etag", "").strip()
                        if not etag:
                            raise CacheError(f"cache {self.url!r}: cannot upload {name!r}: S3 took part {n} "
                                             f"of {count} without an ETag")
                        etags[n] = etag
                async with open_nursery() as nursery:
                    for _ in range(min(PARALLEL_PARTS, count)):
                        nursery.start_soon(uploader)
            finally:
                os.close(fd)
            done = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(etags[n])}</ETag></Part>"
                           for n in range(1, count + 1))
            xml = ('<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                   f"{done}</CompleteMultipartUpload>").encode()
            r, data = await self._request("upload", name, "POST", query=f"uploadId={uid}", body=xml,
                                          headers={"Content-Type": "application/xml",
                                                   "Content-Length": str(len(xml))})
            # S3 may answer 200 and still fail the completion, in the body
            if r.status != 200 or _s3_error(data) is not None:
                raise self._upload_refused(name, r, data)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._abort(name, uid)
            raise
        return count

    async def _abort(self, name: str, uid: str) -> None:
        """Abort the multipart upload ``uid`` (S3 keeps, and bills, the parts of an upload
        neither completed nor aborted); a failure to is only warned of."""
        problem = await self._abort_request(name, uid)
        if problem:
            log.warning("warning: cache %r: the unfinished multipart upload of %r (UploadId %s) was not "
                        "aborted: %s; its parts stay in the bucket until aborted (by 'pure cache prune', "
                        "or a lifecycle rule)", self.url, name, urllib.parse.unquote(uid), problem)

    async def _abort_request(self, name: str, uid: str) -> str | None:
        """DELETE the upload ``uid`` (quoted) within :data:`ABORT_TIMEOUT`; the problem, if any."""
        problem = None
        target = self._target(name) + f"?uploadId={uid}"
        with trio.move_on_after(ABORT_TIMEOUT) as scope:
            try:
                r, data = await self.client.request(
                    "DELETE", target, headers=self._headers(self.client, "DELETE", None, target))
                if r.status not in (200, 204, 404):
                    problem = str(self._s3_status("abort the upload of", name, r, data))
            except self._http.HttpError as e:
                problem = str(e)
        if scope.cancelled_caught:
            problem = f"no answer in {ABORT_TIMEOUT} s"
        return problem


def _http_date(text: str | None) -> float:
    try:
        return email.utils.parsedate_to_datetime(text or "").timestamp()
    except (TypeError, ValueError):
        return float("inf")


def _number(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _timestamp(text: str | None) -> float:
    """Seconds since the epoch of S3's ISO 8601 times (``2026-11-27T02:01:02.000Z``); infinity
    when there is none that can be read (a prune removes nothing on a guess: such a file counts
    as just written)."""
    try:
        return datetime.datetime.fromisoformat(text or "").timestamp()
    except ValueError:
        return float("inf")


def open_s3_backend(cu: CacheURL, *, connect_timeout: float, stall_timeout: float, max_connections: int,
                    attempts: int, ssl_cert_file: str | None) -> S3Backend:
    """:func:`.backend.open_backend` for an ``s3://`` URL."""
    from .http_auth import _ssl_context
    base, bucket, region = http_url(cu)
    creds = load_credentials(cu.param("profile"))
    return S3Backend(cu, creds=creds, region=region, bucket=bucket, connect_timeout=connect_timeout,
                     stall_timeout=stall_timeout, max_connections=max_connections, attempts=attempts,
                     ssl_context=_ssl_context(ssl_cert_file) if base.startswith("https:") else None)
