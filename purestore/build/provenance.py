"""Making and checking the signed provenance of a built store path.

:func:`make_provenance` describes how an output was built, from the store alone: the subject is
the output with its NAR sha256; the build definition is its derivation (path, digest and full
JSON) and the resolved dependencies are the derivation's direct inputs (input sources, used
outputs of input derivations, and the ``.drv`` itself) with their NAR digests, plus the URLs of
fixed-output inputs; the run details name the builder (``urn:purestore:builder:<key name>``), the
purestore version and the start and finish times of the build recorded by the builder
(:mod:`purestore.store.events`).  It is signed into a DSSE envelope.

:func:`verify_provenance` checks an envelope's signature against trusted keys, and that its
subjects match the NAR hashes the store records.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Mapping

from .. import __version__
from ..errors import PathNotValid, ProvenanceError
from ..formats.provenance import (
    BUILDER_ID_PREFIX, Envelope, Subject, VerifiedStatement, check_subject, make_statement,
    resource, sign_statement, verify_envelope,
)
from ..formats.signing import PublicKey, SecretKey
from ..formats.store_path import StorePath


def rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _build_record(store, drv_path: str, out_path: str) -> dict | None:
    """The newest successful build of ``drv_path`` that produced ``out_path``."""
    from ..store import events
    for ev in events.query_builds(store, drv=drv_path):
        if ev["status"] != "built" or ev["kind"] != "build":
            continue
        outs = ev.get("outputs") or {}
        if not outs or any(v and v[0] == out_path for v in outs.values()):
            return ev
    return None


def make_statement_for(store, sp: StorePath, key_name: str, *, require_build_record: bool = True) -> dict:
    """The in-toto statement (a JSON value) for valid output ``sp`` of ``store``.

    Raises :class:`PathNotValid` if ``sp`` is not valid, and :class:`ProvenanceError` when its
    deriver is unknown or not in the store, or (with ``require_build_record``) when this store has
    no record of building it (a substituted path's provenance comes from the store that built it).
    """
    from ..formats.derivation import parse_aterm, to_json
    from .sbom import fixed_output_of

    info = store.query_path_info(sp)
    path = store.print_path(sp)
    if info is None:
        raise PathNotValid(f"path {path!r} is not valid in the store at {store.real_store_dir!r}")
    if info.deriver is None and sp.name.endswith(".drv"):
        # (a .drv is written by instantiating, never built: "added, not built" misled)
        raise ProvenanceError(f"cannot make provenance of {path!r}: it is a derivation, and "
                              "provenance describes what building it made",
                              hint="pass one of its outputs (`pure show-derivation` lists them)")
    if info.deriver is None:
        raise ProvenanceError(f"cannot make provenance of {path!r}: the store does not know its deriver "
                              "(it was added, not built)")
    drv_path = store.print_path(info.deriver)
    try:
        with open(store.real_path(info.deriver), "rb") as f:
            drv_text = f.read()
    except FileNotFoundError:
        raise ProvenanceError(f"cannot make provenance of {path!r}: its derivation {drv_path!r} is not "
                              "in the store") from None
    except OSError as e:  # a directory in its place, no permission
        raise ProvenanceError(f"cannot make provenance of {path!r}: cannot read its derivation "
                              f"{drv_path!r}: {e.strerror}") from e
    drv = parse_aterm(drv_text, where=drv_path)
    outputs = drv.output_paths()
    out_name = next((o for o, p in outputs.items() if p == path), None)
    if out_name is None:
        raise ProvenanceError(f"cannot make provenance of {path!r}: it is not an output of its deriver "
                              f"{drv_path!r}")
    record = _build_record(store, drv_path, path)
    if record is None and require_build_record:
        raise ProvenanceError(
            f"cannot make provenance of {path!r}: this store has no record of building it "
            "(it was substituted, or built before build records were kept)",
            hint="make provenance on the machine that built the path")

    def dep(p: str, **annotations) -> dict:
        try:
            dsp = StorePath.parse(p, store.store_dir)
        except ValueError:
            return resource(p, annotations={"valid": False, **annotations})
        di = store.query_path_info(dsp)
        if di is None:
            return resource(p, annotations={"valid": False, **annotations})
        return resource(p, di.nar_hash, annotations=annotations or None)

    deps = [dep(drv_path, role="derivation")]
    for src in sorted(drv.input_srcs):
        deps.append(dep(src, role="source"))
    for idrv, outs in sorted(drv.input_drvs.items()):
        try:
            with open(store.real_path(StorePath.parse(idrv, store.store_dir)), "rb") as f:
                sub = parse_aterm(f.read(), where=idrv)
        except FileNotFoundError:
            raise ProvenanceError(f"cannot make provenance of {path!r}: input derivation {idrv!r} "
                                  "is not in the store") from None
        except OSError as e:
            raise ProvenanceError(f"cannot make provenance of {path!r}: cannot read input derivation "
                                  f"{idrv!r}: {e.strerror}") from e
        fixed = fixed_output_of(sub)
        for o in sorted(outs):
            ann: dict = {"role": "input", "deriver": idrv, "output": o}
            r = dep(sub.outputs[o].path, **ann)
            if fixed is not None:
                r.setdefault("annotations", {})["fixedOutputHash"] = \
                    ("r:" if fixed.recursive else "") + fixed.hash.typed("base16")
                if fixed.urls:
                    r["uri"] = fixed.urls[0]
                    if len(fixed.urls) > 1:
                        r["annotations"]["urls"] = list(fixed.urls)
                elif fixed.purl:
                    # fetched by a registry client (apt, pip): no URL, its package URL says
                    # where it comes from (as in the SBOM)
                    r["uri"] = fixed.purl
            deps.append(r)

    return make_statement(
        [Subject(path, info.nar_hash)],
        external_parameters={
            "derivation": drv_path,
            "output": out_name,
            "derivationJson": to_json(drv_path, drv)[drv_path],
        },
        internal_parameters={"storeDir": store.store_dir},
        resolved_dependencies=deps,
        builder_id=BUILDER_ID_PREFIX + key_name,
        builder_version={"purestore": __version__},
        invocation_id=f"{drv_path}#build-{record['id']}" if record else None,
        started_on=rfc3339(record["start"]) if record else None,
        finished_on=rfc3339(record["finish"]) if record and record.get("finish") else None,
        byproducts=[{"name": "derivation-sha256",
                     "digest": {"sha256": hashlib.sha256(drv_text).hexdigest()}}],
    )


def make_provenance(store, sp: StorePath, key: SecretKey, *, require_build_record: bool = True) -> Envelope:
    """The signed DSSE envelope of ``sp``'s provenance (see :func:`make_statement_for`)."""
    return sign_statement(make_statement_for(store, sp, key.name, require_build_record=require_build_record), key)


def make_and_keep_provenance(store, sp: StorePath, key: SecretKey, *,
                             require_build_record: bool = True) -> tuple[bytes, str | None]:
    """Sign ``sp``'s provenance and keep it in the store's state, where ``pure copy --to``
    publishes it; returns the rendered envelope and the file it is kept in.

    A statement without a build record (``require_build_record=False`` on a path this store
    did not build) does not replace one the store keeps already (fetched with the path from the
    cache of the store that built it, or made here before), which says more: the file is then
    None.  Raises as :func:`make_statement_for`, and :class:`StoreError` when it cannot write.
    """
    from ..store.provenance import read_provenance, write_provenance
    statement = make_statement_for(store, sp, key.name, require_build_record=require_build_record)
    data = sign_statement(statement, key).render()
    recorded = bool(statement["predicate"]["runDetails"].get("metadata", {}).get("invocationId"))
    if not recorded and read_provenance(store, sp) is not None:
        return data, None
    return data, write_provenance(store, sp, data)


def verify_provenance(store, data: bytes, trusted: Mapping[str, PublicKey], sp: StorePath | None = None,
                      where: str = "provenance") -> VerifiedStatement:
    """Check ``data`` (a DSSE envelope) against trusted keys and the store.

    With ``sp``, that path must be a subject and its NAR hash in the store must match; without,
    every subject must be a valid path of this store with a matching NAR hash.  Raises
    :class:`ProvenanceError` otherwise (bad signature, untrusted key, mismatch, unknown path).
    """
    v = verify_envelope(data, trusted, where)
    if sp is not None:
        info = store.query_path_info(sp)
        if info is None:
            raise PathNotValid(f"path {store.print_path(sp)!r} is not valid in the store")
        check_subject(v, store.print_path(sp), info.nar_hash, where)
        return v
    for name in v.subject_names():  # every subject: one without a usable digest is an error
        try:
            ssp = StorePath.parse(name, store.store_dir)
        except ValueError as e:
            raise ProvenanceError(f"{where}: subject {name!r} is not a path in the store dir "
                                  f"{store.store_dir!r}") from e
        info = store.query_path_info(ssp)
        if info is None:
            raise ProvenanceError(f"{where}: subject {name!r} is not valid in this store",
                                  hint="fetch or build the path first, or verify where it is")
        check_subject(v, name, info.nar_hash, where)
    return v

