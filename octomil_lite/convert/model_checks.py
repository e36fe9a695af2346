"""Cheap checks on model archives before a framework opens them (defence in depth; the job sandbox is the boundary).

`torch.export.load` unpickles weights and constants marked `use_pickle`, custom and opaque objects, legacy
weight files and (after a failed weights-only attempt) the sample inputs; it links AOTInductor libraries and
`exec`s a program's guard code. `torch.jit.load` runs the TorchScript code of `__setstate__` methods. A .pt2
must therefore consist only of JSON, raw tensor bytes and weights-only sample inputs; a TorchScript archive
must not name file-reading operations. A TF SavedModel runs graph ops on load (resource initializers) and on
every call, so its graphs must not hold ops that touch files, outside the save/restore functions TF writes.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

MAX_MEMBERS = 100_000
MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_SAMPLE_INPUT_BYTES = 64 * 1024 * 1024

# Members of a .pt2 (below its root folder) that hold only metadata or raw bytes.
_PT2_PLAIN = re.compile(r"(archive_format|archive_version|byteorder|\.data/[\w.-]+|extra/[^/]+"
                        r"|data/weights/weight_\d+|data/constants/tensor_\d+)")
_PT2_MODEL = re.compile(r"models/([\w.-]+)\.json")
_PT2_CONFIG = re.compile(r"data/(weights|constants)/([\w.-]+)_(weights|constants)_config\.json")
_PT2_SAMPLE_INPUTS = re.compile(r"data/sample_inputs/([\w.-]+)\.pt")
# Graph call targets: core aten/prims ops and Python operators; anything else needs a registered library.
_PT2_TARGET = re.compile(r"(torch\.ops\.(aten|prims|higher_order)\.[\w.]+|_operator\.\w+|math\.\w+"
                         r"|torch\._assert|torch\.sym_\w+|torch\._sym_\w+)")
# Operators that reach files or storage by name, even among aten's.
_FILE_OPS = re.compile(r"from_file|_file\b|\bsave|\bload|\bopen")
# TorchScript source that reads or writes files when run (e.g. in __setstate__ during torch.jit.load).
_SCRIPT_FILE_CALLS = re.compile(rb"\b(from_file|torch\.load|torch\.save|open|_load_for_mobile)\s*\(")


class RefusedArchive(ValueError):
    """The archive holds something the framework would execute or unpickle."""


def _members(path: Path) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
    archive = zipfile.ZipFile(path)
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        archive.close()
        raise RefusedArchive(f"the archive has {len(infos)} entries, over the {MAX_MEMBERS} limit")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        parts = PurePosixPath(info.filename).parts
        if len(parts) < 2 or ".." in parts or info.filename.startswith("/"):
            archive.close()
            raise RefusedArchive(f"unexpected archive entry {_excerpt(info.filename)}")
        if not info.is_dir():
            members["/".join(parts[1:])] = info
    return archive, members


def _excerpt(name: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in name[:80])
    return repr(text + ("…" if len(name) > 80 else ""))


def _json(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > MAX_JSON_BYTES:
        raise RefusedArchive(f"{_excerpt(info.filename)} is {info.file_size} bytes, over the JSON limit")
    try:
        return json.loads(archive.read(info))
    except ValueError:
        raise RefusedArchive(f"{_excerpt(info.filename)} is not JSON") from None


def check_exported_program(path: Path) -> None:
    """Refuse a .pt2 that torch.export.load would unpickle from, link native code from or exec code from."""
    archive, members = _members(path)
    with archive:
        models = 0
        for name, info in members.items():
            if _PT2_PLAIN.fullmatch(name):
                continue
            if _PT2_MODEL.fullmatch(name):
                models += 1
                _check_program_json(_json(archive, info))
            elif _PT2_CONFIG.fullmatch(name):
                _check_payload_config(name, _json(archive, info))
            elif _PT2_SAMPLE_INPUTS.fullmatch(name):
                _check_sample_inputs(archive, info)
            elif name.startswith(("data/weights/", "data/constants/")) and name.endswith(".pt"):
                raise RefusedArchive(f"the archive uses legacy pickled weight files ({_excerpt(name)}); "
                                     "re-save it with torch.export.save from a current PyTorch")
            elif name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")):
                raise RefusedArchive(f"the archive holds compiled or external payloads ({_excerpt(name)}); "
                                     "upload a plain torch.export.save program")
            else:
                raise RefusedArchive(f"unexpected entry {_excerpt(name)} in a torch.export archive")
        if models == 0:
            raise RefusedArchive("the archive holds no exported program (models/*.json)")


def _check_payload_config(name: str, config: Any) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise RefusedArchive(f"{_excerpt(name)} is not a weights/constants configuration")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise RefusedArchive(f"{_excerpt(name)} has a malformed entry")
        if meta.get("use_pickle"):
            raise RefusedArchive(f"the tensor {_excerpt(str(fqn))} is stored as a pickle (use_pickle), which "
                                 "would run code to load; save plain tensors only")
        path_name = str(meta.get("path_name", ""))
        if not re.fullmatch(r"(weight|tensor)_\d+", path_name):
            raise RefusedArchive(f"the constant {_excerpt(str(fqn))} is a custom or opaque object "
                                 f"({_excerpt(path_name)}); only tensors are accepted")


def _check_program_json(program: Any) -> None:
    if not isinstance(program, dict):
        raise RefusedArchive("the exported program is not a JSON object")
    if program.get("guards_code"):
        raise RefusedArchive("the exported program carries guard code, which torch would exec on load; "
                             "re-export it without it")
    pending: list[Any] = [program]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if "as_custom_obj" in node:
                raise RefusedArchive("the exported program uses custom (torchbind) objects; only tensors are "
                                     "accepted")
            target = node.get("target")
            if isinstance(target, str) and "inputs" in node and (
                    not _PT2_TARGET.fullmatch(target) or _FILE_OPS.search(target)):
                raise RefusedArchive(f"the exported program calls {_excerpt(target)}, which is not a core "
                                     "tensor operation")
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)


def _check_sample_inputs(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    import torch

    if info.file_size > MAX_SAMPLE_INPUT_BYTES:
        raise RefusedArchive(f"the sample inputs are {info.file_size} bytes, over the limit")
    try:
        # torch would retry a failed weights-only load with full unpickling; refuse instead.
        torch.load(io.BytesIO(archive.read(info)), weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means torch would fall back to full unpickling
        raise RefusedArchive("the sample inputs are not plain tensors (torch would unpickle them with code "
                             "execution); re-export with tensor inputs") from None


def check_torchscript(path: Path) -> None:
    """Refuse a TorchScript archive whose code calls file-reading functions (run by __setstate__ on load)."""
    archive, members = _members(path)
    with archive:
        for name, info in members.items():
            if not (name.startswith("code/") and name.endswith(".py")):
                continue
            found = _SCRIPT_FILE_CALLS.search(archive.read(info))
            if found:
                raise RefusedArchive(f"the TorchScript code calls {found.group(1).decode()}(), which reads or writes "
                                     "files when the model loads; such models are not accepted")


# TF ops that read, write or list files, or call back into Python, by type name.
TF_FILE_OPS = frozenset({
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2", "FixedLengthRecordReader",
    "FixedLengthRecordReaderV2", "TFRecordReader", "TFRecordReaderV2", "IdentityReader", "IdentityReaderV2",
    "LMDBReader", "ReaderRead", "ReaderReadV2", "ReaderReadUpTo", "ReaderReadUpToV2", "ReaderRestoreState",
    "ReaderRestoreStateV2", "TextLineDataset", "TFRecordDataset", "TFRecordDatasetV2", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset", "LMDBDataset",
    "ExperimentalLMDBDataset", "SqlDataset", "ExperimentalSqlDataset", "SnapshotDataset", "SnapshotDatasetV2",
    "LoadDataset", "SaveDataset", "SaveDatasetV2", "InitializeTableFromTextFile", "InitializeTableFromTextFileV2",
    "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "CreateSummaryFileWriter", "WriteSummary",
    "WriteScalarSummary", "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary", "WriteGraphSummary",
    "WriteRawProtoSummary", "CreateSummaryDbWriter", "ImportEvent", "FlushSummaryWriter", "DecodeProtoV2",
})
# Checkpoint ops, legitimate only inside the save/restore functions tf.saved_model.save traces.
TF_CHECKPOINT_OPS = frozenset({"Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice",
                               "MergeV2Checkpoints"})
_TF_SAVER_FUNCTION = re.compile(r"__inference__traced_(save|restore)_\d+")


def check_saved_model(saved_model_pb: Path) -> None:
    """Refuse a SavedModel whose graphs (main graph or any function) hold file or Python-callback ops."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(saved_model_pb.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise RefusedArchive("saved_model.pb is not a SavedModel protocol buffer") from None
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        _check_tf_nodes(graph.node, in_saver=False)
        for function in graph.library.function:
            _check_tf_nodes(function.node_def, in_saver=bool(_TF_SAVER_FUNCTION.fullmatch(function.signature.name)))


def _check_tf_nodes(nodes: Any, in_saver: bool) -> None:
    for node in nodes:
        op = node.op
        if op in TF_FILE_OPS or (op in TF_CHECKPOINT_OPS and not in_saver):
            raise RefusedArchive(f"the SavedModel's graph uses the {_excerpt(op)} op, which reads or writes files; "
                                 "such models are not accepted")
        if op == "PrintV2" and node.attr["output_stream"].s.startswith(b"file://"):
            raise RefusedArchive("the SavedModel's graph prints to a file; such models are not accepted")
