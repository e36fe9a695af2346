"""Weights files in the sandbox: a torch state_dict read with weights_only=True, and FedAvg of updates.

Run only inside the sandboxed worker (tasks inspect-weights and aggregate-weights), never in the server.
"""

from __future__ import annotations

from typing import Any


def _torch_state(path: str) -> dict[str, Any]:
    """A torch.save'd state_dict as numpy arrays, loaded with weights_only=True (no arbitrary unpickling)."""
    import torch

    from .tensors import WeightsError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is the sender's file
        raise WeightsError(f"not a torch state_dict loadable with weights_only=True ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise WeightsError("the torch file does not hold a state_dict (a dict of tensor names to tensors)")
    try:
        return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}
    except TypeError as exc:
        raise WeightsError(f"a tensor has a dtype NumPy cannot hold ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _arrays(spec: dict[str, Any]) -> dict[str, Any]:
    from .sandbox import job_input
    from .tensors import load_arrays

    path = job_input(spec["input"])
    return _torch_state(path) if spec["encoding"] == "torch" else load_arrays(path, spec["encoding"])


def inspect_weights(payload: dict[str, Any]) -> dict[str, Any]:
    """Names, shapes and dtypes of a weights file's tensors, and which hold NaN or infinity."""
    from .tensors import WeightsError, nonfinite

    try:
        arrays = _arrays(payload)
    except WeightsError as exc:
        return {"ok": False, "reason": str(exc)}
    return {"ok": True, "signature": {k: [list(a.shape), a.dtype.name] for k, a in arrays.items()},
            "nonfinite": nonfinite(arrays)}


def aggregate_weights(payload: dict[str, Any]) -> dict[str, Any]:
    """FedAvg of the updates against the base; writes the result as a torch state_dict or an .npz."""
    from .tensors import WeightsError, fedavg, named, save_npz

    try:
        base = _arrays(payload["base"])
        signature = {k: (list(a.shape), a.dtype.name) for k, a in base.items()}
        updates = ((named(_arrays(u), signature), float(u["weight"]), bool(u["delta"])) for u in payload["updates"])
        result = fedavg(base, updates)
    except WeightsError as exc:
        return {"ok": False, "reason": str(exc)}
    out = "aggregated"  # in the job's scratch; the worker sends it through the output descriptor
    if payload["base"]["encoding"] == "torch":
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in result.items()}, out)
    else:
        save_npz(out, result)
    return {"ok": True, "tensors": len(result), "path": out}
