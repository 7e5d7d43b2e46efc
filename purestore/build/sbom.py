"""Software bills of materials from the derivation graph and store metadata (no binary scanning).

:func:`collect_sbom` walks the derivation graph of one or more targets (output paths or ``.drv``
paths) and the store's reference graph, and returns an :class:`Sbom`: one :class:`Component` per
store path in the *build closure* (every output of every derivation the targets were built from,
every input source, and their reference closures), each with

- its NAR sha256 and size (when the path is valid in the store),
- name and version (``pname``/``version`` of the derivation, else Nix's ``parseDrvName`` split of
  the name: ``hello-2.10`` → ``hello``, ``2.10``),
- whether it is needed at *run time* (it is in the reference closure of a target) or only at
  *build time*,
- for a fixed-output derivation's output: the URL(s) it was fetched from and its pinned hash.

and the dependency graph: the direct references of each path (run-time edges) and the direct
inputs of its derivation that it does not reference (build-time edges).

:func:`render_cyclonedx` turns it into CycloneDX 1.6 JSON with cyclonedx-python-lib and
validates it against the official schema bundled with that library; :func:`render_spdx` writes
SPDX 2.3 JSON, which :func:`render` with ``validate`` checks with the SPDX project's own parser
and validator (:mod:`purestore.build.sbom_validation`).
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from typing import Callable, Iterable, Mapping

import attrs

from .. import __version__
from ..errors import SbomError
from ..formats.hash import Hash
from .sbom_validation import validate_cyclonedx, validate_spdx

FORMATS = ("cyclonedx-json", "spdx-json")


# -- the model -------------------------------------------------------------------------------


@attrs.frozen
class FixedOutput:
    """How a fixed-output derivation's output was obtained: URLs and the pinned hash."""

    urls: tuple[str, ...]
    hash: Hash
    recursive: bool
    purl: str | None = None   # package URL when fetched from a package registry by its client


@attrs.frozen
class Component:
    """One store path of the build closure."""

    path: str                      # absolute store path
    name: str
    version: str | None
    runtime: bool                  # in the reference closure of a target
    nar_hash: Hash | None = None   # None when the path is not valid in this store
    nar_size: int | None = None
    deriver: str | None = None     # absolute .drv path, when known
    output: str | None = None      # output name of the deriver
    system: str | None = None
    fixed: FixedOutput | None = None
    target: bool = False

    @property
    def kind(self) -> str:
        if self.target:
            return "target"
        if self.fixed is not None:
            return "fetched"
        return "output" if self.deriver else "source"


@attrs.frozen
class Sbom:
    """Components keyed by store path, and the direct dependency edges between them."""

    targets: tuple[str, ...]
    components: Mapping[str, Component]
    runtime_deps: Mapping[str, tuple[str, ...]]   # path → direct references (run-time edges)
    build_deps: Mapping[str, tuple[str, ...]]     # path → direct build inputs it does not reference
    warnings: tuple[str, ...] = ()

    def runtime_only(self) -> "Sbom":
        keep = {p: c for p, c in self.components.items() if c.runtime}
        return Sbom(self.targets, keep,
                    {p: tuple(d for d in ds if d in keep) for p, ds in self.runtime_deps.items() if p in keep},
                    {p: () for p in keep}, self.warnings)


_VERSION_START = re.compile(r"-(?=[^A-Za-z])")


_ARCHIVE_EXT = re.compile(r"\.(tar(\.(gz|bz2|xz|zst|lz|Z))?|tgz|tbz2?|txz|zip|gem|whl|deb|crate)$")


def parse_drv_name(name: str) -> tuple[str, str | None]:
    """Nix's ``parseDrvName``: split at the first ``-`` followed by a non-letter.

    An archive extension is not part of the version: ``hello-2.10.tar.gz`` → ``hello``, ``2.10``.
    """
    m = _VERSION_START.search(name)
    if not m:
        return name, None
    version = _ARCHIVE_EXT.sub("", name[m.end():])
    return name[: m.start()], version or None


