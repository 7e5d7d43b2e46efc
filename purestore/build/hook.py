"""The post-build hook (Nix's ``post-build-hook``): a program run after each derivation is built.

It runs outside the sandbox, as the user running ``pure``, with the environment of ``pure`` plus

- ``DRV_PATH``: the derivation just built (a store path as printed, e.g. ``/pure/store/…drv``);
- ``OUT_PATHS``: its outputs, space-separated, in the order of their output names;
- ``PURE_STORE`` / ``PURE_STORE_DIR``: the store's root and store dir, so that a ``pure``
  command the hook runs (``pure copy --to URL $OUT_PATHS``) acts on the same store.

Its output (stdout and stderr) is shown line by line as ``NAME (post)> LINE``, as ``nix build
-L`` shows it (a line longer than :data:`MAX_LINE` bytes cut).  It runs only
after a build, never for a path that was already valid or was fetched from a binary cache.
Unlike Nix's, it does not hold up the other builds while it runs; the realisation waits for
every hook before it returns, and a hook that fails (exit status other than 0, or cannot be
started) fails the command: the outputs stay built and valid.
"""

from __future__ import annotations

import os
import signal
import subprocess

import trio

from ..errors import BuildError

TAIL = 20  # lines of a failed hook's output repeated in the error
GRACE = 2.0  # seconds a cancelled hook's processes have between SIGTERM and SIGKILL
MAX_LINE = 4096  # bytes of a line of the hook's output shown; the rest is cut
CUT = " [line cut]"


def resolve_hook(path: str) -> str:
    """The hook's program: a path, or a bare name looked up on ``PATH``."""
    if "/" not in path:
        import shutil
        return shutil.which(path) or path
    return path


def check_hook(path: str) -> None:
    """Fail early (before any build) when the hook cannot be run."""
    given, path = path, resolve_hook(path)
    if "/" not in path:  # a bare name not on PATH: a file of that name here is not what runs
        here = os.path.isfile(given)  # (it passed this check, then could not be run after the build)
        raise BuildError(f"post-build hook {given!r} is not on PATH",
                         hint=f"give './{given}' to run the one in the working directory" if here else
                         "set post-build-hook to an executable program (or '' for none)")
    if not os.path.isfile(path):
        if os.path.exists(path):
            why = "is not a file"
        else:
            why = "is not on PATH" if "/" not in given else "does not exist"
        raise BuildError(f"post-build hook {given!r} {why}",
                         hint="set post-build-hook to an executable program (or '' for none)")
    if not os.access(path, os.X_OK):
        raise BuildError(f"post-build hook {path!r} is not executable", hint=f"chmod +x {path}")


def hook_env(settings, drv_path: str, out_paths: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DRV_PATH=drv_path, OUT_PATHS=" ".join(out_paths), PURE_STORE_DIR=settings.store_dir)
    if settings.rooted:
        env["PURE_STORE"] = settings.root
    else:
        env.pop("PURE_STORE", None)
    return env


async def run_hook(settings, drv_path: str, out_paths: list[str], emit) -> None:
    """Run the hook for one built derivation; ``emit(line)`` gets each line of its output.
    Raises :class:`BuildError` when it fails."""
    hook = settings.post_build_hook
    tail: list[str] = []
    try:
        proc = await trio.lowlevel.open_process(
            [resolve_hook(hook)], env=hook_env(settings, drv_path, out_paths), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: what it starts is stopped with it
    except OSError as e:
        raise BuildError(f"post-build hook {hook!r} for {drv_path} cannot be run: {e.strerror}") from e
    code = None
    try:
        lines = _Lines()
        async with proc.stdout:
            while chunk := await proc.stdout.receive_some(65536):
                for line in lines.feed(chunk):
                    tail = (tail + [line])[-TAIL:]
                    emit(line)
            for line in lines.end():
                tail = (tail + [line])[-TAIL:]
                emit(line)
        code = await proc.wait()
    finally:
        if code is None:  # cancelled (Ctrl-C, another build failed): stop it and its children
            with trio.CancelScope(shield=True):
                await _stop_group(proc)
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        shown = "\n".join(f"  {line}" for line in tail)
        raise BuildError(f"post-build hook {hook!r} {how} after building {drv_path}; its outputs are "
                         f"built and valid" + (f"; its last lines:\n{shown}" if tail else ""))


class _Lines:
    """Splits output into lines of at most :data:`MAX_LINE` bytes: a longer one (a hook that
    prints a binary file) is shown cut, ending with :data:`CUT`, and the rest of it skipped, so
    that memory and time stay linear in the output (the whole unfinished line was kept and split
    again for every chunk read)."""

    def __init__(self):
        self.buf = b""
        self.skipping = False  # in the rest of a cut line

    def feed(self, chunk: bytes) -> list[str]:
        out = []
        start = 0
        while (nl := chunk.find(b"\n", start)) >= 0:
            if not self.skipping:
                out.append(self._text(self.buf + chunk[start:nl]))
            self.buf, self.skipping, start = b"", False, nl + 1
        if not self.skipping:
            self.buf += chunk[start:]
            if len(self.buf) > MAX_LINE:
                out.append(self._text(self.buf))
                self.buf, self.skipping = b"", True
        return out

    def end(self) -> list[str]:
        return [self._text(self.buf)] if self.buf else []

    @staticmethod
    def _text(raw: bytes) -> str:
        if len(raw) > MAX_LINE:
            return raw[:MAX_LINE].decode("utf-8", "replace") + CUT
        return raw.decode("utf-8", "replace").rstrip("\r")


async def _stop_group(proc) -> None:
    """Stop a cancelled hook and every process it started (its process group, which a shell
    script's children share): SIGTERM, then SIGKILL after :data:`GRACE` seconds.  A hook running
    ``pure copy --to`` without ``exec`` kept uploading after pure had exited."""
    def signal_group(sig) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    signal_group(signal.SIGTERM)
    with trio.move_on_after(GRACE):
        await proc.wait()
    signal_group(signal.SIGKILL)  # what is left of the group (and the hook, if it is still there)
    await proc.wait()  # (the hook itself; a child that had exited the group is not waited for)
