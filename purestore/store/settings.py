"""Settings: where the store lives and how purestore behaves.  Passed explicitly, never global.

Sources, later ones winning: built-in defaults, the config file (``$PURE_CONFIG``, else
``/etc/pure/pure.conf`` then ``~/.config/pure/pure.conf``), environment variables
(``PURE_STORE``, ``PURE_STORE_DIR``), ``--option NAME VALUE``, the other command-line options.

The config file is ``key = value`` lines; ``#`` starts a comment; lists are space-separated::

    substituters = file:///srv/cache http://127.0.0.1:5000
    trusted-public-keys = cache-1:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=
    max-jobs = 4
    max-silent-time = 3600
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import attrs

from ..errors import UsageError
from ..formats.store_path import DEFAULT_STORE_DIR, check_store_dir

_LIST_KEYS = {"substituters", "trusted-public-keys"}
_INT_KEYS = {"max-jobs", "cores", "narinfo-cache-negative-ttl", "connect-timeout", "stalled-download-timeout",
             "download-attempts", "max-silent-time", "timeout", "max-build-log-size"}
_MIN = {"download-attempts": 1, "max-jobs": 0, "cores": 0, "narinfo-cache-negative-ttl": 0,
        "connect-timeout": 0, "stalled-download-timeout": 0, "max-silent-time": 0, "timeout": 0,
        "max-build-log-size": 0}
# the largest value of a number setting: Nix's are 64-bit (time_t, uint64_t); a larger one
# (a timeout of 10**400 seconds) ended in an OverflowError where it met a float
INT_SETTING_MAX = 2**63 - 1
_PATH_KEYS = {"netrc-file", "ssl-cert-file", "post-build-hook"}
_BOOL_KEYS = {"keep-derivations", "keep-outputs", "offline", "sandbox", "require-provenance",
              "fsync-store-paths", "fallback"}


def _parse_bool(v: str, where: str) -> bool:
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise UsageError(f"{where}: expected true or false, got {v!r}")


@attrs.frozen
class Settings:
    """Everything that configures a store and the commands acting on it."""

    store_dir: str = DEFAULT_STORE_DIR
    root: str = "/"
    substituters: tuple[str, ...] = ()
    trusted_public_keys: tuple[str, ...] = ()
    max_jobs: int = attrs.field(factory=lambda: os.cpu_count() or 1)
    cores: int = 0
    keep_derivations: bool = True
    keep_outputs: bool = False
    offline: bool = False
    sandbox: bool = True
    require_provenance: bool = False
    # build what a cache listed but could not give (Nix's default is false: fail instead)
    fallback: bool = True
    # flush the file system before registering a new path (power-loss safety; Nix does not)
    fsync_store_paths: bool = True
    narinfo_cache_negative_ttl: int = 300
    connect_timeout: int = 10
    stalled_download_timeout: int = 30
    download_attempts: int = 5  # tries of an HTTP request to a cache that fails transiently
    # logins for HTTP caches ('machine HOST login NAME password SECRET'), as Nix's netrc-file
    netrc_file: str = "/etc/pure/netrc"
    # CA certificates (PEM) for https caches; empty: the system's (OpenSSL's, SSL_CERT_FILE)
    ssl_cert_file: str = ""
    # a program run after each build with DRV_PATH and OUT_PATHS (Nix's post-build-hook)
    post_build_hook: str = ""
    # limits of one build, as Nix's (0: none): kill a builder silent for this many seconds, one
    # running longer than this many seconds, one that wrote more than this many bytes of log
    max_silent_time: int = 0
    timeout: int = 0
    max_build_log_size: int = 0

    @property
    def real_store_dir(self) -> str:
        """Where the store's files physically are (store dir under the root)."""
        return os.path.normpath(self.root + "/" + self.store_dir) if self.root != "/" else self.store_dir

    @property
    def state_dir(self) -> str:
        """The state dir (database, locks, roots, logs): ``<parent of store dir>/var/pure`` under the root."""
        logical = os.path.dirname(self.store_dir) + "/var/pure"
        return os.path.normpath(self.root + "/" + logical) if self.root != "/" else os.path.normpath(logical)

    @property
    def rooted(self) -> bool:
        return self.root != "/"

    def evolve(self, **kw) -> "Settings":
        return attrs.evolve(self, **kw)


def config_files(env: dict[str, str]) -> list[Path]:
    if env.get("PURE_CONFIG"):
        return [Path(env["PURE_CONFIG"])]
    files = [Path("/etc/pure/pure.conf")]
    home = env.get("XDG_CONFIG_HOME") or (env.get("HOME", "") + "/.config")
    files.append(Path(home) / "pure" / "pure.conf")
    return files


def check_public_keys(keys: tuple[str, ...], where: str) -> None:
    """Each a well-formed public key (``name:base64``), else an error naming ``where`` they
    came from (a config file's line, an option)."""
    from ..errors import FormatError
    from ..formats.signing import PublicKey
    for k in keys:
        try:
            PublicKey.parse(k)
        except FormatError as e:
            # (the key's own hint first: a secret key given here says so)
            raise UsageError(f"{where}: {e}",
                             hint=getattr(e, "hint", None) or "keys are separated by spaces, each NAME:BASE64 "
                                  "as 'pure key public' prints it") from None


def parse_config(text: str, where: str) -> dict[str, object]:
    """Parse a config file's text into Settings keyword arguments."""
    out: dict[str, object] = {}
    # lines end at "\n" only, as in Nix (str.splitlines would also split at form feeds and the
    # like, and count lines differently from an editor)
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        loc = f"{where}:{lineno}"
        if not eq:
            raise UsageError(f"{loc}: expected 'key = value', got {line!r}")
        parse_setting(key, value, loc, out)
    return out


