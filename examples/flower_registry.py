"""A Flower run recorded in octomil-lite: 3 clients fit a linear model for 3 rounds; every round is a version.

    pip install "octomil-lite[flower]"
    octomil-lite serve &                      # and a write key: octomil-lite keys create --name flower
    python examples/flower_registry.py --url http://127.0.0.1:8080 --api-key oml_...

`--engine simulation` runs a ServerApp and ClientApps on Flower's simulation engine (needs flwr[simulation], i.e.
Ray); the default `--engine in-process` runs Flower's own server loop with the clients called directly (no Ray).
The registry sees only RecordingStrategy's calls either way. Afterwards `octomil-lite rounds MODEL` lists them.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, Metrics, ndarrays_to_parameters
from flwr.server.strategy import FedAvg

from octomil_lite import Client
from octomil_lite.flower import RecordingStrategy, run_in_process

FEATURES = 4
TRUE_W = np.array([1.5, -2.0, 0.5, 3.0])


def partition(cid: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `cid`'s own data: a different amount per client, so FedAvg's weighting matters."""
    rng = np.random.default_rng(cid)
    x = rng.normal(size=(40 * (cid + 1), FEATURES))
    return x, x @ TRUE_W + 0.1 * rng.normal(size=len(x))


class LinearClient(NumPyClient):
    def __init__(self, cid: int):
        self.x, self.y = partition(cid)

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        w = parameters[0].copy()
        for _ in range(int(config.get("local_steps", 20))):
            w -= float(config.get("lr", 0.05)) * 2 * self.x.T @ (self.x @ w - self.y) / len(self.y)
        return [w], len(self.y), {"loss": float(np.mean((self.x @ w - self.y) ** 2))}

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        mse = float(np.mean((self.x @ parameters[0] - self.y) ** 2))
        return mse, len(self.y), {"mse": mse}


def weighted(metrics: list[tuple[int, Metrics]]) -> Metrics:
    total = sum(n for n, _ in metrics)
    return {k: sum(n * float(m[k]) for n, m in metrics) / total for k in metrics[0][1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", default="flower-linear")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--engine", choices=["in-process", "simulation"], default="in-process")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_config = {"lr": 0.05, "local_steps": 20, "num_rounds": args.rounds, "clients": args.clients}

    with Client(args.url, args.api_key) as registry:
        strategy = RecordingStrategy(
            FedAvg(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=args.clients,
                   min_evaluate_clients=args.clients, min_available_clients=args.clients,
                   initial_parameters=ndarrays_to_parameters([np.zeros(FEATURES)]),
                   on_fit_config_fn=lambda _: {"lr": 0.05, "local_steps": 20},
                   fit_metrics_aggregation_fn=weighted, evaluate_metrics_aggregation_fn=weighted),
            registry, args.model, run_config=run_config, tensor_names=["w"])

        if args.engine == "simulation":
            simulate(strategy, args.clients, args.rounds)
        else:
            run_in_process(strategy, [LinearClient(cid).to_client() for cid in range(args.clients)], args.rounds)

        for server_round, number in sorted(strategy.versions.items()):
            version = registry.get_version(strategy.model_id, number)
            [recorded] = [r for r in registry.list_rounds(strategy.model_id) if r["round_id"] == version["round_id"]]
            m = recorded["metrics"]
            print(f"round {server_round}: version {number} ({version['label']}), {recorded['participants']} "
                  f"clients, {m['num_examples']:.0f} examples, fit loss {m['loss']:.4f}, eval mse {m['eval_mse']:.4f}")
        print(f"model {strategy.model_id}: {len(strategy.versions)} versions, run {strategy.run_id}")


def simulate(strategy: RecordingStrategy, clients: int, rounds: int) -> None:
    """Flower's simulation engine: a ServerApp and one ClientApp per supernode (Ray actors)."""
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    def server_fn(context: Context) -> ServerAppComponents:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    def client_fn(context: Context) -> object:
        return LinearClient(int(context.node_config["partition-id"])).to_client()

    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=clients, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


if __name__ == "__main__":
    main()
