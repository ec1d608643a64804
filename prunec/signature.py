"""What an artifact accepts: recorded at build time, checked before the exported program runs.

The signature is read from the exported program itself (each input's dtype, its static sizes, and
the range torch.export proved for each dynamic axis), named with the adapter's axis names, plus the
adapter's row rules (facts the graph's guards check in their own words, such as the image tokens
each row must hold). `check_inputs` turns a positional or keyword call into the program's
positional inputs, converting what converts without loss (narrower integer ids, bool masks, half
precision pixels) and raising one `PrunecInputError` line naming the input and what the artifact
takes for anything else, so no torch guard text reaches a user.
"""
from __future__ import annotations

from typing import Any

import sympy
import torch

from .errors import PrunecInputError

# float inputs the program's float dtype takes without loss
_LOSSLESS_FLOATS = {torch.float32: {torch.float16, torch.bfloat16},
                    torch.float64: {torch.float16, torch.bfloat16, torch.float32}}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _axis_names(dynamic_shapes) -> dict[tuple[int, int], str]:
    """(input, axis) -> the adapter's name of the Dim there (a derived `k * Dim` names its root)."""
    names = {}
    for i, dims in enumerate(dynamic_shapes or ()):
        for j, dim in (dims or {}).items():
            names[(i, j)] = getattr(getattr(dim, "root", dim), "__name__", str(dim))
    return names


def _bound(value) -> int | None:
    return int(value) if value.is_finite else None


