"""Reading artifacts without trusting them.

`torch.export.load` unpickles some payloads (pickled weights and constants, sample inputs, with a
`weights_only=False` fallback), so a tampered `model.pt2` could run code. prunec never emits any of
those payloads, and before handing an archive to torch it checks that the archive holds only raw
tensor files, JSON and version stamps: every weight and constant is `use_pickle: false`, there are
no custom-object or opaque constants, and the sample-inputs entry is empty. With a manifest beside
it, the archive's content digest must also match before anything is deserialized.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import torch

from .errors import PrunecError, first_line

_ALLOWED = re.compile(
    r"^[^/]+/(?:data/weights/(?:weight_\d+|model_weights_config\.json)"
    r"|data/constants/(?:tensor_\d+|model_constants_config\.json)"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|archive_format|archive_version|\.data/version|byteorder|\.data/serialization_id)$"
)
_VOLATILE = ".data/serialization_id"  # random per save; not part of the content digest


class ArtifactError(PrunecError):
    """An artifact is missing, corrupted, tampered with or of an unknown format."""


def read_archive(path: Path) -> bytes:
    """The archive's bytes, read once: the checks and torch's loader then see the same data."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None


def _open(data: bytes, path: Path) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable .pt2 archive (truncated or not a zip): {exc}") from None
    if bad is not None:
        raise ArtifactError(f"{path}: entry {bad} fails its CRC check (corrupted)")
    names = archive.namelist()
    if len(names) != len(set(names)):
        # zipfile reads the last of two same-named entries, torch's reader the first: never both
        raise ArtifactError(f"{path}: duplicate entry names; refusing to load")
    if len({name.split("/", 1)[0] for name in names}) != 1:
        raise ArtifactError(f"{path}: entries under more than one top folder; refusing to load")
    return archive


def _payload_config(archive: zipfile.ZipFile, name: str, kind: str, path: Path) -> None:
    try:
        config = json.loads(archive.read(name))["config"]
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{path}: {kind} config {name} is unreadable: {exc}") from None
    for fqn, entry in config.items():
        if entry.get("use_pickle", True):
            raise ArtifactError(f"{path}: {kind} {fqn!r} is stored as a pickle; prunec refuses to unpickle "
                                "artifact contents")
        if not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise ArtifactError(f"{path}: {kind} {fqn!r} is not a raw tensor ({entry.get('path_name')!r})")


def inspect_archive(path: str | Path, data: bytes | None = None) -> None:
    """Raise ArtifactError unless the archive can be loaded without unpickling anything."""
    path = Path(path)
    data = read_archive(path) if data is None else data
    with _open(data, path) as archive:
        for info in archive.infolist():
            if not _ALLOWED.match(info.filename):
                raise ArtifactError(f"{path}: unexpected entry {info.filename!r}; refusing to load")
            if info.filename.endswith("data/sample_inputs/model.pt") and info.file_size:
                raise ArtifactError(f"{path}: carries pickled sample inputs; refusing to load")
            if info.filename.endswith("model_weights_config.json"):
                _payload_config(archive, info.filename, "weight", path)
            if info.filename.endswith("model_constants_config.json"):
                _payload_config(archive, info.filename, "constant", path)