def parse_setting(key: str, value: str, loc: str, out: dict[str, object]) -> None:
    """Add the setting ``key = value`` (a config file's line, an ``--option``) to ``out``, the
    Settings keyword arguments read so far; ``loc`` says where it was in an error."""
    field = key.replace("-", "_")
    if key in _LIST_KEYS:
        out[field] = tuple(value.split())
        out.pop(f"extra_{field}", None)  # set after an extra-: the setting wins, as in Nix
        if key == "trusted-public-keys":
            check_public_keys(out[field], f"{loc}: trusted-public-keys")  # type: ignore[arg-type]
    elif key.startswith("extra-") and key[len("extra-"):] in _LIST_KEYS:
        # Nix's extra-substituters / extra-trusted-public-keys: added to the list (of this
        # file, or of the files read before it), not replacing it
        values = tuple(value.split())
        if key == "extra-trusted-public-keys":
            check_public_keys(values, f"{loc}: {key}")
        base = field[len("extra_"):]
        if base in out:
            out[base] = (*out[base], *values)  # type: ignore[misc]
        else:
            out[field] = (*out.get(field, ()), *values)  # type: ignore[misc]
    elif key == "substitute":  # Nix's name for the opposite of offline
        out["offline"] = not _parse_bool(value, f"{loc}: {key}")
    elif key == "max-jobs" and value == "auto":  # Nix's word for the number of cores
        out[field] = os.cpu_count() or 1
    elif key in _INT_KEYS:
        try:
            out[field] = int(value)
        except ValueError:
            raise UsageError(f"{loc}: {key} must be an integer, got {value!r}") from None
        if key in _MIN and out[field] < _MIN[key]:  # type: ignore[operator]
            raise UsageError(f"{loc}: {key} must be at least {_MIN[key]}, got {value!r}")
        if out[field] > INT_SETTING_MAX:  # type: ignore[operator]
            raise UsageError(f"{loc}: {key} must be at most {INT_SETTING_MAX}, got {value!r}")
    elif key in _BOOL_KEYS:
        out[field] = _parse_bool(value, f"{loc}: {key}")
        if key == "sandbox" and not out[field]:
            # never silently weaker than asked: a build outside the sandbox is not offered
            raise UsageError(f"{loc}: sandbox = false is not supported: purestore always builds "
                             f"in the sandbox", hint=("drop this --option" if loc == "--option" else "remove the line")
                             + " (see docs/building.md)")
    elif key in ("store-dir", "store"):
        if key == "store" and not value:  # (it would be the current directory)
            raise UsageError(f"{loc}: store is empty", hint="give the root of a rooted store, or leave "
                             "the setting out for the default root '/'")
        if key == "store-dir":
            try:
                check_store_dir(value)
            except ValueError as e:
                raise UsageError(f"{loc}: {e}") from None
        out["store_dir" if key == "store-dir" else "root"] = value
    elif key in _PATH_KEYS:
        out[field] = value
    else:
        import difflib
        known = [*_LIST_KEYS, *(f"extra-{k}" for k in _LIST_KEYS), "substitute", *_INT_KEYS, *_BOOL_KEYS,
                 "store-dir", "store", *_PATH_KEYS]
        close = difflib.get_close_matches(key, known, n=1)
        raise UsageError(f"{loc}: unknown setting {key!r}",
                         hint=f"did you mean {close[0]!r}?" if close else
                         "the settings are listed in docs/store.md (Settings)")


def load_settings(env: dict[str, str] | None = None, options: Sequence[tuple[str, str]] = (),
                  **overrides) -> Settings:
    """Build Settings from config files, the environment, ``options`` (NAME, VALUE pairs as the
    config file would have them: ``--option NAME VALUE``) and explicit overrides (None = unset)."""
    env = dict(os.environ) if env is None else env
    kw: dict[str, object] = {}

    def merge(parsed: dict[str, object]) -> None:
        for k, v in parsed.items():
            if k.startswith("extra_"):  # appended to what was read before
                kw[k[len("extra_"):]] = (*kw.get(k[len("extra_"):], ()), *v)  # type: ignore[misc]
            else:
                kw[k] = v
    for f in config_files(env):
        try:
            # bytes that are not UTF-8 (in a comment, a path) are kept as they are, as Nix does
            text = f.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            if env.get("PURE_CONFIG"):  # named on purpose: a typo must not pass for "no config"
                raise UsageError(f"config file {str(f)!r} (named by PURE_CONFIG) does not exist",
                                 hint="PURE_CONFIG=/dev/null reads no config file") from None
            continue
        except OSError as e:
            raise UsageError(f"cannot read config file {str(f)!r}: {e.strerror}") from e
        merge(parse_config(text, str(f)))
    if env.get("PURE_STORE"):
        kw["root"] = env["PURE_STORE"]
    if env.get("PURE_STORE_DIR"):
        kw["store_dir"] = env["PURE_STORE_DIR"]
    for name, value in options:
        parsed: dict[str, object] = {}
        parse_setting(name, value.strip(), "--option", parsed)  # (the message names the setting)
        merge(parsed)
    if overrides.get("root") == "":  # `--store ''`: not the current directory
        raise UsageError("--store: the store root is empty",
                         hint="give the root of a rooted store (--store ROOT), or leave the option out")
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if "root" in kw:
        kw["root"] = os.path.abspath(str(kw["root"]))
    s = Settings(**kw)
    try:
        check_store_dir(s.store_dir)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return s
