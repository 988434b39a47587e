"""The retraining DAG in the KFP v2 DSL: preprocess -> train -> evaluate, with an exit handler.

:func:`build_pipeline` builds the components for a given image; ``retrain_pipeline`` is
the pipeline with the default :data:`~pipelines.image.COMPONENT_IMAGE`. The evaluate step
publishes the ``MetricsReport``; if any step fails, the exit handler publishes one with
``status: failed`` and the failed step's error, so the gatekeeper always hears of the run.
"""

from typing import Any

from kfp import dsl

from components.evaluate.component import evaluate_model, report_failure
from components.preprocess.component import preprocess_data
from components.train.component import train_model
from pipelines.image import COMPONENT_IMAGE, build_component

__all__ = ["PIPELINE_NAME", "build_pipeline", "retrain_pipeline"]

PIPELINE_NAME = "retrain"


def build_pipeline(
    image: str = COMPONENT_IMAGE,
    preprocess_op: Any = None,
    train_op: Any = None,
) -> Any:
    """The retraining pipeline, its components running in ``image``.

    ``preprocess_op`` and ``train_op`` replace our steps with components loaded from a
    ``component.yaml`` (bring your own); their interfaces are checked before this is called.
    """
    preprocess_op = preprocess_op or build_component(preprocess_data, image)
    train_op = train_op or build_component(train_model, image)
    evaluate_op = build_component(evaluate_model, image)
    exit_op = build_component(report_failure, image)

    def retrain(
        model: str,
        data_uris: list[str],
        request_id: str,
        reason: str,
        run_id: str,
        config_yaml: str,
    ) -> None:
        """Validate and split ``data_uris``, fit ``model``, score it against the champion."""
        run = {
            "config_yaml": config_yaml,
            "model": model,
            "run_id": run_id,
            "request_id": request_id,
            "reason": reason,
            # A scheduled job passes no run id: the steps then use the job's name.
            "job_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        }
        on_exit = exit_op(**run).set_display_name("report-failure")
        with dsl.ExitHandler(on_exit, name="retrain-steps"):
            split = preprocess_op(data_uris=data_uris, **run).set_display_name("preprocess")
            fitted = train_op(
                train_data=split.outputs["train_data"], summary=split.outputs["summary"], **run
            ).set_display_name("train")
            evaluate_op(
                model_artifact=fitted.outputs["model_artifact"],
                eval_data=split.outputs["eval_data"],
                summary=split.outputs["summary"],
                **run,
            ).set_display_name("evaluate")

    return dsl.pipeline(name=PIPELINE_NAME)(retrain)


retrain_pipeline = build_pipeline()
