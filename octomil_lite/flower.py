"""Record a Flower (flwr 1.x) run in octomil-lite: one version per round, with its metrics and the run's config.

`RecordingStrategy` wraps any Flower Strategy (FedAvg, FedProx, FedMedian, ...) through Flower's public Strategy
interface and changes nothing it decides: after each round's aggregate_fit it opens a round in the registry
(source "flower", the run's config), uploads the aggregated parameters as an .npz version, and records the round's
fit metrics and participants; aggregate_evaluate and evaluate add their loss and metrics to the same round.
Install with `pip install "octomil-lite[flower]"`.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.common import Parameters, Scalar, parameters_to_ndarrays
from flwr.server.strategy import Strategy

from .convert.tensors import save_npz

if TYPE_CHECKING:
    from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy

    from .client import Client


def _numbers(metrics: dict[str, Scalar], prefix: str = "") -> dict[str, float]:
    """The numeric metrics (the registry keeps numbers; Flower also allows str and bytes)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


class RecordingStrategy(Strategy):
    """A Flower Strategy that delegates every decision to `strategy` and records each round in the registry."""

    def __init__(self, strategy: Strategy, client: Client, model: str, run_config: dict[str, Scalar] | None = None,
                 tensor_names: list[str] | None = None):
        self.strategy = strategy
        self.client = client
        self.run_id = uuid.uuid4().hex[:8]
        self.run_config = dict(run_config or {})
        self.tensor_names = tensor_names
        found = [m for m in client.list_models() if model in (m["id"], m["name"])]
        self.model_id = found[0]["id"] if found else client.create_model(
            name=model, description="Parameters of a Flower run, one version per round")["id"]
        self.rounds: dict[int, str] = {}  # server round -> registry round id
        self.versions: dict[int, int] = {}  # server round -> registry version number

    def __repr__(self) -> str:
        return f"RecordingStrategy({self.strategy!r}, model={self.model_id})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self._record(server_round, parameters, metrics, results, len(failures))
        return parameters, metrics

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
                           ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = self.strategy.aggregate_evaluate(server_round, results, failures)
        self._add_metrics(server_round, loss, metrics, "eval_")
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        result = self.strategy.evaluate(server_round, parameters)
        if result is not None:
            self._add_metrics(server_round, result[0], result[1], "central_")
        return result

    def _record(self, server_round: int, parameters: Parameters, metrics: dict[str, Scalar],
                results: list[tuple[ClientProxy, FitRes]], failures: int) -> None:
        arrays = parameters_to_ndarrays(parameters)
        names = self.tensor_names or [f"arr_{i}" for i in range(len(arrays))]
        if len(names) != len(arrays):
            raise ValueError(f"tensor_names has {len(names)} names for {len(arrays)} parameter arrays")
        config = {**self.run_config, "flower_run": self.run_id, "server_round": server_round,
                  "strategy": type(self.strategy).__name__}
        base = self.versions.get(server_round - 1)
        opened = self.client.open_round(self.model_id, base, source="flower", config=config)
        self.rounds[server_round] = opened["round_id"]
        fit = {**_numbers(metrics), "num_clients": float(len(results)), "num_failures": float(failures),
               "num_examples": float(sum(res.num_examples for _, res in results))}
        with tempfile.TemporaryDirectory(prefix="octomil-flower-") as tmp:
            path = Path(tmp) / f"flower-{self.run_id}-round-{server_round}.npz"
            save_npz(path, dict(zip(names, arrays)))
            uploaded = self.client.upload_version(
                self.model_id, path, format="numpy", version=f"flower-{self.run_id}-r{server_round}",
                round_id=opened["round_id"], accuracy=fit.get("accuracy"), loss=fit.get("loss"),
                description=f"Flower run {self.run_id}, round {server_round}: {type(self.strategy).__name__} "
                            f"of {len(results)} clients")
        self.versions[server_round] = uploaded["version"]
        participants = [{"client": proxy.cid, "num_examples": res.num_examples, "metrics": _numbers(res.metrics)}
                        for proxy, res in results]
        self.client.record_round_result(opened["round_id"], uploaded["version"], fit, participants)

    def _add_metrics(self, server_round: int, loss: float | None, metrics: dict[str, Any], prefix: str) -> None:
        round_id = self.rounds.get(server_round)
        found = _numbers(metrics, prefix) | ({f"{prefix}loss": float(loss)} if loss is not None else {})
        if round_id is not None and found:
            self.client.update_round_metrics(round_id, found)


def run_in_process(strategy: Strategy, clients: list[Any], num_rounds: int) -> Any:
    """Flower's own server loop (flwr.server.Server.fit) with `clients` (flwr Clients) called in this process.

    For machines without Ray (flwr[simulation]): every round, every Flower call and the strategy are Flower's;
    only the transport is a direct call. Returns Flower's History."""
    from flwr.common import DisconnectRes
    from flwr.server import Server, SimpleClientManager
    from flwr.server.client_proxy import ClientProxy

    class InProcessProxy(ClientProxy):
        def __init__(self, cid: str, client: Any):
            super().__init__(cid)
            self.client = client

        def get_properties(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            return self.client.get_properties(ins)

        def get_parameters(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            return self.client.get_parameters(ins)

        def fit(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            return self.client.fit(ins)

        def evaluate(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            return self.client.evaluate(ins)

        def reconnect(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
            return DisconnectRes(reason="")

    manager = SimpleClientManager()
    for cid, client in enumerate(clients):
        manager.register(InProcessProxy(str(cid), client))
    history, _ = Server(client_manager=manager, strategy=strategy).fit(num_rounds=num_rounds, timeout=None)
    return history