# -- collecting from a store -----------------------------------------------------------------


@attrs.frozen
class DrvView:
    """What the SBOM needs of a derivation (read from its ``.drv``)."""

    path: str
    name: str
    system: str
    env: Mapping[str, str]
    outputs: Mapping[str, str]                      # output name → absolute path
    input_drvs: Mapping[str, tuple[str, ...]]       # drv path → output names
    input_srcs: tuple[str, ...]
    fixed: FixedOutput | None


@attrs.frozen
class PathView:
    """What the SBOM needs of a valid path."""

    nar_hash: Hash
    nar_size: int
    references: tuple[str, ...]     # absolute paths, may include itself
    deriver: str | None             # absolute .drv path


def collect_sbom(
    targets: Iterable[str],
    *,
    path_info: Callable[[str], PathView | None],
    read_drv: Callable[[str], DrvView | None],
) -> Sbom:
    """Build the SBOM of ``targets`` (absolute output or ``.drv`` paths).

    ``path_info(path)`` returns what the store knows of a valid path (None if not valid);
    ``read_drv(drv_path)`` parses a derivation from the store (None if it is not there).  Raises
    :class:`SbomError` when a target is neither a valid path nor a derivation in the store.
    """
    warnings: list[str] = []
    out_owner: dict[str, tuple[DrvView, str]] = {}   # output path → (drv, output name)
    drvs: dict[str, DrvView] = {}
    target_paths: list[str] = []

    def load_drv(p: str) -> DrvView | None:
        if p not in drvs:
            d = read_drv(p)
            if d is None:
                return None
            drvs[p] = d
            for o, op in d.outputs.items():
                out_owner.setdefault(op, (d, o))
        return drvs[p]

    for t in targets:
        if t.endswith(".drv"):
            d = load_drv(t)
            if d is None:
                raise SbomError(f"derivation {t!r} is not in the store")
            target_paths.extend(d.outputs.values())
            continue
        info = path_info(t)
        if info is None:
            raise SbomError(f"path {t!r} is not valid in the store",
                            hint="build it first, or pass its .drv")
        target_paths.append(t)
        if info.deriver:
            if load_drv(info.deriver) is None:
                warnings.append(f"the deriver {info.deriver!r} of {t!r} is not in the store: "
                                "build-time dependencies of it are unknown")

    infos: dict[str, PathView | None] = {}

    def info_of(p: str) -> PathView | None:
        if p not in infos:
            infos[p] = path_info(p)
        return infos[p]

    # Runtime closure of the targets.
    runtime: set[str] = set()
    stack = list(target_paths)
    while stack:
        p = stack.pop()
        if p in runtime:
            continue
        runtime.add(p)
        i = info_of(p)
        if i is None:
            warnings.append(f"target output {p!r} is not valid: its run-time closure is unknown")
            continue
        stack.extend(r for r in i.references if r not in runtime)

    # Build closure: walk derivations from the targets' derivers, then add reference closures.
    build_inputs: dict[str, set[str]] = {}
    all_paths: set[str] = set(runtime)
    seen_drvs: set[str] = set()
    todo = [out_owner[p][0] for p in target_paths if p in out_owner]
    while todo:
        d = todo.pop()
        if d.path in seen_drvs:
            continue
        seen_drvs.add(d.path)
        inputs: set[str] = set(d.input_srcs)
        for idrv, outs in sorted(d.input_drvs.items()):
            sub = load_drv(idrv)
            if sub is None:
                warnings.append(f"input derivation {idrv!r} is not in the store")
                continue
            for o in outs:
                if o not in sub.outputs:
                    raise SbomError(f"derivation {d.path!r} uses output {o!r} of {idrv!r}, which has none")
                inputs.add(sub.outputs[o])
            todo.append(sub)
        for o, op in d.outputs.items():
            build_inputs[op] = inputs
            all_paths.add(op)
        all_paths |= inputs
    # Reference closures of everything reached (sources may reference other sources, outputs
    # their run-time dependencies).
    stack = list(all_paths)
    while stack:
        p = stack.pop()
        i = info_of(p)
        if i is None:
            continue
        for r in i.references:
            if r not in all_paths:
                all_paths.add(r)
                stack.append(r)

    components: dict[str, Component] = {}
    runtime_deps: dict[str, tuple[str, ...]] = {}
    build_deps: dict[str, tuple[str, ...]] = {}
    for p in sorted(all_paths):
        i = info_of(p)
        owner = out_owner.get(p)
        if owner is None and i is not None and i.deriver:
            d = load_drv(i.deriver)
            owner = (d, _output_of(d, p)) if d is not None else None
        d, oname = owner if owner else (None, None)
        base = p.rsplit("/", 1)[-1]
        store_name = base[33:] if len(base) > 33 else base
        if d is not None:
            pname = d.env.get("pname") or None
            version = d.env.get("version") or None
            if not pname:
                pname, v = parse_drv_name(d.name)
                version = version or v
            if oname and oname != "out":
                pname = f"{pname}-{oname}"  # hello-dev: the dev output of hello
        else:
            pname, version = parse_drv_name(store_name)
        refs = tuple(sorted(r for r in (i.references if i else ()) if r != p))
        runtime_deps[p] = refs
        build_deps[p] = tuple(sorted(x for x in build_inputs.get(p, ()) if x not in refs and x != p))
        components[p] = Component(
            path=p, name=pname, version=version, runtime=p in runtime,
            nar_hash=i.nar_hash if i else None, nar_size=i.nar_size if i else None,
            deriver=d.path if d else (i.deriver if i else None), output=oname,
            system=d.system if d else None,
            fixed=d.fixed if d is not None else None,
            target=p in target_paths,
        )
    return Sbom(tuple(target_paths), components, runtime_deps, build_deps, tuple(dict.fromkeys(warnings)))


