"""`prunec verify`: is this artifact what its manifest and lock say it is?"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import ArtifactError, inspect_archive, load_program, program_digest, read_archive, read_manifest
from .emit import MANIFEST_VERSION, versions
from .files import file_sha256
from .weights import WEIGHTS_FILE


@dataclass
class Report:
    checks: list[tuple[bool, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(passed for passed, _ in self.checks)

    def check(self, passed: bool, what: str) -> None:
        self.checks.append((passed, what))

    def lines(self) -> list[str]:
        out = [f"{'ok  ' if passed else 'FAIL'} {what}" for passed, what in self.checks]
        out += [f"warn {w}" for w in self.warnings]
        out.append("verified" if self.ok else "artifact does NOT match its manifest")
        return out


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _weights(artifact: Path) -> dict:
    from .weights import WeightsError, load_weights

    try:
        return load_weights(artifact / WEIGHTS_FILE)
    except WeightsError as exc:
        raise ArtifactError(str(exc)) from None


def verify_artifact(artifact: str | Path, rebuild: bool = False) -> Report:
    from . import plan as make_plan

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    if manifest.get("prunec_manifest") != MANIFEST_VERSION:
        raise ArtifactError(f"{artifact}: manifest format {manifest.get('prunec_manifest')!r}, this prunec reads "
                            f"format {MANIFEST_VERSION}")
    report = Report()
    recorded = manifest.get("files", {})
    required = ("module.py", "spec.lock.yaml", WEIGHTS_FILE)
    for name in (*required, *sorted(n for n in recorded if n not in required and not n.endswith(".pt2"))):
        path = artifact / name
        report.check(path.is_file() and file_sha256(path) == recorded.get(name), f"{name} sha256")
    programs = sorted({"model.pt2", *(n for n in recorded if n.endswith(".pt2"))})
    for name in programs:
        if not (artifact / name).is_file():
            report.check(False, f"{name} present")
            continue
        program = read_archive(artifact / name)
        inspect_archive(artifact / name, program)
        report.check(program_digest(artifact / name, program) == recorded.get(name), f"{name} content digest")
    if report.ok:
        weights = _weights(artifact)  # its sha256 was checked with the other files above
        for name in programs:
            try:
                load_program(artifact, name, weights)
                report.check(True, f"{name} binds to {WEIGHTS_FILE} (every tensor present, shapes and dtypes agree)")
            except ArtifactError as exc:
                report.check(False, f"{name} binds to {WEIGHTS_FILE}: {exc}")
        lock_plan = make_plan(artifact / "spec.lock.yaml")
        report.check(lock_plan.spec_hash == manifest.get("spec_sha256"), "spec.lock.yaml resolves to spec_sha256")
    from .provenance import code_changes

    changes = code_changes(manifest.get("code", {}))
    report.check(not changes, "method and runtime code unchanged since the build" + (f" ({'; '.join(changes)})"
                                                                                    if changes else ""))
    for package, built in sorted(manifest.get("versions", {}).items()):
        running = versions().get(package)
        if running != built:
            level = "minor" if _major_minor(running or "") == _major_minor(built) else "major/minor"
            report.warnings.append(f"built with {package} {built}, running {running} ({level} difference)")
    if rebuild and report.ok:
        from . import build

        with tempfile.TemporaryDirectory() as scratch:
            rebuilt = build(artifact / "spec.lock.yaml", Path(scratch))
            for name in ("manifest.json", "module.py", "spec.lock.yaml"):
                report.check((rebuilt / name).read_bytes() == (artifact / name).read_bytes(), f"rebuild: {name} bytes")
    return report