def record(program: torch.export.ExportedProgram, dynamic_shapes, input_names, rules: list[dict]) -> dict:
    """The signature as JSON: per input its name, dtype and shape (ints, or {axis, scale} for a
    dynamic size scale x axis); per axis its name and bounds; and the adapter's row rules."""
    users = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges = {str(symbol): span for symbol, span in program.range_constraints.items()}
    names = _axis_names(dynamic_shapes)
    axes, inputs = {}, []
    for i, (name, node_name) in enumerate(zip(input_names, users, strict=True)):
        value = placeholders[node_name].meta["val"]
        shape = []
        for j, size in enumerate(value.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            scale, symbol = size.node.expr.as_coeff_Mul()
            if not (isinstance(symbol, sympy.Symbol) and scale.is_Integer):
                raise ValueError(f"input {name} axis {j}: size {size.node.expr} is not a multiple of one axis")
            span = ranges[str(symbol)]
            axes[str(symbol)] = {"name": names.get((i, j), str(symbol)), "min": _bound(span.lower),
                                 "max": _bound(span.upper)}
            shape.append({"axis": str(symbol), "scale": int(scale)})
        inputs.append({"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": shape})
    return {"inputs": inputs, "axes": axes, "rules": rules}


def compiled_signature(compiled) -> dict:
    """The signature of a compiled plan's program (what `emit` records and `prunec.compile` checks)."""
    plan = compiled.plan
    signature = record(compiled.program, compiled.context.dynamic_shapes, plan.adapter.input_names(),
                       plan.adapter.input_rules(plan.lock["inputs"]))
    derive = plan.adapter.derive_inputs()
    if derive is not None:
        signature["derive"] = derive
    return signature


def _shape_words(entry: dict, axes: dict) -> str:
    parts = []
    for size in entry["shape"]:
        if isinstance(size, int):
            parts.append(str(size))
        else:
            name = axes[size["axis"]]["name"]
            parts.append(name if size["scale"] == 1 else f"{size['scale']}*{name}")
    return f"({', '.join(parts)})"


def _axis_range(axis: dict) -> str:
    return f"{axis['name']} in {axis['min']}..{axis['max'] if axis['max'] is not None else 'any'}"


def bind(signature: dict, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Positional and keyword inputs by name; unknown or missing names are input errors."""
    return _by_name([entry["name"] for entry in signature["inputs"]], args, kwargs)


def _by_name(names: list[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    if len(args) > len(names):
        raise PrunecInputError(f"{len(args)} positional inputs; the artifact takes {len(names)}: {', '.join(names)}")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise PrunecInputError(f"unexpected input {key!r}; the artifact takes {', '.join(names)}")
        if key in bound:
            raise PrunecInputError(f"input {key} given twice (by position and by name)")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise PrunecInputError(f"missing input {missing[0]}; the artifact takes {', '.join(names)}")
    return bound


def derive(rule: dict, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The program's inputs, by name, from what a user passes (`rule["takes"]`, a processor's output).
    anyres: pixel_values [images, crops, 3, H, W] and image_sizes [images, 2] become the real crops
    and the image token layout (`prunec.anyres`)."""
    from .anyres import derive_anyres

    if rule["kind"] != "anyres":
        raise PrunecInputError(f"this prunec does not know the input derivation {rule['kind']!r}; rebuild the artifact")
    bound = _by_name(rule["takes"], args, kwargs)
    pixels, sizes = bound.pop("pixel_values"), bound.pop("image_sizes")
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 5:
        raise PrunecInputError("input pixel_values: the artifact takes a processor's [images, crops, 3, H, W] "
                               f"tensor, got {tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
    if not isinstance(sizes, torch.Tensor) or sizes.dim() != 2 or sizes.shape != (pixels.shape[0], 2):
        raise PrunecInputError(f"input image_sizes: the artifact takes one (height, width) per image, "
                               f"[{pixels.shape[0]}, 2], got {tuple(sizes.shape) if isinstance(sizes, torch.Tensor) else type(sizes).__name__}")
    try:
        bound["pixel_values"], bound["image_layout"], tokens = derive_anyres(rule, pixels, sizes)
    except (ValueError, TypeError) as exc:
        raise PrunecInputError(f"input image_sizes: {exc}") from None
    ids = bound["input_ids"]
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        _check_images_per_row(ids, rule["token"], tokens)
    return bound


def _check_images_per_row(ids: torch.Tensor, token: int, per_image: list[int]) -> None:
    """Each row's image tokens are those of the next whole images, in order."""
    images = iter(enumerate(per_image))
    for row, count in enumerate((ids == token).sum(dim=1).tolist()):
        taken = []
        while sum(taken) < count:
            index, n = next(images, (None, None))
            if index is None:
                break
            taken.append(n)
        if sum(taken) != count:
            raise PrunecInputError(f"input input_ids: row {row} holds {count} image tokens (id {token}), which are not "
                                   f"whole images in order: the images' sizes give {per_image} tokens per image")


def _convert(name: str, value: Any, entry: dict, device: torch.device | None) -> torch.Tensor:
    want = _dtype(entry["dtype"])
    if not isinstance(value, torch.Tensor):
        raise PrunecInputError(f"input {name} is a {type(value).__name__}; the artifact takes a torch.Tensor "
                               f"({entry['dtype']})")
    if device is not None and value.device != device:
        raise PrunecInputError(f"input {name} is on {value.device}; the artifact's weights are on {device}")
    if value.dtype == want:
        return value
    if not want.is_floating_point and not value.dtype.is_floating_point and not value.dtype.is_complex:
        return value.to(want)  # integer or bool ids and masks: every value fits a wider integer
    if want.is_floating_point and value.dtype in _LOSSLESS_FLOATS.get(want, ()):
        return value.to(want)
    takes = ", ".join([entry["dtype"], *(str(d).removeprefix("torch.") for d in _LOSSLESS_FLOATS.get(want, ()))]
                      ) if want.is_floating_point else "integer or bool"
    raise PrunecInputError(f"input {name} is {str(value.dtype).removeprefix('torch.')}; the artifact takes "
                           f"{takes} (converted without loss)")


def _check_shapes(signature: dict, tensors: dict[str, torch.Tensor]) -> None:
    axes = signature["axes"]
    seen: dict[str, tuple[int, str]] = {}  # axis symbol -> (size, the input that fixed it)
    for entry in signature["inputs"]:
        name, value = entry["name"], tensors[entry["name"]]
        expected = _shape_words(entry, axes)
        if value.dim() != len(entry["shape"]):
            raise PrunecInputError(f"input {name} has shape {tuple(value.shape)}; the artifact takes {expected}")
        for j, (size, want) in enumerate(zip(value.shape, entry["shape"])):
            if isinstance(want, int):
                if size != want:
                    raise PrunecInputError(f"input {name} has shape {tuple(value.shape)}; the artifact takes "
                                           f"{expected} (axis {j} is fixed at {want}: rebuild for another size)")
                continue
            axis = axes[want["axis"]]
            count, remainder = divmod(size, want["scale"])
            if remainder:
                raise PrunecInputError(f"input {name} has shape {tuple(value.shape)}; the artifact takes {expected}: "
                                       f"axis {j} must be a multiple of {want['scale']}")
            if count < axis["min"] or (axis["max"] is not None and count > axis["max"]):
                raise PrunecInputError(f"input {name} has shape {tuple(value.shape)}; the artifact takes {expected} "
                                       f"with {_axis_range(axis)}")
            if want["axis"] in seen and seen[want["axis"]][0] != count:
                other = seen[want["axis"]][1]
                raise PrunecInputError(f"input {name} has {axis['name']} {count} at axis {j} but {other} has "
                                       f"{seen[want['axis']][0]}; they must agree")
            seen.setdefault(want["axis"], (count, name))


def _check_rules(rules: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    for rule in rules:
        value = tensors[rule["input"]]
        if rule["kind"] == "values":
            low, high = rule["min"], rule["max"]
            if value.numel() and (int(value.min()) < low or int(value.max()) > high):
                bad = int(value.min()) if int(value.min()) < low else int(value.max())
                raise PrunecInputError(f"input {rule['input']} holds {bad}; the artifact takes {rule['what']} in "
                                       f"{low}..{high}")
        elif rule["kind"] == "count_per_row":
            counts = (value == rule["token"]).sum(dim=-1).tolist()
            allowed = rule.get("allowed", [rule.get("count")])
            wrong = next((row for row, n in enumerate(counts) if n not in allowed), None)
            if wrong is not None:
                takes = (f"exactly {allowed[0]}" if len(allowed) == 1 else
                         f"one of {', '.join(map(str, allowed))}")
                raise PrunecInputError(f"input {rule['input']}: row {wrong} holds {counts[wrong]} {rule['what']} "
                                       f"(id {rule['token']}); the artifact takes {takes} per row")
        elif rule["kind"] == "layout_tokens":
            tokens = int((tensors[rule["per"]] == rule["token"]).sum())
            if tokens != value.shape[0]:
                raise PrunecInputError(f"input {rule['per']} holds {tokens} image tokens (id {rule['token']}), but "
                                       f"the images' sizes give {value.shape[0]}")
        elif rule["kind"] == "rows_for_tokens":
            rows = value.shape[0]
            tokens = int((tensors[rule["per"]] == rule["token"]).sum())
            if rows * rule["tokens"] != tokens:
                raise PrunecInputError(f"input {rule['input']} holds {rows} {rule['what']}, but {rule['per']} holds "
                                       f"{tokens} image tokens (id {rule['token']}), which is "
                                       f"{tokens / rule['tokens']:g} {rule['what']} of {rule['tokens']}")
        elif rule["kind"] == "rows_per_row":
            rows, batch = value.shape[0], tensors[rule["per"]].shape[0]
            if rows != batch * rule["count"]:
                raise PrunecInputError(f"input {rule['input']} holds {rows} {rule['what']} for a batch of {batch}; "
                                       f"the artifact takes {rule['count']} per row ({batch * rule['count']})")
        elif rule["kind"] == "fixed_axes":
            sizes = tuple(value.shape[int(axis)] for axis in rule["axes"])
            if sizes != tuple(rule["axes"].values()):
                raise PrunecInputError(f"input {rule['input']} has shape {tuple(value.shape)}; the artifact takes "
                                       f"{rule['what']} {'x'.join(map(str, rule['axes'].values()))} only "
                                       f"({rule['why']}; rebuild for another size)")
        else:
            raise PrunecInputError(f"this prunec does not know the input rule {rule['kind']!r}; rebuild the artifact")


def check_inputs(signature: dict, args: tuple, kwargs: dict, device: torch.device | None = None
                 ) -> tuple[torch.Tensor, ...]:
    """The program's positional inputs, checked and converted; PrunecInputError otherwise."""
    if "derive" in signature:
        args, kwargs = (), derive(signature["derive"], args, kwargs)
    bound = bind(signature, args, kwargs)
    tensors = {e["name"]: _convert(e["name"], bound[e["name"]], e, device) for e in signature["inputs"]}
    _check_shapes(signature, tensors)
    _check_rules(signature["rules"], tensors)
    return tuple(tensors[e["name"]] for e in signature["inputs"])


class CheckedModule(torch.nn.Module):
    """An artifact's program behind its input checks: call it positionally or with a processor's
    keyword output (`module(**processor(images=..., text=...))`)."""

    def __init__(self, program_module: torch.nn.Module, signature: dict):
        super().__init__()
        self.program = program_module
        self.signature = signature

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(entry["name"] for entry in self.signature["inputs"])

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The exported program's GraphModule (under any backend wrapper), e.g. for an fx.Interpreter."""
        inner = self.program
        return getattr(inner, "module", inner) if not isinstance(inner, torch.fx.GraphModule) else inner

    def forward(self, *args, **kwargs):
        weight = next(iter(self.program.parameters()), None)
        inputs = check_inputs(self.signature, args, dict(kwargs), weight.device if weight is not None else None)
        return self.program(*inputs)


def runnable(program_module: torch.nn.Module, backend: str, signature: dict | None) -> torch.nn.Module:
    """A program's module as users get it: under the spec's `backend:` when it is not `auto`, and
    behind the input checks when its signature is known."""
    from .kernels import WithBackend

    module = program_module if backend == "auto" else WithBackend(program_module, backend)
    return module if signature is None else CheckedModule(module, signature)