def _output_of(d: DrvView, path: str) -> str | None:
    for o, op in d.outputs.items():
        if op == path:
            return o
    return None


# -- CycloneDX -------------------------------------------------------------------------------

_CDX_ALGO = {"sha256": "SHA_256", "sha1": "SHA_1", "sha512": "SHA_512", "md5": "MD5"}


def _timestamp(now: datetime.datetime | None) -> datetime.datetime:
    return (now or datetime.datetime.now(datetime.timezone.utc)).replace(microsecond=0)


def _serial(sbom: Sbom) -> uuid.UUID:
    """A serial number that is the same for the same content (UUIDv5 over the components)."""
    key = json.dumps([[c.path, c.nar_hash.base16 if c.nar_hash else None, c.runtime]
                      for c in sbom.components.values()])
    return uuid.uuid5(uuid.NAMESPACE_URL, "urn:purestore:sbom:" + key)


def render_cyclonedx(sbom: Sbom, now: datetime.datetime | None = None, validate: bool = False) -> str:
    """The SBOM as CycloneDX 1.6 JSON text; with ``validate``, checked against the official schema
    (loading the validator costs seconds: jsonschema's format checkers compile grammars)."""
    from cyclonedx.model import ExternalReference, ExternalReferenceType, HashAlgorithm, HashType, \
        Property, XsUri
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component as CdxComponent, ComponentScope, ComponentType
    from cyclonedx.model.tool import ToolRepository
    from cyclonedx.output.json import JsonV1Dot6

    def cdx_hash(h: Hash) -> HashType:
        return HashType(alg=getattr(HashAlgorithm, _CDX_ALGO[h.algo]), content=h.base16)

    comps: dict[str, CdxComponent] = {}
    for p, c in sbom.components.items():
        props = [Property(name="purestore:store-path", value=p),
                 Property(name="purestore:scope", value="runtime" if c.runtime else "build")]
        if c.deriver:
            props.append(Property(name="purestore:deriver", value=c.deriver))
        if c.output:
            props.append(Property(name="purestore:output", value=c.output))
        if c.nar_size is not None:
            props.append(Property(name="purestore:nar-size", value=str(c.nar_size)))
        if c.system:
            props.append(Property(name="purestore:system", value=c.system))
        if c.nar_hash is None:
            props.append(Property(name="purestore:valid", value="false"))
        ext = []
        if c.fixed is not None:
            props.append(Property(name="purestore:fixed-output-hash",
                                  value=f"{'r:' if c.fixed.recursive else ''}{c.fixed.hash.typed('base16')}"))
            locations = list(c.fixed.urls) or ([c.fixed.purl] if c.fixed.purl else [])
            for u in locations:
                ext.append(ExternalReference(
                    type=ExternalReferenceType.DISTRIBUTION, url=XsUri(_uri_reference(u)),
                    comment=("pinned hash of the file as fetched" if not c.fixed.recursive
                             else "pinned hash of the unpacked tree's NAR"),
                    hashes=[cdx_hash(c.fixed.hash)]))
        ctype = (ComponentType.APPLICATION if c.target else
                 ComponentType.FILE if c.fixed is not None or not c.deriver else ComponentType.LIBRARY)
        purl = None
        if c.fixed is not None and c.fixed.purl:
            from packageurl import PackageURL
            purl = PackageURL.from_string(c.fixed.purl)
        comps[p] = CdxComponent(
            name=c.name, version=c.version, type=ctype, bom_ref=p, purl=purl,
            scope=ComponentScope.REQUIRED if c.runtime else ComponentScope.EXCLUDED,
            hashes=[cdx_hash(c.nar_hash)] if c.nar_hash else None,
            external_references=ext or None, properties=props,
            description=f"store path {p}",
        )
    tools = ToolRepository(components=[CdxComponent(
        name="purestore", version=__version__, type=ComponentType.APPLICATION)])
    targets = [comps[t] for t in sbom.targets if t in comps]
    meta_comp = None
    if len(targets) == 1:
        meta_comp = targets[0]
    bom = Bom(serial_number=_serial(sbom),
              metadata=BomMetaData(tools=tools, timestamp=_timestamp(now), component=meta_comp))
    for p, c in comps.items():
        if c is not meta_comp:
            bom.components.add(c)
    for p, c in comps.items():
        deps = [comps[d] for d in (*sbom.runtime_deps.get(p, ()), *sbom.build_deps.get(p, ()))
                if d in comps]
        bom.register_dependency(c, deps)
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    if validate:
        validate_cyclonedx(text)
    return text


