"""`scripts/image.sh` (python -m pyflannel_lab.image): build, sign, verify, lock."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pyflannel_lab import image
from pyflannel_lab.image import pylayer, trust


def runtime_closure() -> dict[str, str]:
    """name -> installed version of pyflannel's runtime dependencies, recursively (this
    environment's versions are the ones the tests ran with)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    todo = [Requirement(r).name for r in image._runtime_requires()]
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: pip install -e . first") from None
        key = dist.metadata["Name"]
        if key in pins:
            continue
        pins[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return pins


def _build(args: argparse.Namespace) -> int:
    start = time.monotonic()
    built = image.build(Path(args.out), sign_key=args.sign_key, reference=args.reference,
                        use_cache=not args.no_cache)
    print(json.dumps({
        "archive": str(built.archive), "digest": built.digest, "reference": built.reference,
        "uncompressed_bytes": built.size, "uncompressed_mb": round(built.size / 1e6, 1),
        "layers": list(built.layers), "sbom": str(built.sbom),
        "signature": str(built.signature) if built.signature else None,
        "debian_packages": built.debian_packages, "wheels": built.wheels,
        "seconds": round(time.monotonic() - start, 1)}, indent=1))
    return 0


def _sign(args: argparse.Namespace) -> int:
    print(trust.sign(Path(args.archive), args.key))
    return 0


def _verify(args: argparse.Namespace) -> int:
    digest = trust.verify(Path(args.archive), Path(args.key),
                          signature=Path(args.signature) if args.signature else None,
                          reference=args.reference)
    print(f"verified {args.archive}: {digest}")
    return 0


def _policy(args: argparse.Namespace) -> int:
    print(json.dumps(trust.policy_json(Path(args.key), args.reference), indent=2))
    return 0


def _lock(args: argparse.Namespace) -> int:
    out = image.REPO_ROOT / image.LOCK_FILE
    pylayer.write_lock(out, runtime_closure(), sys.executable)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/image.sh", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the OCI archive (needs root)")
    b.add_argument("--out", default="dist/image", help="output directory (dist/image)")
    b.add_argument("--sign-key", help="gpg fingerprint to sign with (GNUPGHOME's keyring)")
    b.add_argument("--reference", default=image.DEFAULT_REFERENCE,
                   help=f"the name it will be pushed as ({image.DEFAULT_REFERENCE})")
    b.add_argument("--no-cache", action="store_true", help="rebuild the Debian rootfs")
    b.set_defaults(func=_build)
    s = sub.add_parser("sign", help="sign an archive (writes ARCHIVE.sig)")
    s.add_argument("archive")
    s.add_argument("--key", required=True, help="gpg fingerprint")
    s.set_defaults(func=_sign)
    v = sub.add_parser("verify", help="check digests and the signature before use")
    v.add_argument("archive")
    v.add_argument("--key", required=True, help="the signer's public key file (armored)")
    v.add_argument("--signature", help="default: ARCHIVE.sig")
    v.add_argument("--reference", help="default: the reference the archive names")
    v.set_defaults(func=_verify)
    pol = sub.add_parser("policy", help="print a containers policy.json for registry pulls")
    pol.add_argument("--key", required=True)
    pol.add_argument("--reference", default=image.DEFAULT_REFERENCE)
    pol.set_defaults(func=_policy)
    lk = sub.add_parser("lock", help="rewrite deploy/requirements.lock from this venv")
    lk.set_defaults(func=_lock)
    args = p.parse_args(argv)
    try:
        rc: int = args.func(args)
    except (image.ImageBuildError, image.ImageVerificationError,
            pylayer.PythonLayerError) as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
