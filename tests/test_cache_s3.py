"""s3:// caches: push, substitute, mirror, sign and verify against a real S3 API server on
127.0.0.1 (moto's server, run with authentication on: it recomputes every request's AWS
Signature Version 4 and refuses a wrong one), credentials from the environment or a profile,
and S3's errors (wrong key, missing bucket, a 403 for a missing key) told apart."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import run_pure
from test_cache_support import PUB, SEC, make_closure, make_path, narinfo_file, open_store

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server that checks signatures; an admin user's keys; buckets 'cache' and
    'other'.  Returns dict(endpoint, env (the admin's credentials), admin (boto3 kwargs))."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")  # the admin's creation, then signed
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.1)
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
    # mirrored to another bucket and back to a directory: the same files
    run_pure("copy", "--from", url(s3, prefix=prefix), "--to", url(s3, "other"), "--trusted-public-keys", PUB,
             app_p, env=s3["env"])
    assert [k for k in objects(s3, "other") if k != "nix-cache-info"] == \
        [k[len("team-a/"):] for k in keys if k != "team-a/nix-cache-info"]
    run_pure("copy", "--from", url(s3, "other"), "--to", f"file://{tmp_path / 'G'}", "--trusted-public-keys", PUB,
             app_p, env=s3["env"])
    for p in (lib, app):
        assert narinfo_file(tmp_path / "G", p).read_bytes() == narinfo_file(tmp_path / "F", p).read_bytes()
    # checked and signed in place, every narinfo of the bucket (listed) or those named
    r = run_pure("cache", "verify", "--check-contents", "--trusted-public-keys", PUB, url(s3, "other"),
                 env=s3["env"])
    assert "checked 2 paths" in r.stderr and "no problems" in r.stderr
    r = run_pure("cache", "verify", "--trusted-public-keys", PUB, url(s3, prefix=prefix), env=s3["env"])
    assert "checked 2 paths" in r.stderr  # the prefix's narinfos only
    k2 = tmp_path / "k2.sec"
    run_pure("key", "generate", "--name", "s3-2", "--secret-out", k2)
    run_pure("cache", "sign", url(s3, "other"), "--key-file", k2, "--trusted-public-keys", PUB, app_p,
             env=s3["env"])
    assert b"Sig: s3-2:" in body(s3, f"{app.hash_part}.narinfo", "other")
    r = run_pure("cache", "sign", url(s3, "other"), "--key-file", k2, "--trusted-public-keys", PUB, env=s3["env"])
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
    assert r.returncode == 1 and "no binary cache has it" in r.stderr, r.stderr
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
