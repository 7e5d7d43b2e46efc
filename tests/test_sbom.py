"""`pure sbom` on real builds: a busybox-based app, a library it refers to, a file:// fetchurl tarball.

The expression is built with `pure build` in the sandbox; the SBOM then comes from the store.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from conftest import BUSYBOX, run_pure, sandbox_build_reason

from purestore.build.sbom import validate_cyclonedx

REASON = sandbox_build_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

EXPR = '''
import os
from purestore.expr import derivation, source, fetchurl

bb = source("bb", name="busybox")
B = f"{bb}/bin/busybox"
tarball = fetchurl(url="file://" + os.path.join(os.path.dirname(__file__), "greet-1.0.tar"),
                   sha256="@SHA@")
lib = derivation(name="libgreet-1.0", system="x86_64-linux", builder=B,
                 args=["sh", "-c", f"{B} mkdir -p $out/lib && echo greetings > $out/lib/libgreet.txt"])
app = derivation(name="greet-2.0", system="x86_64-linux", builder=B,
                 args=["sh", "-c",
                       f"{B} mkdir -p $out/bin && {B} cat {tarball} > $out/share.txt && "
                       f"echo '#!{B} sh' > $out/bin/greet && "
                       f"echo 'cat {lib}/lib/libgreet.txt' >> $out/bin/greet"])
default = app
'''
TARBALL = b"greet 1.0 sources\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the expression once for the module; return (store root, project dir, app output path)."""
    tmp_path = tmp_path_factory.mktemp("sbom")
    root = tmp_path / "root"
    root.mkdir()
    proj = tmp_path / "proj"
    (proj / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, proj / "bb" / "bin" / "busybox")
    (proj / "greet-1.0.tar").write_bytes(TARBALL)
    (proj / "expr.py").write_text(EXPR.replace("@SHA@", hashlib.sha256(TARBALL).hexdigest()))
    out = run_pure("build", "expr.py", cwd=proj, root=root).stdout.split()[-1]
    return root, proj, out


@pytest.fixture
def store_root(built):
    return built[0]


@pytest.fixture
def project(built):
    return built[1], built[2]


def components(doc):
    comps = {c["bom-ref"]: c for c in doc["components"]}
    comps[doc["metadata"]["component"]["bom-ref"]] = doc["metadata"]["component"]
    return comps


def by_name(comps, name):
    (c,) = [c for c in comps.values() if c["name"] == name]
    return c


def test_cyclonedx_sbom_of_a_build_validates_and_describes_the_closure(pure, project, store_root):
    proj, app = project
    text = pure("sbom", "--validate", "./result", cwd=proj).stdout  # the CLI validates it too
    validate_cyclonedx(text)
    doc = json.loads(text)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    comps = components(doc)
    assert doc["metadata"]["component"]["bom-ref"] == app
    greet = comps[app]
    assert (greet["name"], greet["version"], greet["scope"]) == ("greet", "2.0", "required")
    lib, tar, bb = by_name(comps, "libgreet"), next(c for c in comps.values() if c["name"] == "greet" and c.get("version") == "1.0"), by_name(comps, "busybox")
    # run time vs build time: the app refers to lib and busybox, not to the tarball
    assert lib["scope"] == "required" and bb["scope"] == "required"
    assert tar["scope"] == "excluded"
    props = {p["name"]: p["value"] for p in tar["properties"]}
    assert props["purestore:scope"] == "build"
    # the fetched tarball: its URL and pinned sha256
    (ref,) = tar["externalReferences"]
    assert ref["url"] == f"file://{proj}/greet-1.0.tar"
    assert ref["hashes"] == [{"alg": "SHA-256", "content": hashlib.sha256(TARBALL).hexdigest()}]
    # dependency graph
    deps = {d["ref"]: set(d.get("dependsOn", ())) for d in doc["dependencies"]}
    assert deps[app] == {lib["bom-ref"], tar["bom-ref"], bb["bom-ref"]}
    assert deps[lib["bom-ref"]] == {bb["bom-ref"]}  # busybox built it; lib does not refer to it


def test_component_hash_is_the_nar_hash_pure_hash_path_prints(pure, project, store_root):
    proj, app = project
    doc = json.loads(pure("sbom", app).stdout)
    lib = by_name(components(doc), "libgreet")
    real = str(store_root) + lib["bom-ref"]
    want = pure("hash", "path", "--base16", real).stdout.strip()
    assert lib["hashes"] == [{"alg": "SHA-256", "content": want}]


