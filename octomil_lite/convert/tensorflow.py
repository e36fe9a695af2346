"""TensorFlow models (Keras .keras/.h5, zipped SavedModel, TFLite) to ONNX, TFLite and Core ML; imported lazily."""

from __future__ import annotations

import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .job import Converted, Impossible, Job, Parity, dist_version, framework_version, require
from .model_checks import check_saved_model
from .outputs import ONNX_OPSET, coreml_result, save_onnx
from .parity import FLOAT_TOLERANCE, TFLITE_TOLERANCE, compare, onnx_input_names, onnx_run, sample

MAX_UNZIPPED_BYTES = 4 * 1024**3
MAX_ZIP_MEMBERS = 100_000


def _check_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip after checking its declared sizes and member names (zip bombs, path traversal)."""
    archive = zipfile.ZipFile(path)
    members = archive.infolist()
    if len(members) > MAX_ZIP_MEMBERS:
        raise ValueError(f"the zip has {len(members)} entries, over the {MAX_ZIP_MEMBERS} limit")
    total = sum(m.file_size for m in members)
    if total > MAX_UNZIPPED_BYTES:
        raise ValueError(f"the zip would expand to {total} bytes, over the {MAX_UNZIPPED_BYTES} byte limit")
    for m in members:
        parts = Path(m.filename).parts
        if m.filename.startswith(("/", "\\")) or ".." in parts or ":" in m.filename:
            raise ValueError(f"the zip entry {m.filename!r} points outside the archive")
        if stat.S_ISLNK(m.external_attr >> 16):
            raise ValueError(f"the zip entry {m.filename!r} is a symbolic link")
    return archive


def _extract_saved_model(job: Job) -> Path:
    target = job.scratch / "saved_model"
    with _check_zip(job.src) as archive:
        written = 0
        for member in archive.infolist():
            dest = target / member.filename
            if member.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > MAX_UNZIPPED_BYTES:
                        raise ValueError("the zip expands past the size limit")
                    out.write(chunk)
    found = sorted(p.parent for p in target.rglob("saved_model.pb"))
    if not found:
        raise ValueError("the zip holds no saved_model.pb; zip the SavedModel directory itself")
    directory = min(found, key=lambda p: len(p.parts))
    check_saved_model(directory / "saved_model.pb")
    return directory


def _load_keras(job: Job) -> tuple[Any, str | None]:
    require("tensorflow", "tensorflow")
    import json

    import keras

    if job.kind == "keras":
        with _check_zip(job.src) as archive:
            meta = json.loads(archive.read("metadata.json")) if "metadata.json" in archive.namelist() else {}
        path = _with_suffix(job, ".keras")
    else:
        meta = {}
        path = _with_suffix(job, ".h5")
    # safe_mode refuses Lambda layers' marshalled bytecode; unknown custom classes fail to resolve.
    model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    return model, meta.get("keras_version") or dist_version("keras")


def _fixed_shapes(job: Job, shapes: list[list[int | None]]) -> list[list[int]]:
    """Concrete input shapes for Core ML: input_shape for a single input, else batch 1."""
    if job.input_shape is not None and len(shapes) == 1:
        return [list(job.input_shape)]
    fixed = []
    for shape in shapes:
        dims = [1, *shape[1:]] if shape else []
        if any(d is None for d in dims):
            raise Impossible("the model's input has unknown dimensions and Core ML needs them fixed; re-upload "
                             "with the `input_shape` form field, e.g. `1,224,224,3`")
        fixed.append([int(d) for d in dims if d is not None])
    return fixed


def _tf_to_coreml(function: Any, names: list[str], shapes: list[list[int]], job: Job) -> Converted:
    """Convert one concrete TensorFlow function with fixed input shapes to an ML program."""
    import coremltools as ct

    inputs = [ct.TensorType(name=n, shape=tuple(s)) for n, s in zip(names, shapes)]
    mlmodel = ct.convert([function], source="tensorflow", convert_to="mlprogram", inputs=inputs)
    return coreml_result(mlmodel, job, shapes[0][0] if shapes[0] else 0, framework="tensorflow")


def keras_to_coreml(job: Job) -> Converted:
    require("coreml", "tensorflow", "coremltools")
    import tensorflow as tf

    model, _ = _load_keras(job)
    shapes = _fixed_shapes(job, [list(t.shape) for t in model.inputs])
    names = [f"input_{i}" for i in range(len(model.inputs))]
    signature = [tf.TensorSpec(s, t.dtype, name=n) for s, t, n in zip(shapes, model.inputs, names)]

    @tf.function(input_signature=signature)
    def call(*xs: Any) -> Any:
        return model(list(xs) if len(xs) > 1 else xs[0], training=False)

    return _tf_to_coreml(call.get_concrete_function(), names, shapes, job)


def _keras_sample_inputs(job: Job, model: Any, batch: int = 8) -> list[Any] | None:
    inputs = []
    for t in model.inputs:
        shape = list(t.shape)
        if job.input_shape is not None and len(model.inputs) == 1:
            shape = list(job.input_shape)
        shape[0] = shape[0] or batch
        if any(d is None for d in shape):
            return None
        inputs.append(sample(shape, str(t.dtype)))
    return inputs


def _keras_expected(model: Any, inputs: list[Any]) -> list[Any]:
    import tensorflow as tf

    out = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return [t.numpy() for t in tf.nest.flatten(out)]


def keras_to_onnx(job: Job) -> Converted:
    require("tensorflow", "tensorflow", "tf2onnx")
    import tensorflow as tf
    import tf2onnx

    model, version = _load_keras(job)
    names = [f"input_{i}" for i in range(len(model.inputs))]
    signature = [tf.TensorSpec(t.shape, t.dtype, name=n) for t, n in zip(model.inputs, names)]

    @tf.function(input_signature=signature)
    def call(*xs: Any) -> Any:
        return model(list(xs) if len(xs) > 1 else xs[0], training=False)

    onnx_model, _ = tf2onnx.convert.from_function(call, input_signature=signature, opset=ONNX_OPSET)
    path = save_onnx(onnx_model, job)
    inputs = _keras_sample_inputs(job, model)
    if inputs is None:
        parity = Parity(None, FLOAT_TOLERANCE, None, 0, "the input has unknown dimensions; give input_shape to check")
    else:
        got = onnx_run(path, dict(zip(onnx_input_names(path), inputs)))
        parity = compare(_keras_expected(model, inputs), list(got.values()), FLOAT_TOLERANCE, len(inputs[0]))
    return Converted(path, parity, "tensorflow", version, f"tf2onnx {dist_version('tf2onnx')}")


def _tflite_run(path: Path, named_inputs: dict[str, Any] | list[Any]) -> dict[str, Any]:
    """Run a TFLite model; inputs by signature name, or in the interpreter's input order."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    if isinstance(named_inputs, dict):
        runner = interpreter.get_signature_runner()
        return dict(sorted(runner(**named_inputs).items()))
    details = interpreter.get_input_details()
    for d, x in zip(details, named_inputs):
        interpreter.resize_tensor_input(d["index"], x.shape)
    interpreter.allocate_tensors()
    for d, x in zip(details, named_inputs):
        interpreter.set_tensor(d["index"], x)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


