"""PyTorch models (torch.export .pt2, TorchScript) to ONNX and Core ML; torch is imported lazily."""

from __future__ import annotations

from typing import Any

from .job import Converted, Impossible, Job, dist_version, framework_version, require
from .model_checks import check_exported_program, check_torchscript
from .outputs import ONNX_OPSET, coreml_result
from .parity import FLOAT_TOLERANCE, compare, onnx_input_names, onnx_run, sample

STATE_DICT_REASON = ("a PyTorch state_dict holds only weights; re-export with torch.export (.pt2) "
                     "or TorchScript so the architecture travels with it")
PICKLED_MODULE_REASON = ("the file pickles a whole nn.Module, which needs its Python class (the architecture) "
                         "and would run untrusted code to load; re-export with torch.export (.pt2) or TorchScript")
INPUT_SHAPE_REASON = ("a TorchScript model does not record its input shape; re-upload with the "
                      "`input_shape` form field, e.g. `1,3,32,32`")


def torch_pickle(job: Job) -> Converted:
    require("torch", "torch")
    import pickle

    import torch

    try:
        obj = torch.load(str(job.src), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            raise Impossible(PICKLED_MODULE_REASON) from None
        raise
    if isinstance(obj, dict):
        raise Impossible(STATE_DICT_REASON)
    raise Impossible(f"the file holds a {type(obj).__name__}, not a model; upload a torch.export (.pt2) or "
                     "TorchScript file")


def _user_input_shapes(job: Job, program: Any) -> list[tuple[tuple[int, ...], Any]]:
    """Shape and dtype of each user input of an ExportedProgram, from input_shape or its example inputs."""
    import torch

    user_input = torch.export.graph_signature.InputKind.USER_INPUT
    specs = [s for s in program.graph_signature.input_specs if s.kind == user_input]
    placeholders = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    shapes = []
    for i, spec in enumerate(specs):
        fake = placeholders.get(spec.arg.name)
        if fake is None or not hasattr(fake, "shape"):
            raise ValueError(f"input {spec.arg.name} is not a tensor; only tensor inputs are supported")
        if job.input_shape is not None and len(specs) == 1:
            shapes.append((job.input_shape, fake.dtype))
            continue
        example = (getattr(program, "example_inputs", None) or ((), {}))[0]
        if i < len(example) and isinstance(example[i], torch.Tensor):
            shapes.append((tuple(example[i].shape), fake.dtype))
            continue
        try:
            shapes.append((tuple(int(d) for d in fake.shape), fake.dtype))
        except (TypeError, ValueError):
            raise Impossible("the exported program has dynamic input dimensions and no example inputs; "
                             "re-upload with the `input_shape` form field, e.g. `1,3,32,32`") from None
    return shapes


def _torch_inputs(shapes: list[tuple[tuple[int, ...], Any]]) -> list[Any]:
    import torch

    return [torch.from_numpy(sample(shape, str(dtype).replace("torch.", ""))) for shape, dtype in shapes]


def _flat_tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value.detach().numpy()]
    if isinstance(value, dict):
        return [t for k in value for t in _flat_tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


DYNAMO_OPSET = max(ONNX_OPSET, 18)  # the dynamo exporter's registry starts at opset 18


def reuse_onnx_registry() -> None:
    """Build torch.onnx's registry of torchlib functions once per process, not once per export.

    torch.onnx rebuilds it on every dynamo export (about 2.5 s, re-parsing ~500 onnxscript functions' source).
    A warm job calls this before its rehearsal export, so its one real export reuses the registry; a job is
    discarded after that export, so nothing built for one upload is ever seen by another."""
    import functools

    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry
    if getattr(registry.from_torchlib, "_octomil_cached", False):
        return
    build = registry.from_torchlib.__func__  # type: ignore[attr-defined]

    @functools.cache
    def cached(cls: Any, opset_version: int = build.__defaults__[0]) -> Any:
        return build(cls, opset_version=opset_version)

    def from_torchlib(cls: Any, opset_version: int = build.__defaults__[0]) -> Any:
        return cached(cls, opset_version)

    from_torchlib._octomil_cached = True  # type: ignore[attr-defined]
    registry.from_torchlib = classmethod(from_torchlib)  # type: ignore[assignment,method-assign]


def _load_exported(job: Job) -> Any:
    require("torch", "torch")
    import torch

    check_exported_program(job.src)
    return torch.export.load(str(job.src))


def exported_to_onnx(job: Job) -> Converted:
    require("torch", "torch", "onnxscript")
    import torch

    program = _load_exported(job)
    inputs = _torch_inputs(_user_input_shapes(job, program))
    path = job.out_dir / "model.onnx"
    torch.onnx.export(program, tuple(inputs), str(path), dynamo=True, external_data=False,
                      opset_version=DYNAMO_OPSET)
    with torch.no_grad():
        expected = _flat_tensors(program.module()(*inputs))
    got = onnx_run(path, dict(zip(onnx_input_names(path), (t.numpy() for t in inputs))))
    parity = compare(expected, list(got.values()), FLOAT_TOLERANCE, len(inputs[0]) if inputs else 0)
    converter = f"torch.onnx (dynamo) {dist_version('torch')}"
    return Converted(path, parity, "pytorch", framework_version("pytorch"), converter)


def _load_torchscript(job: Job) -> tuple[Any, tuple[int, ...]]:
    require("torch", "torch")
    import torch

    if job.input_shape is None:
        raise Impossible(INPUT_SHAPE_REASON)
    check_torchscript(job.src)
    return torch.jit.load(str(job.src), map_location="cpu").eval(), job.input_shape


def torchscript_to_onnx(job: Job) -> Converted:
    import torch

    module, shape = _load_torchscript(job)
    x = torch.from_numpy(sample(shape))
    path = job.out_dir / "model.onnx"
    # torch.export cannot trace a ScriptModule, so this is the TorchScript-based exporter.
    torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["input"], opset_version=ONNX_OPSET)
    with torch.no_grad():
        expected = _flat_tensors(module(x))
    got = onnx_run(path, {"input": x.numpy()})
    parity = compare(expected, list(got.values()), FLOAT_TOLERANCE, shape[0])
    converter = f"torch.onnx (TorchScript) {dist_version('torch')}"
    return Converted(path, parity, "pytorch", framework_version("pytorch"), converter)


def exported_to_coreml(job: Job) -> Converted:
    require("coreml", "torch", "coremltools")
    import coremltools as ct

    program = _load_exported(job)
    shapes = _user_input_shapes(job, program)
    mlmodel = ct.convert(program.run_decompositions({}), convert_to="mlprogram")
    return coreml_result(mlmodel, job, shapes[0][0][0] if shapes and shapes[0][0] else 0)


def torchscript_to_coreml(job: Job) -> Converted:
    require("coreml", "torch", "coremltools")
    import coremltools as ct

    module, shape = _load_torchscript(job)
    mlmodel = ct.convert(module, inputs=[ct.TensorType(name="input", shape=shape)], convert_to="mlprogram")
    return coreml_result(mlmodel, job, shape[0])
