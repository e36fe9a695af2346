"""Federated averaging on scikit-learn's digits, with every round's global model kept in an octomil-lite registry.

Several simulated clients each train an SGDClassifier on their own slice of the data; after every round
their weights are averaged (FedAvg) and the global model is uploaded as a new version, tagged with its
round, accuracy and loss. The best round is then fetched back as ONNX and checked with onnxruntime.

    octomil-lite serve &                     # prints an admin key on first start
    export OCTOMIL_API_KEY=oml_...
    python examples/federated_digits.py --rounds 5 --clients 4
"""

from __future__ import annotations

import argparse
import copy
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split

from octomil_lite import Client, OctomilLiteError

CLASSES = np.arange(10)
LOCAL_EPOCHS = 3


def local_update(model: SGDClassifier, x: np.ndarray, y: np.ndarray) -> SGDClassifier:
    """One client's round: a few passes over its own data, starting from the global model."""
    local = copy.deepcopy(model)
    for _ in range(LOCAL_EPOCHS):
        local.partial_fit(x, y, classes=CLASSES)
    return local


def fed_avg(global_model: SGDClassifier, updates: list[SGDClassifier], sizes: list[int]) -> SGDClassifier:
    """The size-weighted average of the clients' coefficients and intercepts."""
    weights = np.asarray(sizes, dtype=float) / sum(sizes)
    merged = copy.deepcopy(global_model)
    merged.coef_ = sum(w * m.coef_ for w, m in zip(weights, updates, strict=True))
    merged.intercept_ = sum(w * m.intercept_ for w, m in zip(weights, updates, strict=True))
    return merged


def evaluate(model: SGDClassifier, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy and log loss on held-out data."""
    return float(accuracy_score(y, model.predict(x))), float(log_loss(y, model.predict_proba(x), labels=CLASSES))


def upload(client: Client, model_id: str, estimator: SGDClassifier, workdir: Path, name: str,
           **fields: Any) -> dict[str, Any]:
    """Pickle an estimator and upload it as the model's next version."""
    path = workdir / f"{name}.pkl"
    path.write_bytes(pickle.dumps(estimator))
    return client.upload_version(model_id, path, format="sklearn", **fields)


def run(client: Client, rounds: int, clients: int, workdir: Path, onnx_timeout: float) -> dict[str, Any]:
    """Train, register every round, then verify the best round's ONNX against scikit-learn; returns a summary."""
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    # A small central set trains the starting point; the rest is split among the clients.
    x_central, x_fed, y_central, y_fed = train_test_split(x_train, y_train, train_size=0.1, stratify=y_train,
                                                          random_state=0)
    parts = list(zip(np.array_split(x_fed, clients), np.array_split(y_fed, clients), strict=True))

    start = SGDClassifier(loss="log_loss", alpha=1e-4, learning_rate="adaptive", eta0=0.1, random_state=0)
    for _ in range(5):
        start.partial_fit(x_central, y_central, classes=CLASSES)
    accuracy, loss = evaluate(start, x_test, y_test)
    baseline = client.create_model(framework="sklearn", framework_version=sklearn.__version__, is_baseline=True,
                                   description="Digits: centrally trained starting point for federated training",
                                   accuracy=accuracy, loss=loss, round_id="central")
    upload(client, baseline["id"], start, workdir, "baseline", description="Central training on 10% of the data",
           round_id="central", accuracy=accuracy, loss=loss)
    print(f"baseline {baseline['id']}: accuracy {accuracy:.3f}, loss {loss:.3f}")

    federated = client.create_model(framework="sklearn", framework_version=sklearn.__version__,
                                    description=f"Digits: FedAvg over {clients} clients")
    print(f"federated model {federated['id']}: one version per round")
    global_model = start
    history = []
    for round_no in range(1, rounds + 1):
        updates = [local_update(global_model, xp, yp) for xp, yp in parts]
        global_model = fed_avg(global_model, updates, [len(yp) for _, yp in parts])
        accuracy, loss = evaluate(global_model, x_test, y_test)
        version = upload(client, federated["id"], global_model, workdir, f"round-{round_no}",
                         description=f"After round {round_no} aggregation", round_id=f"round-{round_no}",
                         accuracy=accuracy, loss=loss)
        history.append({"round": round_no, "version": version["version"], "accuracy": accuracy, "loss": loss,
                        "estimator": global_model})
        print(f"round {round_no}: accuracy {accuracy:.3f}, loss {loss:.3f} -> version {version['version']}")

    best = max(history, key=lambda h: (h["accuracy"], -h["loss"]))
    client.wait_for_format(federated["id"], best["version"], "onnx", timeout=onnx_timeout)
    onnx_path = client.download_version(federated["id"], best["version"], workdir, format="onnx")
    agreement = onnx_agreement(onnx_path, best["estimator"], x_test)
    print(f"best: round {best['round']} (version {best['version']} of {federated['id']}), {onnx_path.name} agrees "
          f"with scikit-learn on {agreement:.1%} of {len(x_test)} test digits")
    return {"baseline_id": baseline["id"], "federated_id": federated["id"], "best_round": best["round"],
            "best_version": best["version"], "rounds": [{k: v for k, v in h.items() if k != "estimator"}
                                                        for h in history], "onnx_agreement": agreement}


def onnx_agreement(onnx_path: Path, estimator: SGDClassifier, x: np.ndarray) -> float:
    """The share of samples on which the ONNX model (run by onnxruntime) predicts the estimator's label."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    labels = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return float(np.mean(np.asarray(labels).ravel() == estimator.predict(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="registry URL [default: $OCTOMIL_LITE_URL or http://127.0.0.1:8080]")
    parser.add_argument("--api-key", default=None, help="API key [default: $OCTOMIL_API_KEY]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--onnx-timeout", type=float, default=120, help="seconds to wait for the ONNX conversion")
    args = parser.parse_args()
    try:
        with Client(args.url, args.api_key) as client, tempfile.TemporaryDirectory() as tmp:
            summary = run(client, args.rounds, args.clients, Path(tmp), args.onnx_timeout)
    except OctomilLiteError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    if summary["onnx_agreement"] < 0.99:
        raise SystemExit(f"the ONNX model disagrees with scikit-learn on {1 - summary['onnx_agreement']:.1%} of digits")


if __name__ == "__main__":
    main()
