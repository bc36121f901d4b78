# One image for the Ray head, every worker group and the RayJob submitter: cluster/*.yaml name
# it, and nothing is pip-installed when a pod starts.
#
#   make image IMAGE=<your registry>/engram-ray:0.1.0-ray2.60.0   # = docker build -t IMAGE .
#   docker push <your registry>/engram-ray:0.1.0-ray2.60.0
#
# The base's Ray and Python are the ones the project is tested with (.venv: ray 2.60.0 on
# CPython 3.11); tests/test_cluster_manifests.py checks this line, the pins below and the tag
# every manifest names against them. Bump them together.
FROM rayproject/ray:2.60.0-py311-cpu

# The Makefile's pin, installed first so the second install keeps it. The default index's
# Linux wheel carries the CUDA runtime: the same image runs on CPU nodes and, with the node's
# NVIDIA driver, on GPU workers. A CPU-only cluster can pass PyTorch's CPU wheel index as
# TORCH_INDEX_URL for an image a few GB smaller.
ARG TORCH_PIN=torch==2.13.0
ARG TORCH_INDEX_URL=
# The Ray the base image ships: pinned again so `.[cluster]` (ray[default]) can never move it.
ARG RAY_PIN=ray[default]==2.60.0

ENV TOKENIZERS_PARALLELISM=false

# The base image runs as `ray`; the checkout must be theirs (pip builds the project in place).
USER root
RUN mkdir -p /home/ray/engram-ray && chown ray:users /home/ray/engram-ray
USER ray
WORKDIR /home/ray/engram-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users engram_ray ./engram_ray
COPY --chown=ray:users pipelines ./pipelines
# The `ray job submit` entrypoints (RayJob entrypoints name /home/ray/engram-ray/jobs/*.py).
COPY --chown=ray:users jobs ./jobs

RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_PIN" \
    && pip install --no-cache-dir "$TORCH_PIN" "$RAY_PIN" ".[cluster]" \
    && python -c "import engram_ray, ray, torch; assert ray.__version__ == '2.60.0', ray.__version__" \
    && engram-ray --help > /dev/null
