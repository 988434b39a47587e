"""The canary's split in process, request ids, and the endpoint resource during a canary:
in-memory registry, constant-probability models (version 1 says 0.2, version 2 says 0.8)."""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

from retrain.gatekeeper.registry import CanaryState, ModelVersion
from retrain.messages import Decision, encode
from serving.app import create_app
from serving.models import ChampionWatcher, ModelLoadError, ModelStore, Serving, share_of
from tests.unit.test_serving import (
    BASE,
    SETTINGS,
    CopyDownloader,
    MemoryRegistry,
    slow_folder,
)

with warnings.catch_warnings():
    # Starlette 1.x asks for httpx2 but works with httpx; the warning is about packaging only.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytestmark = pytest.mark.unit

MODEL = "slow"
PREDICT = f"{BASE}/endpoints/{MODEL}:predict"
PROBABILITY = {"1": 0.2, "2": 0.8}


class CanaryRegistry(MemoryRegistry):
    """A MemoryRegistry whose champion may be a canary, as the gatekeeper records it."""

    def __init__(self) -> None:
        super().__init__()
        self.canaries: dict[str, CanaryState] = {}

    def start_canary(self, model: str, version: str, percent: int) -> None:
        previous = self.champions[model]
        self.champions[model] = version
        self.canaries[model] = CanaryState(version, previous, percent, 0.0, 1)

    def complete(self, model: str) -> None:
        del self.canaries[model]

    def roll_back(self, model: str) -> None:
        self.champions[model] = self.canaries.pop(model).previous

    def canary(self, model: str) -> CanaryState | None:
        found = self.canaries.get(model)
        return found if found and found.version == self.champions.get(model) else None


@pytest.fixture
def registry(tmp_path: Path) -> CanaryRegistry:
    registry = CanaryRegistry()
    for version, probability in PROBABILITY.items():
        folder = slow_folder(tmp_path / f"v{version}", f"canary-unit-{version}", probability)
        registry.add(MODEL, version, folder, champion=version == "1")
    return registry


@pytest.fixture
def downloads() -> CopyDownloader:
    return CopyDownloader()


@pytest.fixture
def store(registry: CanaryRegistry, downloads: CopyDownloader, tmp_path: Path) -> ModelStore:
    return ModelStore([MODEL], registry, downloads, tmp_path / "cache")


def test_the_share_of_a_request_id_is_fixed_and_spread() -> None:
    # The same in every process and run (BLAKE2b, not Python's salted hash): these values.
    assert [share_of(i) for i in ("a", "request-1", "0" * 32)] == [43, 40, 97]
    shares = [share_of(uuid.uuid4().hex) for _ in range(10_000)]
    assert set(shares) == set(range(100))
    below = sum(s < 10 for s in shares)
    # Binomial(10000, 0.1): sd 30; 6 sd either side.
    assert abs(below - 1000) < 180


def test_a_canary_start_keeps_the_old_champion_loaded_and_routes_by_request_id(
    registry: CanaryRegistry, store: ModelStore, downloads: CopyDownloader
) -> None:
    assert store.refresh(MODEL)
    before = store.serving(MODEL)
    assert before is not None
    registry.start_canary(MODEL, "2", 30)
    assert store.refresh(MODEL)
    state = store.serving(MODEL)
    assert state is not None
    assert state.previous is before.champion  # reused, not loaded again
    assert (state.champion.version.version, state.percent, state.split()) == (
        "2",
        30,
        {"2": 30, "1": 70},
    )
    assert len(downloads.calls) == 2
    for _ in range(200):
        rid = uuid.uuid4().hex
        want = "2" if share_of(rid) < 30 else "1"
        assert state.route(rid).version.version == want
        assert state.route(rid) is state.route(rid)
    assert not store.refresh(MODEL), "nothing changed, nothing swapped"
    assert store.versions() == {MODEL: "2"}
    assert store.cached_pinned(MODEL, "1") is state.previous


def test_completing_and_rolling_back_reuse_what_is_loaded(
    registry: CanaryRegistry, store: ModelStore, downloads: CopyDownloader
) -> None:
    store.refresh(MODEL)
    registry.start_canary(MODEL, "2", 50)
    store.refresh(MODEL)
    canary = store.serving(MODEL)
    assert canary is not None
    assert canary.previous is not None

    registry.complete(MODEL)  # the champion stays, the canary ends
    assert store.refresh(MODEL)
    completed = store.serving(MODEL)
    assert completed is not None
    assert (completed.champion, completed.previous, completed.split()) == (
        canary.champion,
        None,
        {"2": 100},
    )

    registry.champions[MODEL] = "1"  # again through a canary, then rolled back
    store.refresh(MODEL)
    registry.start_canary(MODEL, "2", 10)
    store.refresh(MODEL)
    again = store.serving(MODEL)
    assert again is not None
    registry.roll_back(MODEL)
    assert store.refresh(MODEL)
    rolled = store.serving(MODEL)
    assert rolled is not None
    assert (rolled.champion, rolled.previous, rolled.split()) == (again.previous, None, {"1": 100})
    assert len(downloads.calls) == 2, "a version was downloaded twice"


def test_a_canary_whose_previous_version_is_missing_leaves_what_serves(
    registry: CanaryRegistry, store: ModelStore
) -> None:
    store.refresh(MODEL)
    registry.champions[MODEL] = "2"
    registry.canaries[MODEL] = CanaryState("2", "9", 10, 0.0, 1)
    with pytest.raises(ModelLoadError, match="names version 9 as the previous champion"):
        store.refresh(MODEL)
    assert store.versions() == {MODEL: "1"}


