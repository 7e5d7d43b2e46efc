"""build/sbom: collecting the graph and rendering CycloneDX / SPDX, on a hand-made store view.

The store and derivations are plain dicts here so that the graph logic is tested on its own;
tests/test_sbom.py runs the same code through `pure sbom` on real builds.
"""

import datetime
import json
import re

import pytest

from purestore.build.sbom import (
    DrvView, FixedOutput, PathView, collect_sbom, parse_drv_name, render_cyclonedx, render_spdx,
    validate_cyclonedx,
)
from purestore.errors import SbomError
from purestore.formats.hash import Hash

SD = "/pure/store"
H = {n: f"{c * 32}" for n, c in zip(["src", "fod", "tool", "lib", "app", "drvs"], "abcdfg")}


def p(key, name):
    return f"{SD}/{H[key][:31]}{key[0]}-{name}"


TARBALL = p("fod", "hello-2.10.tar.gz")
TOOL = p("tool", "busybox")
LIB = p("lib", "libfoo-1.0")
APP = p("app", "hello-2.10")
SRC = p("src", "builder.sh")
D = {k: f"{SD}/{'z' * 31}{i}-{k}.drv" for i, k in zip("0123", ["fod", "tool", "lib", "app"])}

PINNED = Hash.of_bytes(b"tarball")
NAR = {x: Hash.of_bytes(x.encode()) for x in (TARBALL, TOOL, LIB, APP, SRC)}

DRVS = {
    D["fod"]: DrvView(D["fod"], "hello-2.10.tar.gz", "x86_64-linux", {"url": "file:///srv/hello-2.10.tar.gz"},
                      {"out": TARBALL}, {}, (), FixedOutput(("file:///srv/hello-2.10.tar.gz",), PINNED, False)),
    D["tool"]: DrvView(D["tool"], "busybox", "x86_64-linux", {}, {"out": TOOL}, {}, (), None),
    D["lib"]: DrvView(D["lib"], "libfoo-1.0", "x86_64-linux", {}, {"out": LIB},
                      {D["tool"]: ("out",)}, (SRC,), None),
    D["app"]: DrvView(D["app"], "hello-2.10", "x86_64-linux", {"pname": "hello", "version": "2.10"},
                      {"out": APP}, {D["fod"]: ("out",), D["tool"]: ("out",), D["lib"]: ("out",)},
                      (SRC,), None),
}
INFOS = {
    TARBALL: PathView(NAR[TARBALL], 100, (), D["fod"]),
    TOOL: PathView(NAR[TOOL], 200, (), D["tool"]),
    LIB: PathView(NAR[LIB], 300, (LIB,), D["lib"]),
    APP: PathView(NAR[APP], 400, (APP, LIB), D["app"]),
    SRC: PathView(NAR[SRC], 50, (), None),
}
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def collect(targets=(APP,), infos=INFOS, drvs=DRVS):
    return collect_sbom(targets, path_info=infos.get, read_drv=drvs.get)


def test_parse_drv_name_follows_nix():
    assert parse_drv_name("hello-2.10") == ("hello", "2.10")
    assert parse_drv_name("gcc-wrapper-13.2") == ("gcc-wrapper", "13.2")
    assert parse_drv_name("busybox") == ("busybox", None)
    assert parse_drv_name("hello-2.10.tar.gz") == ("hello", "2.10")
    assert parse_drv_name("zig-0.17.0.whl") == ("zig", "0.17.0")


def test_build_closure_runtime_split_and_edges():
    s = collect()
    assert set(s.components) == {TARBALL, TOOL, LIB, APP, SRC}
    runtime = {x for x, c in s.components.items() if c.runtime}
    assert runtime == {APP, LIB}
    assert s.runtime_deps[APP] == (LIB,)
    assert set(s.build_deps[APP]) == {TARBALL, TOOL, SRC}
    assert s.components[APP].name == "hello" and s.components[APP].version == "2.10"
    assert s.components[TARBALL].fixed.urls == ("file:///srv/hello-2.10.tar.gz",)
    assert s.components[APP].target and not s.components[LIB].target
    assert set(s.runtime_only().components) == {APP, LIB}


