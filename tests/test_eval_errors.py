"""Errors point into the user's expression: syntax errors, exceptions, missing attributes,
bad derivation() arguments, cycles."""

from __future__ import annotations

import textwrap

import pytest

from conftest import run_pure
from purestore.errors import DerivationArgumentError, EvalError
from purestore.expr.loader import evaluate, topo_order
from purestore.expr import derivation, evaluating


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def ev(file, attr=None, **kw):
    return evaluate(str(file), attr, store_dir="/pure/store", env={}, **kw)


def test_syntax_error_shows_file_line_and_the_line(tmp_path):
    f = write(tmp_path / "expr.py", "x = 1\ndef f(:\n    pass\n")
    with pytest.raises(EvalError) as ei:
        ev(f)
    msg = str(ei.value)
    assert msg.startswith(f"syntax error in {f}:2: ")
    assert "    def f(:\n" in msg and msg.rstrip().endswith("^")


def test_syntax_error_in_an_imported_sibling_names_the_sibling_and_the_import(tmp_path):
    write(tmp_path / "broken.py", "x = (\n")
    f = write(tmp_path / "expr.py", "import broken\n")
    with pytest.raises(EvalError) as ei:
        ev(f)
    msg = str(ei.value)
    assert f"syntax error in {tmp_path / 'broken.py'}:1" in msg
    assert f'File "{f}", line 1, in <module>' in msg


def test_exception_shows_only_expression_frames(tmp_path):
    write(tmp_path / "helper.py", "import json\ndef make():\n    return json.loads('{bad')\n")
    f = write(tmp_path / "expr.py", "import helper\ndefault = helper.make()\n")
    with pytest.raises(EvalError) as ei:
        ev(f)
    msg = str(ei.value)
    assert msg.startswith(f"evaluating {f} failed: JSONDecodeError: ")
    assert f'File "{f}", line 2, in <module>\n    default = helper.make()' in msg
    assert f'File "{tmp_path / "helper.py"}", line 3, in make' in msg
    assert "json/decoder.py" not in msg and "importlib" not in msg and "loader.py" not in msg


def test_missing_default_and_missing_attribute_list_the_available_ones(tmp_path):
    f = write(tmp_path / "expr.py", """
        from purestore.expr import derivation
        a = derivation(name="a", system="x", builder="/b")
        pkgs = {"b": a, "c": [a]}
        def helper(): pass
    """)
    with pytest.raises(EvalError, match=r"defines no 'default'; choose a value with -A ATTR; available: a, pkgs$"):
        ev(f)
    with pytest.raises(EvalError, match=r"attribute 'nope' not found: .*expr.py has no 'nope'; available: a, pkgs"):
        ev(f, "nope")
    with pytest.raises(EvalError, match=r"attribute 'pkgs.d' not found: pkgs has no 'd'; available: b, c"):
        ev(f, "pkgs.d")
    assert ev(f, "pkgs.c.0").selected[0].name == "a"
    assert ev(f, "pkgs").selected[0].name == "a"


def test_a_missing_attribute_among_thousands_lists_some_the_closest_first(tmp_path):
    """Of a set of 5000 names, the error lists 30 (the closest to the one asked for first) and
    how many more there are; it listed all 5000 (an error of 40 KiB)."""
    f = write(tmp_path / "expr.py", """
        pkgs = {f"p{i}": i for i in range(5000)}
    """)
    with pytest.raises(EvalError) as ei:
        ev(f, "pkgs.p49999")
    msg = str(ei.value)
    assert msg.startswith("attribute 'pkgs.p49999' not found: pkgs has no 'p49999'; available: p4999, ")
    assert msg.endswith(", … (4970 more)") and msg.count(", ") == 30


def test_selected_value_must_hold_derivations(tmp_path):
    f = write(tmp_path / "expr.py", "default = {'x': 3}\n")
    with pytest.raises(EvalError, match=r"x is int 3; expected a derivation, or a list or dict of derivations"):
        ev(f)
    assert ev(f, allow_values=True).value == {"x": 3}


