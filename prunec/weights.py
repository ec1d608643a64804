"""One copy of the weights per artifact.

An artifact holds up to three programs (model, prefill, decode) over the same parameters. Each
`.pt2` is saved with its parameters, buffers and tensor constants swapped for meta tensors of the
same shape, dtype and strides (torch writes no bytes for those), and the tensors themselves go once
into `weights.safetensors`: a tensor that several programs hold (the same storage, offset, shape,
strides and dtype) is stored once under the name the first program gives it. The manifest's
`weights.programs` maps each program's names to the stored names; loading binds them back, checking
that every placeholder is bound to a tensor of its shape and dtype. safetensors holds raw bytes and
a JSON header, so loading it runs no pickle.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

WEIGHTS_FILE = "weights.safetensors"


class WeightsError(Exception):
    """The weights file does not fit a program (raised as ArtifactError by the loader)."""


@dataclass
class SharedWeights:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # stored name -> tensor
    bindings: dict[str, dict[str, str]] = field(default_factory=dict)  # program file -> {its name: stored name}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        stored, seen = {}, set()
        for name, tensor in sorted(self.tensors.items()):
            tensor = tensor.detach().cpu().contiguous()
            if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            stored[name] = tensor
        save_file(stored, str(path))
        path.chmod(0o644)  # safetensors creates it owner-only; the other files of an artifact are 0644


def _holders(program: torch.export.ExportedProgram) -> list[tuple[dict, str]]:
    """(the dict holding it, its name) for every parameter, buffer and tensor constant."""
    held = [(program.state_dict, name) for name in program.state_dict]
    held += [(program.constants, name) for name, value in program.constants.items() if isinstance(value, torch.Tensor)]
    return held


def _identity(tensor: torch.Tensor) -> tuple:
    pointer = tensor.untyped_storage().data_ptr()
    if pointer == 0:  # no plain storage (a wrapper subclass, an empty tensor): never share it with another
        return ("object", id(tensor))
    return (tensor.device, pointer, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return torch.nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta


@contextmanager
def detached(programs: dict[str, torch.export.ExportedProgram]) -> Iterator[SharedWeights]:
    """Inside the block every program holds meta placeholders instead of its tensors (so
    `torch.export.save` writes none of their bytes); yields the tensors, each stored once. The
    programs get their tensors back on exit, also on error."""
    shared = SharedWeights()
    by_identity: dict[tuple, str] = {}
    originals: list[tuple[dict, str, torch.Tensor]] = []
    placed: dict[int, str] = {}  # id of a placeholder put in -> the stored name of what it replaced
    try:
        for file, program in programs.items():
            binding = shared.bindings.setdefault(file, {})
            for holder, name in _holders(program):
                tensor = holder[name]
                if id(tensor) in placed:  # a holder seen twice (one program under two names)
                    binding[name] = placed[id(tensor)]
                    continue
                key = by_identity.get(_identity(tensor))
                if key is None:
                    key = name if name not in shared.tensors else f"{file}:{name}"
                    by_identity[_identity(tensor)] = key
                    shared.tensors[key] = tensor
                binding[name] = key
                originals.append((holder, name, tensor))
                holder[name] = _placeholder(tensor)
                placed[id(holder[name])] = key
        yield shared
    finally:
        for holder, name, tensor in reversed(originals):  # reversed: a holder seen twice ends with its first value
            holder[name] = tensor


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise WeightsError(f"{path} is not a readable safetensors file: {str(exc).strip().splitlines()[0]}") from None


def bind(program: torch.export.ExportedProgram, binding: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Put the stored tensors into the program's placeholders, with the placeholders' strides."""
    for holder, name in _holders(program):
        placeholder = holder[name]
        if placeholder.device.type != "meta":
            raise WeightsError(f"{name!r} carries its own bytes; an artifact program must not")
        key = binding.get(name)
        if key is None or key not in tensors:
            raise WeightsError(f"no stored tensor for {name!r}")
        tensor = tensors[key]
        if tensor.shape != placeholder.shape or tensor.dtype != placeholder.dtype:
            raise WeightsError(f"{name!r} is {tuple(tensor.shape)} {tensor.dtype} in the weights file, the program "
                               f"expects {tuple(placeholder.shape)} {placeholder.dtype}")
        if tensor.stride() != placeholder.stride() and not _overlaps(placeholder):
            tensor = torch.empty_strided(placeholder.shape, placeholder.stride(), dtype=tensor.dtype).copy_(tensor)
        holder[name] = (torch.nn.Parameter(tensor, requires_grad=placeholder.requires_grad)
                        if isinstance(placeholder, torch.nn.Parameter) else tensor)
    unused = set(binding) - {name for _, name in _holders(program)}
    if unused:
        raise WeightsError(f"the manifest binds {sorted(unused)[0]!r}, which the program does not hold")


def _overlaps(tensor: torch.Tensor) -> bool:
    """Strides under which elements share memory (an expanded constant): such a layout cannot be
    written element by element, so the stored contiguous tensor (same values) is bound instead."""
    dims = sorted((stride, size) for stride, size in zip(tensor.stride(), tensor.shape) if size > 1)
    reach = 1
    for stride, size in dims:
        if stride < reach:
            return True
        reach = stride * size
    return False


def holds_no_weights(program: torch.export.ExportedProgram) -> bool:
    """A program saved by `detached`: its tensors are meta placeholders."""
    held = _holders(program)
    return bool(held) and all(holder[name].device.type == "meta" for holder, name in held)