_BARE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _uri_reference(url: str) -> str:
    """``url`` written as a URI reference that CycloneDX accepts: a ``%`` that starts no escape
    (``100%off``) is escaped as ``%25``, and a ``#`` after the first (the fragment's) as ``%23``.
    A fetcher's URL is taken as given, but XsUri refuses these two (a traceback, before)."""
    url = _BARE_PERCENT.sub("%25", url)
    head, sep, fragment = url.partition("#")
    return head + sep + fragment.replace("#", "%23")


# -- SPDX 2.3 --------------------------------------------------------------------------------

_SPDX_ALGO = {"sha256": "SHA256", "sha1": "SHA1", "sha512": "SHA512", "md5": "MD5"}
# Schemes SPDX 2.3 accepts in downloadLocation; others (file://) go only into externalRefs.
_SPDX_SCHEMES = {"http", "https", "ftp", "sftp", "ssh", "git", "svn"}
_SPDXID_BAD = re.compile(r"[^A-Za-z0-9.\-]")


def spdx_id(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return "SPDXRef-" + _SPDXID_BAD.sub("-", base)


def render_spdx(sbom: Sbom, now: datetime.datetime | None = None) -> str:
    """The SBOM as SPDX 2.3 JSON text.

    Packages carry the NAR sha256 as their checksum; run-time edges are ``DEPENDS_ON``, build-time
    edges ``BUILD_DEPENDENCY_OF``; a fetched source has its first network URL as
    ``downloadLocation`` (SPDX accepts no ``file://`` there), every URL as an external reference
    (category ``OTHER``, type ``purestore-fetch-url``) and its pinned hash as another
    (``purestore-fixed-output-hash``).
    """
    ts = _timestamp(now).strftime("%Y-%m-%dT%H:%M:%SZ")
    serial = _serial(sbom)
    packages = []
    for p, c in sbom.components.items():
        pkg: dict = {
            "SPDXID": spdx_id(p),
            "name": c.name,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "supplier": "NOASSERTION",
        }
        if c.version:
            pkg["versionInfo"] = c.version
        checksums = []
        if c.nar_hash is not None:
            checksums.append({"algorithm": _SPDX_ALGO[c.nar_hash.algo], "checksumValue": c.nar_hash.base16})
        notes = [f"store path {p}", f"needed at {'run' if c.runtime else 'build'} time"]
        if c.nar_hash is not None:
            notes.append(f"checksum: sha256 of the path's NAR serialisation ({c.nar_size} bytes)")
        if c.deriver:
            notes.append(f"deriver {c.deriver}" + (f" output {c.output}" if c.output else ""))
        if c.fixed is not None:
            pkg["downloadLocation"] = next(
                (u for u in c.fixed.urls if u.split(":", 1)[0].lower() in _SPDX_SCHEMES), "NOASSERTION")
            pkg["externalRefs"] = [{
                "referenceCategory": "OTHER", "referenceType": "purestore-fetch-url",
                "referenceLocator": u, "comment": "a URL this fixed-output derivation fetches from",
            } for u in c.fixed.urls if not any(ch.isspace() for ch in u)] + ([{
                "referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                "referenceLocator": c.fixed.purl,
            }] if c.fixed.purl else []) + [{
                "referenceCategory": "OTHER", "referenceType": "purestore-fixed-output-hash",
                "referenceLocator": f"{'r:' if c.fixed.recursive else ''}{c.fixed.hash.typed('base16')}",
                "comment": "the hash this fixed-output derivation pins: "
                           + ("the NAR of the unpacked tree" if c.fixed.recursive else "the file as fetched"),
            }]
            notes.append(f"fixed-output, pinned {'recursive ' if c.fixed.recursive else ''}hash "
                         f"{c.fixed.hash.typed('base16')}; urls: {' '.join(c.fixed.urls) or 'none'}")
        if checksums:
            pkg["checksums"] = checksums
        pkg["comment"] = "; ".join(notes)
        pkg["primaryPackagePurpose"] = ("APPLICATION" if c.target else
                                        "SOURCE" if c.fixed is not None or not c.deriver else "LIBRARY")
        packages.append(pkg)
    rels = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
             "relatedSpdxElement": spdx_id(t)} for t in sbom.targets if t in sbom.components]
    for p in sbom.components:
        for d in sbom.runtime_deps.get(p, ()):
            if d in sbom.components:
                rels.append({"spdxElementId": spdx_id(p), "relationshipType": "DEPENDS_ON",
                             "relatedSpdxElement": spdx_id(d)})
        for d in sbom.build_deps.get(p, ()):
            if d in sbom.components:
                rels.append({"spdxElementId": spdx_id(d), "relationshipType": "BUILD_DEPENDENCY_OF",
                             "relatedSpdxElement": spdx_id(p)})
    names = ", ".join(t.rsplit("/", 1)[-1] for t in sbom.targets)
    doc = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"sbom of {names}",
        "documentNamespace": f"urn:uuid:{serial}",
        "creationInfo": {"created": ts, "creators": [f"Tool: purestore-{__version__}"]},
        "packages": packages,
        "relationships": rels,
    }
    return json.dumps(doc, indent=2) + "\n"