def _tflite_signature_inputs(path: Path) -> list[str]:
    import tensorflow as tf

    runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner()
    return list(runner.get_input_details())


def _write_tflite(data: bytes, job: Job) -> Path:
    path = job.out_dir / "model.tflite"
    path.write_bytes(data)
    return path


def keras_to_tflite(job: Job) -> Converted:
    require("tensorflow", "tensorflow")
    import tensorflow as tf

    model, version = _load_keras(job)
    path = _write_tflite(tf.lite.TFLiteConverter.from_keras_model(model).convert(), job)
    inputs = _keras_sample_inputs(job, model)
    if inputs is None:
        parity = Parity(None, TFLITE_TOLERANCE, None, 0, "the input has unknown dimensions; give input_shape to check")
    else:
        names = _tflite_signature_inputs(path)
        keras_names = [t.name for t in model.inputs]
        if sorted(names) == sorted(keras_names):
            feeds = dict(zip(keras_names, inputs))
        else:
            feeds = dict(zip(names, inputs))
        got = _tflite_run(path, feeds)
        parity = compare(_keras_expected(model, inputs), list(got.values()), TFLITE_TOLERANCE, len(inputs[0]))
    return Converted(path, parity, "tensorflow", version, f"tf.lite {framework_version('tensorflow')}")


@dataclass
class SavedModel:
    """An extracted SavedModel and its serving signature; `loaded` owns the signature's variables."""

    directory: Path
    loaded: Any
    key: str
    names: list[str]
    specs: list[Any]

    def call(self, samples: list[Any]) -> list[Any]:
        """Run the signature; outputs in sorted key order, as the converted models give them."""
        import tensorflow as tf

        out = self.loaded.signatures[self.key](**{n: tf.constant(x) for n, x in zip(self.names, samples)})
        return [out[k].numpy() for k in sorted(out)]


