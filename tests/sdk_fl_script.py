"""The Octomil SDK's federated-learning flow, unmodified, against octomil-lite (run by tests/test_sdk_federated.py).

Runs under the SDK's interpreter (octomil-sdk==4.1.2). The SDK imports torch lazily for state_dicts; when its
virtualenv has none, OCTOMIL_LITE_TORCH_PATH (the project's site-packages) is appended to sys.path, after the
SDK's own packages. Usage: OCTOMIL_LITE_DEVICE_KEY=... OCTOMIL_LITE_WRITE_KEY=... python sdk_fl_script.py CONFIG

Prints {"steps": ..., "trace": ..., "sent": {...}} as sdk_script.py does; "sent" holds every tensor a client
uploaded (as lists), so the test can compute FedAvg by hand.
"""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

if os.environ.get("OCTOMIL_LITE_TORCH_PATH"):
    sys.path.append(os.environ["OCTOMIL_LITE_TORCH_PATH"])

import httpx
from octomil.auth import OrgApiKeyAuth
from octomil.client import OctomilClient
from octomil.control import OctomilControl
from octomil.python.octomil.api_client import OctomilClientError, _ApiClient
from octomil.python.octomil.federated_client import FederatedClient
from octomil.python.octomil.federation import Federation
from sdk_script import STEPS, TRACE, step

SENT: dict[str, list[dict[str, Any]]] = {"train": [], "join": []}


def state_info(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() for k, v in state.items()}


class _Recorded(Federation):
    """A Federation that the JSON report can show (step() records what a call returns)."""

    def __json__(self) -> dict[str, Any]:
        return {"federation_id": getattr(self, "federation_id", None)}


def federation_for(write_key: str, api_base: str) -> Federation:
    """Federation(...) as users build it; where the registry has no /federations yet (the SDK lifecycle issue),
    the same object without its constructor's lookup: train() is the SDK's own code either way."""
    try:
        return _Recorded(auth_token_provider=lambda: write_key, name="lab", api_base=api_base)
    except OctomilClientError:
        federation = _Recorded.__new__(_Recorded)
        federation.api = _ApiClient(auth_token_provider=lambda: write_key, api_base=api_base)
        federation.org_id, federation.name = "default", "lab"
        federation.last_model_id = federation.last_version = None
        return federation


def main() -> None:
    import torch

    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    api_base, model = cfg["api_base"], cfg["model"]
    device_key, write_key = os.environ["OCTOMIL_LITE_DEVICE_KEY"], os.environ["OCTOMIL_LITE_WRITE_KEY"]
    clients = [FederatedClient(auth_token_provider=lambda: device_key, api_base=api_base,
                               device_identifier=f"lab-laptop-{i}") for i in range(3)]

    for i, client in enumerate(clients):
        step(f"register_{i}", client.register)
    again = FederatedClient(auth_token_provider=lambda: device_key, api_base=api_base,
                            device_identifier="lab-laptop-0")
    step("register_0_again", again.register)

    def pulled(client: FederatedClient, version: str | None = None) -> dict[str, Any]:
        state = torch.load(io.BytesIO(client.pull_model(model, version=version)), weights_only=True)
        return state_info(state)

    step("pull_model", lambda: pulled(clients[0]))

    def local_train(seed: int, base: dict[str, Any], n: int) -> tuple[dict[str, Any], int, dict[str, float]]:
        """A few SGD steps of a tiny torch model on random data (the client's private data)."""
        gen = torch.Generator().manual_seed(seed)
        net = torch.nn.Linear(4, 2)
        net.load_state_dict(base)
        x, y = torch.randn(n, 4, generator=gen), torch.randn(n, 2, generator=gen)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in net.state_dict().items()}, n, {"loss": float(loss.detach())}

    base = torch.load(io.BytesIO(clients[0].pull_model(model)), weights_only=True)
    for i, client in enumerate(clients):
        def data(i: int = i) -> tuple[dict[str, Any], int, dict[str, float]]:
            state, n, metrics = local_train(i, base, 10 * (i + 1))
            SENT["train"].append({"state": state_info(state), "n": n})
            return state, n, metrics

        step(f"train_{i}", lambda client=client, data=data: client.train(model, data, version="1"))

    federation = step("federation", lambda: federation_for(write_key, api_base))
    first = step("federation_train", lambda: federation.train(model, min_updates=3, base_version="1"))
    new_version = str(first["new_version"]) if first else "2"
    step("pull_aggregated", lambda: pulled(clients[0], new_version))

    opened = step("open_round", lambda: httpx.post(
        f"{api_base}/training/rounds", headers={"Authorization": f"Bearer {write_key}"}, timeout=60,
        json={"model_id": model, "version": new_version, "min_updates": 3, "target_participants": 3,
              "deadline_seconds": 3600}).json())
    round_id = opened.get("round_id", "") if isinstance(opened, dict) else ""
    for i, client in enumerate(clients):
        step(f"get_round_assignment_{i}", client.get_round_assignment)

        def train_fn(state: dict[str, Any], i: int = i) -> tuple[dict[str, Any], int, dict[str, float]]:
            updated, n, metrics = local_train(100 + i, state, 20 + 5 * i)
            SENT["join"].append({"state": state_info(updated), "n": n})
            return updated, n, metrics

        step(f"join_round_{i}", lambda client=client, fn=train_fn: client.join_round(round_id, fn))
    step("get_round_status_before", lambda: clients[0].get_round_status(round_id))
    second = step("federation_train_round", lambda: federation.train(model, min_updates=3,
                                                                       base_version=new_version))
    final_version = str(second["new_version"]) if second else "3"
    step("get_round_status_after", lambda: clients[0].get_round_status(round_id))
    step("pull_final", lambda: pulled(clients[1], final_version))
    step("get_round_assignment_after", clients[0].get_round_assignment)

    control = OctomilControl(_ApiClient(auth_token_provider=lambda: device_key, api_base=api_base), "default")
    step("control_register", lambda: vars(control.register("lab-laptop-0")))
    step("control_heartbeat", lambda: vars(control.heartbeat()))
    step("control_refresh", lambda: vars(control.refresh()))
    octo = OctomilClient(auth=OrgApiKeyAuth(api_key=write_key, org_id="default", api_base=api_base))
    step("octomil_train", lambda: vars(octo.train(model, rounds=2, min_updates=2)))
    step("octomil_train_status", lambda: octo.train_status(model))
    step("octomil_train_stop", lambda: octo.train_stop(model))

    secure = FederatedClient(auth_token_provider=lambda: device_key, api_base=api_base,
                             device_identifier="lab-laptop-0", secure_aggregation=True)
    step("join_round_secure_aggregation", lambda: secure.join_round(round_id, lambda s: (s, 1, {})))
    step("get_personalized_model", clients[0].get_personalized_model)
    print(json.dumps({"steps": STEPS, "trace": TRACE, "sent": SENT}, default=lambda o: o.__json__()))


if __name__ == "__main__":
    main()
