"""`dsv3-export triton`: a build as a Triton Inference Server model repository (docs/triton.md).

`deploy.triton_repo.write_repository` writes the repository (one model per pipeline stage and the
decoupled `dsv3` model that tokenizes, batches, samples and streams), every config.pbtxt checked
against Triton's model-config schema (`deploy.model_config`); `deploy.llm` is the `dsv3` model's
logic without Triton (request fields, stop strings, the stage chain the scheduler steps);
`deploy.triton_models` holds the python-backend model files copied into the repository;
`deploy.tritonserver` finds and runs the real `tritonserver`. Only the CLI imports this package.
"""
