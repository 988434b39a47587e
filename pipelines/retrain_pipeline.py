"""The retraining DAG in the KFP v2 DSL: preprocess -> train -> evaluate.

:func:`build_pipeline` builds the components for a given image; ``retrain_pipeline`` is
the pipeline with the default :data:`~pipelines.image.COMPONENT_IMAGE`. ``request_id`` and
``reason`` are not used by any task: they are recorded with the run's parameters, so a run
can be traced back to the request that started it.
"""

from typing import Any

from kfp import dsl
from kfp.dsl import Artifact

from components.evaluate.component import evaluate_model
from components.preprocess.component import preprocess_data
from components.train.component import train_model
from pipelines.image import COMPONENT_IMAGE, build_component

__all__ = ["PIPELINE_NAME", "build_pipeline", "retrain_pipeline"]

PIPELINE_NAME = "retrain"


def build_pipeline(image: str = COMPONENT_IMAGE) -> Any:
    """The retraining pipeline, its three components running in ``image``."""
    preprocess_op = build_component(preprocess_data, image)
    train_op = build_component(train_model, image)
    evaluate_op = build_component(evaluate_model, image)

    def retrain(
        model: str,
        data_uris: list[str],
        request_id: str,
        reason: str,
        config_yaml: str,
    ) -> Artifact:
        """Validate and split ``data_uris``, fit ``model``, and score it; returns the report."""
        split = preprocess_op(config_yaml=config_yaml, model=model, data_uris=data_uris)
        fitted = train_op(
            config_yaml=config_yaml,
            model=model,
            train_data=split.outputs["train_data"],
            summary=split.outputs["summary"],
        )
        scored = evaluate_op(
            model_artifact=fitted.outputs["model_artifact"],
            eval_data=split.outputs["eval_data"],
        )
        return scored.outputs["report"]

    return dsl.pipeline(name=PIPELINE_NAME)(retrain)


retrain_pipeline = build_pipeline()