def program_digest(path: str | Path, data: bytes | None = None) -> str:
    """sha256 over the archive's entries (names without the top folder, and contents), in name
    order, leaving out the per-save random serialization id: equal programs give equal digests."""
    digest = hashlib.sha256()
    data = read_archive(Path(path)) if data is None else data
    with _open(data, Path(path)) as archive:
        for name in sorted(archive.namelist()):
            inner = name.split("/", 1)[1]
            if inner == _VOLATILE:
                continue
            digest.update(inner.encode() + b"\0")
            digest.update(hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


def read_manifest(artifact: Path) -> dict:
    path = artifact / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{artifact} is not a prunec artifact (no manifest.json)")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None


def load_module(path: str | Path, member: str = "model.pt2",
                weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """`load_program(...).module()`, run under the spec's `backend:` when it is not `auto`; an
    artifact directory's model program behind the input checks of its recorded signature."""
    import yaml

    from .signature import runnable

    path, member = _artifact_member(Path(path), member)
    manifest = None
    if path.is_dir():
        from .provenance import check_code

        manifest = read_manifest(Path(path))
        check_code(Path(path), manifest)
    module = load_program(path, member, weights).module()
    lock = Path(path) / "spec.lock.yaml"
    mode = yaml.safe_load(lock.read_text()).get("backend", "auto") if lock.is_file() else "auto"
    signature = manifest.get("signature") if manifest is not None and member == "model.pt2" else None
    return runnable(module, mode, signature)


def _artifact_member(path: Path, member: str) -> tuple[Path, str]:
    """A program file inside an artifact directory is loaded as that directory's member, so that
    its manifest digest is checked and its weights are found."""
    if path.is_file() and (path.parent / "manifest.json").is_file():
        try:
            if "prunec_manifest" in json.loads((path.parent / "manifest.json").read_text()):
                return path.parent, path.name
        except (OSError, ValueError, TypeError):
            pass  # someone else's manifest: the program is loaded on its own
    return path, member


def artifact_weights(artifact: Path) -> dict[str, torch.Tensor]:
    """The artifact's weights file, loaded once (sha256 checked against the manifest first)."""
    from .files import file_sha256
    from .weights import WEIGHTS_FILE, WeightsError, load_weights

    path = artifact / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{artifact} has no {WEIGHTS_FILE} (its programs hold no weights without it)")
    if file_sha256(path) != read_manifest(artifact).get("files", {}).get(WEIGHTS_FILE):
        raise ArtifactError(f"{path} does not match the digest in {artifact / 'manifest.json'} (tampered, "
                            "corrupted, or built by another prunec)")
    try:
        return load_weights(path)
    except WeightsError as exc:
        raise ArtifactError(str(exc)) from None


def load_program(path: str | Path, member: str = "model.pt2",
                 weights: dict[str, torch.Tensor] | None = None) -> torch.export.ExportedProgram:
    """Load an artifact directory's `member` program (digest checked against its manifest) with its
    weights bound from the artifact's weights file (`weights`: that file already loaded), or a bare
    .pt2 file that carries its own weights."""
    from . import ops  # noqa: F401  (the prunec ops must be registered before deserializing)
    from .weights import WeightsError, bind, holds_no_weights

    path, member = _artifact_member(Path(path), member)
    archive = path / member if path.is_dir() else path
    if path.is_dir() and not archive.is_file():
        raise ArtifactError(f"{path} has no {member}" + (" (build the spec with `decode:` to generate)"
                                                        if member != "model.pt2" else ""))
    data = read_archive(archive)
    inspect_archive(archive, data)
    if path.is_dir():
        expected = read_manifest(path).get("files", {}).get(member)
        if expected != program_digest(archive, data):
            raise ArtifactError(f"{archive} does not match the digest in {path / 'manifest.json'} (tampered, "
                                "corrupted, or built by another prunec)")
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        first = first_line(exc)
        raise ArtifactError(f"{archive} could not be deserialized: {first}") from None
    if not path.is_dir():
        if holds_no_weights(program):
            raise ArtifactError(f"{archive} holds no weights (an artifact keeps them in its weights file): load the "
                                "artifact directory it came from")
        return program
    binding = read_manifest(path).get("weights", {}).get("programs", {}).get(member)
    if binding is None:
        raise ArtifactError(f"{path / 'manifest.json'} names no weights for {member}")
    try:
        bind(program, binding, artifact_weights(path) if weights is None else weights)
    except WeightsError as exc:
        raise ArtifactError(f"{archive}: {exc}") from None
    return program
