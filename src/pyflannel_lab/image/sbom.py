"""The image's SBOM (SPDX 2.3 JSON): the inputs that decide its digest.

Every Debian package with its version, every Python wheel with its sha256, pyflannel at
its git commit, and the mirrors the Debian packages came from: with these, anyone can
rebuild and compare digests. Written into the image (/usr/share/pyflannel/sbom.spdx.json)
and beside the archive. No wall-clock time: `created` is SOURCE_DATE_EPOCH.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence

from pyflannel_lab.image.oci import canonical_json
from pyflannel_lab.image.pylayer import LockedWheel


def _spdx_id(kind: str, name: str) -> str:
    return f"SPDXRef-{kind}-" + re.sub(r"[^A-Za-z0-9.-]", "-", name)


def spdx_document(*, version: str, commit: str, epoch: int, suite: str,
                  debian: Mapping[str, str], wheels: Sequence[LockedWheel],
                  mirrors: Sequence[str]) -> bytes:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    root = "SPDXRef-pyflannel"
    packages: list[dict[str, object]] = [{
        "SPDXID": root, "name": "pyflannel", "versionInfo": version,
        "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
        "licenseDeclared": "Apache-2.0", "sourceInfo": f"git commit {commit}",
    }]
    for name, deb_version in sorted(debian.items()):
        packages.append({
            "SPDXID": _spdx_id("deb", name), "name": name, "versionInfo": deb_version,
            "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "sourceInfo": "Debian " + suite,
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:deb/debian/{name}@{deb_version}"
                                                  f"?distro={suite}"}],
        })
    for wheel in sorted(wheels, key=lambda w: w.name.lower()):
        packages.append({
            "SPDXID": _spdx_id("pypi", wheel.name), "name": wheel.name,
            "versionInfo": wheel.version, "downloadLocation": "https://pypi.org/simple/"
                                                              f"{wheel.name.lower()}/",
            "filesAnalyzed": False,
            "checksums": [{"algorithm": "SHA256", "checksumValue": wheel.sha256}],
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:pypi/{wheel.name.lower()}@"
                                                  f"{wheel.version}"}],
        })
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": root}]
    relationships += [{"spdxElementId": root, "relationshipType": "DEPENDS_ON",
                       "relatedSpdxElement": str(p["SPDXID"])} for p in packages[1:]]
    return canonical_json({
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"pyflannel-image-{version}",
        "documentNamespace": f"https://github.com/pyflannel/pyflannel/image/{version}/{commit}",
        "creationInfo": {"created": created, "creators": ["Tool: pyflannel_lab.image"],
                         "comment": "Debian mirrors: " + "; ".join(mirrors)},
        "packages": packages, "relationships": relationships,
    })