def test_a_pointer_read_between_two_moves_is_read_again(
    registry: CanaryRegistry, store: ModelStore
) -> None:
    """The champion and the canary are two reads: a canary of another generation than the
    champion read is not taken as that champion's; the pointer is read again."""
    registry.start_canary(MODEL, "2", 40)
    registry.canaries[MODEL] = CanaryState("2", "1", 40, 0.0, generation=2)
    record = registry.versions[(MODEL, "2")]
    reads: list[int] = []

    def champion(model: str) -> ModelVersion:
        reads.append(1)
        generation = 1 if len(reads) == 1 else 2  # read before the pointer moved, then after
        return ModelVersion(model, "2", record.artifact_uri, {}, "run", generation)

    registry.champion = champion  # type: ignore[method-assign]
    assert store.refresh(MODEL)
    assert len(reads) == 2
    state = store.serving(MODEL)
    assert state is not None
    assert state.split() == {"2": 40, "1": 60}


@pytest.mark.parametrize(
    ("verdict", "stage"), [("canary", "gate"), ("promoted", "canary"), ("rolled_back", "canary")]
)
def test_every_decision_refreshes_its_model(
    registry: CanaryRegistry, store: ModelStore, verdict: str, stage: str
) -> None:
    store.refresh(MODEL)
    registry.start_canary(MODEL, "2", 25)
    watcher = ChampionWatcher(store, "p", None, poll_seconds=None)
    acked: list[bool] = []
    decision = Decision.model_validate(
        {"model": MODEL, "run_id": "r", "verdict": verdict, "reasons": ["x"], "stage": stage}
    )
    watcher.on_message(SimpleNamespace(data=encode(decision), ack=lambda: acked.append(True)))
    state = store.serving(MODEL)
    assert state is not None
    assert state.split() == {"2": 25, "1": 75}
    assert acked == [True]


def _post(client: TestClient, path: str = PREDICT, **headers: str) -> Any:
    return client.post(path, json={"instances": [[1.0, 2.0]]}, headers=headers)


def test_request_ids_are_kept_or_made_and_returned_on_every_predict_response(
    store: ModelStore,
) -> None:
    with TestClient(create_app(SETTINGS, store)) as client:
        given = _post(client, **{"X-Request-Id": "client-id-1"})
        assert given.status_code == 200
        assert given.headers["x-request-id"] == "client-id-1"
        made = _post(client)
        assert len(made.headers["x-request-id"]) == 32
        assert int(made.headers["x-request-id"], 16) >= 0
        assert _post(client).headers["x-request-id"] != made.headers["x-request-id"]
        # The body keeps Vertex AI's shape: nothing added.
        assert set(given.json()) == {"predictions", "deployedModelId", "model", "modelVersionId"}
        pinned = _post(client, f"{BASE}/models/{MODEL}@2:predict", **{"X-Request-Id": "p"})
        assert (pinned.json()["modelVersionId"], pinned.headers["x-request-id"]) == ("2", "p")
        for path in (f"{BASE}/models/{MODEL}@7:predict", f"{BASE}/endpoints/nope:predict"):
            missing = _post(client, path, **{"X-Request-Id": "e"})
            assert (missing.status_code, missing.headers["x-request-id"]) == (404, "e")
        bad_body = client.post(PREDICT, json={"instances": []}, headers={"X-Request-Id": "b"})
        assert (bad_body.status_code, bad_body.headers["x-request-id"]) == (400, "b")
        assert _post(client, **{"X-Request-Id": "x" * 128}).status_code == 200


@pytest.mark.parametrize("bad", ["x" * 129, "", "tab\there", "caf\xe9"])
def test_a_bad_request_id_is_400_naming_the_header(store: ModelStore, bad: str) -> None:
    with TestClient(create_app(SETTINGS, store)) as client:
        response = client.post(
            PREDICT,
            json={"instances": [[1.0, 2.0]]},
            headers=[(b"X-Request-Id", bad.encode("latin-1"))],
        )
    assert response.status_code == 400
    assert "X-Request-Id must be 1 to 128 printable ASCII characters" in response.text


def test_the_endpoint_resource_shows_both_versions_and_the_split_during_a_canary(
    registry: CanaryRegistry, store: ModelStore
) -> None:
    with TestClient(create_app(SETTINGS, store)) as client:
        registry.start_canary(MODEL, "2", 20)
        store.refresh(MODEL)
        resource = client.get(f"{BASE}/endpoints/{MODEL}").json()
        ids = {"2": [], "1": []}  # type: dict[str, list[str]]
        for i in range(100):
            answer = _post(client, **{"X-Request-Id": f"req-{i}"}).json()
            ids[answer["modelVersionId"]].append(f"req-{i}")
            assert answer["predictions"][0]["probability"] == PROBABILITY[answer["deployedModelId"]]
    assert [m["id"] for m in resource["deployedModels"]] == ["2", "1"]
    assert resource["trafficSplit"] == {"2": 20, "1": 80}
    assert all(share_of(rid) < 20 for rid in ids["2"])
    assert all(share_of(rid) >= 20 for rid in ids["1"])


def test_serving_without_a_canary_routes_everything_to_the_champion(
    registry: CanaryRegistry, store: ModelStore
) -> None:
    store.refresh(MODEL)
    state = store.serving(MODEL)
    assert state is not None
    assert isinstance(state, Serving)
    assert {state.route(uuid.uuid4().hex).version.version for _ in range(50)} == {"1"}
    assert state.split() == {"1": 100}
