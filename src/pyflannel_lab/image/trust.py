"""Signing an image archive and checking it before use.

The signature is a containers "simple signing" signature (`skopeo standalone-sign`) of
the manifest digest and the image's reference, by a gpg key the operator names; it is
written beside the archive as `<archive>.sig`. The same signature verifies after a push
(`skopeo copy --sign-by` makes the same kind for a registry).

verify() is the gate the lab and the tests go through before importing an image:
1. every blob in the archive matches its digest and size, and the manifest names only
   blobs that are there (a changed byte in any layer is caught here);
2. the archive has a signature;
3. the trust policy holds, evaluated by skopeo's policy engine (containers/image) over
   the archive laid out as a `dir:` image: signed by the given public key, over this
   manifest digest, for exactly this reference (policy_for_archive()). policy_json()
   writes the same rule for a registry repository, for skopeo/podman pulls.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from pyflannel_lab.image.oci import CONTAINERD_NAME


class ImageVerificationError(RuntimeError):
    """The archive must not be used; the message says why."""


def signature_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sig")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageVerificationError(f"{tool} is not installed (scripts/setup.sh installs it)")
    return path


def read_archive(archive: Path, extract_to: Path | None = None) -> tuple[str, bytes, str]:
    """Check every blob of the archive; return (manifest digest, manifest, reference).
    With `extract_to`, also write each blob there as `<hex digest>` (what the `dir:`
    transport reads)."""
    if not archive.is_file():
        raise ImageVerificationError(f"{archive}: no such file")
    try:
        with tarfile.open(archive) as tar:
            blobs: dict[str, int] = {}
            index: bytes | None = None
            for member in tar:
                f = tar.extractfile(member) if member.isfile() else None
                if f is None:
                    continue
                if member.name == "index.json":
                    index = f.read()
                elif member.name.startswith("blobs/sha256/"):
                    want = member.name.removeprefix("blobs/sha256/")
                    digest = hashlib.sha256()
                    out = (extract_to / want).open("wb") if extract_to else None
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                        if out is not None:
                            out.write(chunk)
                    if out is not None:
                        out.close()
                    if digest.hexdigest() != want:
                        raise ImageVerificationError(
                            f"{archive}: blob sha256:{want} does not match its digest (it is "
                            f"sha256:{digest.hexdigest()}): the archive was changed")
                    blobs["sha256:" + want] = member.size
            if index is None:
                raise ImageVerificationError(f"{archive}: no index.json: not an OCI archive")
            manifests = json.loads(index)["manifests"]
            if len(manifests) != 1:
                raise ImageVerificationError(f"{archive}: expected one image, index.json "
                                             f"lists {len(manifests)}")
            entry = manifests[0]
            member = tar.getmember("blobs/sha256/" + entry["digest"].removeprefix("sha256:"))
            extracted = tar.extractfile(member)
            assert extracted is not None
            manifest = extracted.read()
    except (tarfile.TarError, KeyError, ValueError, OSError) as exc:
        if isinstance(exc, ImageVerificationError):
            raise
        raise ImageVerificationError(f"{archive}: not a readable OCI archive: {exc}") from None
    parsed = json.loads(manifest)
    for i, desc in enumerate([parsed["config"], *parsed["layers"]]):
        what = "config" if i == 0 else f"layer {i}"
        if blobs.get(desc["digest"]) != desc["size"]:
            raise ImageVerificationError(f"{archive}: {what} {desc['digest']} is missing or "
                                         "has the wrong size")
    reference = entry.get("annotations", {}).get(CONTAINERD_NAME)
    if not isinstance(reference, str):
        raise ImageVerificationError(f"{archive}: index.json names no image reference")
    return entry["digest"], manifest, reference


def stop_gpg_agent(gnupghome: Path | None) -> None:
    """Stop the gpg daemons of a GNUPGHOME (None: $GNUPGHOME or ~/.gnupg): gpg starts an
    agent on first use, and it would outlive us."""
    home = ["--homedir", str(gnupghome)] if gnupghome is not None else []
    subprocess.run(["gpgconf", *home, "--kill", "all"], capture_output=True)


def sign(archive: Path, fingerprint: str, *, gnupghome: Path | None = None,
         passphrase_file: Path | None = None) -> Path:
    """Sign the archive's manifest and reference with the gpg key `fingerprint`."""
    _, manifest, reference = read_archive(archive)
    out = signature_path(archive)
    env = dict(os.environ)
    if gnupghome is not None:
        env["GNUPGHOME"] = str(gnupghome)
    # gpg starts an agent for the key's home that outlives us; stop it afterwards unless it
    # was running already (an operator's own agent stays).
    home = ["--homedir", str(gnupghome)] if gnupghome is not None else []
    # (its exit status is 0 either way; a running agent answers with "D <pid>")
    had_agent = subprocess.run(["gpg-connect-agent", *home, "--no-autostart", "GETINFO pid",
                                "/bye"], env=env, capture_output=True,
                               text=True).stdout.startswith("D ")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            manifest_file = Path(tmp) / "manifest.json"
            manifest_file.write_bytes(manifest)
            argv = [_need("skopeo"), "standalone-sign", str(manifest_file), reference,
                    fingerprint, "--output", str(out)]
            if passphrase_file is not None:
                argv += ["--passphrase-file", str(passphrase_file)]
            proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    finally:
        if not had_agent:
            stop_gpg_agent(gnupghome)
    if proc.returncode != 0:
        raise ImageVerificationError(f"signing with key {fingerprint} failed: "
                                     f"{proc.stderr.strip()}")
    return out


