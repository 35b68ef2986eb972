# GPU image for Ray clusters (head and workers): Ray 2.60 with CUDA, the CUDA build of the pinned
# torch/torchvision, and this project. Build: docker build -t sscl:gpu .
# The ray-ml images are discontinued; the plain Ray GPU image is the base.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# CUDA flavour of the PyTorch wheels (must match the driver on the nodes: cu126, cu128, ...).
ARG TORCH_CUDA=cu128

# The base image's non-root user owns its Python environment; everything runs as that user.
USER ray
WORKDIR /home/ray/sscl

# Dependencies first (cached across source changes). The same requirements.txt CI installs; the
# CUDA torch wheels satisfy its torch==/torchvision== pins (the +cuXXX local version matches).
COPY --chown=ray:users requirements.txt ./
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir -r requirements.txt

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users sscl ./sscl
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users tune_spaces ./tune_spaces
RUN pip install --no-cache-dir --no-deps -e .

# Registered encoders load without unpickling (pt2); keep it that way in serving code too.
ENV MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