def _load_saved_model(job: Job) -> SavedModel:
    require("tensorflow", "tensorflow")
    import tensorflow as tf

    directory = _extract_saved_model(job)
    loaded = tf.saved_model.load(str(directory))
    if not loaded.signatures:
        raise ValueError("the SavedModel has no signatures; export it with a serving signature")
    key = "serving_default" if "serving_default" in loaded.signatures else min(loaded.signatures)
    specs = loaded.signatures[key].structured_input_signature[1]
    names = sorted(specs)
    return SavedModel(directory, loaded, key, names, [specs[n] for n in names])


def _saved_model_samples(job: Job, specs: list[Any]) -> list[Any] | None:
    samples = []
    for spec in specs:
        shape = list(job.input_shape) if job.input_shape is not None and len(specs) == 1 else list(spec.shape)
        if shape and shape[0] is None:
            shape[0] = 8
        if any(d is None for d in shape):
            return None
        samples.append(sample(shape, spec.dtype.name))
    return samples


def saved_model_to_onnx(job: Job) -> Converted:
    require("tensorflow", "tensorflow", "tf2onnx")
    import tensorflow as tf
    import tf2onnx

    saved = _load_saved_model(job)
    function = saved.loaded.signatures[saved.key]
    signature = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(saved.specs, saved.names)]

    @tf.function(input_signature=signature)
    def call(*xs: Any) -> Any:
        out = function(**dict(zip(saved.names, xs)))
        return [out[k] for k in sorted(out)]

    onnx_model, _ = tf2onnx.convert.from_function(call, input_signature=signature, opset=ONNX_OPSET)
    path = save_onnx(onnx_model, job)
    samples = _saved_model_samples(job, saved.specs)
    if samples is None:
        parity = Parity(None, FLOAT_TOLERANCE, None, 0, "the input has unknown dimensions; give input_shape to check")
    else:
        got = onnx_run(path, dict(zip(onnx_input_names(path), samples)))
        parity = compare(saved.call(samples), list(got.values()), FLOAT_TOLERANCE, len(samples[0]))
    return Converted(path, parity, "tensorflow", framework_version("tensorflow"),
                     f"tf2onnx {dist_version('tf2onnx')}")


def saved_model_to_tflite(job: Job) -> Converted:
    import tensorflow as tf

    saved = _load_saved_model(job)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved.directory), signature_keys=[saved.key])
    path = _write_tflite(converter.convert(), job)
    samples = _saved_model_samples(job, saved.specs)
    if samples is None:
        parity = Parity(None, TFLITE_TOLERANCE, None, 0, "the input has unknown dimensions; give input_shape to check")
    else:
        got = _tflite_run(path, dict(zip(saved.names, samples)))
        parity = compare(saved.call(samples), list(got.values()), TFLITE_TOLERANCE, len(samples[0]))
    version = framework_version("tensorflow")
    return Converted(path, parity, "tensorflow", version, f"tf.lite {version}")


def saved_model_to_coreml(job: Job) -> Converted:
    require("coreml", "tensorflow", "coremltools")
    saved = _load_saved_model(job)
    function = saved.loaded.signatures[saved.key]
    shapes = _fixed_shapes(job, [list(s.shape) for s in saved.specs])
    return _tf_to_coreml(function, saved.names, shapes, job)


def tflite_to_onnx(job: Job) -> Converted:
    require("tensorflow", "tensorflow", "tf2onnx")
    import tensorflow as tf
    import tf2onnx

    interpreter = tf.lite.Interpreter(model_path=str(job.src))
    details = interpreter.get_input_details()
    onnx_model, _ = tf2onnx.convert.from_tflite(str(job.src), opset=ONNX_OPSET)
    path = save_onnx(onnx_model, job)
    samples = []
    for d in details:
        shape = [int(s) if s > 0 else 8 for s in d["shape_signature"]]
        if job.input_shape is not None and len(details) == 1:
            shape = list(job.input_shape)
        samples.append(sample(shape, d["dtype"]))
    expected = _tflite_run(job.src, samples)
    onnx_names = onnx_input_names(path)
    by_name = {d["name"]: x for d, x in zip(details, samples)}
    feeds = {n: by_name[n] for n in onnx_names} if set(onnx_names) == set(by_name) else dict(zip(onnx_names, samples))
    got = onnx_run(path, feeds)
    ordered = [got[n] for n in expected] if set(expected) == set(got) else list(got.values())
    parity = compare(list(expected.values()), ordered, TFLITE_TOLERANCE, len(samples[0]) if samples else 0)
    return Converted(path, parity, "tensorflow", framework_version("tensorflow"), f"tf2onnx {dist_version('tf2onnx')}")


def _with_suffix(job: Job, suffix: str) -> Path:
    # Keras and TF pick their loader from the file name; uploads are stored without one.
    link = job.scratch / f"upload{suffix}"
    link.symlink_to(job.src.resolve())
    return link
