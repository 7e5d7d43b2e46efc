"""`pure why-depends PATH DEP`: the reference chain, the files that hold each reference."""

import json

import pytest

from purestore.store.local import LocalStore


@pytest.fixture
def chain(settings):
    """a -> b -> c, a -> d (no path to c through d), and an unrelated e."""
    with LocalStore.open(settings, durable=False) as store:
        c = store.add_text("c", b"leaf\n")
        e = store.add_text("e", b"unrelated\n")
        d = store.add_text("d", b"nothing\n")
        b = store.add_text("b", f"exec {store.print_path(c)}/bin/x\n".encode(), [c])
        a = store.add_text("a", f"{store.print_path(b)}\n{store.print_path(d)}\n".encode(), [b, d])
        return {k: store.print_path(v) for k, v in dict(a=a, b=b, c=c, d=d, e=e).items()}


def test_shortest_chain_is_printed_with_the_referring_file(pure, chain):
    out = pure("why-depends", chain["a"], chain["c"]).stdout.splitlines()
    assert out[0] == chain["a"]
    assert out[1].startswith("└───" + chain["b"])
    assert out[2].startswith("    └───" + chain["c"])
    assert len(out) == 3


def test_json_names_the_files_that_hold_the_hash(pure, chain):
    got = json.loads(pure("why-depends", "--json", chain["a"], chain["c"]).stdout)
    assert [x["path"] for x in got] == [chain["a"], chain["b"], chain["c"]]
    assert got[0]["files"] == [""] and got[1]["files"] == [""]  # text paths are single files


def test_no_dependency_exits_1_with_a_message(pure, chain):
    p = pure("why-depends", chain["a"], chain["e"], check=False)
    assert p.returncode == 1
    assert "does not depend on" in p.stderr and p.stdout == ""


def test_no_dependency_with_json_prints_an_empty_list(pure, chain):
    """--json: stdout is JSON also when there is no route (it was empty, exit 1), with or
    without --all; the exit status and the message stay."""
    for extra in ([], ["--all"]):
        p = pure("why-depends", "--json", *extra, chain["a"], chain["e"], check=False)
        assert p.returncode == 1
        assert json.loads(p.stdout) == [] and "does not depend on" in p.stderr


def test_all_shows_every_route_as_a_tree(pure, settings):
    with LocalStore.open(settings, durable=False) as store:
        z = store.add_text("z", b"z\n")
        x = store.add_text("x", f"{store.print_path(z)}".encode(), [z])
        y = store.add_text("y", f"{store.print_path(z)}".encode(), [z])
        top = store.add_text("top", f"{store.print_path(x)} {store.print_path(y)}".encode(), [x, y])
        P = store.print_path
        out = pure("why-depends", "--all", P(top), P(z)).stdout
    assert out.splitlines()[0] == P(top)
    assert P(x) in out and P(y) in out and out.count(P(z)) == 2


def test_invalid_path_is_a_clean_error(pure, chain):
    p = pure("why-depends", chain["a"], "/pure/store/00000000000000000000000000000000-nope", check=False)
    assert p.returncode != 0 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_all_with_json_gives_every_route_not_only_the_shortest(pure, settings):
    """--all --json printed the shortest chain only, as --json alone: one route of several."""
    with LocalStore.open(settings, durable=False) as store:
        z = store.add_text("z", b"z\n")
        x = store.add_text("x", f"{store.print_path(z)}".encode(), [z])
        y = store.add_text("y", f"{store.print_path(z)}".encode(), [z])
        w = store.add_text("w", b"w\n")
        top = store.add_text("top", f"{store.print_path(x)} {store.print_path(y)} {store.print_path(w)}".encode(),
                             [x, y, w])
        P = store.print_path
        got = json.loads(pure("why-depends", "--all", "--json", P(top), P(z)).stdout)
    by_path = {n["path"]: n for n in got}
    assert got[0]["path"] == P(top) and got[-1] == {"path": P(z)}
    assert set(by_path) == {P(top), P(x), P(y), P(z)}  # w leads nowhere
    assert by_path[P(top)]["references"] == sorted(
        [{"path": P(x), "files": [""]}, {"path": P(y), "files": [""]}], key=lambda r: r["path"])
    assert by_path[P(x)]["references"] == [{"path": P(z), "files": [""]}]


def test_a_path_depends_on_itself_in_every_form(pure, chain):
    """PATH and DEP the same path: the route is that path alone, in the text and JSON forms,
    with --all or without.  --all --json ended in a KeyError traceback, and --all printed
    nothing."""
    a = chain["a"]
    assert pure("why-depends", a, a).stdout == f"{a}\n"
    assert pure("why-depends", "--all", a, a).stdout == f"{a}\n"
    assert json.loads(pure("why-depends", "--json", a, a).stdout) == [{"path": a}]
    p = pure("why-depends", "--all", "--json", a, a, check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert json.loads(p.stdout) == [{"path": a}]


def test_all_of_a_long_chain(pure, settings):
    """--all over a chain of more than 1000 paths was a RecursionError traceback: it is
    answered as without --all."""
    with LocalStore.open(settings, durable=False) as store:
        prev = first = store.add_text("c0", b"leaf\n")
        for i in range(1, 1200):
            prev = store.add_text(f"c{i}", f"{store.print_path(prev)}\n".encode(), [prev])
        top, leaf = store.print_path(prev), store.print_path(first)
    out = pure("why-depends", "--all", top, leaf).stdout.splitlines()
    assert len(out) == 1200 and out[0] == top and out[-1].endswith("└───" + leaf)
    got = json.loads(pure("why-depends", "--all", "--json", top, leaf).stdout)
    assert len(got) == 1200 and got[0]["path"] == top and got[-1] == {"path": leaf}


def test_all_expands_a_shared_path_once(pure, settings):
    """Shared paths (25 levels of two paths, each referring to both of the next): --all
    expanded every route, 2**25 of them (it ran for ever); a path whose routes were shown
    already is now shown again without them, as Nix does, and says so."""
    with LocalStore.open(settings, durable=False) as store:
        P = store.print_path
        z = store.add_text("z", b"z")
        level = [z]
        for i in range(25):
            text = " ".join(P(r) for r in level).encode()
            level = [store.add_text(f"l{i}a", text + b"a", level), store.add_text(f"l{i}b", text + b"b", level)]
        top = store.add_text("top", " ".join(P(r) for r in level).encode(), level)
        every = {P(p) for p in store.query_closure([top])} - {P(top)}
    out = pure("why-depends", "--all", P(top), P(z), timeout=60).stdout.splitlines()
    assert out[0] == P(top) and len(out) == 101, len(out)  # each of the 50 shared paths twice
    assert {line.split("───")[1].split()[0] for line in out[1:]} == every
    again = [line for line in out if line.endswith("  (its routes onwards are shown above)")]
    assert len(again) == 48  # all but the two under top, met once only
    assert sum(line.endswith("───" + P(z)) for line in out) == 2
