"""Checking the SBOM documents pure writes (``pure sbom --validate``).

CycloneDX documents are checked against the official schema bundled with cyclonedx-python-lib
(:func:`validate_cyclonedx`).  For SPDX 2.3 the project's reference
implementation, spdx-tools, does more than a JSON schema can: its parser refuses fields of the
wrong type or shape (a bad date, an unknown relationship type, a malformed checksum), and its
validator then checks the document against the specification (SPDX identifiers and their
uniqueness, relationships naming elements that exist, checksum lengths per algorithm,
download locations, license expressions, the document namespace).
"""

from __future__ import annotations

import json

from ..errors import SbomError

_MAX_SHOWN = 5


def _json_object(text: str, kind: str) -> dict:
    """``text`` parsed, which must be a JSON object; else an :class:`SbomError` naming ``kind``."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise SbomError(f"{kind} document is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SbomError(f"{kind} document is not a JSON object but {type(doc).__name__}")
    return doc


def validate_cyclonedx(text: str) -> None:
    """Validate CycloneDX JSON against the official schema bundled with cyclonedx-python-lib.

    Raises :class:`SbomError` with the first schema violation.
    """
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    doc = _json_object(text, "CycloneDX")
    version = doc.get("specVersion", "1.6")
    try:
        sv = SchemaVersion.from_version(version)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SbomError(f"unknown CycloneDX spec version {version!r}") from e
    err = JsonStrictValidator(sv).validate_str(text)
    if err is not None:
        raise SbomError(f"CycloneDX document does not validate against the {version} schema: {err}")


def validate_spdx(text: str) -> None:
    """Validate SPDX JSON text (spec version 2.3, or the one it names) with spdx-tools.

    Raises :class:`SbomError` naming the first problems (at most five, with where each is) when
    the text is not JSON, cannot be parsed as an SPDX document, or does not validate; and when
    spdx-tools is not installed.
    """
    try:
        from spdx_tools.spdx.parser.error import SPDXParsingError
        from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
        from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    except ImportError as e:
        raise SbomError(f"cannot validate SPDX: the SPDX project's validator (spdx-tools) is not "
                        f"installed ({e})", hint="install purestore with its dependencies "
                        "(spdx-tools), or validate the CycloneDX output instead") from e
    data = _json_object(text, "SPDX")
    version = data.get("spdxVersion")
    try:
        doc = JsonLikeDictParser().parse(data)
    except SPDXParsingError as e:
        raise SbomError(f"SPDX document does not parse as {version or 'SPDX'}: "
                        f"{_first(e.get_messages())}") from e
    except (AttributeError, TypeError, KeyError, ValueError) as e:
        # spdx-tools' parser expects objects where it walks ('packages': ["x"] reached .get)
        raise SbomError(f"SPDX document does not parse as {version or 'SPDX'}: a field has the "
                        f"wrong type or shape ({type(e).__name__}: {e})") from e
    msgs = validate_full_spdx_document(doc)
    if msgs:
        raise SbomError(f"SPDX document does not validate as {version}: "
                        f"{_first([_where(m) + m.validation_message for m in msgs])}")


def _where(m) -> str:
    """``SPDXRef-x: `` for a problem of the element ``SPDXRef-x`` or of a part of it (a checksum)."""
    ctx = m.context
    sid = getattr(ctx, "spdx_id", None) or getattr(ctx, "parent_id", None)
    return f"{sid}: " if sid else ""


def _first(messages: list[str]) -> str:
    shown = "; ".join(str(m) for m in messages[:_MAX_SHOWN])
    more = len(messages) - _MAX_SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")