def test_a_value_that_contains_itself_is_named_and_a_deep_one_is_walked(tmp_path):
    """A list or dict holding itself was walked until RecursionError, a traceback from pure
    build and pure eval; now an error naming where. A deeply nested (acyclic) value is walked
    and, for pure eval, printed as text; as JSON it is an error (it was a traceback), and so is
    an int too long to print."""
    f = write(tmp_path / "expr.py", """\
        from purestore.expr import derivation
        a = derivation(name="a", system="x86_64-linux", builder="/bin/sh")
        x = [a]
        x.append(x)
        d = {"a": a, "more": {}}
        d["more"]["back"] = d
        shared = [a]
        fine = {"one": shared, "two": (shared, [shared])}
        deep = a
        for _ in range(5000):
            deep = [deep]
        big = 10 ** 5000
    """)
    with pytest.raises(EvalError, match=r"^x\[1\] is x again, a list that contains itself \(a cycle\)"):
        ev(f, "x")
    with pytest.raises(EvalError, match=r"^d.more.back is d again, a dict that contains itself"):
        ev(f, "d", allow_values=True)
    assert len(ev(f, "fine").selected) == 1 and len(ev(f, "deep").selected) == 1
    root = tmp_path / "root"
    for args, said in [(["build", f, "-A", "x"], "error: x[1] is x again"),
                       (["eval", f, "-A", "d"], "error: d.more.back is d again"),
                       (["eval", f, "-A", "deep", "--json"], "error: the value of 'deep' is nested too deeply to print as JSON"),
                       (["eval", f, "-A", "big"], "error: cannot print the value of 'big': Exceeds the limit")]:
        p = run_pure(*args, root=root, check=False)
        assert p.returncode == 1 and p.stderr.startswith(said), (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr
    p = run_pure("eval", f, "-A", "deep", root=root)
    assert p.stdout.count("/pure/store/") == 1


def test_a_missing_module_says_where_it_was_looked_for(tmp_path):
    """ModuleNotFoundError gave "No module named 'pkgs.seeds'" alone, also when PURE_PKGS
    named no directory: the hint says where modules (and the package set) were looked for."""
    f = write(tmp_path / "e" / "expr.py", "from pkgs.seeds import busybox\n")
    with pytest.raises(EvalError) as ei:
        evaluate(str(f), None, store_dir="/pure/store", env={"PURE_PKGS": str(tmp_path / "nowhere")})
    assert "No module named 'pkgs.seeds'" in str(ei.value)
    assert ei.value.hint == f"the package set {str(tmp_path / 'nowhere')!r} is not a directory (PURE_PKGS names it)"
    g = write(tmp_path / "e" / "other.py", "import helpers_not_there\n")
    with pytest.raises(EvalError) as ei:
        evaluate(str(g), None, include_paths=[str(tmp_path / "inc")], store_dir="/pure/store", env={})
    assert ei.value.hint == (f"modules are looked for in {tmp_path / 'e'}, {tmp_path / 'inc'} "
                             "(the expression's directory, -I, PURE_PATH)")
    p = run_pure("eval", f, root=tmp_path / "root", env={"PURE_PKGS": str(tmp_path / "nowhere")}, check=False)
    assert p.returncode == 1 and p.stderr.splitlines()[-1].startswith("hint: the package set ")


BAD_ARGS = [
    (dict(system="x", builder="/b"), "required attribute 'name' is missing"),
    (dict(name="n", builder="/b"), "derivation 'n': required attribute 'system' is missing"),
    (dict(name=3, system="x", builder="/b"), "attribute 'name' must be a string, got int 3"),
    (dict(name="a b", system="x", builder="/b"), "attribute 'name' is not a valid store path name"),
    (dict(name="a.drv", system="x", builder="/b"), "must not end in '.drv'"),
    (dict(name="n", system="x", builder="/b", args="-c x"), "attribute 'args' must be a list, got str '-c x'"),
    (dict(name="n", system="x", builder="/b", outputs="out"), "attribute 'outputs' must be a list of strings, got str 'out'"),
    (dict(name="n", system="x", builder="/b", outputs=["out", "out"]), "duplicate output 'out'"),
    (dict(name="n", system="x", builder="/b", outputs=["drv"]), "invalid output name 'drv'"),
    (dict(name="n", system="x", builder="/b", x={"a": 1}), "attribute 'x' must be a string, bool, None, int, float, list, derivation, output or source, got dict {'a': 1}"),
    (dict(name="n", system="x", builder="/b", x=[1, object]), "attribute 'x' must be a string"),
    (dict(name="n", system="x", builder="/b", outputHash="sha256:zz"), "attribute 'outputHash' (outputHashAlgo '') is not a valid hash"),
    (dict(name="n", system="x", builder="/b", outputHash="abc", outputHashAlgo="md4"), "'outputHashAlgo' must be one of md5, sha1, sha256, sha512 (or empty with an SRI hash), got 'md4'"),
    (dict(name="n", system="x", builder="/b", outputHash="sha1-qvTGHdzF6KLavt4PO0gs2a6pQ00=", outputHashAlgo="sha256"), "is sha1, expected sha256"),
    (dict(name="n", system="x", builder="/b", outputHash="sha1-qvTGHdzF6KLavt4PO0gs2a6pQ00=", outputHashMode="nar"), "'outputHashMode' must be 'flat' or 'recursive', got 'nar'"),
    (dict(name="n", system="x", builder="/b", outputHash="sha1-qvTGHdzF6KLavt4PO0gs2a6pQ00=", outputs=["out", "dev"]), "must have the single output 'out'"),
    (dict(name="n", system="x", builder="/b", __structuredAttrs=True), "'__structuredAttrs' is not supported"),
]


@pytest.mark.parametrize("kw, msg", BAD_ARGS, ids=[m[:30] for _, m in BAD_ARGS])
def test_bad_derivation_argument_names_field_expected_and_value(kw, msg):
    with evaluating("/pure/store"):
        with pytest.raises(DerivationArgumentError) as ei:
            derivation(**kw)
    assert msg in str(ei.value)
    assert isinstance(ei.value, TypeError)


def test_bad_argument_in_a_file_points_at_the_line(tmp_path):
    f = write(tmp_path / "expr.py", """
        from purestore.expr import derivation
        x = 1
        default = derivation(name="x", system="x", builder="/b", outputs="out")
    """)
    with pytest.raises(DerivationArgumentError) as ei:
        ev(f)
    assert f'File "{f}", line 4, in <module>' in str(ei.value)


def test_import_cycle_is_named(tmp_path):
    write(tmp_path / "b.py", "import a\ny = a.x\n")
    write(tmp_path / "a.py", "import b\nx = 1\n")
    f = write(tmp_path / "expr.py", "import a\ndefault = []\n")
    with pytest.raises(EvalError, match=r"import cycle: a -> b -> a: 'b' uses a.x before 'a' has finished loading"):
        ev(f)


def test_from_import_cycle_is_named(tmp_path):
    write(tmp_path / "b.py", "from a import x\n")
    write(tmp_path / "a.py", "from b import y\nx = 1\n")
    f = write(tmp_path / "expr.py", "import a\n")
    with pytest.raises(EvalError, match=r"import cycle: a -> b -> a"):
        ev(f)


def test_dependency_cycle_between_derivations_is_named():
    # derivations are immutable values, so a cycle can only come from tampering; the graph walk still names it
    with evaluating("/pure/store"):
        a = derivation(name="a", system="x", builder="/b")
        b = derivation(name="b", system="x", builder="/b", dep=a)
    a.input_drvs[b.drv_path] = b
    with pytest.raises(EvalError, match=r"dependency cycle between derivations: (a -> b -> a|b -> a -> b)"):
        topo_order([b])


def test_missing_file_and_cli_exit_status(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        ev(tmp_path / "nope.py")
    p = run_pure("instantiate", tmp_path / "nope.py", root=tmp_path / "root", check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: expression file") and "Traceback" not in p.stderr


def test_api_outside_an_evaluation_says_how_to_use_it():
    with pytest.raises(EvalError, match="work only during an evaluation"):
        derivation(name="x", system="x", builder="/b")


@pytest.mark.parametrize("code, said", [("sys.exit(0)", "sys.exit(0)"), ("sys.exit(3)", "sys.exit(3)"),
                                        ("raise SystemExit", "sys.exit(None)")])
def test_an_expression_that_exits_is_an_error_not_the_commands_exit(tmp_path, code, said):
    """sys.exit() in an expression used to end `pure` silently with its status: `sys.exit(0)`
    made `pure build` print nothing, build nothing and succeed."""
    f = write(tmp_path / "expr.py", f"import sys\n{code}\n")
    with pytest.raises(EvalError) as ei:
        ev(f)
    assert f"the expression called {said}" in str(ei.value)
    assert f'File "{f}", line 2, in <module>' in str(ei.value)
    p = run_pure("instantiate", f, root=tmp_path / "root", check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: evaluating") and "Traceback" not in p.stderr


def test_a_base_exception_of_the_expression_is_an_error_not_a_traceback(tmp_path):
    f = write(tmp_path / "expr.py", "class Stop(BaseException):\n    pass\nraise Stop('here')\n")
    p = run_pure("instantiate", f, root=tmp_path / "root", check=False)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"error: evaluating {f} failed: Stop: here\n") and "Traceback" not in p.stderr


def test_deep_recursion_shows_the_repeated_frame_once_with_a_count(tmp_path):
    f = write(tmp_path / "expr.py", "def f(n):\n    return f(n + 1)\ndefault = f(0)\n")
    with pytest.raises(EvalError) as ei:
        ev(f)
    msg = str(ei.value)
    assert "RecursionError" in msg
    assert msg.count(f'File "{f}", line 2, in f') == 1
    assert "[previous frame repeated " in msg and len(msg.splitlines()) < 12


def test_a_nul_byte_is_a_syntax_error_with_its_line(tmp_path):
    f = tmp_path / "expr.py"
    f.write_bytes(b'x = 1\ny = "\0"\n')
    with pytest.raises(EvalError, match=rf"^syntax error in {f}:2: .*null bytes"):
        ev(f)


def test_a_missing_output_lists_the_derivations_outputs(tmp_path):
    """`-A lib.dev` of a derivation without 'dev' said 'available: (none)'."""
    f = write(tmp_path / "expr.py", """
        from purestore.expr import derivation
        lib = derivation(name="lib", system="x", builder="/b", outputs=["out", "doc"])
    """)
    with pytest.raises(EvalError, match=r"^attribute 'lib.dev' not found: lib has no 'dev'; available: out, doc$"):
        ev(f, "lib.dev")


def _signal_during_evaluation(tmp_path, body: str, sig, sigint, timeout: float = 60) -> tuple[int, str]:
    """`pure instantiate` of an expression that opens the FIFO ``{go}`` (``body`` formatted
    with its name) and sent ``sig`` once it has (the open returns then: it is being evaluated),
    with SIGINT's disposition set to ``sigint``; returns (status, stderr).  A pure that the
    signal did not stop is SIGKILLed after ``timeout`` seconds (status -9), so that a test of
    that fails instead of hanging."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    from conftest import pure_env
    go = tmp_path / "go"
    os.mkfifo(go)
    f = write(tmp_path / "expr.py", body.format(go=repr(str(go))))
    p = subprocess.Popen([sys.executable, "-m", "purestore.cli.main", "instantiate", str(f)],
                         env=pure_env(tmp_path / "root"), stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))

    def unblock_if_it_ended_early():  # so that the open below cannot wait for ever
        p.wait()
        os.close(os.open(go, os.O_RDONLY | os.O_NONBLOCK))
    threading.Thread(target=unblock_if_it_ended_early, daemon=True).start()
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    try:
        with open(go, "w"):  # returns once the expression has opened it: it is being evaluated
            if p.poll() is None:
                p.send_signal(sig)
            err = p.stderr.read()
            return p.wait(), err
    finally:
        killer.cancel()


def test_sigterm_during_evaluation_in_a_background_job_ends_pure_as_sigterm_does(tmp_path):
    """In a background job of a non-interactive shell (SIGINT ignored), SIGTERM ends pure by its
    default action.  During an evaluation, the handler's os.kill() was refused by pure mode and
    came out as 'pure evaluation refused to run a process (os.kill ...)', status 1."""
    import signal
    status, err = _signal_during_evaluation(tmp_path, "data = open({go}).read()\n", signal.SIGTERM,
                                            signal.SIG_IGN)
    assert status == -signal.SIGTERM, err
    assert "refused" not in err


@pytest.mark.parametrize("sig, status, said", [("SIGINT", 130, "error: interrupted"),
                                               ("SIGTERM", 143, "error: terminated (SIGTERM)")])
def test_an_interrupt_the_expression_swallows_still_interrupts(tmp_path, sig, status, said):
    """An expression's bare `except:` caught the KeyboardInterrupt of Ctrl-C (or SIGTERM): the
    evaluation went on and pure failed later with an unrelated error, status 1."""
    import signal
    rc, err = _signal_during_evaluation(tmp_path, "try:\n    open({go}).read()\nexcept:\n    pass\ndefault = 1\n",
                                        getattr(signal, sig), signal.SIG_DFL)
    assert (rc, err.strip()) == (status, said)


def test_ctrl_c_stops_an_expression_that_ignores_sigint(tmp_path):
    """An expression that set SIGINT to SIG_IGN made pure deaf to Ctrl-C for the rest of its
    evaluation (here: for ever).  It cannot change the handler now, and Ctrl-C stops pure."""
    import signal
    body = ("import signal\ntry:\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\nexcept ValueError:\n"
            "    pass\ndata = open({go}).read()\n")
    rc, err = _signal_during_evaluation(tmp_path, body, signal.SIGINT, signal.SIG_DFL)
    assert (rc, err.strip()) == (130, "error: interrupted")


@pytest.mark.parametrize("sig, status, said", [("SIGINT", 130, "error: interrupted"),
                                               ("SIGTERM", 143, "error: terminated (SIGTERM)")])
def test_an_expression_that_keeps_catching_the_interrupt_is_still_stopped(tmp_path, sig, status, said):
    """A loop that caught every KeyboardInterrupt kept pure evaluating after Ctrl-C (or SIGTERM):
    the interrupt was noted but acted on only once the evaluation ended, which it never did."""
    import signal
    body = "while True:\n    try:\n        open({go}).read()\n    except KeyboardInterrupt:\n        pass\n"
    rc, err = _signal_during_evaluation(tmp_path, body, getattr(signal, sig), signal.SIG_DFL)
    assert (rc, err.strip()) == (status, said)


def test_an_expression_may_not_set_a_signal_handler(tmp_path):
    """signal.signal() in an expression is an evaluation error that says why (it replaced pure's
    own handler, in the process that evaluates)."""
    f = write(tmp_path / "expr.py", """
        import signal
        signal.signal(signal.SIGINT, signal.getsignal(signal.SIGINT))
        default = 1
    """)
    with pytest.raises(EvalError, match="signal only works in main thread") as ei:
        ev(f, allow_values=True)
    assert "line 3" in str(ei.value)
    assert "cannot change how pure handles signals" in ei.value.hint


def test_deep_recursion_with_an_unlimited_stack_is_evaluated_as_in_the_main_thread(tmp_path):
    """With `ulimit -s unlimited` the main thread's stack may grow without bound, but a thread
    gets glibc's default of 2 MiB: since the expression runs in a thread of its own, an
    expression that raises the recursion limit and recurses deeply (here through __init__, a C
    frame per level) crashed pure with SIGSEGV, where it had evaluated in the main thread."""
    import resource
    import subprocess
    import sys

    from conftest import pure_env
    if resource.getrlimit(resource.RLIMIT_STACK)[1] != resource.RLIM_INFINITY:
        pytest.skip("the hard stack limit is not unlimited: `ulimit -s unlimited` is not allowed here")
    f = write(tmp_path / "deep.py", """
        import sys
        sys.setrecursionlimit(30000)
        class Node:
            def __init__(self, n):
                self.child = Node(n - 1) if n else None
        def depth(node):
            d = 0
            while node is not None:
                d, node = d + 1, node.child
            return d
        default = depth(Node(12000))
    """)

    def unlimited_stack():
        resource.setrlimit(resource.RLIMIT_STACK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    p = subprocess.run([sys.executable, "-m", "purestore.cli.main", "eval", str(f)], capture_output=True,
                       text=True, env=pure_env(tmp_path / "store"), preexec_fn=unlimited_stack, timeout=120)
    assert (p.returncode, p.stdout.strip()) == (0, "12001"), p.stderr