def key_fingerprints(pubkey: Path, gnupghome: Path) -> list[str]:
    proc = subprocess.run([_need("gpg"), "--homedir", str(gnupghome), "--batch",
                           "--with-colons", "--import-options", "show-only", "--import",
                           str(pubkey)], capture_output=True, text=True)
    fprs: list[str] = []
    previous = ""
    for line in proc.stdout.splitlines():
        fields = line.split(":")
        if fields[0] == "fpr" and previous == "pub":
            fprs.append(fields[9])
        previous = fields[0] if fields[0] in ("pub", "sub") else previous
    if proc.returncode != 0 or not fprs:
        raise ImageVerificationError(f"{pubkey}: not a gpg public key "
                                     f"({proc.stderr.strip() or 'no key in it'})")
    return fprs


def policy_for_archive(pubkey: Path, reference: str) -> dict[str, object]:
    """The policy verify() enforces, in containers-policy.json(5) form: only images
    signed by `pubkey` for exactly `reference`."""
    return {"default": [{"type": "reject"}], "transports": {"dir": {"": [{
        "type": "signedBy", "keyType": "GPGKeys", "keyPath": str(pubkey.resolve()),
        "signedIdentity": {"type": "exactReference", "dockerReference": reference}}]}}}


def verify(archive: Path, pubkey: Path, *, signature: Path | None = None,
           reference: str | None = None) -> str:
    """Check the archive against the policy "signed by `pubkey`, exactly `reference`"
    (default: the reference the archive names); return the manifest digest.

    The policy is evaluated by skopeo's own engine (containers/image): the archive's
    blobs, checked against their digests, are laid out as a `dir:` image with the
    signature, and `skopeo --policy copy` must accept it."""
    signature = signature or signature_path(archive)
    with tempfile.TemporaryDirectory(prefix="pf-verify-") as tmp:
        image = Path(tmp) / "image"
        image.mkdir()
        digest, manifest, named = read_archive(archive, extract_to=image)
        reference = reference or named
        if not signature.is_file():
            raise ImageVerificationError(f"{archive} is not signed: no signature at "
                                         f"{signature} (sign it with `scripts/image.sh sign`)")
        home = Path(tmp) / "gnupg"
        home.mkdir(mode=0o700)
        fingerprint = key_fingerprints(pubkey, home)[0]
        (image / "manifest.json").write_bytes(manifest)
        (image / "version").write_text("Directory Transport Version: 1.1\n")
        shutil.copyfile(signature, image / "signature-1")
        policy = Path(tmp) / "policy.json"
        policy.write_text(json.dumps(policy_for_archive(pubkey, reference)))
        proc = subprocess.run([_need("skopeo"), "--policy", str(policy), "copy", "--quiet",
                               f"dir:{image}", f"dir:{Path(tmp) / 'accepted'}"],
                              env={**os.environ, "GNUPGHOME": str(home)},
                              capture_output=True, text=True)
        stop_gpg_agent(home)  # skopeo's gpg may have started one for this home
    if proc.returncode != 0:
        why = _why(proc.stderr, pubkey, fingerprint, reference)
        raise ImageVerificationError(f"{archive} refused: {why}")
    return digest


def _why(stderr: str, pubkey: Path, fingerprint: str, reference: str) -> str:
    """One line from skopeo's error: which rule of the policy failed."""
    found = re.search(r'msg="(.*?)"\s*$', stderr.strip(), re.S)
    detail = (found.group(1) if found else stderr.strip()).replace('\\"', '"')
    if "Invalid GPG signature" in detail or "not trusted" in detail or "key" in detail.lower():
        # (skopeo's policy engine names the signer's fingerprint in gpgme's struct)
        signer = re.search(r'Fingerprint:"([0-9A-F]+)"', detail)
        by = f"; it is signed by key {signer.group(1)}" if signer else ""
        return f"it is not signed by the key in {pubkey} ({fingerprint}){by}"
    if ("does not match" in detail and "eference" in detail) or "for identity" in detail:
        return f"the signature is for another name, not {reference}: {detail}"
    if "igest" in detail:
        return f"the signature is for another manifest: {detail}"
    return f"the signature does not verify: {detail}"


def policy_json(pubkey: Path, reference: str) -> dict[str, object]:
    """containers-policy.json(5): accept `reference` only when signed by `pubkey`."""
    name, _, tag = reference.rpartition(":")
    repository = name if name and "/" not in tag else reference  # "host:port/x" has no tag
    requirement = {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(pubkey),
                   "signedIdentity": {"type": "matchRepository"}}
    return {"default": [{"type": "reject"}],
            "transports": {"docker": {repository: [requirement]}}}