def render(sbom: Sbom, fmt: str, now: datetime.datetime | None = None, validate: bool = False) -> str:
    if fmt == "cyclonedx-json":
        return render_cyclonedx(sbom, now, validate=validate)
    if fmt == "spdx-json":
        text = render_spdx(sbom, now)
        if validate:
            validate_spdx(text)
        return text
    raise SbomError(f"unknown SBOM format {fmt!r}, expected one of {', '.join(FORMATS)}")


# -- reading a LocalStore ----------------------------------------------------------------------


def fixed_output_of(drv) -> FixedOutput | None:
    """URLs and pinned hash of a fixed-output :class:`~purestore.formats.derivation.Derivation`.

    URLs come from the ``urls`` (space-separated) or ``url`` attribute, the convention of
    purestore's ``fetchurl`` and of Nix's.
    """
    if not drv.is_fixed_output:
        return None
    h, recursive = drv.fixed_output_hash()
    urls = tuple(drv.env.get("urls", "").split()) or tuple(drv.env.get("url", "").split())
    return FixedOutput(urls, h, recursive, registry_purl(drv.builder, drv.env))


def registry_purl(builder: str, env: Mapping[str, str]) -> str | None:
    """The package URL (purl) of an artifact fetched by a registry client builtin.

    ``builtin:fetch-apt`` gives ``pkg:deb/debian/NAME@VERSION?arch=source`` for a source package
    (``kind = source``) or ``arch=amd64`` for a binary one; ``builtin:fetch-pip`` gives
    ``pkg:pypi/NAME@VERSION``.  Such fetches have no URL of their own: the purl says where the
    artifact comes from, and the pinned hash which one it is.
    """
    from packageurl import PackageURL
    pkg, ver = env.get("package"), env.get("version")
    if not pkg or not ver:
        return None
    if builder == "builtin:fetch-apt":
        arch = "source" if env.get("kind") == "source" else "amd64"
        return PackageURL(type="deb", namespace="debian", name=pkg, version=ver,
                          qualifiers={"arch": arch}).to_string()
    if builder == "builtin:fetch-pip":
        return PackageURL(type="pypi", name=pkg.lower(), version=ver).to_string()
    return None


