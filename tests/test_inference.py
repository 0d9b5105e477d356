"""SL inference: split predictions equal the unsplit model's; bad requests get clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.inference import InferenceRequestError
from clients.split_client import SplitClusterClient
from gaisnet_flwr.apps.client_app import create_client_app
from gaisnet_flwr.cloud.foundation import Foundation
from gaisnet_flwr.contract import INFERENCE_REQUEST_ERROR, PEER_FAILURE, InferRequest
from tests.conftest import cluster_client

TINY = {
    "depth": 4,
    "embed-dim": 32,
    "num-heads": 2,
    "peers-per-cluster": 2,
    "foundation": "none",
    "num-prompts": 3,
}


pytestmark = pytest.mark.usefixtures("task_identity")


def client(**overrides: object) -> SplitClusterClient:
    return cluster_client({**TINY, **overrides})  # type: ignore[no-any-return]


def fine_tuned(c: SplitClusterClient) -> ArrayRecord:
    """Tunable modules that differ from the initial ones, as after fine-tuning."""
    model = Foundation.of(c.cfg).load(c.data.num_classes)
    torch.manual_seed(1)
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in model.tunable_state().items()}
    return ArrayRecord(state)


def request(
    model: ArrayRecord | None,
    distribution: str = "efficient",
    images: np.ndarray | None = None,
    c: SplitClusterClient | None = None,
) -> RecordDict:
    """A `query.infer` request's content, with the task of the cluster `c` (else the default
    client's) that serves it."""
    content = RecordDict({"config": ConfigRecord({"distribution": distribution})})
    if model is not None:
        content["model"] = model
    if images is not None:
        content["inputs"] = ArrayRecord({"images": Array(images)})
    content["task"] = (c or client()).task.to_record()
    return content


def infer(c: SplitClusterClient, content: RecordDict) -> RecordDict:
    """`c` serves the request as its ClientApp does (`contract.InferRequest`)."""
    message = Message(content, dst_node_id=1, message_type="query.infer")
    return c.infer(InferRequest.from_message(message))


@pytest.mark.parametrize(("peers", "speeds"), [(1, ""), (2, "1,3"), (4, "1,1,1,1")])
def test_split_inference_predictions_equal_the_unsplit_model(peers: int, speeds: str) -> None:
    c = client(**{"peers-per-cluster": peers, "peer-speeds": speeds})
    modules = fine_tuned(c)
    reply = infer(c, request(modules, c=c))
    predictions = reply.array_records["predictions"]["predictions"].numpy()

    whole = Foundation.of(c.cfg).load(c.data.num_classes)
    whole.load_tunable_state(modules.to_torch_state_dict())
    images = torch.stack([c.val_set[i][0] for i in range(len(c.val_set))])
    expected = whole.eval()(images).argmax(1).numpy()
    np.testing.assert_array_equal(predictions, expected)
    metrics = reply.metric_records["metrics"]
    assert metrics["num-samples"] == len(c.val_set)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["latency-s"] > 0 and metrics["energy-j"] > 0 and metrics["d2d-bytes"] > 0


def test_parameter_efficient_and_full_distribution_agree_and_differ_in_bytes() -> None:
    c = client()
    modules = fine_tuned(c)
    model = Foundation.of(c.cfg).load(c.data.num_classes)
    model.load_tunable_state(modules.to_torch_state_dict())
    full = ArrayRecord(model.state_dict())
    efficient_reply = infer(c, request(modules, "efficient", c=c))
    full_reply = infer(c, request(full, "full", c=c))
    np.testing.assert_array_equal(
        efficient_reply.array_records["predictions"]["predictions"].numpy(),
        full_reply.array_records["predictions"]["predictions"].numpy(),
    )
    pe = efficient_reply.metric_records["metrics"]["download-bytes"]
    pf = full_reply.metric_records["metrics"]["download-bytes"]
    assert pe == modules.count_bytes() and pf == full.count_bytes()
    assert pf > 10 * pe


def test_request_images_are_served_and_checked() -> None:
    c = client()
    images = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    reply = infer(c, request(fine_tuned(c), images=images, c=c))
    assert reply.array_records["predictions"]["predictions"].numpy().shape == (5,)
    assert "accuracy" not in reply.metric_records["metrics"]  # no labels came with them
    with pytest.raises(
        InferenceRequestError,
        match=r"shape \[5, 3, 16, 16\]; expected "
        r"\['N', 3, 32, 32\]",
    ):
        infer(c, request(fine_tuned(c), images=images[:, :, :16, :16].copy(), c=c))
    with pytest.raises(InferenceRequestError, match="dtype float64; expected float32"):
        infer(c, request(fine_tuned(c), images=images.astype(np.float64), c=c))


def test_a_node_without_the_model_says_so() -> None:
    c = client()
    with pytest.raises(InferenceRequestError, match="has no model to serve the request"):
        infer(c, request(None, c=c))
    wrong = ArrayRecord({"prompt.0": Array(np.zeros((7, 32), np.float32))})
    with pytest.raises(InferenceRequestError, match="does not fit"):
        infer(c, request(wrong, c=c))
    with pytest.raises(InferenceRequestError, match="distribution 'half' is not valid"):
        infer(c, request(fine_tuned(c), "half", c=c))


def test_client_app_answers_a_bad_request_with_an_error_and_serves_the_next() -> None:
    app = create_client_app({**TINY, "foundation": "none"})
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    c = client()
    bad = Message(request(None, c=c), dst_node_id=1, message_type="query.infer")
    reply = app(bad, context)
    assert reply.has_error() and reply.error.code == INFERENCE_REQUEST_ERROR
    assert "has no model" in reply.error.reason
    good = Message(request(fine_tuned(c), c=c), dst_node_id=1, message_type="query.infer")
    assert not app(good, context).has_error()


def test_a_cluster_whose_peer_is_down_replies_with_an_error_naming_it() -> None:
    # A deployed cluster whose end point does not answer: train and infer both fail cleanly.
    app = create_client_app({**TINY, "foundation": "none", "peers-per-cluster": 1})
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2, "peers": "127.0.0.1:9,127.0.0.1:7",
                     "peer-timeout-s": 2},
        state=RecordDict(),
        run_config={},
    )  # fmt: skip
    c = client(**{"peers-per-cluster": 1})
    modules = fine_tuned(c)
    train = Message(
        RecordDict(
            {
                "arrays": modules,
                "config": ConfigRecord({"server-round": 1}),
                "task": c.task.to_record(),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    reply = app(train, context)
    assert reply.has_error() and reply.error.code == PEER_FAILURE
    # Members open from the end point backwards (each Open carries the next member's token).
    assert "end at 127.0.0.1:7: Open failed: UNAVAILABLE" in reply.error.reason
    served = Message(request(modules, c=c), dst_node_id=1, message_type="query.infer")
    assert app(served, context).error.code == PEER_FAILURE