def test_runtime_only_leaves_out_build_time_components(pure, project):
    proj, app = project
    doc = json.loads(pure("sbom", "--runtime-only", "./result", cwd=proj).stdout)
    names = {c["name"] for c in components(doc).values()}
    assert names == {"greet", "libgreet", "busybox"}
    assert all(c["scope"] == "required" for c in components(doc).values())


def test_sbom_of_the_expression_file_equals_that_of_its_output(pure, project):
    proj, app = project
    a = json.loads(pure("sbom", "expr.py", cwd=proj).stdout)
    b = json.loads(pure("sbom", app).stdout)
    assert components(a).keys() == components(b).keys()


def test_spdx_sbom_of_a_build_validates(pure, project):
    pytest.importorskip("spdx_tools")
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    proj, app = project
    out = proj / "sbom.spdx.json"
    pure("sbom", "--format", "spdx-json", "--validate", "-o", str(out), "./result", cwd=proj)  # (validated by the CLI)
    msgs = validate_full_spdx_document(parse_file(str(out)))
    assert msgs == [], [m.validation_message for m in msgs]
    data = json.loads(out.read_text())
    tar = next(p for p in data["packages"] if p["name"] == "greet" and p.get("versionInfo") == "1.0")
    assert {"referenceCategory": "OTHER", "referenceType": "purestore-fetch-url",
            "referenceLocator": f"file://{proj}/greet-1.0.tar",
            "comment": "a URL this fixed-output derivation fetches from"} in tar["externalRefs"]


def test_sbom_of_a_path_that_is_not_valid_is_a_clean_error(pure):
    p = pure("sbom", "/pure/store/00000000000000000000000000000000-nothing", check=False)
    assert p.returncode != 0 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_sbom_of_the_derivation_equals_that_of_its_output(pure, project):
    proj, app = project
    info = json.loads(pure("store", "path-info", "--json", app).stdout)
    entry = info[0] if isinstance(info, list) else next(iter(info.values())) if app not in info else info[app]
    drv = entry["deriver"]
    a = json.loads(pure("sbom", drv).stdout)
    b = json.loads(pure("sbom", app).stdout)
    assert components(a).keys() == components(b).keys()


def test_a_fetch_url_that_is_not_a_well_formed_uri_is_escaped_not_a_traceback(pure, project):
    """A fetchurl URL with a '%' that starts no escape or a second '#' (taken as given by the
    fetcher) ended `pure sbom` in cyclonedx's InvalidUriException traceback.  CycloneDX now gets
    the URL as a valid URI reference ('%25', '%23'); SPDX and the property keep it as written."""
    proj, _app = project
    url = "https://example.com/100%off.tar?a=%41#frag#more"
    (proj / "odd.py").write_text(
        "from purestore.expr import derivation, source, fetchurl\n"
        "bb = source('bb', name='busybox')\n"
        f"src = fetchurl(url={url!r}, name='off.tar', sha256='{'0' * 64}')\n"
        "default = derivation(name='odd-1.0', system='x86_64-linux', builder=f'{bb}/bin/busybox',\n"
        "                     args=['sh', '-c', f'cat {src} > $out'])\n")
    p = pure("sbom", "--validate", "odd.py", cwd=proj, check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    (comp,) = [c for c in json.loads(p.stdout)["components"] if c["name"] == "off.tar"]
    assert [r["url"] for r in comp["externalReferences"]] == ["https://example.com/100%25off.tar?a=%41#frag%23more"]
    spdx = json.loads(pure("sbom", "--format", "spdx-json", "odd.py", cwd=proj).stdout)
    (pkg,) = [p for p in spdx["packages"] if p["name"] == "off.tar"]
    assert pkg["downloadLocation"] == url


def test_an_expression_file_that_is_not_there_is_named_as_such(pure, project):
    """`pure sbom nothere.py` said "'nothere.py' is neither a store path nor a store path base
    name"; like `pure build`, it says the expression file does not exist."""
    proj, _app = project
    (proj / "dir.py").mkdir(exist_ok=True)
    for name in ("nothere.py", "dir.py"):
        p = pure("sbom", name, cwd=proj, check=False)
        assert p.returncode != 0 and p.stderr.startswith(
            f"error: expression file '{proj / name}' does not exist or is not a file"), p.stderr
    p = pure("sbom", "nothere", cwd=proj, check=False)  # not meant as a file: the store's message
    assert p.returncode != 0 and "neither a store path" in p.stderr
