"""s3:// caches: push, substitute, mirror, sign and verify against a real S3 API server on
127.0.0.1 (moto's server, run with authentication on: it recomputes every request's AWS
Signature Version 4 and refuses a wrong one), credentials from the environment or a profile,
and S3's errors (wrong key, missing bucket, a 403 for a missing key) told apart."""

from __future__ import annotations

import collections
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import run_pure
from test_cache_support import PUB, SEC, make_closure, make_path, narinfo_file, open_store, settings_for

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server that checks signatures; an admin user's keys; buckets 'cache' and
    'other'.  Returns dict(endpoint, env (the admin's credentials), admin (boto3 kwargs)).

    The server takes a free port itself (-p 0) and says which once it listens: a port found
    free here and handed to it could be taken by another process meanwhile."""
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")  # the admin's creation, then signed
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = []
    for line in proc.stderr:  # (werkzeug binds and listens before it prints this line)
        said.append(line)
        m = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
        if m:
            break
    else:
        proc.kill()
        proc.wait()
        pytest.fail(f"moto server did not start: {''.join(said)[-2000:]}")
    # its log of requests goes on to stderr: read on, lest the pipe fill and block it
    threading.Thread(target=lambda: collections.deque(proc.stderr, maxlen=0), daemon=True).start()
    endpoint = f"127.0.0.1:{m[1]}"
    try:
        anon = dict(endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                    aws_access_key_id="setup", aws_secret_access_key="setup")
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        admin = dict(anon, aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        boto3.client("s3", **admin).create_bucket(Bucket="cache")
        boto3.client("s3", **admin).create_bucket(Bucket="other")
        yield dict(endpoint=endpoint, admin=admin,
                   env={"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                        "HOME": str(tmp_path_factory.mktemp("home"))})
    finally:
        proc.kill()
        proc.wait()


def url(s3, bucket="cache", prefix="", **params):
    q = "&".join(f"{k}={v}" for k, v in {"endpoint": s3["endpoint"], "scheme": "http", **params}.items())
    return f"s3://{bucket}{prefix}?{q}"


def objects(s3, bucket="cache", prefix=""):
    out = boto3.client("s3", **s3["admin"]).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []))


def body(s3, key, bucket="cache"):
    return boto3.client("s3", **s3["admin"]).get_object(Bucket=bucket, Key=key)["Body"].read()


def test_push_to_s3_then_substitute_and_mirror(s3, tmp_path):
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    with open_store(root) as store:
        lib, app = make_closure(store)
    app_p = app.absolute("/pure/store")
    prefix = "/team-a"
    r = run_pure("copy", "--to", url(s3, prefix=prefix, **{"secret-key": key}), app_p, root=root, env=s3["env"])
    assert "copied 2 paths to s3://cache/team-a" in r.stderr
    keys = objects(s3, prefix="team-a/")
    assert "team-a/nix-cache-info" in keys and f"team-a/{app.hash_part}.narinfo" in keys
    assert sum(k.startswith("team-a/nar/") for k in keys) == 2
    # the narinfos are the bytes a file:// push of the same paths writes
    run_pure("copy", "--to", f"file://{tmp_path / 'F'}?secret-key={key}", app_p, root=root)
    for p in (lib, app):
        assert body(s3, f"team-a/{p.hash_part}.narinfo") == narinfo_file(tmp_path / "F", p).read_bytes()
    # substituted from S3, references first, checked
    dst = tmp_path / "dst"
    run_pure("copy", "--from", url(s3, prefix=prefix), "--trusted-public-keys", PUB, app_p, root=dst, env=s3["env"])
    run_pure("store", "verify", "--check-contents", root=dst)
    # pushing again skips what is there
    again = json.loads(run_pure("copy", "--json", "--to", url(s3, prefix=prefix), app_p, root=root,
                                env=s3["env"]).stdout)
    assert again["uploaded"] == [] and len(again["skipped"]) == 2
    # mirrored to another bucket and back to a directory: the same files (a bucket of this
    # test's own, listed whole below: other tests put objects in the fixture's "other")
    boto3.client("s3", **s3["admin"]).create_bucket(Bucket="mirror")
    run_pure("copy", "--from", url(s3, prefix=prefix), "--to", url(s3, "mirror"), "--trusted-public-keys", PUB,
             app_p, env=s3["env"])
    assert [k for k in objects(s3, "mirror") if k != "nix-cache-info"] == \
        [k[len("team-a/"):] for k in keys if k != "team-a/nix-cache-info"]
    run_pure("copy", "--from", url(s3, "mirror"), "--to", f"file://{tmp_path / 'G'}", "--trusted-public-keys", PUB,
             app_p, env=s3["env"])
    for p in (lib, app):
        assert narinfo_file(tmp_path / "G", p).read_bytes() == narinfo_file(tmp_path / "F", p).read_bytes()
    # checked and signed in place, every narinfo of the bucket (listed) or those named
    r = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, url(s3, "mirror"),
                 env=s3["env"])
    assert "checked 2 paths" in r.stderr and "no problems" in r.stderr
    r = run_pure("cache", "verify", "--trusted-public-keys", PUB, url(s3, prefix=prefix), env=s3["env"])
    assert "checked 2 paths" in r.stderr  # the prefix's narinfos only
    k2 = tmp_path / "k2.sec"
    run_pure("key", "generate", "--name", "s3-2", "--secret-out", k2)
    run_pure("cache", "sign", url(s3, "mirror"), "--key-file", k2, "--trusted-public-keys", PUB, app_p,
             env=s3["env"])
    assert b"Sig: s3-2:" in body(s3, f"{app.hash_part}.narinfo", "mirror")
    r = run_pure("cache", "sign", url(s3, "mirror"), "--key-file", k2, "--trusted-public-keys", PUB, env=s3["env"])
    assert "signed 1 path" in r.stderr and "1 had the signatures already" in r.stderr


def test_wrong_credentials_and_missing_bucket_are_clear_errors(s3, tmp_path):
    root = tmp_path / "src"
    with open_store(root) as store:
        p = make_path(store, "one-1.0", {"": b"one\n"}).absolute("/pure/store")
    bad = dict(s3["env"], AWS_SECRET_ACCESS_KEY="not-the-secret")
    r = run_pure("copy", "--to", url(s3), p, root=root, env=bad, check=False)
    assert r.returncode == 1
    assert "S3 SignatureDoesNotMatch" in r.stderr and "credentials come from the environment" in r.stderr
    r = run_pure("copy", "--from", url(s3), "--trusted-public-keys", PUB, p, root=tmp_path / "d", env=bad,
                 check=False)
    assert r.returncode == 1 and "S3 SignatureDoesNotMatch" in r.stderr
    r = run_pure("copy", "--to", url(s3, "no-such-bucket"), p, root=root, env=s3["env"], check=False)
    assert r.returncode == 1 and "S3 NoSuchBucket" in r.stderr and "create the bucket 'no-such-bucket'" in r.stderr
    assert "Traceback" not in r.stderr


def test_credentials_from_a_profile_and_a_reader_that_may_not_list(s3, tmp_path):
    """A user allowed s3:GetObject only: S3 answers 403 AccessDenied for a missing key, which
    counts as "not there"; its keys come from a profile of a credentials file."""
    iam = boto3.client("iam", **s3["admin"])
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="get", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}))
    k = iam.create_access_key(UserName="reader")["AccessKey"]
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n"
                     f"[ci]\naws_access_key_id = {k['AccessKeyId']}\naws_secret_access_key = {k['SecretAccessKey']}\n")
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    with open_store(root) as store:
        present = make_path(store, "here-1.0", {"": b"here\n"}).absolute("/pure/store")
        absent = make_path(store, "gone-1.0", {"": b"gone\n"}).absolute("/pure/store")
    run_pure("copy", "--to", url(s3, prefix="/ro", **{"secret-key": key}), present, root=root, env=s3["env"])
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "HOME": s3["env"]["HOME"],
           "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    dst = tmp_path / "dst"
    run_pure("copy", "--from", url(s3, prefix="/ro", profile="ci"), "--trusted-public-keys", PUB, present,
             root=dst, env=env)
    r = run_pure("copy", "--from", url(s3, prefix="/ro", profile="ci"), "--trusted-public-keys", PUB, absent,
                 root=dst, env=env, check=False)
    assert r.returncode == 1 and "does not have it" in r.stderr, r.stderr
    # the reader may not upload: S3's refusal is reported as such
    r = run_pure("copy", "--to", url(s3, prefix="/ro", profile="ci"), absent, root=root, env=env, check=False)
    assert r.returncode == 1 and "S3 AccessDenied" in r.stderr
    # the default profile's keys are not known to S3
    r = run_pure("cache", "path-info", url(s3, prefix="/ro"), present, env=env, check=False)
    assert r.returncode == 1 and "S3 InvalidAccessKeyId" in r.stderr and "profile [default]" in r.stderr
    r = run_pure("cache", "path-info", url(s3, profile="nope"), present, env=env, check=False)
    assert r.returncode == 1 and "has no profile [nope]" in r.stderr


@pytest.mark.parametrize("bad, message", [
    ("s3://Bad_Bucket", "is not an S3 bucket name"),
    ("s3://bucket?scheme=ftp", "scheme must be https or http"),
    ("s3://bucket?endpoint=host/path", "endpoint must be HOST[:PORT]"),
    ("s3://bucket?token-file=/t", "signs its requests with AWS credentials"),
    ("http://host/?region=eu-west-1", "'region' applies to s3:// caches only"),
    ("s3://bucket?regin=x", "unknown parameter 'regin', expected one of buffer-size, compression, "),
    ("s3://bucket?endpoint=ftp://host", "endpoint must be HOST[:PORT]"),
    # a host in brackets that is no IPv6 address, a '[' without its ']': a ValueError traceback
    ("s3://bucket?endpoint=http://[minio]:9000", "endpoint must be HOST[:PORT], got 'http://[minio]:9000' "
                                                 "(malformed host: "),
    ("s3://bucket?endpoint=[::1:9000", "endpoint must be HOST[:PORT], got '[::1:9000' (malformed host: "),
    ("s3://bucket?endpoint=http://host&scheme=https", "endpoint 'http://host' and scheme 'https' disagree"),
])
def test_bad_s3_urls(bad, message):
    r = run_pure("cache", "path-info", bad, "/pure/store/0rzqlwgy4qwib41y722122yp0p6a6qrq-lib-1.0", check=False)
    assert r.returncode == 1 and message in r.stderr, r.stderr


def test_signatures_equal_botocore_and_urls():
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    from purestore.cache.backend import parse_url
    from purestore.cache.s3_backend import Credentials, http_url, sign_v4

    now = datetime.datetime(2026, 11, 26, 12, 0, 0, tzinfo=datetime.timezone.utc)
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    for method, target, headers, token in [
            ("GET", "/bucket/nix-cache-info", {}, None),
            ("PUT", "/bucket/nar/0abc%2Bdef.nar.zst", {"Content-Type": "application/x-nix-nar"}, "SESSION"),
            ("GET", "/b/x.narinfo?versionId=3&a=b%20c", {"Range": "bytes=0-0"}, None)]:
        ours = sign_v4(method, "s3.example:9000", target, headers, Credentials("AKID", secret, token), "eu-west-1", now)
        names = ours["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
        req = AWSRequest(method=method, url="http://s3.example:9000" + target,
                         headers={**{k: v for k, v in ours.items() if k.lower() in names}, "host": "s3.example:9000"})
        req.context["timestamp"] = ours["x-amz-date"]
        auth = S3SigV4Auth(BotoCredentials("AKID", secret, token), "s3", "eu-west-1")
        want = auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req)
        assert ours["Authorization"].endswith(f"Signature={want}")
        assert "x-amz-security-token" in names if token else "x-amz-security-token" not in names
    assert http_url(parse_url("s3://my-bucket?region=eu-west-1"))[0] == "https://my-bucket.s3.eu-west-1.amazonaws.com/"
    assert http_url(parse_url("s3://b1b?endpoint=minio:9000&scheme=http"))[0] == "http://minio:9000/b1b/"
    assert http_url(parse_url("s3://b1b/a/b/?endpoint=minio"))[0] == "https://minio/b1b/a/b/"
    # an endpoint given as a URL keeps its scheme (as the AWS SDK behind Nix does)
    assert http_url(parse_url("s3://b1b?endpoint=http://minio:9000/"))[0] == "http://minio:9000/b1b/"
    assert http_url(parse_url("s3://b1b?endpoint=https://minio&scheme=https"))[0] == "https://minio/b1b/"


def test_where_credentials_come_from(tmp_path):
    from purestore.cache.s3_backend import load_credentials
    from purestore.errors import CacheError

    home = {"HOME": str(tmp_path)}
    assert load_credentials(env=home) is None  # no keys anywhere: unsigned requests
    env = dict(home, AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_SESSION_TOKEN="T")
    c = load_credentials("ignored", env=env)
    assert (c.access_key, c.secret_key, c.token) == ("AK", "SK", "T") and "SK" not in repr(c)
    (tmp_path / ".aws").mkdir()
    f = tmp_path / ".aws" / "credentials"
    f.write_text("[default]\naws_access_key_id = D\naws_secret_access_key = DS\n"
                 "[ci]\naws_access_key_id = C\naws_secret_access_key = CS\naws_session_token = CT\n")
    assert load_credentials(env=home).access_key == "D"
    assert load_credentials(env=dict(home, AWS_PROFILE="ci")).token == "CT"
    assert load_credentials("ci", env=home).source == f"profile [ci] of {f}"
    with pytest.raises(CacheError, match=r"has no profile \[x\]"):
        load_credentials("x", env=home)
    f.write_text("[ci]\naws_access_key_id = C\n")
    with pytest.raises(CacheError, match="needs aws_access_key_id and aws_secret_access_key"):
        load_credentials("ci", env=home)
    assert load_credentials(env=home) is None  # no [default]: unsigned
    f.write_text("not an ini file")
    with pytest.raises(CacheError, match="cannot read AWS credentials file"):
        load_credentials(env=home)


def test_a_bucket_in_another_region_is_named(tmp_path):
    """S3's answer to the wrong region: 301 without a Location, the region in a header."""
    import http.server
    import threading

    class Moved(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<Error><Code>PermanentRedirect</Code><Message>use the right endpoint</Message></Error>"
            self.send_response(301)
            self.send_header("x-amz-bucket-region", "eu-central-1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = run_pure("cache", "path-info", f"s3://cache?endpoint=127.0.0.1:{server.server_port}&scheme=http",
                     "/pure/store/0rzqlwgy4qwib41y722122yp0p6a6qrq-lib-1.0", check=False,
                     env={"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    finally:
        server.shutdown()
    assert r.returncode == 1
    assert "the bucket 'cache' is in the region 'eu-central-1'" in r.stderr
    assert "hint: add region=eu-central-1 to the cache URL" in r.stderr


async def test_listing_a_bucket_goes_page_by_page(s3, monkeypatch):
    from purestore.cache.backend import open_backend

    client = boto3.client("s3", **s3["admin"])
    names = [f"{i:032d}.narinfo" for i in range(5)]
    for n in names:
        client.put_object(Bucket="other", Key=f"paged/{n}", Body=b"x")
    client.put_object(Bucket="other", Key="paged/nar/x.narinfo", Body=b"x")  # not at the top
    client.put_object(Bucket="other", Key="paged/nix-cache-info", Body=b"StoreDir: /pure/store\n")
    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    backend = open_backend(url(s3, "other", prefix="/paged"))
    backend.list_page = 2
    async with backend:
        assert await backend.list_narinfos() == names


def test_big_nars_go_up_in_parts_and_come_back(s3, tmp_path):
    """multipart-upload=true: a NAR over buffer-size goes up in parts (S3 names a multipart
    object's ETag with its number of parts), is the same object as one PUT gives, leaves no
    unfinished upload, and substitutes like any other."""
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    with open_store(root) as store:  # incompressible: the zstd NAR is as big as the files
        big = make_path(store, "big-1.0", {"blob": os.urandom(11 << 20), "README": b"big\n"})
    big_p = big.absolute("/pure/store")
    run_pure("copy", "--to", url(s3, prefix="/parts", **{"secret-key": key, "multipart-upload": "true",
                                                         "buffer-size": 5 << 20}),
             big_p, root=root, env=s3["env"])
    run_pure("copy", "--to", url(s3, prefix="/whole", **{"secret-key": key}), big_p, root=root, env=s3["env"])
    client = boto3.client("s3", **s3["admin"])
    [nar] = [k for k in objects(s3, prefix="parts/nar/")]
    assert client.head_object(Bucket="cache", Key=nar)["ETag"].endswith('-3"')  # 5 + 5 + 1 MiB
    whole = "whole/" + nar[len("parts/"):]
    assert "-" not in client.head_object(Bucket="cache", Key=whole)["ETag"]
    assert body(s3, nar) == body(s3, whole)
    assert body(s3, f"parts/{big.hash_part}.narinfo") == body(s3, f"whole/{big.hash_part}.narinfo")
    assert client.list_multipart_uploads(Bucket="cache").get("Uploads", []) == []
    dst = tmp_path / "dst"
    run_pure("copy", "--from", url(s3, prefix="/parts"), "--trusted-public-keys", PUB, big_p, root=dst,
             env=s3["env"])
    run_pure("store", "verify", "--check-contents", root=dst)
    for bad, message in [({"buffer-size": 1000}, "buffer-size must be a number of bytes of at least 5242880"),
                         ({"buffer-size": "5M"}, "buffer-size must be a number of bytes"),
                         ({"multipart-upload": "perhaps"}, "multipart-upload must be true or false")]:
        r = run_pure("copy", "--to", url(s3, prefix="/bad", **bad), big_p, root=root, env=s3["env"], check=False)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_pure("copy", "--to", f"file://{tmp_path / 'F'}?buffer-size=6000000", big_p, root=root, check=False)
    assert r.returncode == 1 and "'buffer-size' applies to s3:// caches only" in r.stderr


class FaultyProxy:
    """Between a client and moto: relays each request on a connection of its own (signatures
    stay valid: the Host header is passed on as it came), except that an upload of part
    ``fail`` is answered 500 and one of part ``stall`` never; records the requests."""

    def __init__(self, upstream: str, fail: int | None = None, stall: int | None = None):
        self.host, port = upstream.split(":")
        self.port = int(port)
        self.fail, self.stall = fail, stall
        self.seen: list[str] = []

    async def serve(self, task_status):
        import trio
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._one, listeners)

    async def _one(self, client):
        import trio
        from test_cache_support import read_http_request
        async with client:
            buf = b""
            while True:
                got = await read_http_request(client, buf)
                if got is None:
                    return
                head, req_body, buf = got
                lines = head.split(b"\r\n")
                target = lines[0].split(b" ")[1].decode()
                self.seen.append(f"{lines[0].split(b' ')[0].decode()} {target}")
                if self.stall is not None and f"partNumber={self.stall}&" in target:
                    await trio.sleep_forever()
                if self.fail is not None and f"partNumber={self.fail}&" in target:
                    await client.send_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                    continue
                kept = [line for line in lines[1:] if not line.lower().startswith(b"connection:")]
                up = await trio.open_tcp_stream(self.host, self.port)
                async with up:
                    await up.send_all(b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n" + req_body)
                    answer = b""
                    while data := await up.receive_some(65536):
                        answer += data
                rhead, _, rbody = answer.partition(b"\r\n\r\n")
                rlines = [line for line in rhead.split(b"\r\n") if not line.lower().startswith(b"connection:")]
                await client.send_all(b"\r\n".join([*rlines, b"Connection: close"]) + b"\r\n\r\n" + rbody)
                return


async def test_a_multipart_upload_that_fails_or_is_interrupted_is_aborted(s3, tmp_path, monkeypatch):
    import trio

    from purestore.cache import http_backend
    from purestore.cache.backend import open_backend
    from purestore.errors import CacheError

    monkeypatch.setattr(http_backend, "RETRY_DELAY", 0.01)
    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", **s3["admin"])
    local = tmp_path / "nar"
    local.write_bytes(os.urandom((11 << 20) + 7))

    def unfinished():
        return client.list_multipart_uploads(Bucket="cache").get("Uploads", [])

    async with trio.open_nursery() as n:
        failing = FaultyProxy(s3["endpoint"], fail=2)
        port = await n.start(failing.serve)
        proxied = f"s3://cache/faulty?endpoint=127.0.0.1:{port}&scheme=http&multipart-upload=true"
        async with open_backend(proxied, attempts=2) as backend:
            with pytest.raises(CacheError, match=r"cannot upload 'nar/x.nar': HTTP 500.*\(2 attempts\) \(part 2 of 3\)"):
                await backend.put_file("nar/x.nar", str(local))
        assert any(s.startswith("DELETE /cache/faulty/nar/x.nar?uploadId=") for s in failing.seen)
        assert unfinished() == [] and objects(s3, prefix="faulty/") == []
        assert local.exists()  # not moved away: it can be pushed again

        stalling = FaultyProxy(s3["endpoint"], stall=3)
        port = await n.start(stalling.serve)
        proxied = f"s3://cache/faulty?endpoint=127.0.0.1:{port}&scheme=http&multipart-upload=true"
        async with open_backend(proxied) as backend:
            with trio.move_on_after(3) as scope:  # the user's Ctrl-C, or a build's cancellation
                await backend.put_file("nar/x.nar", str(local))
        assert scope.cancelled_caught
        assert any(s.startswith("DELETE ") for s in stalling.seen)
        assert unfinished() == [] and objects(s3, prefix="faulty/") == []

        # over S3's limit for one PUT, a file goes up in parts whatever the URL says
        async with open_backend(url(s3, prefix="/limit")) as backend:
            backend.single_put_max = 6 << 20
            await backend.put_file("nar/x.nar", str(local))
        assert client.head_object(Bucket="cache", Key="limit/nar/x.nar")["ETag"].endswith('-3"')
        assert body(s3, "limit/nar/x.nar") == local.read_bytes()
        n.cancel_scope.cancel()


def test_part_sizes_keep_under_s3s_limit_of_parts():
    from purestore.cache.s3_backend import MAX_PARTS, part_size

    assert part_size(100 << 20, 5 << 20) == 5 << 20
    big = 80 << 30  # 80 GiB in 5 MiB parts would be 16384 parts
    size = part_size(big, 5 << 20)
    assert size % (1 << 20) == 0 and -(-big // size) <= MAX_PARTS and size < 10 << 20


def test_pruning_a_bucket_keeps_closures_whole(s3, tmp_path):
    """cache prune s3://: what was not pushed within the age goes, narinfos first, except the
    closures of what stays; old unfinished uploads are aborted; a dry run changes nothing."""
    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    with open_store(root) as store:
        lib, app = make_closure(store)
        other = make_path(store, "other-1.0", {"x": b"other\n"})
        fresh = make_path(store, "fresh-1.0", {"x": b"fresh\n"})
    sd = "/pure/store"
    bucket = url(s3, prefix="/prune", **{"secret-key": key, "write-nar-listing": "true"})
    run_pure("copy", "--to", bucket, app.absolute(sd), other.absolute(sd), root=root, env=s3["env"])
    client = boto3.client("s3", **s3["admin"])
    stale = client.create_multipart_upload(Bucket="cache", Key="prune/nar/cut-off.nar.zst")["UploadId"]
    # The cut-off between old and fresh is the instant `cut`, 3 s after the old uploads and 3 s
    # before the fresh one (S3's times are whole seconds); each prune is given the age that puts
    # it there, so that however long the commands between take, what is old stays old and what
    # is fresh stays fresh (a fixed age of 5 s made the last prune remove `fresh` once the
    # commands after its push took more than 5 s, on a loaded machine).  A prune's own start-up
    # (between the age computed here and its clock read) may take up to 2 s.
    time.sleep(3)
    cut = time.time()
    time.sleep(3)

    def age() -> str:
        return f"{time.time() - cut:.3f}s"

    run_pure("copy", "--to", bucket, fresh.absolute(sd), root=root, env=s3["env"])
    before = objects(s3, prefix="prune/")

    r = run_pure("cache", "prune", url(s3, prefix="/prune"), "--older-than", age(), "--keep", app.absolute(sd),
                 "--dry-run", "--json", env=s3["env"])
    plan = json.loads(r.stdout)
    assert plan["removed"] == [other.absolute(sd)] and plan["kept"] == 3
    assert plan["abortedUploads"] == ["nar/cut-off.nar.zst"] and plan["files"][0] == f"{other.hash_part}.narinfo"
    assert "would abort 1 unfinished upload" in r.stderr
    assert objects(s3, prefix="prune/") == before
    assert [u["UploadId"] for u in client.list_multipart_uploads(Bucket="cache")["Uploads"]] == [stale]

    # someone who may read the bucket but not delete from it: S3's refusal, nothing removed
    iam = boto3.client("iam", **s3["admin"])
    iam.create_user(UserName="looker")
    iam.put_user_policy(UserName="looker", PolicyName="look", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
            "s3:GetObject", "s3:ListBucket", "s3:ListBucketMultipartUploads"]}]}))
    k = iam.create_access_key(UserName="looker")["AccessKey"]
    looker = dict(s3["env"], AWS_ACCESS_KEY_ID=k["AccessKeyId"], AWS_SECRET_ACCESS_KEY=k["SecretAccessKey"])
    r = run_pure("cache", "prune", url(s3, prefix="/prune"), "--older-than", age(), env=looker, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: cannot remove '{other.hash_part}.narinfo' from" in r.stderr and "S3 AccessDenied" in r.stderr
    # every narinfo refused: each path stays, with its closure, and is reported kept
    assert "no other file was removed" in r.stderr and "tried to remove 0 paths" in r.stderr and "4 paths kept" in r.stderr
    assert objects(s3, prefix="prune/") == before

    r = run_pure("cache", "prune", url(s3, prefix="/prune"), "--older-than", age(), env=s3["env"])
    assert "removed 3 paths" in r.stderr and "1 path kept" in r.stderr and "aborted 1 unfinished upload" in r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(f"removing '{p.absolute(sd)}'" for p in (lib, app, other))
    left = objects(s3, prefix="prune/")
    fresh_nar = next(ln[5:] for ln in body(s3, f"prune/{fresh.hash_part}.narinfo").decode().splitlines()
                     if ln.startswith("URL: "))
    assert left == sorted(["prune/nix-cache-info", f"prune/{fresh.hash_part}.narinfo", f"prune/{fresh.hash_part}.ls",
                           f"prune/{fresh_nar}"])
    assert client.list_multipart_uploads(Bucket="cache").get("Uploads", []) == []
    r = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, url(s3, prefix="/prune"),
                 env=s3["env"])
    assert "checked 1 path" in r.stderr and "no problems" in r.stderr
    # nothing to say what to keep, and a bucket that is not a cache: refused, nothing touched
    r = run_pure("cache", "prune", url(s3, prefix="/prune"), env=s3["env"], check=False)
    assert r.returncode == 2 and "say what to keep" in r.stderr
    r = run_pure("cache", "prune", url(s3, "other", prefix="/nothing-here"), "--older-than", "1d", env=s3["env"],
                 check=False)
    assert r.returncode == 1 and "is not a binary cache (it has no nix-cache-info)" in r.stderr
    assert objects(s3, prefix="prune/") == left


async def test_pushing_again_renews_a_narinfo_in_a_bucket(s3, tmp_path, monkeypatch):
    """A push that finds a path already in the bucket renews its narinfo's Last-Modified (what a
    bucket's prune goes by) once it is older than MARK_AFTER, without changing its bytes."""
    from purestore.cache import prune, push

    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "src"
    with open_store(root) as store:
        p = make_path(store, "again-1.0", {"x": b"again\n"})
        target = url(s3, prefix="/again", **{"narinfo-compression": "xz"})
        await push.copy_to(store, settings_for(root), target, [p])
        client = boto3.client("s3", **s3["admin"])
        name = f"again/{p.hash_part}.narinfo"
        first = client.head_object(Bucket="cache", Key=name)["LastModified"]
        text = body(s3, name)
        time.sleep(1.1)
        await push.copy_to(store, settings_for(root), target, [p])  # younger than MARK_AFTER: untouched
        assert client.head_object(Bucket="cache", Key=name)["LastModified"] == first
        monkeypatch.setattr(prune, "MARK_AFTER", 0)
        res = await push.copy_to(store, settings_for(root), target, [p])
        assert not res.uploaded and p in res.skipped
    assert client.head_object(Bucket="cache", Key=name)["LastModified"] > first
    assert body(s3, name) == text
    head = client.head_object(Bucket="cache", Key=name)
    assert head["ContentType"] == "text/x-nix-narinfo" and head["ContentEncoding"] == "xz"  # kept by the copy


def test_narinfos_listings_and_logs_stored_compressed(s3, tmp_path):
    """narinfo-compression, ls-compression, log-compression (Nix's S3 parameters): the objects
    are compressed with the method as their Content-Encoding, and everything reads them as the
    plain files (substitution, ls, verify, log, a mirror to a directory)."""
    from purestore.formats.store_path import StorePath
    from test_cache_support import keep_build_log

    key = tmp_path / "k.sec"
    key.write_text(SEC)
    root = tmp_path / "src"
    drv = StorePath("1" * 32, "thing.drv")
    with open_store(root) as store:
        out = make_path(store, "thing-1.0", {"bin/thing": b"#!/bin/sh\necho thing\n"}, deriver=drv)
        keep_build_log(store, drv, b"building thing\n" * 100)
    out_p = out.absolute("/pure/store")
    packed = url(s3, prefix="/packed", **{"secret-key": key, "write-nar-listing": "true", "narinfo-compression": "xz",
                                          "ls-compression": "br", "log-compression": "gzip"})
    run_pure("copy", "--to", packed, out_p, root=root, env=s3["env"])
    plain = tmp_path / "plain"
    run_pure("copy", "--to", f"file://{plain}?write-nar-listing=true&secret-key={key}", out_p, root=root)
    client = boto3.client("s3", **s3["admin"])
    for name, encoding, magic in [(f"{out.hash_part}.narinfo", "xz", b"\xfd7zXZ"),
                                  (f"{out.hash_part}.ls", "br", None),
                                  (f"log/{drv.base_name}", "gzip", b"\x1f\x8b")]:
        obj = client.get_object(Bucket="cache", Key=f"packed/{name}")
        raw = obj["Body"].read()
        assert obj["ContentEncoding"] == encoding
        assert raw != (plain / name).read_bytes() and (magic is None or raw.startswith(magic))
    reader = url(s3, prefix="/packed")
    dst = tmp_path / "dst"
    run_pure("copy", "--from", reader, "--trusted-public-keys", PUB, out_p, root=dst, env=s3["env"])
    run_pure("store", "verify", "--check-contents", root=dst)
    r = run_pure("cache", "ls", "--trusted-public-keys", PUB, reader, "-R", out_p, env=s3["env"])
    assert r.stdout.split() == ["./bin", "./bin/thing"]
    r = run_pure("cache", "verify", "--trusted-public-keys", PUB, reader, env=s3["env"])
    assert "checked 1 path" in r.stderr and "no problems" in r.stderr
    r = run_pure("--substituters", reader, "log", out_p, root=dst, env=s3["env"])
    assert r.stdout == "building thing\n" * 100
    mirror = tmp_path / "mirror"
    run_pure("copy", "--from", reader, "--to", f"file://{mirror}", "--trusted-public-keys", PUB, out_p, env=s3["env"])
    for name in (f"{out.hash_part}.narinfo", f"{out.hash_part}.ls"):
        assert (mirror / name).read_bytes() == (plain / name).read_bytes()
    r = run_pure("copy", "--to", url(s3, prefix="/bad", **{"ls-compression": "lz4"}), out_p, root=root,
                 env=s3["env"], check=False)
    assert r.returncode == 1 and "ls-compression must be one of br, gzip, xz, bzip2, zstd or none, got 'lz4'" in r.stderr
