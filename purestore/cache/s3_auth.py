"""Who an ``s3://`` cache's requests are from: the AWS credentials (:func:`load_credentials`: the
environment, else a profile of the shared credentials file, else none: unsigned requests to a
public bucket) and AWS Signature Version 4 (:func:`sign_v4`), bodies sent as ``UNSIGNED-PAYLOAD``.
Used by :mod:`.s3_backend`; plain functions, no requests.
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import hmac
import os
import urllib.parse

import attrs

from ..errors import CacheError

UNSIGNED = "UNSIGNED-PAYLOAD"


@attrs.frozen(repr=False)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None
    source: str = ""  # where they came from, for messages (never the secret)

    def __repr__(self) -> str:
        return f"Credentials({self.access_key!r}, from {self.source})"


def load_credentials(profile: str | None = None, env=None) -> Credentials | None:
    """The credentials to sign with (see the module docstring); None: none configured.
    Raises :class:`CacheError` for a credentials file that cannot be read or lacks the
    profile asked for by name."""
    env = os.environ if env is None else env
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                           env.get("AWS_SESSION_TOKEN") or None, "the environment (AWS_ACCESS_KEY_ID)")
    named = profile or env.get("AWS_PROFILE")
    name = named or "default"
    path = env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(env.get("HOME", "/root"), ".aws", "credentials")
    if not os.path.exists(path):
        if named:
            raise CacheError(f"no AWS credentials file {path!r} for the profile {name!r}",
                             hint="set AWS_SHARED_CREDENTIALS_FILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        return None
    cp = configparser.RawConfigParser()
    try:
        with open(path) as f:
            cp.read_file(f)
    except (OSError, configparser.Error) as e:
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise CacheError(f"cannot read AWS credentials file {path!r}: {why}") from None
    if not cp.has_section(name):
        if named:
            raise CacheError(f"AWS credentials file {path!r} has no profile [{name}]")
        return None
    sec = cp[name]
    if not sec.get("aws_access_key_id") or not sec.get("aws_secret_access_key"):
        raise CacheError(f"AWS credentials file {path!r}: profile [{name}] needs aws_access_key_id "
                         "and aws_secret_access_key")
    return Credentials(sec["aws_access_key_id"].strip(), sec["aws_secret_access_key"].strip(),
                       (sec.get("aws_session_token") or "").strip() or None, f"profile [{name}] of {path}")


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign_v4(method: str, host: str, target: str, headers: dict[str, str], creds: Credentials, region: str,
            now: datetime.datetime | None = None, service: str = "s3") -> dict[str, str]:
    """``headers`` plus what AWS Signature Version 4 adds (``x-amz-date``,
    ``x-amz-content-sha256``, the session token, ``Authorization``) for a request of
    ``method`` to ``target`` (the path, already URI-encoded as sent, and query) on ``host``
    (the Host header).  Signs the host and the ``x-amz-*`` headers; the body is unsigned."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    out = dict(headers)
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = UNSIGNED
    if creds.token:
        out["x-amz-security-token"] = creds.token
    path, _, query = target.partition("?")
    pairs = sorted(urllib.parse.parse_qsl(query, keep_blank_values=True))
    canonical_query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                               for k, v in pairs)
    signed = {"host": host}
    for k, v in out.items():
        if k.lower().startswith("x-amz-"):
            signed[k.lower()] = " ".join(v.split())
    names = sorted(signed)
    canonical = "\n".join([method, path, canonical_query, *(f"{k}:{signed[k]}" for k in names), "",
                           ";".join(names), UNSIGNED])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + creds.secret_key).encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                            f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return out