def test_a_drv_target_gives_the_same_components():
    assert set(collect([D["app"]]).components) == set(collect().components)


def test_unknown_target_is_an_error():
    with pytest.raises(SbomError, match="not valid"):
        collect([p("src", "nothing")])
    with pytest.raises(SbomError, match="not in the store"):
        collect([D["app"].replace("-app", "-other")])


def test_missing_deriver_is_a_warning_and_the_runtime_closure_is_still_listed():
    s = collect(drvs={})
    assert set(s.components) == {APP, LIB}
    assert any("not in the store" in w for w in s.warnings)


def test_cyclonedx_validates_and_carries_hashes_urls_and_scopes():
    text = render_cyclonedx(collect(), NOW)
    validate_cyclonedx(text)
    doc = json.loads(text)
    assert doc["specVersion"] == "1.6"
    assert doc["metadata"]["component"]["bom-ref"] == APP
    comps = {c["bom-ref"]: c for c in doc["components"]}
    comps[APP] = doc["metadata"]["component"]
    assert comps[APP]["scope"] == "required" and comps[LIB]["scope"] == "required"
    assert comps[TOOL]["scope"] == "excluded" and comps[TARBALL]["scope"] == "excluded"
    assert comps[LIB]["hashes"] == [{"alg": "SHA-256", "content": NAR[LIB].base16}]
    (ref,) = comps[TARBALL]["externalReferences"]
    assert ref["url"] == "file:///srv/hello-2.10.tar.gz" and ref["type"] == "distribution"
    assert ref["hashes"] == [{"alg": "SHA-256", "content": PINNED.base16}]
    deps = {d["ref"]: set(d.get("dependsOn", ())) for d in doc["dependencies"]}
    assert deps[APP] == {LIB, TARBALL, TOOL, SRC}
    assert deps[LIB] == {TOOL, SRC}
    # Same input, same document (serial number included).
    assert render_cyclonedx(collect(), NOW) == text


def test_cyclonedx_validator_rejects_a_broken_document():
    doc = json.loads(render_cyclonedx(collect(), NOW))
    doc["components"][0]["scope"] = "sometimes"
    with pytest.raises(SbomError, match="does not validate"):
        validate_cyclonedx(json.dumps(doc))
    # not JSON, not an object, a spec version that is no string: SbomError, not a traceback
    for text, match in (("nope", "not JSON"), ("[]", "not a JSON object but list"),
                        ('{"specVersion": 5}', "unknown CycloneDX spec version 5")):
        with pytest.raises(SbomError, match=match):
            validate_cyclonedx(text)


def test_spdx_validation_passes_ours_and_refuses_tampered_documents():
    """`--validate --format spdx-json` validates for real (it passed anything before): our
    document passes the SPDX project's parser and validator; broken ones are refused with
    what is wrong and where."""
    from purestore.build.sbom import render
    from purestore.build.sbom_validation import validate_spdx
    text = render(collect(), "spdx-json", NOW, validate=True)
    validate_spdx(text)
    doc = json.loads(text)
    pkg = doc["packages"][0]

    def refused(change, match):
        d = json.loads(text)
        change(d)
        with pytest.raises(SbomError, match=match):
            validate_spdx(json.dumps(d))

    # relationships must name elements of the document
    refused(lambda d: d["relationships"].append({"spdxElementId": pkg["SPDXID"], "relationshipType": "DEPENDS_ON",
                                                 "relatedSpdxElement": "SPDXRef-nowhere"}),
            "does not validate as SPDX-2.3: .*SPDXRef-nowhere")
    # a SHA256 checksum has 64 hex digits
    refused(lambda d: d["packages"][0]["checksums"][0].update(checksumValue="abc"),
            f"does not validate as SPDX-2.3: {re.escape(pkg['SPDXID'])}: .*SHA256 must consist of 64")
    refused(lambda d: d["creationInfo"].update(created="yesterday"), "does not parse as SPDX-2.3: .*yesterday")
    refused(lambda d: d["relationships"][0].update(relationshipType="LIKES"), "does not parse as SPDX-2.3: .*LIKES")
    refused(lambda d: d.update(packages=["x"]), "does not parse as SPDX-2.3: a field has the wrong type or shape")
    with pytest.raises(SbomError, match="not JSON"):
        validate_spdx(text[:-10])