def store_views(store) -> tuple[Callable[[str], PathView | None], Callable[[str], DrvView | None]]:
    """``path_info`` and ``read_drv`` functions for :func:`collect_sbom` over a LocalStore."""
    from ..errors import InvalidStorePath
    from ..formats.derivation import parse_aterm
    from ..formats.store_path import StorePath

    sd = store.store_dir

    def parse(p: str) -> StorePath | None:
        try:
            return StorePath.parse(p, sd)
        except InvalidStorePath:
            return None

    def path_info(p: str) -> PathView | None:
        sp = parse(p)
        info = store.query_path_info(sp) if sp else None
        if info is None:
            return None
        return PathView(info.nar_hash, info.nar_size,
                        tuple(store.print_path(r) for r in info.references),
                        store.print_path(info.deriver) if info.deriver else None)

    def read_drv(p: str) -> DrvView | None:
        sp = parse(p)
        if sp is None:
            return None
        try:
            with open(store.real_path(sp), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SbomError(f"cannot read derivation {p!r}: {e.strerror}") from e
        drv = parse_aterm(data, where=p)
        return DrvView(p, drv.name, drv.system, drv.env, drv.output_paths(),
                       {k: tuple(sorted(v)) for k, v in drv.input_drvs.items()},
                       tuple(sorted(drv.input_srcs)), fixed_output_of(drv))

    return path_info, read_drv


def sbom_of_paths(store, paths: Iterable[str]) -> Sbom:
    """The SBOM of store paths (outputs or ``.drv``), read from ``store``."""
    path_info, read_drv = store_views(store)
    return collect_sbom(list(paths), path_info=path_info, read_drv=read_drv)