def test_spdx_validates_with_the_spdx_tools_validator():
    spdx_json = pytest.importorskip("spdx_tools.spdx.parser.json.json_parser")
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    text = render_spdx(collect(), NOW)
    doc = spdx_json.JsonParser().parse(json.loads(text)) if hasattr(spdx_json, "JsonParser") else None
    if doc is None:
        import tempfile, os
        with tempfile.NamedTemporaryFile("w", suffix=".spdx.json", delete=False) as f:
            f.write(text)
        try:
            doc = spdx_json.parse_from_file(f.name)
        finally:
            os.unlink(f.name)
    msgs = validate_full_spdx_document(doc)
    assert msgs == [], [m.validation_message for m in msgs]
    data = json.loads(text)
    by_id = {x["SPDXID"]: x for x in data["packages"]}
    tar = next(x for x in data["packages"] if x["name"] == "hello" and x.get("versionInfo") == "2.10" and x["primaryPackagePurpose"] == "SOURCE")
    assert tar["downloadLocation"] == "NOASSERTION"  # SPDX has no file:// download locations
    refs = {r["referenceType"]: r["referenceLocator"] for r in tar["externalRefs"]}
    assert refs["purestore-fetch-url"] == "file:///srv/hello-2.10.tar.gz"
    assert PINNED.base16 in refs["purestore-fixed-output-hash"]
    rels = {(r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"]) for r in data["relationships"]}
    app_id = next(k for k, v in by_id.items() if v.get("primaryPackagePurpose") == "APPLICATION")
    lib_id = next(k for k, v in by_id.items() if v["name"] == "libfoo")
    assert (app_id, "DEPENDS_ON", lib_id) in rels
    assert (tar["SPDXID"], "BUILD_DEPENDENCY_OF", app_id) in rels


def test_registry_fetch_without_url_is_identified_by_its_purl():
    from purestore.build.sbom import registry_purl
    purl = registry_purl("builtin:fetch-apt", {"package": "busybox-static", "version": "1:1.35.0-4+deb12u1+b1",
                                               "kind": "binary"})
    assert purl == "pkg:deb/debian/busybox-static@1:1.35.0-4%2Bdeb12u1%2Bb1?arch=amd64"
    assert registry_purl("builtin:fetch-pip", {"package": "ziglang", "version": "0.17.0"}) == "pkg:pypi/ziglang@0.17.0"
    seed_hash = Hash.of_bytes(b"busybox tree")
    drvs = dict(DRVS)
    drvs[D["tool"]] = DrvView(D["tool"], "busybox", "x86_64-linux", {}, {"out": TOOL}, {}, (),
                              FixedOutput((), seed_hash, True, purl))
    s = collect(drvs=drvs)
    doc = json.loads(render_cyclonedx(s, NOW))
    tool = next(c for c in doc["components"] if c["bom-ref"] == TOOL)
    assert tool["purl"] == purl
    assert tool["externalReferences"][0]["url"] == purl
    assert tool["externalReferences"][0]["hashes"][0]["content"] == seed_hash.base16
    spdx = json.loads(render_spdx(s, NOW))
    pkg = next(x for x in spdx["packages"] if x["name"] == "busybox")
    assert {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": purl} \
        in pkg["externalRefs"]
